"""master_weights: an fp32 copy of the trained blocks, so small updates survive bf16 params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import losia_jax
from tests.jax.helpers import indices_of, random_grads, tiny_params

OUT = dict(output_module="embed_tokens")


def _bf16_exact(params):
  """fp32 params holding bf16-representable values, and their bf16 twin."""
  p32 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  return p32, jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)


def _q(p):
  return np.asarray(p["layers"][0]["q_proj"]["weight"], np.float32)


def test_small_block_updates_survive_bf16_params():
  # the probe: lr 1e-5, 20 steps, one 64-entry block of a bf16 matrix whose
  # entries (std 0.01, as LLM weights) have a bf16 spacing of ~3e-5 to 1.2e-4
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(0, 0.01, (32, 32)), jnp.bfloat16)
  params = {"layers": [{"q_proj": {"weight": w}}]}
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=100, non_target="freeze")
  g = {"layers": [{"q_proj": {"weight": jnp.ones((32, 32), jnp.bfloat16)}}]}
  out = {}
  for name, p0, master in (("fp32", jax.tree.map(lambda x: x.astype(jnp.float32), params), False),
                           ("bf16", params, False), ("bf16+master", params, True)):
    tx = losia_jax.losia(1e-5, cfg, master_weights=master)
    p, s = p0, tx.init(p0)
    step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
    for _ in range(20):
      p, s = step(p, s, jax.tree.map(lambda x, y: x.astype(y.dtype), g, p0))
    out[name] = _q(p)
  before = _q(params)
  changed = {k: int((v != before).sum()) for k, v in out.items()}
  assert changed["fp32"] == 64
  assert changed["bf16"] <= 32  # half or more of the updates rounded away without the copy
  assert changed["bf16+master"] >= 56
  # exactly: the bf16 params hold the rounding of the fp32 trajectory
  np.testing.assert_array_equal(
      out["bf16+master"], np.asarray(jnp.asarray(out["fp32"]).astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("fused", [True, False])
def test_master_copy_follows_the_fp32_run_and_params_hold_its_rounding(fused):
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=1000)  # one window: same blocks
  p32, p16 = _bf16_exact(tiny_params())
  ref, tx = losia_jax.losia(1e-4, cfg, **OUT), losia_jax.losia(1e-4, cfg, master_weights=True,
                                                                 **OUT)
  sa, sb = ref.init(p32), tx.init(p16)
  if fused:
    step = lambda t: jax.jit(lambda p, s, g: t.apply_gradients(g, s, p))
  else:
    step = lambda t: jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *t.update(g, s, p)))
  fa, fb = step(ref), step(tx)
  rng = np.random.default_rng(1)
  for _ in range(12):
    g = random_grads(p32, rng)
    p32, sa = fa(p32, sa, g)
    p16, sb = fb(p16, sb, jax.tree.map(lambda x: x.astype(jnp.bfloat16), g))
  plan = tx.plan(p16)
  leaves16, leaves32 = jax.tree_util.tree_leaves(p16), jax.tree_util.tree_leaves(p32)
  st = losia_jax.find_losia_state(sb)
  for b in plan.buckets:
    ts = st.targets[b.role]
    for j, t in enumerate(b.members):
      o = b.offsets[j]
      rows, cols = np.asarray(ts.rows[o]), np.asarray(ts.cols[o])
      w32 = np.asarray(leaves32[t.leaf_index])
      w16 = np.asarray(leaves16[t.leaf_index], np.float32)
      w32, w16 = (w32.T, w16.T) if t.transposed else (w32, w16)
      m = np.asarray(ts.master[o])
      m = m.T if t.transposed else m
      np.testing.assert_allclose(m, w32[np.ix_(rows, cols)], rtol=1e-3, atol=1e-6)
      np.testing.assert_array_equal(  # the param holds the copy's bf16 rounding
          w16[np.ix_(rows, cols)], np.asarray(jnp.asarray(m).astype(jnp.bfloat16), np.float32))


def test_relocalized_blocks_start_their_copy_from_the_params_and_paths_agree():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
  _, params = _bf16_exact(tiny_params())
  tx = losia_jax.losia(1e-3, cfg, master_weights=True, **OUT)
  fused = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  plain = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  pa, pb, sa, sb = params, params, tx.init(params), tx.init(params)
  plan = tx.plan(params)
  rng = np.random.default_rng(2)
  for k in range(4 * plan.total):  # every layer relocalizes twice
    g = random_grads(params, rng)
    pa, sa = fused(pa, sa, g)
    pb, sb = plain(pb, sb, g)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, pa),
                 jax.tree.map(np.asarray, pb))
    st = losia_jax.find_losia_state(sa)
    leaves = jax.tree_util.tree_leaves(pa)
    for b in plan.buckets:
      ts = st.targets[b.role]
      for j, t in enumerate(b.members):
        o = b.offsets[j]
        w = np.asarray(leaves[t.leaf_index], np.float32)
        w = w.T if t.transposed else w
        m = np.asarray(ts.master[o])
        m = m.T if t.transposed else m
        rows, cols = np.asarray(ts.rows[o]), np.asarray(ts.cols[o])
        # always: the param block is the rounding of the copy (a fresh copy is the param)
        np.testing.assert_array_equal(
            w[np.ix_(rows, cols)], np.asarray(jnp.asarray(m).astype(jnp.bfloat16), np.float32))
  moved = [int(x) for b in plan.buckets for x in
           losia_jax.find_losia_state(sa).targets[b.role].last_relocalization]
  assert min(moved) >= 0


def test_master_weights_state_size_is_p_squared():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
  params = tiny_params()
  base = losia_jax.state_nbytes(jax.eval_shape(losia_jax.losia(1e-3, cfg, **OUT).init, params))
  more = losia_jax.state_nbytes(jax.eval_shape(
      losia_jax.losia(1e-3, cfg, master_weights=True, **OUT).init, params))
  plan = losia_jax.make_plan(params, cfg, **OUT)
  blocks = sum(t.n * int(np.prod(t.block_shape)) for t in plan.targets)
  assert more - base == 4 * blocks
