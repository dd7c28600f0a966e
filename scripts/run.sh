#!/usr/bin/env bash
# The main job: LoSiA fine-tuning of the embedded SmolLM2-135M-Instruct on the
# embedded arithmetic task (JAX backend), with accuracy before and after, a
# progress bar, metrics, pictures, checkpoints and a transformers export in
# ./losia-run. Flags are passed to losia-finetune (try --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/losia-finetune" "$@"
