"""losia_jax transformation: hand-checked trajectory, invariants and ecosystem use."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import losia_jax
from losia_jax.importance import ImportanceState, update_importance
from tests.jax.helpers import random_grads, tiny_params

LR = 0.01


def two_layer():
  # torch layout ("weight" = [d_out, d_in]); 2 layers x one 4x4 target, p = 0.5
  return {"layers": [{"q_proj": {"weight": jnp.ones((4, 4))}} for _ in range(2)]}


def grad_with_block(rows, cols):
  g = np.full((4, 4), 0.1, np.float32)
  g[np.ix_(rows, cols)] = 0.9
  return jnp.asarray(g)


def test_hand_checked_trajectory_through_two_relocalizations():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.5, period=2)  # total = 2 layers, T = 2
  tx = losia_jax.losia(LR, cfg)
  params = two_layer()
  state = tx.init(params)
  st0 = losia_jax.find_losia_state(state)
  init_rows = np.asarray(st0.targets["q_proj"].rows)
  init_cols = np.asarray(st0.targets["q_proj"].cols)
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))

  def run(g0, g1):
    nonlocal params, state
    before = jax.tree.map(np.asarray, params)
    params, state = step(params, state, {"layers": [{"q_proj": {"weight": g0}},
                                                     {"q_proj": {"weight": g1}}]})
    st = losia_jax.find_losia_state(state)
    after = jax.tree.map(np.asarray, params)
    return st, [after["layers"][i]["q_proj"]["weight"] - before["layers"][i]["q_proj"]["weight"]
                for i in range(2)]

  a = grad_with_block([1, 3], [0, 2])
  b = grad_with_block([0, 2], [1, 3])
  # steps 0, 1: layer 0 profiles; at the end of step 1 it relocalizes onto {1,3} x {0,2}
  st, d = run(a, a)
  assert (st.targets["q_proj"].rows == init_rows).all()
  assert float(jnp.abs(st.importance["q_proj"].ibar).sum()) > 0  # layer 0's slot filled
  # first step: Adam with bias correction gives u = g / (|g| + eps) -> the block moves by -LR
  for i in range(2):
    blk = np.ix_(init_rows[i], init_cols[i])
    np.testing.assert_allclose(d[i][blk], -LR, atol=1e-6)
    mask = np.zeros((4, 4), bool); mask[blk] = True
    assert (d[i][~mask] == 0).all()  # only the block changes
  st, d = run(a, a)
  rows, cols = np.asarray(st.targets["q_proj"].rows), np.asarray(st.targets["q_proj"].cols)
  assert rows[0].tolist() == [1, 3] and cols[0].tolist() == [0, 2]
  assert (rows[1] == init_rows[1]).all()
  assert st.targets["q_proj"].last_relocalization.tolist() == [1, -1]
  assert st.targets["q_proj"].inner.count.tolist() == [0, 2]  # fresh state, step count too
  # step 2: layer 0 on its new block with rewarm 0 -> no change; layer 1 profiles,
  # its window starting from empty statistics (not from layer 0's leftovers)
  w1 = params["layers"][1]["q_proj"]["weight"]
  fresh = update_importance(
      ImportanceState(jnp.zeros((4, 4)), jnp.zeros((4, 4))), w1, b, cfg.importance,
      cfg.importance_beta1, cfg.importance_beta2)
  st, d = run(a, b)
  np.testing.assert_allclose(st.importance["q_proj"].ibar, fresh.ibar, rtol=1e-6)
  np.testing.assert_allclose(st.importance["q_proj"].ubar, fresh.ubar, rtol=1e-6)
  assert (d[0] == 0).all() and np.abs(d[1]).max() > 0
  assert st.targets["q_proj"].inner.count.tolist() == [1, 3]
  # step 3: rewarm 1/2, Adam u = 1 for a constant gradient -> block moves by -LR/2
  st, d = run(a, b)
  blk = np.ix_([1, 3], [0, 2])
  np.testing.assert_allclose(d[0][blk], -LR / 2, atol=1e-6)
  mask = np.zeros((4, 4), bool); mask[blk] = True
  assert (d[0][~mask] == 0).all()
  # end of step 3: layer 1 relocalizes onto {0,2} x {1,3}
  assert st.targets["q_proj"].rows[1].tolist() == [0, 2]
  assert st.targets["q_proj"].cols[1].tolist() == [1, 3]
  assert st.targets["q_proj"].last_relocalization.tolist() == [1, 3]
  # steps 4, 5: layer 0 profiles again with gradient pattern b -> second relocalization
  run(b, a)
  st, d = run(b, a)
  assert st.targets["q_proj"].rows[0].tolist() == [0, 2]
  assert st.targets["q_proj"].cols[0].tolist() == [1, 3]
  assert st.targets["q_proj"].last_relocalization.tolist() == [5, 3]
  assert int(st.count) == 6


def test_fused_and_optax_paths_bit_identical():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=2, output_rank_factor=0.2)
  tx = losia_jax.losia(0.03, cfg, weight_decay=0.01, output_module="embed_tokens")
  p1 = p2 = tiny_params()
  s1 = s2 = tx.init(p1)
  fused = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  plain = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  rng = np.random.default_rng(0)
  for _ in range(9):
    g = random_grads(p1, rng)
    p1, s1 = fused(p1, s1, g)
    p2, s2 = plain(p2, s2, g)
  # optimizer state and target weights: bit for bit
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), s1, s2)))
  plan = tx.plan(p1)
  l1, l2 = jax.tree.leaves(p1), jax.tree.leaves(p2)
  for t in plan.targets:
    np.testing.assert_array_equal(l1[t.leaf_index], l2[t.leaf_index])
  # non-targets: the fused path adds the update inside the Adam fusion (1-ulp rounding)
  for _, i in plan.non_targets:
    np.testing.assert_allclose(l1[i], l2[i], rtol=1e-6, atol=1e-7)


def _trajectory_with_an_inf_step(tx, fused):
  """(params, state leaves) after each of 7 steps of ``tx`` on ``tiny_params``, the
  fourth gradient holding an inf in the embedding; fused path or optax path."""
  params = tiny_params()
  rng = np.random.default_rng(0)
  grads = [random_grads(params, rng) for _ in range(7)]
  grads[3]["model"]["embed_tokens"]["embedding"] = \
      grads[3]["model"]["embed_tokens"]["embedding"].at[1, 2].set(jnp.inf)
  step = (jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p)) if fused else
          jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
              *tx.update(g, s, p))))
  p, s = params, tx.init(params)
  out = []
  for g in grads:
    p, s = step(p, s, g)
    out.append((p, jax.tree.leaves(s)))
  return out


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_non_target_adam_by_selects_equals_the_conditional(clip_norm):
  """The default inner optimizer (``optax.scale_by_adam``) steps the non-targets
  without a conditional; wrapped in a chain it takes the general conditional path.
  Both give the same trajectory bit for bit, a skipped non-finite step included,
  on the optax path and the fused one."""
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=2, non_target="train")
  kw = dict(learning_rate=0.02, weight_decay=0.01, clip_norm=clip_norm)
  fast = losia_jax.scale_by_losia(cfg, optax.scale_by_adam(b1=0.8, b2=0.95, eps=1e-6), **kw)
  general = losia_jax.scale_by_losia(cfg, optax.chain(optax.scale_by_adam(b1=0.8, b2=0.95,
                                                                          eps=1e-6)), **kw)
  assert fast.update.__self__.options.adam is not None
  assert general.update.__self__.options.adam is None
  for fused in (False, True):
    a, b = _trajectory_with_an_inf_step(fast, fused), _trajectory_with_an_inf_step(general, fused)
    for (pa, sa), (pb, sb) in zip(a, b):
      # weights: where XLA fuses `w - lr * u` differs (FMA contraction), 1 ulp
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), pa, pb)
      assert len(sa) == len(sb)
      for x, y in zip(sa, sb):
        np.testing.assert_array_equal(x, y)
    # the skipped step left weights and moments as they were
    jax.tree.map(np.testing.assert_array_equal, a[3][0], a[2][0])


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_promised_chain_form_steps_non_targets_by_selects(clip_norm):
  """``chain(losia(config), optax.adamw(schedule, weight_decay=...))`` is recognised as
  Adam followed by scalar-state pieces, so its non-targets step without a
  conditional too. The same optimizer spelled so that it is not recognised (Adam
  inside a nested chain) takes the conditional: same trajectory (state within
  1 ulp), a skipped non-finite step included, on the optax path and the fused one."""
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=2, non_target="train")
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.02, 2, 7)
  adam = lambda: optax.scale_by_adam(b1=0.8, b2=0.95, eps=1e-6)
  head = (optax.clip_by_global_norm(clip_norm),) if clip_norm else ()
  fast = losia_jax.chain(*head, losia_jax.losia(cfg),
                         optax.adamw(sched, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1))
  general = losia_jax.chain(*head, losia_jax.losia(cfg), optax.chain(
      optax.chain(adam()), optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(sched)))
  find = lambda tx: tx.plan.__self__.options  # the LoSiAFunctions inside the chain
  assert find(fast).adam is not None and find(fast).adam.tail is not None
  assert find(general).adam is None
  for fused in (False, True):
    a, b = _trajectory_with_an_inf_step(fast, fused), _trajectory_with_an_inf_step(general, fused)
    for (pa, sa), (pb, sb) in zip(a, b):
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), pa, pb)
      assert len(sa) == len(sb)
      for x, y in zip(sa, sb):  # 1 ulp: XLA may contract the clip's scale into Adam's square
        np.testing.assert_allclose(x, y, rtol=2.5e-7, atol=0)
    jax.tree.map(np.testing.assert_array_equal, a[3][0], a[2][0])
    # the schedule and decay did act: the non-targets moved on the finite steps
    emb = lambda p: np.asarray(p["model"]["embed_tokens"]["embedding"])
    assert not np.array_equal(emb(a[6][0]), emb(a[5][0]))


@pytest.mark.parametrize("optimizer, recognised", [
    (lambda: optax.scale_by_adam(), True),
    (lambda: optax.adam(1e-3), True),
    (lambda: optax.adamw(optax.cosine_decay_schedule(1e-3, 10), weight_decay=0.1), True),
    (lambda: optax.chain(optax.scale_by_adam(), optax.scale(-1e-3)), True),
    (lambda: optax.adam(1e-3, nesterov=True), False),
    (lambda: optax.chain(optax.scale_by_adam(), optax.trace(0.9)), False),  # momentum after Adam
    (lambda: optax.chain(optax.clip(1.0), optax.scale_by_adam()), False),  # Adam not first
    (lambda: optax.lion(1e-3), False),
])
def test_adam_settings_recognises_adam_and_its_scalar_state_tail(optimizer, recognised):
  from losia_jax.inner import adam_settings
  assert (adam_settings(optimizer()) is not None) == recognised


def test_init_is_abstract_and_state_shapes_never_change():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=1)  # relocalize every step
  tx = losia_jax.losia(0.01, cfg)
  params = tiny_params()
  abstract = jax.eval_shape(tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  state = tx.init(params)
  spec = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert spec(abstract) == spec(state)

  def body(carry, g):
    p, s = carry
    return tx.apply_gradients(g, s, p), None

  rng = np.random.default_rng(0)
  gs = jax.tree.map(lambda *x: jnp.stack(x), *[random_grads(params, rng) for _ in range(5)])
  (p, s), _ = jax.jit(lambda c, g: jax.lax.scan(body, c, g))((params, state), gs)
  assert spec(s) == spec(state) and int(losia_jax.find_losia_state(s).count) == 5


def test_non_finite_gradients_skip_the_step():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=2)
  tx = losia_jax.losia(0.01, cfg)
  params = tiny_params()
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  rng = np.random.default_rng(0)
  params, state = step(params, state, random_grads(params, rng))
  st = losia_jax.find_losia_state(state)
  # NaN inside a target's block
  g = random_grads(params, rng)
  r, c = int(st.targets["self_attn.q_proj"].rows[0, 0]), int(st.targets["self_attn.q_proj"].cols[0, 0])
  g["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"] = \
      g["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].at[c, r].set(jnp.nan)
  p2, s2 = step(params, state, g)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, p2)))
  st2 = losia_jax.find_losia_state(s2)
  assert int(st2.count) == 1 and int(st2.notfinite_count) == 1
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                          st._replace(notfinite_count=0), st2._replace(notfinite_count=0))))
  def outside_block(layer, value):
    """Gradients with ``value`` in layer's down_proj, in an output column outside its block."""
    g = random_grads(params, rng)
    w = g["model"]["layers"][layer]["mlp"]["down_proj"]["kernel"]
    blk_rows = set(np.asarray(st.targets["mlp.down_proj"].rows[layer]).tolist())
    free_out = next(i for i in range(w.shape[1]) if i not in blk_rows)
    g["model"]["layers"][layer]["mlp"]["down_proj"]["kernel"] = w.at[0, free_out].set(value)
    return g

  # Inf in the profiling layer (layer 0 owns slot 0) outside any block: importance would be poisoned
  p3, s3 = step(params, state, outside_block(0, jnp.inf))
  assert int(losia_jax.find_losia_state(s3).notfinite_count) == 1
  assert np.isfinite(np.asarray(losia_jax.find_losia_state(s3).importance["mlp.down_proj"].ibar)).all()
  # a NaN that the step does not read (another layer, outside its block) is ignored
  _, s4 = step(params, state, outside_block(2, jnp.nan))
  assert int(losia_jax.find_losia_state(s4).count) == 2


def test_chain_with_clipping_and_multisteps():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=2)
  params = tiny_params()
  rng = np.random.default_rng(0)
  grads = [random_grads(params, rng, 10.0) for _ in range(8)]
  # losia_jax.chain keeps the fused path and equals optax.chain
  tx = losia_jax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(0.01, cfg))
  ref = optax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(0.01, cfg))
  p1, s1, p2, s2 = params, tx.init(params), params, ref.init(params)
  fused = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  plain = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*ref.update(g, s, p)))
  for g in grads[:4]:
    p1, s1 = fused(p1, s1, g)
    p2, s2 = plain(p2, s2, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)
  # MultiSteps(k=2) on pairs == one step on the mean gradient
  ms = optax.MultiSteps(losia_jax.losia(0.01, cfg), every_k_schedule=2)
  one = losia_jax.losia(0.01, cfg)
  pa, sa, pb, sb = params, ms.init(params), params, one.init(params)
  step_ms = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*ms.update(g, s, p)))
  step_one = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*one.update(g, s, p)))
  for i in range(0, 8, 2):
    for g in grads[i:i + 2]:
      pa, sa = step_ms(pa, sa, g)
    mean = jax.tree.map(lambda x, y: (x + y) / 2, grads[i], grads[i + 1])
    pb, sb = step_one(pb, sb, mean)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), pa, pb)


class TinyBlock(nnx.Module):
  def __init__(self, rngs):
    self.q_proj = nnx.Linear(8, 8, use_bias=True, rngs=rngs)
    self.up_proj = nnx.Linear(8, 16, use_bias=False, rngs=rngs)


class TinyModel(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([TinyBlock(rngs) for _ in range(2)])
    self.head = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    for blk in self.layers:
      x = jax.nn.relu(blk.up_proj(blk.q_proj(x)))[..., :8]
    return self.head(jnp.concatenate([x, x], -1))


def test_nnx_optimizer_trains_and_matches_plain_optax():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=3)
  model = TinyModel(nnx.Rngs(0))
  params0 = nnx.as_pure(nnx.state(model, nnx.Param))  # arrays: a snapshot
  opt = nnx.Optimizer(model, losia_jax.losia(0.05, cfg), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (16, 8))
  y = jnp.sum(x, -1, keepdims=True)
  loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)

  @nnx.jit
  def train_step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(train_step(model, opt)) for _ in range(12)]
  assert losses[-1] < losses[0]
  # same run with the plain optax API on the pure params
  graphdef, _ = nnx.split(TinyModel(nnx.Rngs(0)))
  tx = losia_jax.losia(0.05, cfg)
  p = params0
  s = tx.init(p)
  @jax.jit
  def plain_step(p, s):
    g = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p)))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(12):
    p, s = plain_step(p, s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               nnx.as_pure(nnx.state(model, nnx.Param)), p)


def test_bf16_params_fp32_state():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=2)
  params = tiny_params(dtype=jnp.bfloat16)
  tx = losia_jax.losia(0.01, cfg)
  state = tx.init(params)
  st = losia_jax.find_losia_state(state)
  assert st.targets["self_attn.q_proj"].inner.mu.dtype == jnp.float32
  assert st.importance["self_attn.q_proj"].ibar.dtype == jnp.float32
  rng = np.random.default_rng(0)
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  for _ in range(7):
    params, state = step(params, state, random_grads(params, rng))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert int(losia_jax.find_losia_state(state).count) == 7


def test_stacked_layers_equal_unstacked():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=2)
  params = tiny_params()
  stack = lambda p: {**p, "model": {**p["model"], "layers": jax.tree.map(lambda *x: jnp.stack(x), *p["model"]["layers"])}}
  tx1 = losia_jax.losia(0.02, cfg)
  tx2 = losia_jax.losia(0.02, cfg, stacked_layers=True)
  p1, p2 = params, stack(params)
  s1, s2 = tx1.init(p1), tx2.init(p2)
  rng = np.random.default_rng(3)
  step1 = jax.jit(lambda p, s, g: tx1.apply_gradients(g, s, p))
  step2 = jax.jit(lambda p, s, g: tx2.apply_gradients(g, s, p))
  for _ in range(13):
    g = random_grads(params, rng)
    p1, s1 = step1(p1, s1, g)
    p2, s2 = step2(p2, s2, stack(g))
  # same indices at every matrix; weights equal up to XLA's vectorization of the math
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), stack(p1), p2)
  t1, t2 = losia_jax.find_losia_state(s1).targets, losia_jax.find_losia_state(s2).targets
  for role in t1:
    for f in ("rows", "cols", "last_relocalization"):
      np.testing.assert_array_equal(getattr(t1[role], f), getattr(t2[role], f))
  assert int(t1["self_attn.q_proj"].last_relocalization.max()) >= 0  # relocalized


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_stacked_layers_compile_without_a_switch_over_layers(clip_norm):
  """Stacked (scan-over-layers) leaves are read at the profiling layer's index by
  dynamic slicing: the compiled step has no multi-way conditional over layers, its
  size does not grow with the layer count, and it trains as the unstacked plan does."""
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=2)
  stack = lambda p: {**p, "model": {**p["model"], "layers": jax.tree.map(
      lambda *x: jnp.stack(x), *p["model"]["layers"])}}
  sizes = []
  for n in (3, 6):
    params = tiny_params(layers=n)
    tx = losia_jax.losia(0.02, cfg, stacked_layers=True, clip_norm=clip_norm)
    p = stack(params)
    step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p), donate_argnums=(0, 1))
    text = step.lower(p, tx.init(p), p).compile().as_text()
    conds = [l for l in text.splitlines() if " conditional(" in l]
    # lax.cond (two branches, on `finite` / relocalization) is fine; a switch over
    # n layers would list n + 1 branch computations
    assert all(l.count("branch_computations") == 0 or l.split("branch_computations={")[1]
               .split("}")[0].count(",") <= 1 for l in conds), conds
    sizes.append(sum(" = " in l for l in text.splitlines()))
  assert sizes[1] <= sizes[0] * 1.05, sizes
  # the same trajectory as the unstacked plan (indices exactly, weights to rounding)
  params = tiny_params()
  tx1 = losia_jax.losia(0.02, cfg, clip_norm=clip_norm)
  tx2 = losia_jax.losia(0.02, cfg, stacked_layers=True, clip_norm=clip_norm)
  p1, p2 = params, stack(params)
  s1, s2 = tx1.init(p1), tx2.init(p2)
  rng = np.random.default_rng(5)
  step1 = jax.jit(lambda p, s, g: tx1.apply_gradients(g, s, p))
  step2 = jax.jit(lambda p, s, g: tx2.apply_gradients(g, s, p))
  for _ in range(9):
    g = random_grads(params, rng)
    p1, s1 = step1(p1, s1, g)
    p2, s2 = step2(p2, s2, stack(g))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), stack(p1), p2)
  i1, i2 = losia_jax.find_losia_state(s1), losia_jax.find_losia_state(s2)
  for role in i1.targets:
    for f in ("rows", "cols", "last_relocalization"):
      np.testing.assert_array_equal(getattr(i1.targets[role], f), getattr(i2.targets[role], f))
    np.testing.assert_allclose(i1.importance[role].ibar, i2.importance[role].ibar, rtol=1e-5,
                               atol=1e-9)
  assert int(i1.targets["self_attn.q_proj"].last_relocalization.max()) >= 0  # relocalized


def test_memory_formula_llama_shaped():
  """State bytes = 4 * (2 p^2 target + 2 one-layer targets + non-target state) within 2%."""
  h, i, L, V = 64, 176, 6, 256
  kv = 32
  layer = lambda: {"self_attn": {"q_proj": {"kernel": jax.ShapeDtypeStruct((h, h), jnp.float32)},
                                 "k_proj": {"kernel": jax.ShapeDtypeStruct((h, kv), jnp.float32)},
                                 "v_proj": {"kernel": jax.ShapeDtypeStruct((h, kv), jnp.float32)},
                                 "o_proj": {"kernel": jax.ShapeDtypeStruct((h, h), jnp.float32)}},
                   "mlp": {"gate_proj": {"kernel": jax.ShapeDtypeStruct((h, i), jnp.float32)},
                           "up_proj": {"kernel": jax.ShapeDtypeStruct((h, i), jnp.float32)},
                           "down_proj": {"kernel": jax.ShapeDtypeStruct((i, h), jnp.float32)}},
                   "input_layernorm": {"scale": jax.ShapeDtypeStruct((h,), jnp.float32)}}
  params = {"model": {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((V, h), jnp.float32)},
                      "layers": [layer() for _ in range(L)]}}
  p = 0.125
  for policy in ("train", "freeze"):
    cfg = losia_jax.LoSiAConfig(rank_factor=p, non_target=policy)
    tx = losia_jax.losia(1e-3, cfg)
    state = jax.eval_shape(tx.init, params)
    plan = tx.plan(params)
    target = plan.target_params
    one_layer = target // L
    non_target = sum(np.prod(x.shape) for x in jax.tree.leaves(params)) - target
    formula = 4 * (2 * p * p * target + 2 * one_layer + (2 * non_target if policy == "train" else 0))
    got = losia_jax.state_nbytes(state)
    assert abs(got - formula) / formula < 0.02, (policy, got, formula)
  # the inner state is compact: p^2 of AdamW's for the targets
  st = losia_jax.find_losia_state(state)
  mu = st.targets["mlp.gate_proj"].inner.mu
  assert mu.shape == (L, h // 8, i // 8)  # [layers, k_in, k_out]: the kernel layout


def test_bad_arguments():
  with pytest.raises(ValueError, match="weight_decay"):
    losia_jax.losia(0.1, weight_decay=-1.0)
  with pytest.raises(ValueError, match="learning_rate"):
    losia_jax.losia(-0.1)
  with pytest.raises(TypeError, match="config"):
    losia_jax.losia(0.1, {"rank_factor": 0.1})
  tx = losia_jax.losia(0.1)
  params = {"layers": [{"q_proj": {"weight": jnp.ones((8, 8))}}]}
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize("with_output", [False, True])
def test_fused_step_copies_no_matrix_sized_buffer(with_output):
  """The compiled fused step writes weights and importance buffers in place: XLA
  copies no target-matrix-sized array (the weights before the in-place scatter, the
  importance buffers through the profiling switch). Each such copy is a pass over
  memory that, for one LLaMA-7B layer, cost more than the layer's training matmuls
  on CPU. Shapes are chosen so that nothing else has them."""
  d_in, d_out, vocab = 40, 72, 56
  params = {"model": {"layers": [{"self_attn": {"q_proj": {"kernel": jnp.ones((d_in, d_out))}},
                                  "mlp": {"down_proj": {"kernel": jnp.ones((d_out, d_in))}}}
                                 for _ in range(3)]},
            "lm_head": {"kernel": jnp.ones((d_in, vocab))}}
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=3, non_target="freeze",
                              output_rank_factor=0.25 if with_output else 0.0)
  tx = losia_jax.losia(LR, cfg)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p), donate_argnums=(0, 1))
  text = step.lower(params, state, grads).compile().as_text()
  copies = [line.strip()[:120] for line in text.splitlines()
            if " copy(%" in line and " copy(%transpose" not in line and any(f"f32[{a},{b}]" in line for a, b in
                                         ((d_in, d_out), (d_out, d_in), (d_in, vocab)))]
  assert not copies, copies
  # and the step still profiles: run a window and see importance accumulate
  for _ in range(2):
    params, state = step(params, state, grads)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  imp = losia_jax.find_losia_state(state).importance
  # slot 0 belongs to the output layer when it is a target, else to layer 0
  profiled = {"output"} if with_output else {"self_attn.q_proj", "mlp.down_proj"}
  for role, v in imp.items():
    assert (float(jnp.abs(v.ibar).sum()) > 0) == (role in profiled), role


@pytest.mark.parametrize("form", ["builtin", "chain"])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("non_target", ["freeze", "train"])
def test_optax_step_writes_params_in_place(stacked, non_target, form):
  """``tx.update`` + ``optax.apply_updates`` in one jit with donated params, the form
  users write: XLA folds ``p + scatter_add(0, block)`` into an in-place scatter of the
  params and copies no target weight (the profiling reads come first). So its
  temporaries exceed the fused step's by at most the non-targets' updates (real
  parameter-sized arrays) and one target matrix of slack; materialized zero-plus-block
  updates would add every target matrix, and the copies that the reads needed
  unordered cost two more passes over each (1.45x AdamW's step on SmolLM2-135M)."""
  d_in, d_out, vocab, n = 96, 160, 120, 3
  layers = [{"self_attn": {"q_proj": {"kernel": jnp.ones((d_in, d_out))}},
             "mlp": {"down_proj": {"kernel": jnp.ones((d_out, d_in))}}} for _ in range(n)]
  if stacked:
    layers = jax.tree.map(lambda *x: jnp.stack(x), *layers)
  params = {"model": {"layers": layers, "embed_tokens": {"embedding": jnp.ones((vocab, d_in))}}}
  cfg = losia_jax.LoSiAConfig(rank_factor=0.125, period=3, non_target=non_target)
  if form == "builtin":
    tx = losia_jax.losia(LR, cfg, weight_decay=0.01, stacked_layers=stacked)
  else:  # the promised form: the user's AdamW as the inner optimizer
    tx = losia_jax.chain(losia_jax.losia(cfg, stacked_layers=stacked),
                         optax.adamw(LR, weight_decay=0.01))
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)

  def plain(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = {name: jax.jit(f, donate_argnums=(0, 1)).lower(params, state, grads).compile()
              for name, f in (("optax", plain),
                              ("fused", lambda p, s, g: tx.apply_gradients(g, s, p)))}
  text = compiled["optax"].as_text()
  copies = [line.strip()[:120] for line in text.splitlines()
            if " copy(%" in line and " copy(%transpose" not in line
            and any(f"{a},{b}]" in line for a, b in ((d_in, d_out), (d_out, d_in)))]
  assert not copies, copies
  # Adam on the non-targets skips a non-finite step by selects, not in a
  # conditional: their update fuses into optax.apply_updates too, no
  # parameter-sized buffer comes out of a conditional.
  embedding = f"f32[{vocab},{d_in}]"
  assert not [line for line in text.splitlines()
              if " conditional(" in line and embedding in line.split("conditional(")[0]]
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  matrix = 4 * d_in * d_out
  assert temp["optax"] <= temp["fused"] + matrix, (temp, matrix)
  # and the step is the fused step: same state, same target weights
  p1, s1 = jax.jit(plain)(params, state, grads)
  p2, s2 = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))(params, state, grads)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), s1, s2)))
  for t in tx.plan(params).targets:
    np.testing.assert_array_equal(jax.tree.leaves(p1)[t.leaf_index],
                                  jax.tree.leaves(p2)[t.leaf_index])


@pytest.mark.parametrize("schedule", ["async", "sync"])
def test_clip_norm_is_an_unclipped_step_on_gradients_scaled_by_the_read_norm(schedule):
  """clip_norm scales every gradient by min(1, c / (norm + 1e-6)), the norm taken over the
  values the step reads: blocks of non-profiling targets, full gradients of profiling
  ones, trained non-targets (computed here in NumPy from the state's indices)."""
  from tests.jax.helpers import indices_of
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.25,
                              schedule=schedule)
  out = dict(output_module="embed_tokens")
  params = tiny_params()
  plan = losia_jax.make_plan(params, cfg, **out)
  clipped, plain = (losia_jax.losia(0.05, cfg, weight_decay=0.01, clip_norm=c, **out)
                    for c in (0.5, None))
  sa, sb, pa, pb = clipped.init(params), plain.init(params), params, params
  step_a = jax.jit(lambda p, s, g: clipped.apply_gradients(g, s, p))
  step_b = jax.jit(lambda p, s, g: plain.apply_gradients(g, s, p))
  rng = np.random.default_rng(2)
  for s in range(3 * 2 * plan.total):
    g = random_grads(pa, rng)
    leaves, idx = jax.tree_util.tree_leaves(g), indices_of(sa, plan)
    owner = (s // cfg.period) % plan.total
    sq = sum(float(np.sum(np.square(leaves[i]))) for _, i in plan.non_targets)
    for t in plan.targets:
      full = np.asarray(leaves[t.leaf_index])
      full = full.T if t.transposed else full
      profiling = (owner in t.layer_ids) if schedule == "async" else owner == 0
      rows, cols = idx[t.key]
      sq += float(np.sum(np.square(full if profiling else full[np.ix_(rows, cols)])))
    factor = min(1.0, 0.5 / (np.sqrt(sq) + 1e-6))
    assert factor < 1  # the clip is active
    pa, sa = step_a(pa, sa, g)
    pb, sb = step_b(pb, sb, jax.tree.map(lambda x: x * factor, g))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6), pa, pb)
    for k, (r, c) in indices_of(sa, plan).items():
      np.testing.assert_array_equal(r, indices_of(sb, plan)[k][0])
