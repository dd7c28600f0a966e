"""LoSiA and LoSiA-Pro against full fine-tuning, LoRA and GaLore: one training step.

Side by side, per backend (JAX: ``losia_cli.jax_backend``; torch:
``losia_cli.torch_backend``) and workload, the time of a whole training step
(forward, backward, optimizer; ``Backend.train_step``), trainable parameters,
optimizer-state bytes and peak memory of

- ``full``: AdamW on every parameter;
- ``lora``: LoRA on LoSiA's target projections, at the rank whose trainable
  parameter count matches LoSiA's (computed from the plan) and at r = 8, 16;
- ``losia`` / ``losia-pro``: rank factor 1/8 on the targets, non-targets
  frozen; ``losia (non_target=train)`` is built for its optimizer state only.
  On the SmolLM2 shape the output layer is not a target (the library default,
  ``output_rank_factor=0``), so it is frozen as under LoRA; ``losia-pro (+ output
  rows 1/8)`` adds it in row mode. The single 7B-shaped layer is timed as one
  of many: a one-layer model in the async schedule would otherwise profile in
  every step, so the small output layer (1/8 of 1024 rows) is a target and owns
  the timed slot, as another layer does in 31 of 32 slots of a 32-layer model;
  ``losia-pro (layer profiling)`` times the steps of the layer's own slot;
- ``galore`` (JAX only): ``optax.contrib.galore`` rank 128 on the target kernels.

Every method runs without gradient clipping (``max_grad_norm=0``: the methods
clip different gradient sets, so clipping would time different work) at a
constant learning rate, with a LoSiA period far beyond the steps run (no
relocalization in the timed window; see ``jax_optimizer_step.py`` for its
amortized cost). Workloads: a SmolLM2-135M-shaped model and one LLaMA-2-7B-shaped
decoder layer, random weights written locally (nothing is downloaded).

    .venv/bin/python benchmarks/peers.py            # the full run (tens of minutes)
    .venv/bin/python benchmarks/peers.py --write    # ... and rewrite RESULTS.md, results.json
    .venv/bin/python benchmarks/peers.py --seq 128 --layers 8 --steps 10
    .venv/bin/python benchmarks/peers.py --tiny --steps 2 --rounds 1 --isolation inline

The step is timed in rounds that alternate the method order; see ``peers_jax.py``
and ``peers_torch.py`` for how each backend is timed and its memory measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from typing import Any, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from losia_common.subnet import block_size  # noqa: E402

sys.path.insert(0, HERE)
import md_sections  # noqa: E402

RESULTS_MD = os.path.join(HERE, "RESULTS.md")
# benchmarks/gpu.py owns the part of RESULTS.md between these markers; rewriting
# the file from a CPU run keeps it.
GPU_BEGIN, GPU_END = "<!-- gpu.py: begin generated GPU section -->", "<!-- gpu.py: end -->"
RESULTS_JSON = os.path.join(HERE, "results.json")
LOSIA_FACTOR = 0.125  # rank_factor of every LoSiA row (and output_rank_factor where used)
GALORE_RANK = 128
TARGETS = (  # (key, text, threshold)
    ("pro_vs_full", "LoSiA-Pro step / full step", 0.75),
    ("pro_vs_best_lora", "LoSiA-Pro step / best LoRA step", 1.0),
    ("losia_vs_full", "LoSiA step / full step", 0.95),
    ("state_vs_adamw", "optimizer state LoSiA (non-targets frozen) / AdamW", 0.04),
    ("peak_pro_vs_lora", "peak memory LoSiA-Pro / LoRA (matched rank)", 1.0),
)


# --- workloads and methods ---------------------------------------------------------

def workloads(args) -> list[dict]:
  """The model shapes (transformers ``LlamaConfig`` kwargs) with their batch."""
  if args.tiny:
    return [
        dict(name="smollm2-135m", label="SmolLM2-135M shape, tiny test variant",
             config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         tie_word_embeddings=True, max_position_embeddings=256),
             seq=args.seq or 16, batch=args.batch or 1, resident=True, losia_output=0.0),
        dict(name="llama2-7b-layer", label="LLaMA-2-7B layer shape, tiny test variant",
             config=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
                         tie_word_embeddings=False, max_position_embeddings=256),
             seq=args.seq or 16, batch=args.batch7b or 1, resident=False,
             losia_output=LOSIA_FACTOR)]
  return [
      dict(name="smollm2-135m",
           label=f"SmolLM2-135M shape ({args.layers} layers, hidden 576, GQA 9/3, "
                 "vocab 49152, tied)",
           config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                       tie_word_embeddings=True, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5),
           seq=args.seq or 256, batch=args.batch or 4, resident=True, losia_output=0.0),
      # One decoder layer with a small vocabulary, so the layer's matrices dominate;
      # rebuilt per round (compiles in seconds) so eight copies never share the RAM.
      dict(name="llama2-7b-layer",
           label="one LLaMA-2-7B decoder layer (hidden 4096, intermediate 11008, 32 heads, "
                 "vocab 1024, untied)",
           config=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=1024,
                       tie_word_embeddings=False, max_position_embeddings=4096,
                       rope_theta=10000.0, rms_norm_eps=1e-5),
           seq=args.seq7b or args.seq or 256, batch=args.batch7b or 1, resident=False,
           losia_output=LOSIA_FACTOR)]


def target_shapes(c: dict) -> list[tuple[int, int]]:
  """(d_in, d_out) of every LoSiA/LoRA target matrix of one decoder layer."""
  h, i = c["hidden_size"], c["intermediate_size"]
  hd = h // c["num_attention_heads"]
  q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
  return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def losia_block_params(c: dict, output_factor: float) -> int:
  """LoSiA's trainable block parameters: a k_in x k_out block per target, and
  ``output_factor`` of the output layer's rows (row mode) when it is > 0."""
  per_layer = sum(block_size(LOSIA_FACTOR, di) * block_size(LOSIA_FACTOR, do)
                  for di, do in target_shapes(c))
  out = block_size(output_factor, c["vocab_size"]) * c["hidden_size"] if output_factor else 0
  return c["num_hidden_layers"] * per_layer + out


def matched_lora_rank(c: dict, output_factor: float) -> int:
  """The LoRA rank whose parameter count r * sum(d_in + d_out) is nearest LoSiA's."""
  per_rank = c["num_hidden_layers"] * sum(di + do for di, do in target_shapes(c))
  return max(1, int(round(losia_block_params(c, output_factor) / per_rank)))


def method_specs(w: dict) -> list[dict]:
  """The rows of one workload. ``backends`` None: both."""
  c, out = w["config"], w["losia_output"]
  r = matched_lora_rank(c, out)
  specs = [dict(name="full", method="full", backends=None)]
  specs.append(dict(name=f"lora r={r} (matched)", method="lora", lora_rank=r, backends=None,
                    matched=True))
  specs += [dict(name=f"lora r={k}", method="lora", lora_rank=k, backends=None)
            for k in (8, 16) if k != r]
  losia = dict(non_target="freeze", output_rank_factor=out, backends=None)
  specs += [dict(name="losia", method="losia", **losia),
            dict(name="losia-pro", method="losia-pro", **losia)]
  if out:  # the timed slot is the output layer's; this row times the layer's own slot
    specs.append(dict(name="losia-pro (layer profiling)", method="losia-pro",
                      **{**losia, "output_rank_factor": 0.0}))
  else:
    specs.append(dict(name="losia-pro (+ output rows 1/8)", method="losia-pro",
                      **{**losia, "output_rank_factor": LOSIA_FACTOR}))
  specs += [dict(name=f"galore r={GALORE_RANK}", method="galore", galore_rank=GALORE_RANK,
                 backends=["jax"]),
            dict(name="losia (non_target=train)", method="losia",
                 **{**losia, "non_target": "train"}, state_only=True)]
  return specs


def write_model(w: dict, directory: str) -> str:
  """A random-weight transformers LLaMA of the workload's shape, saved once."""
  import torch
  import transformers
  path = os.path.join(directory, w["name"])
  if not os.path.isdir(path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**w["config"])).save_pretrained(path)
  return path


# --- running the workers -------------------------------------------------------------

def make_job(w: dict, model_dir: str, specs: list[dict], args) -> dict:
  """What a worker (``peers_jax.py``, ``peers_torch.py``) runs: one workload, its rows."""
  return {"workload": w["name"], "model_dir": model_dir, "seq": w["seq"], "batch": w["batch"],
          "vocab": w["config"]["vocab_size"], "methods": specs, "steps": args.steps,
          "rounds": args.rounds, "warmup": args.warmup, "period": args.period,
          "resident": w["resident"], "dtype": args.dtype, "torch_threads": args.torch_threads}


def _child(script: str, job: dict, tmp: str, tag: str) -> dict:
  job_path, out_path = os.path.join(tmp, f"{tag}.job.json"), os.path.join(tmp, f"{tag}.out.json")
  with open(job_path, "w", encoding="utf-8") as f:
    json.dump(job, f)
  subprocess.run([sys.executable, os.path.join(HERE, script), job_path, out_path], check=True)
  with open(out_path, encoding="utf-8") as f:
    return json.load(f)


def run_jax(job: dict, isolation: str, tmp: str) -> dict:
  if isolation == "inline":
    import peers_jax
    return peers_jax.run(job)
  return _child("peers_jax.py", job, tmp, f"jax-{job['workload']}")


def run_torch(job: dict, isolation: str, tmp: str) -> dict:
  """Each (method, round) in a fresh process, method order alternating per round."""
  specs = [s for s in job["methods"] if s["backends"] is None or "torch" in s["backends"]]
  timed = [s for s in specs if not s.get("state_only")]
  per_round = max(1, -(-job["steps"] // job["rounds"]))
  plan = [(s, 1, 0) for s in specs if s.get("state_only")]
  for rnd in range(job["rounds"]):
    plan += [(s, job["warmup"], per_round) for s in (timed if rnd % 2 == 0 else timed[::-1])]
  rows: dict[str, dict] = {}
  for n, (spec, warm, steps) in enumerate(plan):
    sub = {**job, "spec": spec, "spec_warmup": warm, "spec_steps": steps}
    if isolation == "inline":
      import peers_torch
      r = peers_torch.run_one(sub, spec, warm, steps)
    else:
      r = _child("peers_torch.py", sub, tmp, f"torch-{job['workload']}-{n}")
    if spec["name"] not in rows:
      rows[spec["name"]] = r
    else:  # a later round: more timed steps, the larger peak
      rows[spec["name"]]["times_s"] += r["times_s"]
      rows[spec["name"]]["peak_bytes"] = max(rows[spec["name"]]["peak_bytes"], r["peak_bytes"])
  return {"rows": rows, "platform": next(iter(rows.values()))["device"] if rows else "?"}


def optimizer_only(args) -> dict:
  """The optimizer step alone (after backward), from the existing benchmarks."""
  out: dict[str, Any] = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "jax.json")
    cmd = [sys.executable, os.path.join(HERE, "jax_optimizer_step.py"), "--steps", "10",
           "--layers", str(args.layers), "--json", path]
    subprocess.run(cmd, check=True)
    with open(path, encoding="utf-8") as f:
      out["jax"] = json.load(f)
    out["jax_command"] = " ".join(shlex.quote(c) for c in cmd[1:-2]).replace(ROOT + os.sep, "")
  cmd = [sys.executable, os.path.join(HERE, "torch_optimizer_step.py"), "--steps", "5",
         "--layers", str(args.layers)]
  text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  print(text)
  out["torch_stdout"] = text
  out["torch_command"] = " ".join(shlex.quote(c) for c in cmd[1:]).replace(ROOT + os.sep, "")
  return out


# --- figures, ratios, targets ----------------------------------------------------------

def derive(result: dict, specs: list[dict], rounds: int = 1) -> None:
  """Adds medians (overall and per round) and the ratios to full and to the fastest
  LoRA to every timed row."""
  order = {s["name"]: i for i, s in enumerate(specs)}
  rows = result["rows"] = dict(sorted(result["rows"].items(), key=lambda kv: order[kv[0]]))
  for r in rows.values():
    t = r.get("times_s") or []
    if t:
      r.update(median_s=float(np.median(t)), min_s=float(min(t)), max_s=float(max(t)))
      per = -(-len(t) // max(1, rounds))
      r["round_medians_s"] = [float(np.median(t[i:i + per])) for i in range(0, len(t), per)]
  loras = [n for n, r in rows.items() if r["method"] == "lora" and "median_s" in r]
  best = min(loras, key=lambda n: rows[n]["median_s"]) if loras else None
  matched = next((s["name"] for s in specs if s.get("matched") and s["name"] in rows), None)
  result.update(best_lora=best, matched_lora=matched)
  full = rows.get("full", {}).get("median_s")
  for r in rows.values():
    if "median_s" in r:
      r["ratio_full"] = r["median_s"] / full if full else None
      r["ratio_best_lora"] = r["median_s"] / rows[best]["median_s"] if best else None
  pro, los = rows.get("losia-pro", {}), rows.get("losia", {})
  checks = {
      "pro_vs_full": pro.get("ratio_full"),
      "pro_vs_best_lora": pro.get("ratio_best_lora"),
      "losia_vs_full": los.get("ratio_full"),
      "state_vs_adamw": (los["opt_state_bytes"] / rows["full"]["opt_state_bytes"]
                         if los and rows.get("full", {}).get("opt_state_bytes") else None),
      "peak_pro_vs_lora": (pro["peak_bytes"] / rows[matched]["peak_bytes"]
                           if matched and pro.get("peak_bytes") and rows[matched].get("peak_bytes")
                           else None),
  }
  result["targets"] = {k: {"value": checks[k], "threshold": thr, "text": text,
                           "met": None if checks[k] is None else bool(checks[k] <= thr)}
                       for k, text, thr in TARGETS}


def _mib(n: Optional[float]) -> str:
  return "" if n is None else f"{n / 2**20:,.1f}"


def _x(v: Optional[float]) -> str:
  return "" if v is None else f"{v:.3f}"


def table(result: dict, backend: str) -> str:
  """A markdown table of one (backend, workload) result."""
  jax_ = backend == "jax"
  head = ["method", "trainable", "opt state MiB", "peak MiB", "median ms", "min ms", "max ms",
          "/ full", "/ best LoRA", "round medians ms", "first step ms"]
  if jax_:
    head += ["compile s", "GFLOP/step"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in result["rows"].items():
    ms = lambda k: f"{1e3 * r[k]:,.0f}" if r.get(k) is not None else ""
    cells = [name, f"{r['trainable_params']:,}", _mib(r.get("opt_state_bytes")),
             _mib(r.get("peak_bytes")), ms("median_s"), ms("min_s"), ms("max_s"),
             _x(r.get("ratio_full")), _x(r.get("ratio_best_lora")),
             " / ".join(f"{1e3 * v:,.0f}" for v in r.get("round_medians_s", [])),
             ms("first_step_s") if r.get("times_s") else ""]
    if jax_:
      cells += [f"{r['compile_s']:.1f}" if "compile_s" in r else "",
                f"{r['gflops']:,.1f}" if "gflops" in r else ""]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def targets_table(results: dict) -> str:
  lines = ["| backend | workload | target | value | threshold | |", "|---|---|---|---|---|---|"]
  for key, res in results.items():
    backend, workload = key.split("/")
    for t in res["targets"].values():
      met = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
      lines.append(f"| {backend} | {workload} | {t['text']} | {_x(t['value'])} | "
                   f"<= {t['threshold']} | {met} |")
  return "\n".join(lines)


def workloads_of(results: dict) -> list[dict]:
  return results.get("__workloads__", [])


def findings(results: dict, ws: Optional[list[dict]] = None) -> list[str]:
  """Plain statements computed from the figures (the 'what the figures say' section)."""
  results = {**results, "__workloads__": ws or []}
  out = []
  for key, res in results.items():
    if key == "__workloads__":
      continue
    rows, t = res["rows"], res["targets"]
    full, pro, los = rows.get("full", {}), rows.get("losia-pro", {}), rows.get("losia", {})
    best = res.get("best_lora")
    if "median_s" not in pro or "median_s" not in full:
      continue
    s = (f"**{key}**: LoSiA-Pro's step takes {_x(pro['ratio_full'])} of full fine-tuning's "
         f"and {_x(pro['ratio_best_lora'])} of the fastest LoRA's ({best}); plain LoSiA "
         f"{_x(los.get('ratio_full'))} of full.")
    if "gflops" in pro and "gflops" in full:
      flops = ", ".join(f"{n} {r['gflops']:,.1f}" for n, r in rows.items() if "gflops" in r)
      s += f" XLA's FLOP count per step: {flops}."
    w = next((x for x in workloads_of(results) if x["name"] == key.split("/")[1]), None)
    if w is not None:
      c = w["config"]
      head = 2 * w["batch"] * w["seq"] * c["vocab_size"] * c["hidden_size"] / 1e9
      if w.get("losia_output"):
        s += (f" The output layer is a LoSiA target (row mode) here: full, LoSiA and LoSiA-Pro "
              f"compute its full weight gradient ({head:,.1f} GFLOP), LoRA does not (frozen).")
      else:
        s += (f" The output layer's weight gradient (2 x tokens x vocab x hidden = {head:,.1f} "
              "GFLOP) is computed by full fine-tuning and GaLore only: LoRA, LoSiA and "
              "LoSiA-Pro leave the output layer frozen (not a target, non-targets frozen); "
              "the '+ output rows' row shows what training its rows costs.")
      layer = sum(di * do for di, do in target_shapes(c))
      prof = 2 * w["batch"] * w["seq"] * layer / 1e9
      s += (f" In every step of a decoder layer's profiling slot, LoSiA-Pro computes that "
            f"layer's full weight gradients (2 x tokens x {layer:,} entries = {prof:,.1f} "
            f"GFLOP), i.e. a full backward for 1 of the model's {c['num_hidden_layers']} "
            "decoder layer(s).")
    if los.get("importance_bytes") and full.get("opt_state_bytes"):
      s += (f" LoSiA's optimizer state is {_mib(los['opt_state_bytes'])} MiB against AdamW's "
            f"{_mib(full['opt_state_bytes'])} MiB; {_mib(los['importance_bytes'])} MiB of it are "
            "the async importance buffers (two fp32 per entry of the profiling matrices); "
            f"without them the ratio would be "
            f"{(los['opt_state_bytes'] - los['importance_bytes']) / full['opt_state_bytes']:.3f}.")
    lo = rows.get(res.get("matched_lora") or "", {})
    if (w is not None and w["config"]["num_hidden_layers"] == 1 and los.get("importance_bytes")
        and full.get("opt_state_bytes") and "compile_s" in los):  # JAX: buffers always held
      # Arithmetic on byte counts (exact sizes, not timings): one layer stands for many.
      n = 32
      imp, blocks_b = los["importance_bytes"], los["opt_state_bytes"] - los["importance_bytes"]
      s += (f" With a single decoder layer the async importance buffers ({_mib(imp)} MiB, one "
            "layer's worth per model) are as large as AdamW's moments of that layer; in a "
            f"model of {n} such layers they would be shared by all, and the state ratio "
            f"(blocks x {n} + buffers) / (AdamW x {n}) = "
            f"{(n * blocks_b + imp) / (n * full['opt_state_bytes']):.3f}.")
      if pro.get("peak_bytes") and lo.get("peak_bytes") and "compile_s" in pro:
        s += (f" JAX keeps these buffers in its (static-shape) state in every slot, torch "
              f"only in the layer's own slot: LoSiA-Pro's peak without them would be "
              f"{(pro['peak_bytes'] - imp) / lo['peak_bytes']:.3f} of {res['matched_lora']}'s.")
      if "temp_bytes" in pro:
        entries = sum(di * do for di, do in target_shapes(w["config"]))
        s += (f" One compiled JAX step serves every slot, so its temporaries "
              f"({_mib(pro['temp_bytes'])} MiB) hold what the decoder layer's slot needs: the "
              f"layer's full weight gradients and their products with the weights (2 x 4 bytes "
              f"x {entries:,} entries = {_mib(8 * entries)} MiB). In the output layer's slot "
              "the step still writes these as zeros and passes once over the layer's buffers "
              "(a masked update: read two buffers and the products, write two buffers), about "
              f"7 x 4 bytes x {entries:,} = {28 * entries / 1e9:,.1f} GB of memory traffic per "
              "step; in a model of n such layers that stays one layer's worth while the "
              "matmuls grow n-fold.")
    if "temp_bytes" in pro and "temp_bytes" in lo:
      s += (f" XLA memory, LoSiA-Pro against {res['matched_lora']}: arguments "
            f"{_mib(pro['argument_bytes'])} vs {_mib(lo['argument_bytes'])} MiB (params + "
            f"optimizer state + batch), temporaries {_mib(pro['temp_bytes'])} vs "
            f"{_mib(lo['temp_bytes'])} MiB.")
    missed = [v["text"] for v in t.values() if v["met"] is False]
    s += (" Missed: " + "; ".join(missed) + ".") if missed else " All targets met."
    out.append(s)
  return out


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  versions = {"python": platform.python_version()}
  for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
      versions[mod] = "not installed"
  mem = None
  try:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "versions": versions,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(doc: dict) -> str:
  m, a = doc["machine"], doc["args"]
  ver = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
  out = [
      "# LoSiA / LoSiA-Pro against full fine-tuning, LoRA and GaLore: training step",
      "",
      "Generated by `benchmarks/peers.py --write`; do not edit by hand (rerun instead).",
      "",
  ] + ([f"**Partial: the run stopped or is still running; {doc['partial']}.**", ""]
       if doc.get("partial") else []) + [
      f"- command: `{doc['command']}`",
      f"- machine: {m['cpu']}, {m['cores']} cores, {_mib(m['memory_bytes'])} MiB RAM; "
      f"{doc['platforms']}",
      f"- libraries: {ver}",
      f"- date: {m['date']}",
      f"- timed steps per method: {a['steps']} in {a['rounds']} rounds of alternating method "
      f"order, after {a['warmup']} warm-up steps (JAX: after ahead-of-time compilation, "
      "reported apart); figures are the median, min and max of those steps",
      "- settings: fp32, AdamW (betas 0.9/0.999) everywhere, constant LR, weight decay 0, "
      "**no gradient clipping** (`max_grad_norm=0`: each method would clip a different "
      "gradient set); LoSiA rank factor 0.125, period "
      f"{a['period']} (no relocalization in the timed steps), async schedule, non-targets "
      "frozen; output layer: SmolLM2 shape not a target (frozen, as under LoRA; the "
      "'+ output rows 1/8' row trains 1/8 of its rows), 7B layer: a target in row mode with "
      "1/8 of its 1024 rows, so that the timed steps are in its slot and the decoder layer "
      "does not profile, as in 31 of 32 slots of a 32-layer model ('layer profiling' times "
      "the layer's own slot); LoRA alpha 16 on the same target projections; GaLore "
      f"(`optax.contrib.galore`) rank {GALORE_RANK}, projector update every 200 steps (its SVD "
      "runs in the first, untimed step: see 'first step'), target kernels only, Adam on the "
      "rest",
      "- memory: JAX `peak` = XLA's `memory_analysis()` of the compiled step: arguments + "
      "outputs - donated aliases + temporaries (params, optimizer state and activations; no "
      "allocator overhead). torch on CPU: peak resident set (`VmHWM`) of a fresh process per "
      "method during its steps, reset after loading (absolute: it includes the ~0.5 GB of "
      "the Python/torch runtime and the weights); on CUDA `torch.cuda.max_memory_allocated`",
      "- `opt state` = optimizer state bytes after the steps (JAX `losia_jax.state_nbytes`; "
      "torch: the optimizer's state tensors, LoSiA's importance buffers included)",
      "",
  ]
  for key, res in doc["results"].items():
    backend, wname = key.split("/")
    w = next(x for x in doc["workloads"] if x["name"] == wname)
    out += [f"## {backend}: {w['label']}, batch {w['batch']} x {w['seq']} tokens", "",
            table(res, backend), ""]
    if res.get("matched_lora"):
      out += [f"LoSiA trains {res['losia_block_params']:,} block parameters (plan); "
              f"{res['matched_lora']} is the LoRA with the nearest count.", ""]
  out += ["## Targets", "", targets_table(doc["results"]), ""]
  opt = doc.get("optimizer_only")
  if opt:
    out += ["## Optimizer step alone (after backward), SmolLM2-135M shape", "",
            "Both scripts use their own LoSiA settings (rank factor 0.125, no output-layer "
            "target: output_rank_factor 0, so no 49152-row importance buffer), fake gradients.",
            "",
            f"`{opt['jax_command']}` (JAX, LoSiA period 10, relocalization amortized):", "",
            "| variant | median ms | amortized ms | / AdamW | state MiB | state / AdamW |",
            "|---|---|---|---|---|---|"]
    base = opt["jax"]["results"]["adamw"]
    for name, r in opt["jax"]["results"].items():
      out.append(f"| {name} | {1e3 * r['median_s']:.1f} | {1e3 * r['amortized_s']:.1f} | "
                 f"{r['amortized_s'] / base['amortized_s']:.3f} | {_mib(r['state_bytes'])} | "
                 f"{r['state_bytes'] / base['state_bytes']:.4f} |")
    out += ["", f"`{opt['torch_command']}` (torch):", "", "```", opt["torch_stdout"].strip(),
            "```", ""]
  out += ["## What the figures say", ""]
  out += [f"- {s}" for s in findings(doc["results"], doc["workloads"])]
  if doc.get("notes"):  # what a person running a reduced or patched-up run had to say
    out += ["", "## Notes on this run", ""] + [f"- {n}" for n in doc["notes"]]
  return "\n".join(out) + "\n"


# --- main -------------------------------------------------------------------------------

def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--backends", default="jax,torch")
  ap.add_argument("--workloads", default="smollm2-135m,llama2-7b-layer")
  ap.add_argument("--layers", type=int, default=30, help="SmolLM2 decoder layers")
  ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256)")
  ap.add_argument("--batch", type=int, default=None, help="SmolLM2 batch (default 4)")
  ap.add_argument("--seq7b", type=int, default=None, help="7B-layer tokens (default: --seq)")
  ap.add_argument("--batch7b", type=int, default=None, help="7B-layer batch (default 1)")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per method (all rounds)")
  ap.add_argument("--rounds", type=int, default=2, help="rounds of alternating method order")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--period", type=int, default=10_000, help="LoSiA period")
  ap.add_argument("--isolation", choices=["process", "inline"], default="process",
                  help="process: JAX per workload and torch per (method, round) in child "
                       "processes; inline: all in this one (fast; torch peaks then mix)")
  ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                  help="torch on CUDA only; CPU and JAX always run fp32")
  ap.add_argument("--torch-threads", type=int, default=None)
  ap.add_argument("--tiny", action="store_true", help="tiny shapes, for the smoke test")
  ap.add_argument("--no-optimizer-step", dest="optimizer_step", action="store_false",
                  help="skip the optimizer-only benchmarks")
  ap.add_argument("--write", action="store_true", help="rewrite RESULTS.md and results.json")
  ap.add_argument("--json-out", default=None, help="also write the JSON here")
  ap.add_argument("--model-dir", default=None, help="keep the generated models here")
  ap.add_argument("--render", metavar="RESULTS.json", default=None,
                  help="only rewrite RESULTS.md from that JSON (no run)")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.render:
    with open(args.render, encoding="utf-8") as f:
      doc = json.load(f)
    for key, res in doc["results"].items():
      w = next(x for x in doc["workloads"] if x["name"] == key.split("/")[1])
      derive(res, method_specs(w), doc["args"]["rounds"])
    write_md(markdown(doc))
    return doc
  backends = args.backends.split(",")
  wanted = args.workloads.split(",")
  ws = [w for w in workloads(args) if w["name"] in wanted]
  doc: dict[str, Any] = {"command": " ".join(["benchmarks/peers.py"] + [
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]),
      "args": vars(args), "machine": machine(), "workloads": ws, "results": {}}
  platforms = set()
  with tempfile.TemporaryDirectory() as tmp:
    model_root = args.model_dir or tmp
    for w in ws:
      specs = method_specs(w)
      job = make_job(w, write_model(w, model_root), specs, args)
      for backend in backends:
        print(f"== {backend} / {w['name']} ({w['batch']} x {w['seq']})", flush=True)
        res = (run_jax if backend == "jax" else run_torch)(job, args.isolation, tmp)
        res["losia_block_params"] = losia_block_params(w["config"], w["losia_output"])
        derive(res, specs, args.rounds)
        platforms.add(f"{backend}: {res.get('platform')}")
        doc["results"][f"{backend}/{w['name']}"] = res
        doc["platforms"] = "; ".join(sorted(platforms))
        print(table(res, backend), flush=True)
        todo = len(ws) * len(backends) - len(doc["results"])
        # Written after every part, so a run cut short still leaves what it measured.
        save(doc, args, f"{todo} backend/workload part(s) still to run" if todo else
             ("the optimizer-only benchmarks still to run" if args.optimizer_step
              and not args.tiny else None))
  if args.optimizer_step and not args.tiny and "smollm2-135m" in wanted:
    doc["optimizer_only"] = optimizer_only(args)
  print(targets_table(doc["results"]))
  for s in findings(doc["results"], doc["workloads"]):
    print("-", s)
  save(doc, args, None)
  return doc


def save(doc: dict, args, partial: Optional[str]) -> None:
  doc["partial"] = partial
  text = json.dumps(doc, indent=1)
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      f.write(text)
  if args.write:
    with open(RESULTS_JSON, "w", encoding="utf-8") as f:
      f.write(text)
    write_md(markdown(doc))


def write_md(text: str, path: str = RESULTS_MD) -> None:
  """Writes ``text`` to ``path``, keeping the sections other scripts generated there."""
  try:
    with open(path, encoding="utf-8") as f:
      old = f.read()
  except FileNotFoundError:
    old = ""
  for m in md_sections.SECTION.finditer(old):
    if m.group(0) not in text:
      text = text.rstrip("\n") + "\n\n" + m.group(0) + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  main()
