"""One method's whole CLI training step in one backend: median time and page faults per step.

The step is ``Backend.train_step`` of ``losia_cli`` (forward, backward,
optimizer; it returns host floats, so it has finished), on the SmolLM2-135M
shape of ``peers.py`` (30 layers, 4 x 256 tokens, fp32, random weights written
locally) or on ``--7b-layers`` LLaMA-2-7B-shaped layers (1 x 256). Minor page
faults are counted with ``getrusage`` over the timed steps: on CPU, XLA
allocates its large temporaries anew in every step, and glibc serves each one
with a fresh ``mmap`` that the kernel faults in page by page; an allocator that
keeps freed memory (e.g. mimalloc, ``pip install cmeel-mimalloc``) avoids that.
Compare the two side by side, one process each (mimalloc from the registry's
``cmeel-mimalloc``, installed into the venv)::

    .venv/bin/python benchmarks/cli_step.py --backend jax --method losia-pro
    .venv/bin/pip install --no-deps cmeel-mimalloc
    LD_PRELOAD=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/cmeel.prefix/lib/libmimalloc.so \
        .venv/bin/python benchmarks/cli_step.py --backend jax --method losia-pro

For one core: ``taskset -c 1`` with ``OMP_NUM_THREADS=1`` and
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--backend", choices=("jax", "torch"), default="jax")
  ap.add_argument("--method", default="losia-pro",
                  choices=("full", "lora", "losia", "losia-pro"))
  ap.add_argument("--output-rank-factor", type=float, default=0.0)
  ap.add_argument("--7b-layers", dest="layers_7b", type=int, default=0,
                  help="LLaMA-2-7B-shaped layers instead of the SmolLM2 shape")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (the smoke test)")
  ap.add_argument("--model-dir", default=None, help="keep the generated model here")
  args = ap.parse_args(argv)

  import tempfile
  import peers
  import peers_7b
  from peers_common import make_batch, settings_for

  if args.layers_7b:
    w = peers_7b.workload(args.layers_7b, 256 if not args.tiny else 8, 1, args.tiny)
  else:
    ns = argparse.Namespace(tiny=args.tiny, layers=30, seq=8 if args.tiny else None,
                            batch=None, seq7b=None, batch7b=None)
    w = peers.workloads(ns)[0]
  spec = dict(name=args.method, method=args.method, non_target="freeze",
              output_rank_factor=args.output_rank_factor, backends=None, lora_rank=16)
  with tempfile.TemporaryDirectory() as tmp:
    path = peers.write_model(w, args.model_dir or tmp)
    job = {"workload": w["name"], "model_dir": path, "seq": w["seq"], "batch": w["batch"],
           "vocab": w["config"]["vocab_size"], "methods": [spec], "steps": args.steps,
           "rounds": 1, "warmup": args.warmup, "period": 10_000, "resident": True,
           "dtype": "fp32", "torch_threads": None}
    batch = make_batch(job)
    if args.backend == "jax":
      import peers_jax
      b = peers_jax.build(spec, job)
      peers_jax.compile_ahead(b, batch)
    else:
      from losia_cli.backend import ModelSource
      from losia_cli.torch_backend import TorchBackend
      b = TorchBackend(ModelSource("hf", path, w["name"]), settings_for(spec, job), device="cpu")
    for _ in range(args.warmup):
      b.train_step(batch)
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
      t0 = time.perf_counter()
      b.train_step(batch)
      times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) // args.steps
  out = dict(backend=args.backend, method=args.method, workload=w["name"],
             median_s=float(np.median(times)), min_s=float(min(times)), faults_per_step=faults,
             ld_preload=os.environ.get("LD_PRELOAD", ""))
  print(f"{args.backend} {args.method} on {w['name']}: median {out['median_s']:.3f} s, "
        f"min {out['min_s']:.3f} s, {faults:,} minor page faults per step"
        + (f", LD_PRELOAD={out['ld_preload']}" if out["ld_preload"] else ""))
  return out


if __name__ == "__main__":
  main()
