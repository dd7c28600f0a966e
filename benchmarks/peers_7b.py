"""A LLaMA-2-7B-shaped model of several decoder layers on CPU: LoSiA-Pro against LoRA.

``peers.py`` times one 7B-shaped decoder layer with a 1,024-token vocabulary.
There a single layer carries what a real model shares among all its layers: the
async importance buffers (one profiling layer's worth per model) and, in LoSiA-Pro,
the full weight gradient of the layer that profiles (one layer per step). This
benchmark builds the real shape with ``--layers`` decoder layers (hidden 4096,
intermediate 11008, 32 heads, vocabulary 32,000, untied) and times a whole
training step of every LoRA and LoSiA row of ``peers.py`` through the same
workers, in both backends. The schedule has ``layers + 1`` slots: the output
layer's (row "losia-pro", no decoder layer profiles) and one per decoder layer
(row "losia-pro (layer profiling)", one of the layers profiles). LoSiA-Pro's
step over a whole round of slots is therefore

    amortized = (t_output_slot + layers * t_layer_slot) / (layers + 1),

which is the figure compared with LoRA. Full fine-tuning and GaLore are not run:
AdamW on every fp32 parameter needs four copies of the model (17 GB at 4 layers)
next to the activations; AdamW's state is computed from the shapes instead (two
fp32 moments per parameter), which is what the state ratio needs.

    .venv/bin/python benchmarks/peers_7b.py --layers 4            # about 20 min, machine alone
    .venv/bin/python benchmarks/peers_7b.py --layers 4 --write    # ... and RESULTS.md's section
    .venv/bin/python benchmarks/peers_7b.py --tiny --steps 2 --rounds 1   # the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import md_sections  # noqa: E402
import peers  # noqa: E402

MD_BEGIN = "<!-- peers_7b.py: begin generated section -->"
MD_END = "<!-- peers_7b.py: end -->"
SKIPPED = ("full", "galore")  # do not fit next to the activations at fp32 (module doc)


def workload(layers: int, seq: int, batch: int, tiny: bool) -> dict:
  if tiny:
    config = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                  tie_word_embeddings=False, max_position_embeddings=256)
  else:
    config = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                  tie_word_embeddings=False, max_position_embeddings=4096,
                  rope_theta=10000.0, rms_norm_eps=1e-5)
  return dict(name=f"llama2-7b-{layers}l",
              label=(f"LLaMA-2-7B shape, {layers} decoder layers (hidden "
                     f"{config['hidden_size']}, intermediate {config['intermediate_size']}, "
                     f"vocab {config['vocab_size']}, untied)"),
              config=config, seq=seq, batch=batch, resident=False,
              losia_output=peers.LOSIA_FACTOR)


def method_specs(w: dict) -> list[dict]:
  return [s for s in peers.method_specs(w) if s["method"] not in SKIPPED]


def total_params(c: dict) -> int:
  """Every parameter of the LLaMA: embedding, head, decoder layers, norms."""
  h, layers = c["hidden_size"], c["num_hidden_layers"]
  per_layer = sum(di * do for di, do in peers.target_shapes(c)) + 2 * h
  return 2 * c["vocab_size"] * h + layers * per_layer + h


def summarize(res: dict, w: dict) -> dict:
  """The slot-amortized LoSiA-Pro step and the ratios of this workload."""
  rows, layers = res["rows"], w["config"]["num_hidden_layers"]
  out_slot = rows.get("losia-pro", {}).get("median_s")
  layer_slot = rows.get("losia-pro (layer profiling)", {}).get("median_s")
  best = res.get("best_lora")
  best_s = rows[best]["median_s"] if best else None
  adamw = 8 * total_params(w["config"])  # two fp32 moments per parameter
  s: dict[str, Any] = {"layers": layers, "adamw_state_bytes": adamw, "best_lora": best}
  if out_slot and layer_slot:
    s["pro_amortized_s"] = (out_slot + layers * layer_slot) / (layers + 1)
    if best_s:
      s["pro_amortized_vs_best_lora"] = s["pro_amortized_s"] / best_s
      s["pro_output_slot_vs_best_lora"] = out_slot / best_s
      s["pro_layer_slot_vs_best_lora"] = layer_slot / best_s
  los = rows.get("losia", {})
  if los.get("opt_state_bytes") is not None:
    s["state_vs_adamw"] = los["opt_state_bytes"] / adamw
  lo = rows.get(res.get("matched_lora") or "", {})
  peaks = [rows[n]["peak_bytes"] for n in ("losia-pro", "losia-pro (layer profiling)")
           if rows.get(n, {}).get("peak_bytes")]
  if peaks and lo.get("peak_bytes"):
    s["peak_pro_vs_lora"] = max(peaks) / lo["peak_bytes"]
  res["summary"] = s
  return s


def notes(res: dict, w: dict) -> list[str]:
  """What the figures are made of: FLOPs, the state's importance buffers, the slot rows."""
  rows, c = res["rows"], w["config"]
  tokens, h, vocab = w["batch"] * w["seq"], c["hidden_size"], c["vocab_size"]
  out = []
  best, pro = rows.get(res.get("best_lora") or "", {}), rows.get("losia-pro", {})
  if "gflops" in best and "gflops" in pro:
    out.append(f"XLA's FLOP count per step: {res['best_lora']} {best['gflops']:,.0f}, LoSiA-Pro "
               f"(output slot) {pro['gflops']:,.0f} ({pro['gflops'] / best['gflops']:.2f}x), "
               f"its time {pro['median_s'] / best['median_s']:.2f}x.")
  los = rows.get("losia", {})
  if los.get("importance_bytes"):
    adamw = res["summary"]["adamw_state_bytes"]
    out.append(f"Of LoSiA's {los['opt_state_bytes'] / 2**20:,.0f} MiB of state, "
               f"{los['importance_bytes'] / 2**20:,.0f} MiB are importance buffers (two fp32 per "
               "entry of the matrices that profile: the output layer's "
               f"{vocab:,} x {h:,} and, in JAX, one decoder layer's); without them the state "
               f"is {(los['opt_state_bytes'] - los['importance_bytes']) / adamw:.3f} of AdamW's.")
  head = 2 * tokens * vocab * h / 1e9
  out.append(f"Both LoSiA-Pro rows compute the output layer's full weight gradient when it is a "
             f"target ({head:,.1f} GFLOP: the output layer in row mode keeps an ordinary "
             "gradient, of which the step uses its profiling slot's whole matrix or the "
             "block's rows), the output slot's row also its importance update; the layer "
             "slot's row computes one decoder layer's full weight gradients instead, and leaves "
             "the output layer out of the targets (so that a decoder layer owns the timed slot), "
             f"so it lacks those {head:,.1f} GFLOP that a real layer slot also computes. LoRA "
             "leaves the output layer frozen.")
  return out


def _x(v: Optional[float]) -> str:
  return "n/a" if v is None else f"{v:.3f}"


def markdown(doc: dict) -> str:
  m, w = doc["machine"], doc["workload"]
  lines = [MD_BEGIN, f"## {w['label']}, batch {w['batch']} x {w['seq']} tokens (CPU)", "",
           f"Generated by `{doc['command']}` on {m['cpu']} ({m['cores']} cores), {m['date']}; "
           + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ". "
           "Settings as in the tables above (fp32, AdamW inside every method, no clipping, "
           "LoSiA p = 1/8 with the output layer's rows 1/8 in row mode, non-targets frozen). "
           "Full fine-tuning and GaLore are not run (four fp32 copies of the model do not fit "
           "next to the activations); AdamW's state is computed from the shapes.", ""]
  for key, res in doc["results"].items():
    backend = key.split("/")[0]
    s = res["summary"]
    lines += [f"### {backend}", "", peers.table(res, backend), ""]
    lines.append(
        f"- LoSiA-Pro over a round of {s['layers'] + 1} slots (the output layer's, then one "
        f"per decoder layer): {1e3 * s['pro_amortized_s']:,.0f} ms per step, "
        f"**{_x(s.get('pro_amortized_vs_best_lora'))} of the fastest LoRA's** ({s['best_lora']}); "
        f"output slot {_x(s.get('pro_output_slot_vs_best_lora'))}, a decoder layer's slot "
        f"{_x(s.get('pro_layer_slot_vs_best_lora'))}."
        if "pro_amortized_s" in s else "- LoSiA-Pro: a slot's row is missing.")
    lines.append(f"- Optimizer state, LoSiA / AdamW (computed, {s['adamw_state_bytes'] / 2**20:,.0f} "
                 f"MiB): **{_x(s.get('state_vs_adamw'))}**; peak memory, LoSiA-Pro (the larger "
                 f"slot) / {res.get('matched_lora')}: **{_x(s.get('peak_pro_vs_lora'))}**.")
    lines += [f"- {x}" for x in notes(res, w)]
    lines.append("")
  lines.append(MD_END)
  return "\n".join(lines) + "\n"


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--backends", default="jax,torch")
  ap.add_argument("--steps", type=int, default=4, help="timed steps per method (all rounds)")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--isolation", choices=["process", "inline"], default="process")
  ap.add_argument("--torch-threads", type=int, default=None)
  ap.add_argument("--tiny", action="store_true", help="tiny shapes, for the smoke test")
  ap.add_argument("--write", action="store_true", help="rewrite this section of RESULTS.md")
  ap.add_argument("--results-md", default=peers.RESULTS_MD, help=argparse.SUPPRESS)
  ap.add_argument("--json-out", default=None)
  ap.add_argument("--render", metavar="JSON", default=None,
                  help="only rewrite the RESULTS.md section from that JSON (no run)")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.render:
    with open(args.render, encoding="utf-8") as f:
      doc = json.load(f)
    md_sections.replace_section(args.results_md, markdown(doc), MD_BEGIN, MD_END)
    return doc
  w = workload(args.layers, args.seq, args.batch, args.tiny)
  specs = method_specs(w)
  doc: dict[str, Any] = {
      "command": " ".join(["benchmarks/peers_7b.py"] + [
          shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]),
      "machine": peers.machine(), "workload": w, "results": {}}
  with tempfile.TemporaryDirectory() as tmp:
    # period far beyond the steps (no relocalization timed); fp32 as on every CPU row
    job = peers.make_job(w, peers.write_model(w, tmp), specs,
                         argparse.Namespace(**vars(args), period=10_000, dtype="fp32"))
    for backend in args.backends.split(","):
      print(f"== {backend} / {w['name']} ({w['batch']} x {w['seq']})", flush=True)
      res = (peers.run_jax if backend == "jax" else peers.run_torch)(job, args.isolation, tmp)
      peers.derive(res, specs, args.rounds)
      summarize(res, w)
      doc["results"][f"{backend}/{w['name']}"] = res
      print(peers.table(res, backend), flush=True)
      print(json.dumps(res["summary"], indent=1), flush=True)
      # after every backend, so a run cut short keeps what it measured
      if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
          json.dump(doc, f, indent=1)
      if args.write:
        md_sections.replace_section(args.results_md, markdown(doc), MD_BEGIN, MD_END)
  return doc


if __name__ == "__main__":
  main()
