#!/usr/bin/env bash
# One command for a CUDA machine (torch, jax[cuda], flax, optax, orbax, transformers and peft
# preinstalled; no network): installs this project over that stack without dependencies, then
# runs benchmarks/gpu.py (device correctness checks, then the LLaMA-2-7B-shaped bf16 benchmark)
# under a hard deadline of GPU_DEADLINE_S seconds (default 420) counted from here, the install
# included. Arguments go to gpu.py. Results: benchmarks/gpu_results.json and the GPU section of
# benchmarks/RESULTS.md (or --json/--md); where $OUT is set (the device tool), both are also
# copied there, with the log, whatever happens.
#
#   bash benchmarks/gpu.sh                 # the full run
#   bash benchmarks/gpu.sh --layers 16     # fewer decoder layers
set -u
START=$(date +%s)
DEADLINE_S=${GPU_DEADLINE_S:-420}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1
LOG=${OUT:+$OUT/gpu.log}
LOG=${LOG:-/dev/null}
copy_out() {
  if [ -n "${OUT:-}" ]; then
    cp -f benchmarks/gpu_results.json benchmarks/RESULTS.md "$OUT"/ 2>/dev/null
  fi
}
trap copy_out EXIT
{
  echo "gpu.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), deadline ${DEADLINE_S} s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  # --no-build-isolation and --no-index: no network; the preinstalled setuptools builds it.
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      >/tmp/gpu-sh-pip.log 2>&1; then
    tail -5 /tmp/gpu-sh-pip.log
    echo "gpu.sh: pip install failed; running from the checkout (PYTHONPATH)"
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export GPU_SH_COMMAND="bash benchmarks/gpu.sh${*:+ $*}"
  LEFT=$(( START + DEADLINE_S - $(date +%s) ))
  # gpu.py keeps to the deadline itself; this is the backstop.
  timeout -k 5 $(( LEFT + 10 )) "$PY" benchmarks/gpu.py --start-epoch "$START" \
      --deadline-s "$DEADLINE_S" "$@"
  RC=$?
  echo "gpu.sh: exit status $RC, $(( $(date +%s) - START )) s"
  exit $RC
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
