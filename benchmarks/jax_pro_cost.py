"""LoSiA-Pro vs LoSiA in JAX: compiled FLOPs and temporary memory of the gradient.

Compiles (does not run) the gradient computation of a SmolLM2-135M-shaped
model (30 layers, hidden 576, GQA 9/3 heads, vocab 49152, tied embeddings) for
a batch, with XLA's own accounting:

- ``compiled.cost_analysis()["flops"]`` of the forward alone and of forward +
  backward, hence backward FLOPs;
- ``compiled.memory_analysis()``: ``temp_size_in_bytes``, the scratch XLA
  allocates (activations saved for the backward, workspace), and
  ``output_size_in_bytes``, the returned gradients (full-size for LoSiA's
  targets, compact blocks for Pro); their sum is what the gradient step needs
  on top of the parameters and the optimizer state.

LoSiA computes the full gradient of every target (``jax.value_and_grad`` over
the parameters); LoSiA-Pro (``losia_jax.pro.value_and_grad``) differentiates
the compact blocks and saves ``x[..., cols]`` only. Both use the same config
(non-targets frozen, output layer in row mode). Prints the ratios.

    .venv/bin/python benchmarks/jax_pro_cost.py [--layers 30] [--batch 4] [--seq 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

import losia_jax
from losia_jax.models import masked_nll
from losia_jax import pro
from losia_jax.models import LlamaForCausalLM, default_linear


def smollm2_config(layers: int) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
      max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)


def analyse(fn, *args):
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return {"flops": float(cost.get("flops", float("nan"))),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
          "temp_bytes": int(mem.temp_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
          "compile_s": time.perf_counter() - t}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--rank-factor", type=float, default=0.125)
  ap.add_argument("--json", default=None, help="also write the figures here")
  args = ap.parse_args()

  # Abstract parameters: nothing is initialised for real, only compiled.
  model = nnx.eval_shape(lambda: LlamaForCausalLM(smollm2_config(args.layers), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  cfg = losia_jax.LoSiAConfig(rank_factor=args.rank_factor, output_rank_factor=args.rank_factor,
                              non_target="freeze", period=10)
  tx = losia_jax.losia(1e-4, cfg, output_module="embed_tokens")
  opt_state = jax.eval_shape(tx.init, params)
  ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  mask = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.float32)

  def loss_fn(p, linear, ids, mask):
    st = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(st, p)
    logits = nnx.merge(graphdef, st)(ids, linear=linear)
    return masked_nll(logits, ids, mask)

  forward = lambda p, ids, mask: loss_fn(p, default_linear, ids, mask)
  plain = lambda p, s, ids, mask: jax.value_and_grad(forward)(p, ids, mask)
  compact = lambda p, s, ids, mask: pro.value_and_grad(loss_fn, tx)(p, s, ids, mask)
  fwd = analyse(forward, params, ids, mask)
  res = {"losia": analyse(plain, params, opt_state, ids, mask),
         "losia-pro": analyse(compact, params, opt_state, ids, mask)}
  for r in res.values():
    r["backward_flops"] = r["flops"] - fwd["flops"]
    r["temp_plus_output_bytes"] = r["temp_bytes"] + r["output_bytes"]
  out = {"shape": vars(args), "forward": fwd, **res,
         "ratios": {k: res["losia-pro"][k] / res["losia"][k]
                    for k in ("backward_flops", "flops", "temp_bytes", "output_bytes",
                              "temp_plus_output_bytes", "bytes_accessed")}}
  print(f"SmolLM2-135M-shaped, {args.layers} layers, batch {args.batch} x seq {args.seq}, "
        f"p = {args.rank_factor}, fp32, jax {jax.__version__} on {jax.devices()[0].platform}")
  print(f"{'':12s} {'fwd+bwd GFLOP':>14s} {'bwd GFLOP':>10s} {'temp MiB':>9s} "
        f"{'grads MiB':>10s} {'GB accessed':>12s}")
  for name in ("losia", "losia-pro"):
    r = res[name]
    print(f"{name:12s} {r['flops'] / 1e9:14.1f} {r['backward_flops'] / 1e9:10.1f} "
          f"{r['temp_bytes'] / 2**20:9.1f} {r['output_bytes'] / 2**20:10.1f} "
          f"{r['bytes_accessed'] / 1e9:12.2f}")
  print(f"forward only: {fwd['flops'] / 1e9:.1f} GFLOP")
  rt = out["ratios"]
  print(f"Pro / LoSiA: backward FLOPs {rt['backward_flops']:.3f}, total FLOPs {rt['flops']:.3f}, "
        f"temp memory {rt['temp_bytes']:.3f}, gradients {rt['output_bytes']:.3f}, temp + "
        f"gradients {rt['temp_plus_output_bytes']:.3f}, bytes accessed {rt['bytes_accessed']:.3f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
