"""The two halves of ``benchmarks/gpu.py``: a torch worker and a JAX worker.

``gpu.py`` runs each in a child process (``gpu.py --worker torch|jax JOB.json OUT.json``)
with a hard timeout; a worker rewrites ``OUT.json`` after every check and every
method, so what it measured survives a kill at the deadline. Each worker:

1. correctness on the device (``job["device"]``: ``gpu``, or ``cpu`` standing in
   for it in the dry run): torch reuses ``torch_gpu_check.py`` (CPU vs device with
   replayed and with own gradients, LoSiA-Pro == plain); JAX runs the CLI backend's
   fused LoSiA step (``JaxBackend``, clipping on) on the CPU and on the device from
   the same weights and batches, and LoSiA-Pro against plain LoSiA on the device;
2. the benchmark: ``losia_cli`` backends (as ``peers.py`` times them, through
   ``peers_torch.run_one`` and ``peers_jax.build/compile_ahead``) on a random-weight
   model built in memory in bf16 on the device (the loaders are swapped for one that
   builds it; nothing is written to disk), one method after another, each skipped
   when the time left is shorter than the longest method so far took.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from losia_cli.backend import Batch, ModelSource, TrainSettings  # noqa: E402

CHECK_STEPS_DRY = 5  # dry run: fewer steps than 2 * T * total + 1
TOL = 1e-4


class Recorder:
  """The worker's result document, rewritten atomically after every change."""

  def __init__(self, path: str, backend: str):
    self.path = path
    self.doc: dict[str, Any] = {"backend": backend, "checks": [], "bench": None,
                                "in_progress": None, "error": None}

  def save(self) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.doc, f, indent=1)
    os.replace(tmp, self.path)


def _short(e: BaseException, n: int = 400) -> str:
  s = f"{type(e).__name__}: {e}".strip()
  return s if len(s) <= n else s[:n] + " ..."


def run_check(rec: Recorder, name: str, fn: Callable[[], str]) -> None:
  """Runs one check; records PASS with its summary or FAIL with the assertion."""
  rec.doc["in_progress"] = f"check: {name}"
  rec.save()
  t0 = time.perf_counter()
  buf = io.StringIO()
  try:
    with contextlib.redirect_stdout(buf):
      detail = fn() or ""
    ok = True
  except Exception as e:  # pylint: disable=broad-except
    ok, detail = False, _short(e, 1200)
    traceback.print_exc()
  printed = [ln.strip() for ln in buf.getvalue().splitlines() if ln.strip()]
  detail = detail or " / ".join(printed)
  print(f"  {'PASS' if ok else 'FAIL'} {rec.doc['backend']}: {name}: {detail}", flush=True)
  rec.doc["checks"].append({"name": name, "passed": ok, "detail": detail,
                            "seconds": round(time.perf_counter() - t0, 2)})
  rec.doc["in_progress"] = None
  rec.save()


def is_oom(e: BaseException) -> bool:
  s = f"{type(e).__name__} {e}"
  return any(k in s for k in ("OutOfMemoryError", "RESOURCE_EXHAUSTED", "out of memory",
                              "Out of memory", "does not fit"))


def bench_loop(rec: Recorder, job: dict, run_method: Callable[[dict, dict], dict]) -> None:
  """Runs ``job["methods"]`` in order at ``job["batch"]``; halves the batch (down to 1) and
  starts again when the first method does not fit; skips a method when the time left
  is shorter than the longest one took."""
  batch = job["batch"]
  bench = rec.doc["bench"] = {"batch": batch, "seq": job["seq"],
                              "layers": job["config"]["num_hidden_layers"], "rows": {},
                              "skipped": {}, "batch_attempts": []}
  longest = 0.0
  for k, spec in enumerate(job["methods"]):
    left = job["deadline"] - time.time()
    if k >= 2 and left < longest:  # the LoRA baseline and LoSiA-Pro always start
      bench["skipped"][spec["name"]] = (f"deadline: {left:.0f} s left, the longest method "
                                        f"so far took {longest:.0f} s")
      print(f"  skip {spec['name']}: {bench['skipped'][spec['name']]}", flush=True)
      rec.save()
      continue
    while True:
      rec.doc["in_progress"] = f"{spec['name']} (batch {batch})"
      rec.save()
      t0 = time.perf_counter()
      try:
        row = run_method(spec, {**job, "batch": batch})
      except Exception as e:  # pylint: disable=broad-except
        if not is_oom(e):
          traceback.print_exc()
        row = {"method": spec["method"], "error": ("out of memory: " if is_oom(e) else "")
               + _short(e), "oom": is_oom(e), "times_s": []}
      gc.collect()
      row["wall_s"] = time.perf_counter() - t0
      if k == 0 and row.get("oom") and batch > 1:  # the baseline must fit: a smaller batch
        bench["batch_attempts"].append({"batch": batch, "error": row["error"]})
        batch //= 2
        bench["batch"] = batch
        print(f"  {spec['name']} does not fit; batch {batch}", flush=True)
        continue
      break
    longest = max(longest, row["wall_s"])
    bench["rows"][spec["name"]] = row
    rec.doc["in_progress"] = None
    rec.save()
    status = row.get("error") or f"median {1e3 * float(np.median(row['times_s'])):.1f} ms"
    print(f"  {rec.doc['backend']} {spec['name']}: {status}", flush=True)


# --- torch --------------------------------------------------------------------------------

def torch_worker(job: dict, rec: Recorder) -> None:
  import torch
  dev = "cuda" if job["device"] == "gpu" else "cpu"
  if dev == "cuda" and not torch.cuda.is_available():
    rec.doc["error"] = "no CUDA device visible to torch"
    return
  rec.doc["device"] = (f"{torch.cuda.get_device_name()} "
                       f"({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
                       if dev == "cuda" else "cpu")
  rec.doc["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
  rec.save()
  if job["checks"]:
    import torch_gpu_check as tgc
    if dev == "cuda":
      torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity with the CPU
      torch.backends.cudnn.allow_tf32 = False
    run_check(rec, "LoSiA on CPU vs device (replayed CPU gradients)",
              lambda: tgc.check_cpu_vs_device(dev, replay=True))
    run_check(rec, "LoSiA on CPU vs device (own forward/backward)",
              lambda: tgc.check_cpu_vs_device(dev, replay=False))
    run_check(rec, "LoSiA-Pro == plain LoSiA on the device (clip 0.5)",
              lambda: tgc.check_pro(dev))
  if not job["bench"]:
    return
  import transformers
  import losia_cli.torch_backend as tb
  import peers_torch
  cfg = transformers.LlamaConfig(**job["config"])

  def random_model(source):  # replaces tb.load_model: random weights, bf16, on the device
    del source
    with torch.device(dev):
      return transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16,
                                                        attn_implementation="sdpa")
  tb.load_model = random_model

  def run_method(spec, j):
    pjob = {"workload": "llama2-7b-shape", "model_dir": "(random, in memory)", "seq": j["seq"],
            "batch": j["batch"], "vocab": j["config"]["vocab_size"], "period": j["period"],
            "dtype": "bf16", "torch_device": dev}
    try:
      return peers_torch.run_one(pjob, spec, j["warmup"], j["steps"], log=lambda m: None)
    finally:
      gc.collect()
      if dev == "cuda":
        torch.cuda.empty_cache()
  bench_loop(rec, job, run_method)


# --- JAX ------------------------------------------------------------------------------------

def _jax_source(hf_cfg, dtype):
  """Swaps the JAX backend's loader for one that builds a random model in ``dtype``."""
  from flax import nnx
  import losia_cli.jax_backend as jb
  from losia_jax.models import LlamaForCausalLM

  def load(path):
    del path
    return LlamaForCausalLM(hf_cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype), hf_cfg
  jb.load_hf = load
  return ModelSource("hf", "(random, in memory)", "random")


def _max_diff(p0, p1) -> float:
  import jax
  return max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
             for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))


def _same_subnets(a, b) -> bool:
  sa, sb = a.subnets(), b.subnets()
  return sa.keys() == sb.keys() and all(
      np.array_equal(sa[k][0], sb[k][0]) and np.array_equal(sa[k][1], sb[k][1]) for k in sa)


def _check_settings(method: str, clip: float, steps: int):
  import torch_gpu_check as tgc
  return TrainSettings(method=method, losia=tgc.CHECK_CFG, lr=1e-2, lr_schedule="constant",
                       warmup_steps=0, total_steps=max(steps, 1), weight_decay=0.01,
                       max_grad_norm=clip, lora_rank=8, lora_alpha=16.0, seed=0,
                       seq_len=16, batch_size=2)


def _check_batches(n: int, vocab: int) -> list[Batch]:
  import torch_gpu_check as tgc  # the torch check's seeded batches
  return [Batch(ids.numpy().astype(np.int32), np.ones(ids.shape, np.int32),
                np.ones(ids.shape, np.float32)) for ids in tgc.batches(n, vocab)]


def _trio_run(runs, batches) -> dict[str, Any]:
  """Steps three backends over the same batches: ``(name, backend, device)`` for plain
  LoSiA on the CPU, plain LoSiA on the device and LoSiA-Pro on the device. Each pair
  (``cpu``: CPU vs device, ``pro``: Pro vs plain) must keep identical subnets and weights
  within TOL; returns per pair its summary or the AssertionError of its first miss."""
  import jax
  (_, a, cpu), (_, b, dev), (_, p, _) = runs
  pairs = {"cpu": (a, b, "dev"), "pro": (b, p, "pro")}
  worst, dloss = {"cpu": 0.0, "pro": 0.0}, {"cpu": 0.0, "pro": 0.0}
  out: dict[str, Any] = {}
  moves, prev = 0, a.subnets()
  for k, batch in enumerate(batches):
    losses = {}
    for name, backend, device in runs:
      with jax.default_device(device):
        losses[name] = backend.train_step(batch)["loss"]
    for key, (x, y, ny) in pairs.items():
      if key in out:
        continue
      what = ("JAX fused LoSiA step, CPU vs " + dev.platform if key == "cpu"
              else "JAX LoSiA-Pro vs plain on " + dev.platform)
      dloss[key] = max(dloss[key], abs(losses["cpu" if key == "cpu" else "dev"] - losses[ny]))
      worst[key] = max(worst[key], _max_diff(x.params, y.params))
      if not _same_subnets(x, y):
        out[key] = AssertionError(f"{what}: subnets differ after step {k}")
      elif worst[key] > TOL:
        out[key] = AssertionError(f"{what}: weights differ by {worst[key]:.3g} > {TOL} after "
                                  f"step {k}")
    now = a.subnets()
    moves += any(not np.array_equal(now[i][j], prev[i][j]) for i in now for j in (0, 1))
    prev = now
  for key in pairs:
    if key not in out:
      out[key] = (AssertionError("the subnets never moved") if not moves else
                  f"{len(batches)} steps, identical subnets (changed at {moves} steps), max "
                  f"weight diff {worst[key]:.2g}, max loss diff {dloss[key]:.2g}")
  return out


def jax_checks(rec: Recorder, job: dict, dev) -> None:
  """Plain LoSiA on the CPU and on the device and LoSiA-Pro on the device, from the same weights, over the same batches, clip 0.5."""
  import jax
  import transformers
  import torch_gpu_check as tgc
  from losia_cli.jax_backend import JaxBackend
  cpu = jax.devices("cpu")[0]
  tiny = {**tgc.TINY, "num_hidden_layers": 1} if job["dry_run"] else tgc.TINY  # compiles faster
  hf_cfg = transformers.LlamaConfig(**tiny)
  total = tiny["num_hidden_layers"] + 1  # the tied output layer is a target (row mode)
  steps = CHECK_STEPS_DRY if job["dry_run"] else 2 * tgc.CHECK_CFG.period * total + 1
  batches = _check_batches(steps, tiny["vocab_size"])
  src = _jax_source(hf_cfg, jax.numpy.float32)
  out: dict[str, Any] = {}

  def run_all():
    with jax.default_matmul_precision("highest"):
      with jax.default_device(cpu):
        a = JaxBackend(src, _check_settings("losia", 0.5, steps))
      weights = jax.tree.map(np.asarray, a.params)
      with jax.default_device(dev):
        b = JaxBackend(src, _check_settings("losia", 0.5, steps))
        p = JaxBackend(src, _check_settings("losia-pro", 0.5, steps))
        # the same weights, placed as the backends place theirs (committed arrays would
        # make the step compile again once its outputs come back)
        b.params = jax.tree.map(jax.numpy.asarray, weights)
        p.params = jax.tree.map(jax.numpy.asarray, weights)
      if dev.platform == "cpu":  # the dry run: one compiled step serves both
        b._step_fn = a._step_fn  # pylint: disable=protected-access
      out.update(_trio_run([("cpu", a, cpu), ("dev", b, dev), ("pro", p, dev)], batches))

  def result(key):
    def get():
      got = out.get(key, out.get("error"))
      if isinstance(got, BaseException):
        raise got
      return got
    return get

  rec.doc["in_progress"] = "JAX checks"
  rec.save()
  t0 = time.perf_counter()
  try:
    run_all()
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    out["error"] = e
  print(f"  JAX checks: {time.perf_counter() - t0:.1f} s", flush=True)
  run_check(rec, "fused LoSiA step on CPU vs device (clip 0.5, fp32 'highest')", result("cpu"))
  run_check(rec, "LoSiA-Pro == plain LoSiA on the device (clip 0.5)", result("pro"))


def choose_layers(probes: dict[int, float], left: float, max_layers: int,
                  methods: int = 3, run_s_per_layer: float = 0.5) -> int:
  """The most decoder layers (<= ``max_layers``) for which ``methods`` compilations and
  runs fit in ``left`` seconds, from the compile seconds ``probes`` of LoSiA-Pro (the
  slowest to compile) at two small layer counts, extrapolated linearly."""
  (l0, t0), (l1, t1) = sorted(probes.items())[:2]
  slope = max((t1 - t0) / (l1 - l0), t1 / l1 / 4)  # a noisy difference is not trusted below
  fits = [n for n in range(1, max_layers + 1)
          if methods * (t0 + slope * (n - l0) + run_s_per_layer * n) <= left]
  return max(fits, default=1)


def probe_jax_layers(job: dict, run_method, rec: Recorder) -> int:
  """Compiles LoSiA-Pro at 2 and 4 layers and picks the layer count the deadline allows
  (``job["layers_auto"]``); the probes are recorded in the result."""
  spec = next(s for s in job["methods"] if s["name"] == "losia-pro")
  probes = {}
  for n in (2, 4):
    rec.doc["in_progress"] = f"compile-time probe, {n} layers"
    rec.save()
    row = run_method(spec, {**job, "config": {**job["config"], "num_hidden_layers": n},
                            "compile_only": True})
    probes[n] = row["compile_s"]
  left = job["deadline"] - time.time() - 10.0
  layers = choose_layers(probes, left, job["config"]["num_hidden_layers"])
  rec.doc["layer_probe"] = {"compile_s": probes, "left_s": left, "layers": layers}
  print(f"  JAX compile-time probe {probes}: {layers} layers for {left:.0f} s", flush=True)
  rec.save()
  return layers


def jax_worker(job: dict, rec: Recorder) -> None:
  import jax
  import jax.numpy as jnp
  devs = [d for d in jax.devices() if d.platform != "cpu"] if job["device"] == "gpu" \
      else jax.devices("cpu")
  if not devs:
    rec.doc["error"] = f"no GPU visible to JAX (devices: {jax.devices()})"
    return
  dev = devs[0]
  rec.doc["device"] = f"{dev.device_kind} ({dev.platform})"
  rec.doc["versions"] = {"jax": jax.__version__}
  stats = dev.memory_stats() or {}
  limit = stats.get("bytes_limit")
  rec.doc["bytes_limit"] = limit
  rec.save()
  if job["checks"]:
    jax_checks(rec, job, dev)
  if not job["bench"]:
    return
  import transformers
  import peers_jax

  def run_method(spec, j):
    _jax_source(transformers.LlamaConfig(**j["config"]), jnp.bfloat16)
    pjob = {"workload": "llama2-7b-shape", "model_dir": "(random, in memory)", "seq": j["seq"],
            "batch": j["batch"], "vocab": j["config"]["vocab_size"], "period": j["period"]}
    batch = peers_jax.make_batch(pjob)
    with jax.default_device(dev):
      t0 = time.perf_counter()
      b = peers_jax.build(spec, pjob)
      if b.lora is not None:  # adapters in the compute dtype, as the torch rows run them
        b.lora = jax.tree.map(lambda x: x.astype(jnp.bfloat16), b.lora)
        b.opt_state = b.tx.init(b.lora)
      row = {"method": spec["method"], "load_s": time.perf_counter() - t0,
             "trainable_params": peers_jax.trainable(b),
             "opt_state_bytes": int(peers_jax.losia_jax.state_nbytes(b.opt_state)),
             "times_s": []}
      row.update(peers_jax.compile_ahead(b, batch))
      if j.get("compile_only"):
        del b
        return row
      if limit and row.get("peak_bytes", 0) > limit:
        raise MemoryError(f"does not fit: XLA needs {row['peak_bytes'] / 2**30:.1f} GiB, "
                          f"the device has {limit / 2**30:.1f} GiB")
      t0 = time.perf_counter()
      b.train_step(batch)
      row["first_step_s"] = time.perf_counter() - t0
      for _ in range(j["warmup"]):
        b.train_step(batch)
      row["times_s"] = peers_jax._timed(b, batch, j["steps"])  # pylint: disable=protected-access
      if b.settings.method in ("losia", "losia-pro"):
        row["plan_block_params"] = int(b.plan.trainable_block_params)
    del b
    jax.clear_caches()
    row["device_peak_bytes_so_far"] = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    return row
  if job.get("layers_auto"):
    try:
      job = {**job, "config": {**job["config"],
                               "num_hidden_layers": probe_jax_layers(job, run_method, rec)}}
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      rec.doc["layer_probe"] = {"error": _short(e)}
  bench_loop(rec, job, run_method)


def main(argv: list[str]) -> int:
  backend, job_path, out_path = argv[:3]
  with open(job_path, encoding="utf-8") as f:
    job = json.load(f)
  rec = Recorder(out_path, backend)
  rec.save()
  try:
    (torch_worker if backend == "torch" else jax_worker)(job, rec)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    rec.doc["error"] = _short(e, 1200)
  rec.doc["done"] = True
  rec.save()
  return 0
