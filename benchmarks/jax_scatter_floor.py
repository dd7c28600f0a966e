"""The floor under LoSiA's fused JAX step on CPU: gathering and scatter-adding the blocks.

Times, on SmolLM2-135M-shaped Flax kernels (210 target matrices, p = 1/8), only
the block gathers of the gradients and the in-place block scatter-adds into the
donated weights — the two things every LoSiA step must do — next to a full
``optax.adamw`` step on the same matrices, and prints the ratios. Whatever the
fused step costs above this floor is LoSiA's own overhead.

One more row times :func:`masked_add`, the block write without a scatter (one
elementwise pass over every matrix): XLA's CPU backend compiles each scatter on
its own even when identical, so a write without one was the candidate for a
shorter compile (``jax_compile_time.py --parts floor`` compiles both). Measured
alone on the 2-core machine (2026-12-03): it runs 9.2x slower than the in-place
scatter-adds (79 against 8.6 ms) and compiles slower too (3.3 against 1.6 s at
30 layers), so the library keeps the scatter.

A second write without a scatter was tried in the library itself (2026-12-03,
not kept): each per-layer block spread to its matrix's shape by two gathers from
a copy padded with -0.0, through inverse maps of the indices (one scatter per
role builds them), and added to the weight. The values are bit-identical (-0.0
added to a weight leaves its bits), and the kernels are loop fusions of one shape,
which XLA compiles once. The 30-layer train step then compiled in 1.17x full
fine-tuning's time for LoSiA and 1.49x for LoSiA-Pro, against 1.52x and 1.81x
with the scatters (1.52x and 1.83x after the indices stopped wrapping around;
fastest of three runs each, same session, the train step of
``jax_compile_time.py``). But the fused optimizer step of
``jax_optimizer_step.py`` (non_target=freeze) went from 29 to 102 ms, and the
optax path with non_target=train from 0.54x to 1.00x of AdamW's step: about 73 ms
more per step, so the 1.2-1.3 s it saves once is lost again after some 20 steps.

    .venv/bin/python benchmarks/jax_scatter_floor.py
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_optimizer_step import smollm2_params

ROLES = [("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]),
         ("mlp", ["gate_proj", "up_proj", "down_proj"])]
FLAGS = dict(indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")


def masked_add(w: jax.Array, block: jax.Array, c: jax.Array, r: jax.Array) -> jax.Array:
  """``w.at[c[:, None], r[None, :]].add(block)`` (sorted unique ``c``, ``r``) without a scatter.

  Every entry of ``w`` is read and written: where both its row and its column are
  chosen it gets ``block``'s entry, gathered through each index's inverse map
  (found by comparisons), elsewhere it is kept as is (a select, not ``+ 0``).
  """
  def inverse(idx, n):
    ar = jnp.arange(n, dtype=idx.dtype)
    pos = jnp.minimum(jnp.sum(idx[None, :] < ar[:, None], axis=1), idx.shape[0] - 1)
    return pos, jnp.take(idx, pos) == ar

  pc, hc = inverse(c, w.shape[0])
  pr, hr = inverse(r, w.shape[1])
  g = jnp.take(jnp.take(block, pc, axis=0), pr, axis=1).astype(w.dtype)
  return jnp.where(hc[:, None] & hr[None, :], w + g, w)


def median_ms(fn, args, donate, n=10):
  jf = jax.jit(fn, donate_argnums=donate)
  out = jf(*args)
  jax.block_until_ready(out)
  ts = []
  for _ in range(n):
    if donate:
      args = (out,) + tuple(args[1:])
    t0 = time.perf_counter()
    out = jf(*args)
    jax.block_until_ready(out)
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def main():
  layers = smollm2_params(30)["model"]["layers"]
  ws = [l[a][b]["kernel"] for l in layers for a, bs in ROLES for b in bs]  # [in, out]
  gs = [jnp.full_like(w, 1e-3) for w in ws]
  rng = np.random.default_rng(0)
  idx = [(jnp.asarray(np.sort(rng.permutation(w.shape[1])[:w.shape[1] // 8]), jnp.int32),
          jnp.asarray(np.sort(rng.permutation(w.shape[0])[:w.shape[0] // 8]), jnp.int32))
         for w in ws]
  blocks = [jnp.full((c.shape[0], r.shape[0]), 1e-4) for r, c in idx]
  n_blk = sum(b.size for b in blocks)

  def gather(gs, idx):
    take = lambda a, i, ax: jnp.take(a, i, axis=ax, mode="clip", indices_are_sorted=True,
                                     unique_indices=True)
    return [take(take(g, c, 0), r, 1) for g, (r, c) in zip(gs, idx)]

  def scatter(ws, blocks, idx):
    return [w.at[c[:, None], r[None, :]].add(b, **FLAGS) for w, b, (r, c) in zip(ws, blocks, idx)]

  def masked(ws, blocks, idx):
    return [masked_add(w, b, c, r) for w, b, (r, c) in zip(ws, blocks, idx)]

  tx = optax.adamw(1e-4, weight_decay=0.0)

  def adamw(ws, state, gs):
    u, state = tx.update(gs, state, ws)
    return optax.apply_updates(ws, u), state

  t_gather = median_ms(gather, (gs, idx), ())
  t_scatter = median_ms(scatter, ([jnp.copy(w) for w in ws], blocks, idx), (0,))
  t_masked = median_ms(masked, ([jnp.copy(w) for w in ws], blocks, idx), (0,))
  same = all(bool(jnp.array_equal(a, b)) for a, b in zip(
      jax.jit(scatter)(ws, blocks, idx), jax.jit(masked)(ws, blocks, idx)))
  state = tx.init(ws)
  jf = jax.jit(adamw, donate_argnums=(0, 1))
  p, s = jf([jnp.copy(w) for w in ws], state, gs)
  ts = []
  for _ in range(10):
    t0 = time.perf_counter()
    p, s = jf(p, s, gs)
    jax.block_until_ready(p)
    ts.append(time.perf_counter() - t0)
  t_adamw = 1e3 * statistics.median(ts)
  print(f"{len(ws)} target matrices, {sum(w.size for w in ws):,} params, {n_blk:,} block entries")
  print(f"{'':34s} {'ms':>8s} {'/ adamw':>8s}")
  print(f"{'adamw step on these matrices':34s} {t_adamw:8.2f} {1.0:8.3f}")
  print(f"{'block gathers (gradients)':34s} {t_gather:8.2f} {t_gather / t_adamw:8.3f}")
  print(f"{'block scatter-adds (in place)':34s} {t_scatter:8.2f} {t_scatter / t_adamw:8.3f}")
  print(f"{'floor (gathers + scatters)':34s} {t_gather + t_scatter:8.2f} "
        f"{(t_gather + t_scatter) / t_adamw:8.3f}")
  print(f"{'masked writes (no scatter)':34s} {t_masked:8.2f} {t_masked / t_adamw:8.3f}  "
        f"{t_masked / t_scatter:.2f}x the scatter-adds, {'same' if same else 'DIFFERENT'} values")


if __name__ == "__main__":
  main()
