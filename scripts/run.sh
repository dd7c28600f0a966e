#!/usr/bin/env bash
# The main job. For now: a small LoSiA fine-tuning run in JAX that prints the
# loss, the subnet relocalizations and the optimizer-state memory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/python" examples/quickstart_jax.py "$@"
