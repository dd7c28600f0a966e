"""Torch half of ``benchmarks/peers.py``: one method's training step, timed.

Each method is ``losia_cli.torch_backend.TorchBackend`` (losia and losia-pro via
``losia_torch``, full = ``torch.optim.AdamW``, lora = PEFT). ``peers.py`` runs
every (method, round) in a fresh child process (``--isolation process``), in
alternating method order, so that

- the peak memory of one method is not the leftover of another: on CPU it is
  the process's peak resident set (``VmHWM``) during the training steps, reset
  after the model and optimizer are built (``/proc/self/clear_refs``, Linux);
  where that reset is refused it is ``ru_maxrss`` over the whole process, load
  included (``rss_reset: false``). On CUDA it is ``torch.cuda.max_memory_allocated``
  over the steps;
- the allocator starts clean for every method.

The command line is that protocol: ``peers_torch.py JOB.json OUT.json``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from losia_cli.backend import ModelSource  # noqa: E402
from losia_cli.torch_backend import TorchBackend, _tensor_bytes  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers_common import make_batch, settings_for  # noqa: E402


def _status_kib(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS mark of this process (Linux >= 4.0)."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def state_bytes(backend: TorchBackend) -> int:
  if backend.losia_opt is not None:
    return int(backend.losia_opt.state_nbytes())
  return int(_tensor_bytes(list(backend.optimizer.state.values())))


def run_one(job: dict, spec: dict, warmup: int, steps: int, log=print) -> dict:
  """Builds one method's backend and times ``steps`` training steps after ``warmup``."""
  device = job.get("torch_device") or ("cuda" if torch.cuda.is_available() else "cpu")
  cuda = device.startswith("cuda")
  batch = make_batch(job)
  t0 = time.perf_counter()
  b = TorchBackend(ModelSource("hf", job["model_dir"], job["workload"]),
                   settings_for(spec, job), device=device)
  if cuda and job.get("dtype") == "bf16":
    # Untested here (no GPU): the weights in bf16, optimizer moments as the optimizer made them.
    b.model.to(torch.bfloat16)
  load_s = time.perf_counter() - t0
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  rss_before = _status_kib("VmRSS")
  reset = reset_peak_rss()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  first_step_s = 0.0
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    out = b.train_step(batch)
    sync()
    dt = time.perf_counter() - t0
    if not np.isfinite(out["loss"]):
      raise FloatingPointError(f"non-finite loss {out['loss']}")
    if i >= warmup:
      times.append(dt)
    elif i == 0:
      first_step_s = dt
  row = {"method": spec["method"], "load_s": load_s, "trainable_params": int(b.trainable_params()),
         "opt_state_bytes": state_bytes(b), "times_s": times, "first_step_s": first_step_s,
         "device": str(b.device)}
  if cuda:
    row["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    row["peak_kind"] = "cuda max_memory_allocated"
  else:
    hwm = _status_kib("VmHWM") if reset else None
    if hwm is None:
      hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    row["peak_bytes"] = int(hwm) * 1024
    row["rss_before_bytes"] = int(rss_before or 0) * 1024
    row["rss_reset"] = bool(reset)
    row["peak_kind"] = "peak RSS over the steps" if reset else "ru_maxrss (load included)"
  if b.losia_opt is not None:
    row["plan_block_params"] = int(b.losia_opt.plan.trainable_block_params)
    # async profiling buffers (two fp32 per entry of the profiling layer's matrices)
    row["importance_bytes"] = int(sum(2 * 4 * s.ibar.numel()
                                      for s in b.losia_opt._importance.values()))
  log(f"  torch {spec['name']}: median {1e3 * float(np.median(times)) if times else 0:.0f} ms")
  return row


def main(argv: Optional[list[str]] = None) -> None:
  job_path, out_path = (argv or sys.argv[1:])[:2]
  with open(job_path, encoding="utf-8") as f:
    job = json.load(f)
  if job.get("torch_threads"):
    torch.set_num_threads(int(job["torch_threads"]))
  row = run_one(job, job["spec"], job["spec_warmup"], job["spec_steps"],
                log=lambda m: print(m, flush=True))
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(row, f)


if __name__ == "__main__":
  main()
