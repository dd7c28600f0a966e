"""Compile time of the jitted train step: LoSiA and LoSiA-Pro against full fine-tuning.

SmolLM2-135M shapes (hidden 576, GQA 9/3, intermediate 1536, vocab 49152, tied
embedding) at several layer counts. For each count, in one process and side by
side (so drift of a shared machine hits every method alike):

- ``train``: the whole train step (forward, backward, optimizer), as
  ``losia_cli.jax_backend`` builds it: full = ``apply_if_finite(adamw)`` with
  ``tx.update`` + ``optax.apply_updates``; losia = ``jax.value_and_grad`` +
  ``tx.apply_gradients``; losia-pro = ``pro.value_and_grad`` + ``tx.apply_gradients``;
- ``opt``: the optimizer step alone on parameter-shaped gradients (adamw vs
  LoSiA's fused step), unstacked and with stacked (scan-over-layers) leaves;
- ``floor``: the one thing every LoSiA step on per-layer leaves must compile, one
  in-place block scatter-add per target matrix, against as many elementwise adds:
  XLA's CPU backend compiles each scatter on its own even when identical. A third
  column compiles the same writes without a scatter (``jax_scatter_floor.masked_add``,
  a pass over every matrix, whose cost per step ``jax_scatter_floor.py`` prints).

Everything is lowered from abstract shapes (nothing is allocated) with donated
params and state; the figures are ``lower().compile()`` seconds and the
number of instructions (and of ``conditional`` instructions) in the optimized
HLO, which is deterministic where seconds are noisy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/jax_compile_time.py [--layers 4 8 16 30]
        [--parts train opt floor] [--non-target train|freeze] [--json FILE]
        [--md benchmarks/RESULTS.md] [--note TEXT]
    .venv/bin/python benchmarks/jax_compile_time.py --from-json FILE --md benchmarks/RESULTS.md

``--md`` writes the tables as this script's section of that markdown file
(between its markers; appended if absent), which ``peers.py --write`` keeps;
``--from-json`` writes it from an earlier ``--json`` (dated by that file) without
measuring, and ``--note`` adds a line on the conditions (e.g. what else ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import losia_jax
from losia_jax import pro
from losia_jax.models import functional, masked_nll
from losia_jax.models.llama import LlamaForCausalLM, ModelConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import md_sections  # noqa: E402
from jax_scatter_floor import masked_add  # noqa: E402

SMOLLM2 = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)
BATCH, SEQ = 4, 256


def model_fns(layers: int):
  c = SMOLLM2
  cfg = ModelConfig(vocab_size=c["vocab"], hidden_size=c["hidden"],
                    intermediate_size=c["intermediate"], num_hidden_layers=layers,
                    num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                    head_dim=c["hidden"] // c["heads"], tie_word_embeddings=True)
  model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  params, apply, _ = functional(model)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  return params, apply


def count(text: str) -> tuple[int, int]:
  """(instructions, conditionals) of an optimized HLO module's text."""
  lines = [l for l in text.splitlines() if " = " in l and not l.lstrip().startswith("//")]
  conds = sum(1 for l in lines if re.search(r"\bconditional\(", l))
  return len(lines), conds


def measure(fn, *args) -> dict:
  lowered = jax.jit(fn, donate_argnums=(0, 1)).lower(*args)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  secs = time.perf_counter() - t0
  n, conds = count(compiled.as_text())
  return dict(compile_s=secs, hlo=n, conditionals=conds)


def train_steps(layers: int, cfg: losia_jax.LoSiAConfig):
  params, apply = model_fns(layers)
  ids = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
  loss = lambda p, linear, ids: masked_nll(apply(p, ids, None, linear=linear), ids)
  full_tx = optax.apply_if_finite(optax.adamw(1e-4, weight_decay=0.0), max_consecutive_errors=2**30)
  losia_tx = losia_jax.losia(1e-4, cfg, output_module="embed_tokens")

  def full(p, s, ids):
    l, g = jax.value_and_grad(lambda p: loss(p, None, ids))(p)
    u, s = full_tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  def losia(p, s, ids):
    l, g = jax.value_and_grad(lambda p: loss(p, None, ids))(p)
    p, s = losia_tx.apply_gradients(g, s, p)
    return p, s, l

  vg = pro.value_and_grad(loss, losia_tx)

  def losia_pro(p, s, ids):
    l, g = vg(p, s, ids)
    p, s = losia_tx.apply_gradients(g, s, p)
    return p, s, l

  fs = jax.eval_shape(full_tx.init, params)
  ls = jax.eval_shape(losia_tx.init, params)
  return {"full": (full, params, fs, ids), "losia": (losia, params, ls, ids),
          "losia-pro": (losia_pro, params, ls, ids)}


def floor_steps(layers: int, cfg: losia_jax.LoSiAConfig):
  """What every LoSiA step compiles whatever its code: one in-place block scatter-add
  per target matrix (7 per layer, donated Flax kernels, p = 1/8 blocks), next to the
  same number of elementwise adds of the same shapes, which XLA compiles once per shape."""
  del cfg
  params, _ = model_fns(layers)
  leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)
  ws = [w for w in jax.tree.leaves(params["model"]["layers"], is_leaf=leaf)
        if len(w.shape) == 2]
  idx = [(jax.ShapeDtypeStruct((w.shape[0] // 8,), jnp.int32),
          jax.ShapeDtypeStruct((w.shape[1] // 8,), jnp.int32)) for w in ws]
  blocks = [jax.ShapeDtypeStruct((w.shape[0] // 8, w.shape[1] // 8), w.dtype) for w in ws]

  def scatters(ws, blocks, idx):
    return [w.at[c[:, None], r[None, :]].add(b, indices_are_sorted=True, unique_indices=True)
            for w, b, (c, r) in zip(ws, blocks, idx)], blocks

  def adds(ws, blocks, idx):
    del idx
    return [w + 1e-3 for w in ws], blocks

  def masked(ws, blocks, idx):
    return [masked_add(w, b, c, r) for w, b, (c, r) in zip(ws, blocks, idx)], blocks

  return {"adds": (adds, ws, blocks, idx), "scatters": (scatters, ws, blocks, idx),
          "masked writes": (masked, ws, blocks, idx)}


def opt_steps(layers: int, cfg: losia_jax.LoSiAConfig):
  params, _ = model_fns(layers)
  layers_list = params["model"]["layers"]
  leaves = [layers_list[i]
            for i in range(layers)]
  stacked_layers = jax.tree.map(lambda *x: jax.ShapeDtypeStruct((layers,) + x[0].shape, x[0].dtype),
                                *leaves)
  stacked = {"model": {**params["model"], "layers": stacked_layers}}
  adamw = optax.adamw(1e-4, weight_decay=0.0)
  out = {}
  for tag, p, tx in (("", params, losia_jax.losia(1e-4, cfg, output_module="embed_tokens")),
                     (" stacked", stacked, losia_jax.losia(1e-4, cfg, output_module="embed_tokens",
                                                           stacked_layers=True))):
    def adam_step(p, s, g):
      u, s = adamw.update(g, s, p)
      return optax.apply_updates(p, u), s

    out["adamw" + tag] = (adam_step, p, jax.eval_shape(adamw.init, p), p)
    out["losia" + tag] = (lambda p, s, g, tx=tx: tx.apply_gradients(g, s, p), p,
                          jax.eval_shape(tx.init, p), p)
  return out


MD_BEGIN = "<!-- jax_compile_time.py: begin generated section -->"
MD_END = "<!-- jax_compile_time.py: end -->"


def markdown(results: dict, args, when: float | None = None) -> str:
  """The tables: per part, one row per layer count, seconds (ratio to the reference)
  and HLO instructions of every variant."""
  cmd = " ".join(["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/jax_compile_time.py",
                  "--layers", *map(str, args.layers), "--parts", *args.parts,
                  "--non-target", args.non_target])
  out = [MD_BEGIN, "## Compile time (JAX), SmolLM2-135M shapes", "",
         f"Generated by `{cmd} --md benchmarks/RESULTS.md` (rerun it instead of editing); "
         + (f"{args.note}; " if args.note else "") +
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(when))}, {platform.machine()}, "
         f"jax {jax.__version__}, {jax.devices()[0].platform}. `lower().compile()` seconds of "
         "the jitted step with donated params and state (noisy on a shared machine; the "
         "ratio is to full fine-tuning's step, or to AdamW's for the optimizer alone, "
         "compiled in the same process) and optimized-HLO instruction counts "
         "(deterministic). `train`: forward, backward and optimizer; `opt`: the "
         "optimizer step alone on parameter-shaped gradients (LoSiA's fused step); "
         "`floor`: the block scatter-adds alone, one per target matrix, against as many "
         "elementwise adds of the same shapes and against the same writes without a "
         "scatter (`masked writes`: one pass over every matrix, which "
         "`benchmarks/jax_scatter_floor.py` times per step). "
         "XLA's CPU backend compiles each distinct kernel once (about 10-15 ms each): "
         "LoSiA's layers share their kernels (`TargetState.starts`), so what it adds is "
         "a fixed set per role (profiling, selection, relocalization: the stacked "
         "optimizer's constant time) and one scatter per target matrix (7 per layer), "
         "which XLA compiles separately even when identical.", ""]
  for part in args.parts:
    rows = {n: results[f"{part} {n}"] for n in args.layers if f"{part} {n}" in results}
    if not rows:
      continue
    names = list(next(iter(rows.values())))
    out += [f"`{part}`:", "", "| layers | " + " | ".join(f"{m} s" for m in names) + " | "
            + " | ".join(f"{m} HLO" for m in names) + " |",
            "|---" * (1 + 2 * len(names)) + "|"]
    for n, row in rows.items():
      cells = []
      for m in names:
        ref = row[_reference(part, m)]
        cells.append(f"{row[m]['compile_s']:.1f} ({row[m]['compile_s'] / ref['compile_s']:.2f}x)")
      out.append(f"| {n} | " + " | ".join(cells) + " | "
                 + " | ".join(f"{row[m]['hlo']:,}" for m in names) + " |")
    out.append("")
  return "\n".join(out + [MD_END, ""])


def _reference(part: str, name: str) -> str:
  if part == "train":
    return "full"
  if part == "floor":
    return "adds"
  return "adamw stacked" if "stacked" in name else "adamw"


def insert_section(path: str, block: str) -> None:
  """Replaces this script's marked section of ``path`` (appends it if absent)."""
  md_sections.replace_section(path, block, MD_BEGIN, MD_END)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 30])
  ap.add_argument("--parts", nargs="+", default=["train", "opt"],
                  choices=["train", "opt", "floor"])
  ap.add_argument("--json", default=None, help="also write the figures to this file")
  ap.add_argument("--from-json", default=None, help="write --md from this --json's figures "
                                                    "instead of measuring")
  ap.add_argument("--non-target", default="train", choices=["train", "freeze"],
                  help="LoSiA's non-target policy (default: train, the library default)")
  ap.add_argument("--note", default="", help="a line on the conditions, for --md")
  ap.add_argument("--md", default=None, help="write the tables as this script's section of "
                                             "this markdown file")
  args = ap.parse_args(argv)
  cfg = losia_jax.LoSiAConfig(rank_factor=0.125, period=10, non_target=args.non_target)
  results = {}
  if args.from_json:
    with open(args.from_json) as f:
      insert_section(args.md, markdown(json.load(f), args, os.path.getmtime(args.from_json)))
    return
  print(f"SmolLM2-135M shapes, {jax.devices()[0].platform}, jax {jax.__version__}; "
        f"compile seconds / optimized HLO instructions / conditionals")
  for part in args.parts:
    for n in args.layers:
      steps = {"train": train_steps, "opt": opt_steps, "floor": floor_steps}[part](n, cfg)
      row = {name: measure(*spec) for name, spec in steps.items()}
      results[f"{part} {n}"] = row
      cells = []
      for name, r in row.items():
        ref = row[_reference(part, name)]
        cells.append(f"{name} {r['compile_s']:.1f}s ({r['compile_s'] / ref['compile_s']:.2f}x) "
                     f"{r['hlo']} hlo {r['conditionals']} cond")
      print(f"{part:5s} {n:2d} layers: " + " | ".join(cells), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  if args.md:
    insert_section(args.md, markdown(results, args))


if __name__ == "__main__":
  main(sys.argv[1:])
