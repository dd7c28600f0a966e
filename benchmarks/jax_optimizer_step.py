"""LoSiA's optimizer step against optax.adamw's on SmolLM2-135M-shaped params.

Times everything after the gradients (the optimizer update and the write into
the parameters), each variant jitted with donated params and state, side by
side in one process, and prints ratios to AdamW. Steps that end a profiling
window (relocalization) are timed apart and folded into an amortized figure.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/jax_optimizer_step.py [--steps 20] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import losia_jax

SMOLLM2 = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)


def smollm2_params(layers: int, dtype=jnp.float32, seed: int = 0):
  """Flax-layout ([in, out] kernels) SmolLM2-135M-shaped params, tied embedding."""
  c = SMOLLM2
  h, i, hd = c["hidden"], c["intermediate"], c["hidden"] // c["heads"]
  kv = c["kv_heads"] * hd
  key = jax.random.key(seed)

  def w(shape):
    nonlocal key
    key, sub = jax.random.split(key)
    return (0.02 * jax.random.normal(sub, shape)).astype(dtype)

  layer = lambda: {
      "input_layernorm": {"scale": jnp.ones((h,), dtype)},
      "self_attn": {"q_proj": {"kernel": w((h, h))}, "k_proj": {"kernel": w((h, kv))},
                    "v_proj": {"kernel": w((h, kv))}, "o_proj": {"kernel": w((h, h))}},
      "post_attention_layernorm": {"scale": jnp.ones((h,), dtype)},
      "mlp": {"gate_proj": {"kernel": w((h, i))}, "up_proj": {"kernel": w((h, i))},
              "down_proj": {"kernel": w((i, h))}},
  }
  return {"model": {"embed_tokens": {"embedding": w((c["vocab"], h))},
                    "layers": [layer() for _ in range(layers)],
                    "norm": {"scale": jnp.ones((h,), dtype)}}}


def stack_layers(params):
  """The layer list as one leaf per role with a leading layer axis."""
  layers = params["model"]["layers"]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *layers)
  return {"model": {**params["model"], "layers": stacked}}


def time_steps(step, params, state, grads, n, classify=None):
  """Runs ``n`` timed steps after 2 warm-ups; returns {class: [seconds]}."""
  for _ in range(2):
    params, state = step(params, state, grads)
  jax.block_until_ready(params)
  out: dict[str, list[float]] = {}
  for _ in range(n):
    kind = classify(state) if classify else "step"
    t0 = time.perf_counter()
    params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    out.setdefault(kind, []).append(time.perf_counter() - t0)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--layers", type=int, default=SMOLLM2["layers"])
  ap.add_argument("--period", type=int, default=10,
                  help="LoSiA period T used here; relocalization steps are timed apart")
  ap.add_argument("--json", default=None, help="also write the figures to this file")
  args = ap.parse_args()

  params = smollm2_params(args.layers)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def optimizer_step(tx):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return jax.jit(step, donate_argnums=(0, 1))

  def losia_fused(tx):
    return jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p), donate_argnums=(0, 1))

  results = {}

  def run(name, tx, make_step, losia_cfg=None):
    p = jax.tree.map(jnp.copy, params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), p)
    s = tx.init(p)
    nbytes = losia_jax.state_nbytes(s)
    classify = None
    if losia_cfg is not None:
      T = losia_cfg.period
      classify = lambda st: "relocalize" if (int(losia_jax.find_losia_state(st).count) + 1) % T == 0 else "step"
    t = time_steps(make_step(tx), p, s, grads, args.steps, classify)
    med = statistics.median(t["step"])
    reloc = statistics.median(t["relocalize"]) if "relocalize" in t else None
    amort = med if reloc is None else ((losia_cfg.period - 1) * med + reloc) / losia_cfg.period
    results[name] = dict(median_s=med, min_s=min(t["step"]), max_s=max(t["step"]),
                         relocalize_s=reloc, amortized_s=amort, state_bytes=nbytes)
    del p, s

  cfg_freeze = losia_jax.LoSiAConfig(period=args.period, non_target="freeze")
  cfg_train = losia_jax.LoSiAConfig(period=args.period, non_target="train")
  # "optax path": tx.update + optax.apply_updates in one jit with donated params and
  # state (optimizer_step), the form users write; "fused": tx.apply_gradients
  run("adamw", optax.adamw(1e-4, weight_decay=0.0), optimizer_step)
  run("losia fused, non_target=freeze", losia_jax.losia(1e-4, cfg_freeze), losia_fused, cfg_freeze)
  run("losia optax path, non_target=freeze", losia_jax.losia(1e-4, cfg_freeze), optimizer_step,
      cfg_freeze)
  run("losia fused, non_target=train", losia_jax.losia(1e-4, cfg_train), losia_fused, cfg_train)
  run("losia optax path, non_target=train", losia_jax.losia(1e-4, cfg_train), optimizer_step,
      cfg_train)
  # the promised form: the user's own AdamW as LoSiA's inner optimizer
  chained = lambda: losia_jax.chain(losia_jax.losia(cfg_train), optax.adamw(1e-4, weight_decay=0.0))
  run("chain(losia, adamw) fused, train", chained(), losia_fused, cfg_train)
  run("chain(losia, adamw) optax path, train", chained(), optimizer_step, cfg_train)
  # the same parameters as one stacked leaf per role (scan-over-layers layout)
  unstacked = params
  params = stack_layers(params)
  stacked_tx = lambda: losia_jax.losia(1e-4, cfg_freeze, stacked_layers=True)
  run("losia fused, stacked layers, freeze", stacked_tx(), losia_fused, cfg_freeze)
  run("losia optax path, stacked, freeze", stacked_tx(), optimizer_step, cfg_freeze)
  run("adamw, stacked layers", optax.adamw(1e-4, weight_decay=0.0), optimizer_step)
  params = unstacked

  base = results["adamw"]
  print(f"SmolLM2-135M-shaped params: {n_params:,} ({args.layers} layers), fp32, "
        f"{jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}, T={args.period}, {args.steps} timed steps")
  print(f"{'variant':40s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'reloc ms':>9s} "
        f"{'amort ms':>9s} {'ratio':>7s} {'state MB':>9s} {'state ratio':>11s}")
  for name, r in results.items():
    reloc_ms = "" if r["relocalize_s"] is None else f"{1e3 * r['relocalize_s']:.1f}"
    print(f"{name:40s} {1e3 * r['median_s']:10.1f} {1e3 * r['min_s']:8.1f} {1e3 * r['max_s']:8.1f} "
          f"{reloc_ms:>9s} "
          f"{1e3 * r['amortized_s']:9.1f} {r['amortized_s'] / base['amortized_s']:7.3f} "
          f"{r['state_bytes'] / 2**20:9.1f} {r['state_bytes'] / base['state_bytes']:11.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(n_params=n_params, layers=args.layers, period=args.period,
                     results=results), f, indent=2)


if __name__ == "__main__":
  main()
