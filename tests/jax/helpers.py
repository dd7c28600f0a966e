"""Small LLaMA-shaped params trees and a driver comparing losia_jax with the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import losia_jax
from tests.common.oracle import OracleLoSiA

H, I, V = 12, 16, 20


def tiny_params(layers=3, seed=0, dtype=jnp.float32, tied=True):
  """Flax layout: kernels are [in, out]."""
  rng = np.random.default_rng(seed)
  w = lambda *s: jnp.asarray(rng.normal(0, 0.5, s), dtype)
  layer = lambda: {"self_attn": {"q_proj": {"kernel": w(H, H)}, "k_proj": {"kernel": w(H, 6)}},
                   "mlp": {"down_proj": {"kernel": w(I, H)}},
                   "norm": {"scale": jnp.ones((H,), dtype)}}
  p = {"model": {"embed_tokens": {"embedding": w(V, H)},
                 "layers": [layer() for _ in range(layers)],
                 "norm": {"scale": jnp.ones((H,), dtype)}}}
  if not tied:
    p["lm_head"] = {"kernel": w(H, V)}
  return p


def oracle_for(params, cfg, lr, wd=0.0, output_module="embed_tokens", **kw):
  """The oracle on the same weights, in [d_out, d_in] orientation."""
  plan = losia_jax.make_plan(params, cfg, output_module=output_module)
  leaves = jax.tree_util.tree_leaves(params)
  targets = {}
  for t in plan.targets:
    w = np.asarray(leaves[t.leaf_index], np.float32)
    w = w.T if t.transposed else w
    targets[t.key] = (t.name.layer_index if not t.row_mode else None, t.role, w)
  nts = {k: np.asarray(leaves[i], np.float32) for k, i in plan.non_targets}
  return OracleLoSiA(cfg, targets, nts, lr, weight_decay=wd, **kw), plan


def random_grads(params, rng, scale=1.0):
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(0, scale, p.shape), p.dtype), params)


def indices_of(state, plan):
  """{target key: (rows, cols)} from a LoSiA state, per leaf."""
  st = losia_jax.find_losia_state(state)
  out = {}
  for b in plan.buckets:
    ts = st.targets[b.role]
    for j, t in enumerate(b.members):
      o = b.offsets[j]
      out[t.key] = (np.asarray(ts.rows[o]), np.asarray(ts.cols[o]))
  return out


def compare_with_oracle(cfg, steps, lr=0.05, wd=0.0, fused=True, output_module="embed_tokens",
                        params=None, grad_fn=None, rtol=2e-5, atol=1e-5):
  params = tiny_params() if params is None else params
  oracle, plan = oracle_for(params, cfg, lr, wd, output_module=output_module)
  tx = losia_jax.losia(lr, cfg, weight_decay=wd, output_module=output_module)
  state = tx.init(params)
  if fused:
    step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  else:
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  rng = np.random.default_rng(1)
  history = []
  for k in range(steps):
    grads = grad_fn(params, rng, k) if grad_fn else random_grads(params, rng)
    leaves = jax.tree_util.tree_leaves(grads)
    og = {}
    for t in plan.targets:
      g = np.asarray(leaves[t.leaf_index], np.float32)
      og[t.key] = g.T if t.transposed else g
    oracle.step(og, {kk: np.asarray(leaves[i]) for kk, i in plan.non_targets})
    params, state = step(params, state, grads)
    idx = indices_of(state, plan)
    pl = jax.tree_util.tree_leaves(params)
    for t in plan.targets:
      ot = oracle.targets[t.key]
      np.testing.assert_array_equal(idx[t.key][0], ot.rows, err_msg=f"rows {t.key} step {k}")
      if not t.row_mode:
        np.testing.assert_array_equal(idx[t.key][1], ot.cols, err_msg=f"cols {t.key} step {k}")
      w = np.asarray(pl[t.leaf_index])
      np.testing.assert_allclose(w.T if t.transposed else w, ot.w, rtol=rtol, atol=atol,
                                 err_msg=f"{t.key} step {k}")
    for kk, i in plan.non_targets:
      np.testing.assert_allclose(np.asarray(pl[i]), oracle.non_targets[kk], rtol=rtol, atol=atol,
                                 err_msg=f"{kk} step {k}")
    history.append(idx)
  return oracle, history, params, state
