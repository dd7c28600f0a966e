"""LoSiA-Pro against LoRA on one GPU, in the paper's setting, within a hard deadline.

    bash benchmarks/gpu.sh                    # on a CUDA machine: install, check, benchmark
    python benchmarks/gpu.py --dry-run --md /tmp/RESULTS.md --json /tmp/gpu.json   # CPU, seconds
    python benchmarks/gpu.py --render gpu.json --md benchmarks/RESULTS.md           # section only

Within ``--deadline-s`` (default 420 s, counted from ``--start-epoch``: ``gpu.sh``
passes its own start, so the install counts), in two child processes run one
after the other (torch, then JAX, so they never share the GPU), each with a hard
timeout and each rewriting its result file as it goes:

1. correctness on the device (see ``gpu_workers.py``): torch CPU vs CUDA (replayed
   and own gradients) and Pro == plain (``torch_gpu_check.py``); JAX's fused LoSiA
   step on the GPU vs the CPU and Pro == plain;
2. a LLaMA-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads, vocab 32000,
   untied; ``--layers``, default 32; JAX, whose unrolled layers compile for tens of
   seconds each, takes as many of them as its time left allows, from LoSiA-Pro's compile
   time at 2 and 4 layers, unless ``--jax-layers``) with random weights in bf16, batch ``--batch`` x
   ``--seq`` (4 x 2048; halved while the first method does not fit; no activation
   checkpointing): step time and peak memory of PEFT/JAX LoRA r = 8 and at the rank
   matched to LoSiA's trainable count, LoSiA, LoSiA-Pro (rank factor 1/8, output layer
   frozen, so the timed steps are a decoder layer's profiling slot, as in 32 of the 33
   slots of the paper's setting with output rows 1/8), full fine-tuning, and
   LoSiA-Pro with output rows 1/8 (its timed steps are the output layer's slot). MFU
   is counted on the FLOPs each method needs (``step_flops``) against the GPU's dense
   bf16 peak.

After every child the JSON (``--json``) and the generated section of the markdown
(``--md``, between the markers below; the rest of the file is left as it is) are
rewritten, so a run cut short still leaves what it measured. ``--dry-run``: tiny
shapes, a few steps, the CPU standing in for the GPU; it writes markdown only where
``--md`` points.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import md_sections  # noqa: E402
import peers  # noqa: E402  (the shapes, LoSiA's block count, the matched LoRA rank)
from losia_common.subnet import block_size  # noqa: E402

BEGIN, END = peers.GPU_BEGIN, peers.GPU_END
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                 tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10000.0,
                 rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, tie_word_embeddings=False,
            max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, by the datasheets
TARGETS = (  # key, text, threshold, "<=" or ">="
    ("pro_vs_best_lora", "LoSiA-Pro step / best LoRA step", 0.70, "<="),
    ("peak_pro_vs_lora", "LoSiA-Pro peak memory / lowest LoRA peak", 1.0, "<="),
    ("pro_mfu", "LoSiA-Pro MFU (on the FLOPs it needs)", 0.35, ">="),
)
OUT_ROWS = 0.125  # output rows 1/8 (the paper's Pro script)


def method_specs(c: dict) -> list[dict]:
  """The rows, in the order they run (the essential pair first)."""
  r = peers.matched_lora_rank(c, 0.0)
  losia = dict(non_target="freeze", output_rank_factor=0.0, backends=None)
  specs = [dict(name="lora r=8", method="lora", lora_rank=8, backends=None, matched=r == 8),
           dict(name="losia-pro", method="losia-pro", **losia)]
  if r != 8:
    specs.append(dict(name=f"lora r={r} (matched)", method="lora", lora_rank=r, backends=None,
                      matched=True))
  return specs + [dict(name="losia", method="losia", **losia),
                  dict(name="full", method="full", backends=None),
                  dict(name="losia-pro (+ output rows 1/8, output slot)", method="losia-pro",
                       **{**losia, "output_rank_factor": OUT_ROWS})]


def step_flops(c: dict, batch: int, seq: int, spec: dict) -> float:
  """Matmul FLOPs one training step of the method needs.

  Forward and activation gradients for every method (causal attention: half of
  ``QK^T`` and ``PV``; backward attention twice the forward); weight gradients: full:
  every matrix; LoRA: the adapters (3 x their forward); LoSiA and LoSiA-Pro: the core
  blocks (``2 N k_in k_out`` each), the output rows if a target, and the full
  gradients of the layer whose profiling slot the step is in (decoder layer 0 when
  the output layer is frozen, else the output layer). Plain LoSiA needs the same
  FLOPs as Pro (it computes more: every full weight gradient)."""
  n, layers, h, v = batch * seq, c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]
  shapes = peers.target_shapes(c)
  p = sum(di * do for di, do in shapes)
  attn = 2 * batch * seq * seq * h
  head = 2 * n * h * v
  fwd = layers * (2 * n * p + attn) + head
  dx = layers * (2 * n * p + 2 * attn) + head
  m = spec["method"]
  if m == "full":
    dw = layers * 2 * n * p + head
  elif m == "lora":
    dw = 3 * layers * 2 * n * spec["lora_rank"] * sum(di + do for di, do in shapes)
  else:
    f = spec.get("output_rank_factor") or 0.0
    k = peers.LOSIA_FACTOR
    dw = layers * sum(2 * n * block_size(k, di) * block_size(k, do) for di, do in shapes)
    dw += (2 * n * h * block_size(f, v) + head) if f else 2 * n * p
  return float(fwd + dx + dw)


# --- running the workers ---------------------------------------------------------------

def run_worker(backend: str, job: dict, timeout: float, tmp: str) -> dict:
  job_path, out_path = os.path.join(tmp, f"{backend}.job.json"), os.path.join(tmp, f"{backend}.json")
  with open(job_path, "w", encoding="utf-8") as f:
    json.dump(job, f)
  env = dict(os.environ)
  if job["device"] == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    # tiny programs whose speed means nothing here: compile them fast
    env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                   "--xla_llvm_disable_expensive_passes=true")
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  print(f"== {backend} (hard timeout {timeout:.0f} s)", flush=True)
  status = "finished"
  try:
    rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", backend,
                         job_path, out_path], env=env, timeout=max(1.0, timeout)).returncode
    if rc:
      status = f"exit status {rc}"
  except subprocess.TimeoutExpired:
    status = f"killed at its {timeout:.0f} s timeout"
  try:
    with open(out_path, encoding="utf-8") as f:
      res = json.load(f)
  except (OSError, ValueError):
    res = {"backend": backend, "checks": [], "bench": None, "error": "no result file"}
  res["status"] = status
  return res


def derive(res: dict, c: dict, specs: list[dict], peak_tflops: Optional[float]) -> None:
  """Medians, ratios, FLOPs, MFU and the targets of one backend's result."""
  bench = res.get("bench")
  if not bench:
    return
  by = {s["name"]: s for s in specs}
  rows = bench["rows"]
  for name, r in rows.items():
    t = sorted(r.get("times_s") or [])
    if t:
      r["median_s"] = t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2
      r["tflop"] = step_flops(c, bench["batch"], bench["seq"], by[name]) / 1e12
      r["mfu"] = r["tflop"] / r["median_s"] / peak_tflops if peak_tflops else None
  timed = {n: r for n, r in rows.items() if "median_s" in r}
  loras = [n for n in timed if rows[n]["method"] == "lora"]
  best = min(loras, key=lambda n: timed[n]["median_s"]) if loras else None
  low = min((n for n in loras if rows[n].get("peak_bytes")), key=lambda n: rows[n]["peak_bytes"],
            default=None)
  full = timed.get("full", {}).get("median_s")
  for r in timed.values():
    r["ratio_best_lora"] = r["median_s"] / timed[best]["median_s"] if best else None
    r["ratio_full"] = r["median_s"] / full if full else None
  pro = timed.get("losia-pro", {})
  vals = {"pro_vs_best_lora": pro.get("ratio_best_lora"),
          "peak_pro_vs_lora": (pro["peak_bytes"] / rows[low]["peak_bytes"]
                               if low and pro.get("peak_bytes") else None),
          "pro_mfu": pro.get("mfu")}
  bench.update(best_lora=best, lowest_peak_lora=low)
  res["targets"] = {k: {"text": text, "threshold": thr, "op": op, "value": vals[k],
                        "met": None if vals[k] is None else
                        bool(vals[k] <= thr if op == "<=" else vals[k] >= thr)}
                    for k, text, thr, op in TARGETS}


# --- markdown ---------------------------------------------------------------------------

def _f(v, fmt: str) -> str:
  return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _gib(n) -> str:
  return _f(None if n is None else n / 2**30, ",.2f")


def section(doc: dict) -> str:
  a, m = doc["args"], doc["machine"]
  out = [BEGIN, "", "## GPU: LLaMA-2-7B shape in bf16, LoSiA-Pro against LoRA (generated)", "",
         "Generated by `benchmarks/gpu.py`; do not edit by hand (rerun, or `gpu.py --render "
         "JSON`).", ""]
  if doc.get("partial"):
    out += [f"**Partial: {doc['partial']}.**", ""]
  out += [f"- command: `{doc['command']}`",
          f"- machine: {m.get('gpu') or 'no GPU'}; host {m['cpu']}, {m['cores']} cores",
          "- libraries: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
          f"- date: {m['date']}; deadline {a['deadline_s']:.0f} s"
          + (f", used {doc['elapsed_s']:.0f} s" if doc.get("elapsed_s") else ""),
          f"- peak for MFU: {_f(doc.get('peak_tflops'), ',.0f') or 'unknown'} TFLOP/s dense bf16"
          f" ({doc.get('peak_source', '')})", ""]
  out += ["### Correctness on the device", "", "| backend | check | result | detail |",
          "|---|---|---|---|"]
  for b, res in doc["results"].items():
    for ch in res.get("checks", []):
      out.append(f"| {b} | {ch['name']} | {'PASS' if ch['passed'] else '**FAIL**'} | "
                 f"{ch['detail'].replace('|', '/')} |")
    if res.get("error") or res.get("status") != "finished":
      out.append(f"| {b} | (worker) | {res.get('status')} | {res.get('error') or ''} |")
  c = doc["config"]
  out += ["", "### Training step", "",
          f"Model: hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
          f"{c['num_attention_heads']} heads, vocab {c['vocab_size']}, untied, random weights, "
          "bf16 weights and activations, no activation checkpointing. torch: transformers "
          "`LlamaForCausalLM` (SDPA attention), PEFT LoRA (adapters cast to bf16), "
          "`torch.optim.AdamW` (bf16 moments) for full; JAX: the Flax NNX LLaMA of "
          "`losia_jax.models` (attention written out: fp32 scores), LoRA through its linear "
          "hook, optax AdamW. LoSiA: rank factor 1/8, non-targets frozen, fp32 block moments, "
          f"no clipping, period {a['period']} (no relocalization in the timed steps). Median of "
          f"{a['steps']} steps after {a['warmup']} warm-up steps (JAX: after ahead-of-time "
          "compilation). Peak: torch `max_memory_allocated`, JAX XLA's `memory_analysis` "
          "(arguments + outputs - aliases + temporaries); both include the weights. TFLOP: "
          "the matmul FLOPs the method needs (`gpu.py step_flops`); MFU = TFLOP / step / peak. "
          "Rows: `losia-pro` and `losia` leave the output layer frozen, so the timed steps are "
          "decoder layer 0's profiling slot (its full weight gradients are computed), as in 32 "
          "of the 33 slots of the paper's setting (output rows 1/8); `+ output rows 1/8, output "
          "slot` is that setting in the output layer's own slot (1 of 33). By these counts "
          "LoSiA-Pro needs about the FLOPs of LoRA (neither computes the frozen weights' "
          "gradients), so its step / LoRA step is LoRA's MFU / Pro's MFU.", ""]
  for b, res in doc["results"].items():
    bench = res.get("bench")
    if not bench:
      continue
    att = "".join(f" (batch {x['batch']} did not fit: {x['error'][:120]})"
                  for x in bench.get("batch_attempts", []))
    probe = res.get("layer_probe") or {}
    if probe.get("layers"):
      att += (f"; layers chosen for the time left ({probe['left_s']:.0f} s) from LoSiA-Pro's "
              "compile time at " + ", ".join(f"{k} layers {v:.1f} s"
                                             for k, v in probe["compile_s"].items()))
    elif probe.get("error"):
      att += f"; layer probe failed: {probe['error'][:120]}"
    out += [f"**{b}**: {bench['layers']} layers, batch {bench['batch']} x {bench['seq']}{att}",
            "", "| method | trainable | peak GiB | median ms | / best LoRA | / full | TFLOP "
            "needed | MFU | XLA TFLOP | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in bench["rows"].items():
      if r.get("error"):
        out.append(f"| {name} | {_f(r.get('trainable_params'), ',')} | | {r['error'][:160]} "
                   "| | | | | | |")
        continue
      out.append(
          f"| {name} | {_f(r.get('trainable_params'), ',')} | {_gib(r.get('peak_bytes'))} | "
          f"{_f(1e3 * r['median_s'] if 'median_s' in r else None, ',.1f')} | "
          f"{_f(r.get('ratio_best_lora'), '.3f')} | {_f(r.get('ratio_full'), '.3f')} | "
          f"{_f(r.get('tflop'), ',.1f')} | {_f(None if r.get('mfu') is None else 100 * r['mfu'], '.1f')}"
          f"{'%' if r.get('mfu') is not None else ''} | "
          f"{_f(r['gflops'] / 1e3 if 'gflops' in r else None, ',.1f')} | "
          f"{_f(r.get('compile_s'), '.1f')} |")
    for name, why in bench.get("skipped", {}).items():
      out.append(f"| {name} | | | skipped: {why} | | | | | | |")
    out.append("")
  names = [n for res in doc["results"].values() if res.get("bench")
           for n in res["bench"]["rows"]]
  names = list(dict.fromkeys(names))
  backs = [b for b, res in doc["results"].items() if res.get("bench")]
  if backs:
    out += ["Side by side (step / best LoRA step; peak GiB):", "",
            "| method | " + " | ".join(f"{b} / best LoRA | {b} peak GiB" for b in backs) + " |",
            "|---|" + "---|---|" * len(backs)]
    for n in names:
      cells = []
      for b in backs:
        r = doc["results"][b]["bench"]["rows"].get(n, {})
        cells += [_f(r.get("ratio_best_lora"), ".3f"), _gib(r.get("peak_bytes"))]
      out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ["", "### Targets", "", "| backend | target | value | threshold | |", "|---|---|---|---|---|"]
    for b in backs:
      for t in doc["results"][b].get("targets", {}).values():
        met = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        out.append(f"| {b} | {t['text']} | {_f(t['value'], '.3f')} | {t['op']} {t['threshold']} "
                   f"| {met} |")
  out += ["", END]
  return "\n".join(out) + "\n"


def insert_section(path: str, text: str) -> None:
  """Replaces this script's marked section of ``path`` (appends it if absent)."""
  md_sections.replace_section(path, text, BEGIN, END)


# --- main -------------------------------------------------------------------------------

def machine(results: dict) -> dict:
  versions = {"python": platform.python_version()}
  for pkg in ("torch", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax",
              "optax", "orbax-checkpoint", "transformers", "peft"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      pass
  cuda = (results.get("torch", {}).get("versions") or {}).get("cuda")
  if cuda:
    versions["CUDA (torch)"] = cuda
  gpu = None
  try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    gpu = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    gpu = gpu and f"{gpu.split(',')[0]} ({', '.join(x.strip() for x in gpu.split(',')[1:])})"
  except (OSError, subprocess.SubprocessError, IndexError):
    pass
  gpu = gpu or next((r["device"] for r in results.values() if r.get("device")), None)
  m = peers.machine()
  return {"gpu": gpu, "cpu": m["cpu"], "cores": m["cores"], "versions": versions,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def finish(doc: dict, args) -> None:
  c = doc["config"]
  specs = method_specs(c)
  gpu = doc["machine"].get("gpu") or ""
  peak, src = args.peak_tflops, "--peak-tflops"
  if peak is None:
    peak, src = next(((v, f"datasheet, {k}") for k, v in PEAK_TFLOPS.items() if k in gpu),
                     (None, "unknown GPU: pass --peak-tflops"))
  doc["peak_tflops"], doc["peak_source"] = peak, src
  for res in doc["results"].values():
    derive(res, c, specs, peak)
  if no_device(doc["results"]):
    return
  text = json.dumps(doc, indent=1)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      f.write(text)
  if args.md and not no_device(doc["results"]):
    insert_section(args.md, section(doc))


def no_device(results: dict) -> bool:
  """Every worker found no device (a GPU run on a machine without one)."""
  return bool(results) and all((r.get("error") or "").startswith("no ") and not r.get("checks")
                               for r in results.values())


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, seconds")
  ap.add_argument("--backends", default="torch,jax")
  ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
  ap.add_argument("--jax-layers", default="auto",
                  help="JAX decoder layers: 'auto' (default: as many as the time left allows, "
                  "from LoSiA-Pro's compile time at 2 and 4 layers; at most --layers) or 'same'")
  ap.add_argument("--batch", type=int, default=None, help="default 4 (dry run 1)")
  ap.add_argument("--seq", type=int, default=None, help="default 2048 (dry run 16)")
  ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5, dry run 2)")
  ap.add_argument("--warmup", type=int, default=None, help="default 2 (dry run 1)")
  ap.add_argument("--period", type=int, default=10_000)
  ap.add_argument("--deadline-s", type=float, default=420.0)
  ap.add_argument("--start-epoch", type=float, default=None, help="the deadline's start")
  ap.add_argument("--torch-share", type=float, default=0.35,
                  help="share of the time left that the torch worker may use (JAX gets the rest)")
  ap.add_argument("--methods", default=None,
                  help="comma-separated row names to run (default: all, in their order)")
  ap.add_argument("--no-checks", dest="checks", action="store_false")
  ap.add_argument("--no-bench", dest="bench", action="store_false")
  ap.add_argument("--peak-tflops", type=float, default=None)
  ap.add_argument("--json", default=None, help="the result JSON (default: none in a dry run, "
                  "else benchmarks/gpu_results.json)")
  ap.add_argument("--md", default=None, help="markdown to put the section in (default: none in "
                  "a dry run, else benchmarks/RESULTS.md)")
  ap.add_argument("--render", metavar="JSON", default=None, help="only write --md from JSON")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  raw = sys.argv[1:] if argv is None else argv
  if raw[:1] == ["--worker"]:
    import gpu_workers
    return gpu_workers.main(raw[1:])
  args = parse_args(raw)
  if args.render:
    with open(args.render, encoding="utf-8") as f:
      doc = json.load(f)
    args.json = None
    if doc["args"].get("dry_run") and not args.md:
      print("a dry run's JSON: pass --md (the committed RESULTS.md holds GPU runs only)")
      return 2
    args.md = args.md or RESULTS_MD
    finish(doc, args)
    return 0
  start = args.start_epoch or time.time()
  deadline = start + args.deadline_s
  dry = args.dry_run
  if not dry:
    args.json = args.json or os.path.join(HERE, "gpu_results.json")
    args.md = args.md or RESULTS_MD
  c = dict(TINY if dry else LLAMA2_7B)
  c["num_hidden_layers"] = args.layers or c["num_hidden_layers"]
  job = {"device": "cpu" if dry else "gpu", "dry_run": dry, "config": c,
         "batch": args.batch or (1 if dry else 4), "seq": args.seq or (16 if dry else 2048),
         "steps": args.steps or (2 if dry else 5), "warmup": args.warmup or (1 if dry else 2),
         "period": args.period, "checks": args.checks, "bench": args.bench,
         "methods": [s for s in method_specs(c) if not args.methods
                     or s["name"] in args.methods.split(",")]}
  doc: dict[str, Any] = {
      "command": " ".join(["benchmarks/gpu.py"] + [shlex.quote(x) for x in raw]),
      "args": {**vars(args), "deadline_s": args.deadline_s, "steps": job["steps"],
               "warmup": job["warmup"]},
      "config": c, "results": {}, "partial": None}
  if os.environ.get("GPU_SH_COMMAND"):
    doc["command"] = os.environ["GPU_SH_COMMAND"]
  backends = [b for b in args.backends.split(",") if b]
  with tempfile.TemporaryDirectory() as tmp:
    for k, b in enumerate(backends):
      left = deadline - time.time() - 5.0  # time to write the results
      share = args.torch_share if b == "torch" and k < len(backends) - 1 else 1.0
      timeout = left * share
      doc["partial"] = f"{b} running; {', '.join(backends[k + 1:]) or 'nothing'} still to run"
      if timeout < 10:
        doc["results"][b] = {"backend": b, "checks": [], "bench": None,
                             "status": "not started: no time left"}
        continue
      auto = b == "jax" and not dry and args.jax_layers == "auto" and any(
          s["name"] == "losia-pro" for s in job["methods"])
      cfg = c
      if b == "jax" and args.jax_layers not in ("auto", "same"):
        cfg = {**c, "num_hidden_layers": int(args.jax_layers)}
      res = run_worker(b, {**job, "config": cfg, "deadline": time.time() + timeout - 3.0,
                           "layers_auto": auto}, timeout, tmp)
      doc["results"][b] = res
      doc["machine"] = machine(doc["results"])
      doc["partial"] = (f"{', '.join(backends[k + 1:])} still to run" if k < len(backends) - 1
                        else None)
      cut = [f"{b}: {r['status']}" + (f" during {r['in_progress']}" if r.get("in_progress")
                                       else "") for b, r in doc["results"].items()
             if r.get("status") != "finished"]
      if cut and not doc["partial"]:
        doc["partial"] = "; ".join(cut)
      doc["elapsed_s"] = time.time() - start
      finish(doc, args)
  failed = [f"{b}: {ch['name']}" for b, r in doc["results"].items()
            for ch in r.get("checks", []) if not ch["passed"]]
  print(section(doc))
  if failed:
    print("FAILED checks: " + "; ".join(failed))
  if no_device(doc["results"]):
    print("no GPU found: nothing written to the markdown")
    return 2
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
