"""losia_jax.nnx.Optimizer: flax.nnx.Optimizer on LoSiA's fused in-place path."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import losia_jax
import losia_jax.nnx
import losia_jax.wrappers
from losia_jax import nnx as losia_nnx

CFG = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
# Frozen non-targets: the two paths then see the same gradients at every step, so the
# whole trajectory is bit for bit. (Trained non-targets differ by an ulp between the
# paths, as documented, and that ulp reaches the next gradients.)
FROZEN = losia_jax.LoSiAConfig(rank_factor=0.25, period=2, non_target="freeze")


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


X = jax.random.normal(jax.random.key(1), (16, 8))
Y = jnp.sum(X, -1, keepdims=True)


def loss_fn(model):
  return jnp.mean((model(X) - Y) ** 2)


@nnx.jit
def train_step(model, opt):
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def pure_params(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


TXS = {
    "losia": lambda cfg: losia_jax.losia(0.05, cfg, weight_decay=0.01),
    "chain(clip, losia, adamw)": lambda cfg: losia_jax.chain(
        optax.clip_by_global_norm(1.0), losia_jax.losia(cfg), optax.adamw(0.05)),
    "losia_jax.MultiSteps": lambda cfg: losia_jax.MultiSteps(losia_jax.losia(0.05, cfg), 2),
    "optax.MultiSteps": lambda cfg: optax.MultiSteps(losia_jax.losia(0.05, cfg), 2),
}


@pytest.mark.parametrize("name", list(TXS))
def test_fused_optimizer_equals_nnx_optimizer_bit_for_bit(name):
  """Same trajectory as nnx.Optimizer's standard path: losses and weights bit for bit."""
  m1, m2 = TinyModel(nnx.Rngs(0)), TinyModel(nnx.Rngs(0))
  ref = nnx.Optimizer(m1, TXS[name](FROZEN), wrt=nnx.Param)
  opt = losia_nnx.Optimizer(m2, TXS[name](FROZEN), wrt=nnx.Param)
  assert isinstance(opt, nnx.Optimizer)
  # the same state layout: nnx tooling and checkpoints see an nnx.Optimizer
  assert jax.tree.structure(nnx.state(opt)) == jax.tree.structure(nnx.state(ref))
  losses = []
  for _ in range(10):  # 5 LoSiA steps for MultiSteps, relocalizations included
    l1, l2 = train_step(m1, ref), train_step(m2, opt)
    assert float(l1) == float(l2)
    losses.append(float(l2))
    jax.tree.map(np.testing.assert_array_equal, pure_params(m1), pure_params(m2))
  assert losses[-1] < losses[0]
  assert int(opt.step[...]) == int(ref.step[...]) == 10
  jax.tree.map(np.testing.assert_array_equal, nnx.as_pure(ref.opt_state),
               nnx.as_pure(opt.opt_state))
  st = losia_jax.find_losia_state(nnx.as_pure(opt.opt_state))
  assert int(st.count) == (5 if "MultiSteps" in name else 10)
  assert int(st.targets["up_proj"].last_relocalization.min()) >= 0  # every block moved


@pytest.mark.parametrize("name", ["losia", "chain(clip, losia, adamw)"])
def test_fused_optimizer_with_trained_non_targets(name):
  """Trained non-targets: the same trajectory within float rounding."""
  m1, m2 = TinyModel(nnx.Rngs(0)), TinyModel(nnx.Rngs(0))
  ref = nnx.Optimizer(m1, TXS[name](CFG), wrt=nnx.Param)
  opt = losia_nnx.Optimizer(m2, TXS[name](CFG), wrt=nnx.Param)
  assert isinstance(opt, nnx.Optimizer)
  # the same state layout: nnx tooling and checkpoints see an nnx.Optimizer
  assert jax.tree.structure(nnx.state(opt)) == jax.tree.structure(nnx.state(ref))
  for _ in range(10):
    train_step(m1, ref)
    train_step(m2, opt)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               pure_params(m1), pure_params(m2))
  for a, b in zip(jax.tree.leaves(nnx.as_pure(ref.opt_state)),
                  jax.tree.leaves(nnx.as_pure(opt.opt_state))):
    if a.dtype == jnp.int32:  # indices, counters
      np.testing.assert_array_equal(a, b)


def test_update_takes_the_fused_path():
  """With a transformation whose update() raises, only the fused path can train."""
  core = losia_jax.losia(0.05, CFG)

  def boom(*args, **kwargs):
    raise AssertionError("update() was called")

  spy = losia_jax.wrappers.FusedTransformation(core.init, boom, core.apply_gradients)
  model = TinyModel(nnx.Rngs(0))
  opt = losia_nnx.Optimizer(model, spy, wrt=nnx.Param)
  before = pure_params(model)
  train_step(model, opt)
  assert not np.array_equal(before["layers"][0]["q_proj"]["kernel"],
                            pure_params(model)["layers"][0]["q_proj"]["kernel"])
  with pytest.raises(AssertionError, match="update"):
    train_step(model, nnx.Optimizer(model, spy, wrt=nnx.Param))


@pytest.mark.parametrize("make", [lambda: optax.adam(1e-2),
                                  lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                                      losia_jax.losia(0.05, CFG))])
def test_without_a_fused_path_it_is_nnx_optimizer(make):
  m1, m2 = TinyModel(nnx.Rngs(0)), TinyModel(nnx.Rngs(0))
  ref = nnx.Optimizer(m1, make(), wrt=nnx.Param)
  opt = losia_nnx.Optimizer(m2, make(), wrt=nnx.Param)
  for _ in range(3):
    train_step(m1, ref)
    train_step(m2, opt)
  jax.tree.map(np.testing.assert_array_equal, pure_params(m1), pure_params(m2))
  grads = nnx.grad(loss_fn)(m2)
  assert opt.update(m2, grads) is not None  # the standard path returns the updates


def test_docstring_examples():
  result = doctest.testmod(losia_jax.nnx, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
