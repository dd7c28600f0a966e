"""LoSiA inside standard optax wrappers: MultiSteps on the fused path, apply_if_finite,
optax.chain(clip, losia), and finding LoSiA inside any of them."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import losia_jax
import losia_jax.wrappers
from losia_jax.wrappers import find_losia, fused_path
from tests.jax.helpers import random_grads, tiny_params

CFG = losia_jax.LoSiAConfig(rank_factor=0.34, period=2)


def plan_of(params):
  return losia_jax.make_plan(params, CFG)


def optax_step(tx):
  """The plain optax way: update + apply_updates in one jit."""
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return jax.jit(step)


def assert_targets_identical(plan, a, b, what=""):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  for t in plan.targets:
    np.testing.assert_array_equal(la[t.leaf_index], lb[t.leaf_index], err_msg=f"{t.key} {what}")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def assert_states_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def inners():
  return {
      "losia": lambda: losia_jax.losia(0.02, CFG, weight_decay=0.01),
      "chain_adamw": lambda: losia_jax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(CFG),
                                             optax.adamw(0.02, weight_decay=0.01)),
  }


@pytest.mark.parametrize("inner", ["losia", "chain_adamw"])
def test_multisteps_fused_equals_optax_multisteps(inner):
  params = tiny_params()
  plan = plan_of(params)
  rng = np.random.default_rng(0)
  grads = [random_grads(params, rng) for _ in range(12)]  # 4 LoSiA steps of k=3
  ref = optax.MultiSteps(inners()[inner](), every_k_schedule=3)
  ms = losia_jax.MultiSteps(inners()[inner](), every_k_schedule=3)
  assert isinstance(ms, optax.MultiSteps)
  plain = optax.MultiSteps(inners()[inner](), every_k_schedule=3)  # fused via apply_gradients()
  fused = jax.jit(ms.apply_gradients, donate_argnums=(1, 2))
  fused_plain = jax.jit(lambda g, s, p: losia_jax.apply_gradients(plain, g, s, p))
  step_ref = optax_step(ref)
  p1 = p2 = p3 = params
  s1, s2, s3 = ref.init(params), ms.init(params), plain.init(params)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)  # MultiSteps' own state
  for k, g in enumerate(grads):
    before = p2
    p1, s1 = step_ref(p1, s1, g)
    p2, s2 = fused(g, s2, jax.tree.map(jnp.copy, p2))
    p3, s3 = fused_plain(g, s3, p3)
    assert isinstance(s2, optax.MultiStepsState)
    if k % 3 != 2:  # a mini-step only accumulates: nothing moves, LoSiA's state is untouched
      jax.tree.map(np.testing.assert_array_equal, before, p2)
    assert bool(ms.has_updated(s2)) == (k % 3 == 2)
    assert_targets_identical(plan, p1, p2, f"step {k}")
    assert_targets_identical(plan, p1, p3, f"step {k}")
    assert_states_equal(s1, s2)
    assert_states_equal(s1, s3)
  st = losia_jax.find_losia_state(s2)
  assert int(st.count) == 4 and int(s2.gradient_step) == 4
  assert int(st.targets["self_attn.q_proj"].last_relocalization.max()) >= 0  # relocalized


def test_multisteps_fused_path_never_calls_update():
  """The fused MultiSteps step goes through the inner apply_gradients only."""
  params = tiny_params()
  core = losia_jax.losia(0.02, CFG)

  def boom(*args, **kwargs):
    raise AssertionError("the fused path called update()")

  spy = losia_jax.wrappers.FusedTransformation(core.init, boom, core.apply_gradients)
  ms = losia_jax.MultiSteps(spy, every_k_schedule=2)
  s = ms.init(params)
  rng = np.random.default_rng(0)
  step = jax.jit(ms.apply_gradients)
  p = params
  for _ in range(4):
    p, s = step(random_grads(params, rng), s, p)
  assert int(losia_jax.find_losia_state(s).count) == 2
  with pytest.raises(AssertionError, match="called update"):
    optax_step(ms)(params, ms.init(params), random_grads(params, rng))
  # gradient_transformation() keeps the fused path (what nnx.Optimizer and users get)
  gt = ms.gradient_transformation()
  assert isinstance(gt, optax.GradientTransformationExtraArgs)
  assert fused_path(gt) is not None and fused_path(optax.MultiSteps(core, 2)) is not None


def test_multisteps_skip_function_on_the_fused_path():
  params = tiny_params()
  plan = plan_of(params)
  rng = np.random.default_rng(2)
  grads = [random_grads(params, rng) for _ in range(6)]
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[1])
  grads.insert(1, bad)  # a mini-step to be skipped
  kw = dict(every_k_schedule=2, should_skip_update_fn=optax.skip_not_finite)
  ref = optax.MultiSteps(losia_jax.losia(0.02, CFG), **kw)
  ms = losia_jax.MultiSteps(losia_jax.losia(0.02, CFG), **kw)
  p1 = p2 = params
  s1, s2 = ref.init(params), ms.init(params)
  step_ref, fused = optax_step(ref), jax.jit(ms.apply_gradients)
  for k, g in enumerate(grads):
    p1, s1 = step_ref(p1, s1, g)
    p2, s2 = fused(g, s2, p2)
    assert_targets_identical(plan, p1, p2)
    assert_states_equal(s1, s2)
    assert bool(s2.skip_state["should_skip"]) == (k == 1)
  # 6 accepted mini-steps of 7: three full steps and nothing pending (without the skip: 1)
  assert int(s2.gradient_step) == 3 and int(s2.mini_step) == 0
  assert np.isfinite(np.asarray(jax.tree.leaves(p2)[0])).all()


def test_losia_multisteps_needs_a_fused_transformation():
  with pytest.raises(ValueError, match="use optax.MultiSteps"):
    losia_jax.MultiSteps(optax.adam(1e-3), every_k_schedule=2)


def test_apply_if_finite_through_the_optax_path():
  params = tiny_params()
  plan = plan_of(params)
  rng = np.random.default_rng(3)
  grads = [random_grads(params, rng) for _ in range(6)]
  nan = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads[0])
  tx = optax.apply_if_finite(losia_jax.losia(0.02, CFG), max_consecutive_errors=3)
  one = losia_jax.losia(0.02, CFG)
  p1, s1, p2, s2 = params, tx.init(params), params, one.init(params)
  step, step_one = optax_step(tx), optax_step(one)
  for k, g in enumerate(grads):
    if k == 2:  # a non-finite step is rejected: nothing moves, LoSiA's state is untouched
      before_p, before_s = p1, losia_jax.find_losia_state(s1)
      p1, s1 = step(p1, s1, nan)
      jax.tree.map(np.testing.assert_array_equal, before_p, p1)
      jax.tree.map(np.testing.assert_array_equal, before_s, losia_jax.find_losia_state(s1))
      assert int(s1.notfinite_count) == 1 and int(s1.total_notfinite) == 1
    p1, s1 = step(p1, s1, g)
    p2, s2 = step_one(p2, s2, g)
    assert_targets_identical(plan, p1, p2, f"step {k}")
  assert_states_equal(losia_jax.find_losia_state(s1), s2)
  assert int(s1.notfinite_count) == 0 and int(s2.count) == 6


def test_optax_chain_clip_then_losia_through_the_optax_path():
  params = tiny_params()
  plan = plan_of(params)
  rng = np.random.default_rng(4)
  grads = [random_grads(params, rng, 10.0) for _ in range(6)]  # large: the clip engages
  tx = optax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(0.02, CFG))
  one = losia_jax.losia(0.02, CFG)
  clip = optax.clip_by_global_norm(1.0)
  p1, s1, p2, s2 = params, tx.init(params), params, one.init(params)
  step = optax_step(tx)
  fused_one = jax.jit(lambda p, s, g: one.apply_gradients(clip.update(g, clip.init(p))[0], s, p))
  for k, g in enumerate(grads):
    p1, s1 = step(p1, s1, g)
    p2, s2 = fused_one(p2, s2, g)
    assert_targets_identical(plan, p1, p2, f"step {k}")
  assert_states_equal(s1[1], s2)
  assert float(optax.tree.norm(grads[0])) > 10  # the clip did engage


def test_find_losia_through_wrappers():
  params = tiny_params()
  core = losia_jax.losia(0.02, CFG)
  expected = core.plan(params).summary()
  wrapped = {
      "itself": core,
      "losia_jax.chain": losia_jax.chain(optax.clip_by_global_norm(1.0), core),
      "optax.chain": optax.chain(optax.clip_by_global_norm(1.0), core),
      "MultiSteps": optax.MultiSteps(core, 2),
      "apply_if_finite": optax.apply_if_finite(core, 3),
      "nested": optax.MultiSteps(optax.apply_if_finite(
          optax.chain(optax.clip_by_global_norm(1.0), core), 3), 2),
      "inject_hyperparams": optax.inject_hyperparams(
          losia_jax.losia, static_args=("config",))(learning_rate=0.02, config=CFG),
  }
  for name, tx in wrapped.items():
    cores = find_losia(tx)
    assert len(cores) == 1, name
    assert cores[0].plan(params).summary() == expected, name
    assert cores[0].inner is not None, name
  assert find_losia(optax.adam(1e-3)) == []


def test_docstring_examples():
  result = doctest.testmod(losia_jax.wrappers, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
