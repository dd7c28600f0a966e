"""LoSiA on an 8-device CPU mesh with FSDP-style sharded params equals the single-device run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import losia_jax
from tests.jax.helpers import random_grads

H, I, L = 32, 64, 4


def params_tree(seed=0):
  rng = np.random.default_rng(seed)
  w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
  layer = lambda: {"self_attn": {"q_proj": {"kernel": w(H, H)}, "o_proj": {"kernel": w(H, H)}},
                   "mlp": {"up_proj": {"kernel": w(H, I)}, "down_proj": {"kernel": w(I, H)}},
                   "norm": {"scale": jnp.ones((H,))}}
  return {"model": {"embed_tokens": {"embedding": w(64, H)}, "layers": [layer() for _ in range(L)]}}


def fsdp(mesh, x):
  # shard the first axis that divides by the mesh size, replicate small leaves
  for ax, d in enumerate(x.shape):
    if d % mesh.size == 0:
      spec = [None] * x.ndim
      spec[ax] = "fsdp"
      return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


@pytest.mark.parametrize("schedule", ["async", "sync"])
def test_sharded_equals_single_device(schedule):
  assert jax.device_count() >= 8, "tests/conftest.py asks XLA for 8 host devices"
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2, schedule=schedule)
  tx = losia_jax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(0.02, cfg, weight_decay=0.01))
  params = params_tree()
  rng = np.random.default_rng(1)
  grads = [random_grads(params, rng) for _ in range(3 * (L * 2) + 1)]

  # single device
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  p1, s1 = params, tx.init(params)
  for g in grads:
    p1, s1 = step(p1, s1, g)

  # 8 devices
  p_sh = jax.tree.map(lambda x: fsdp(mesh, x), params)
  s_sh = losia_jax.state_shardings(tx, params, p_sh)
  st_sh = losia_jax.find_losia_state(s_sh)
  rep = lambda sh: sh.is_fully_replicated
  assert all(rep(x) for x in jax.tree.leaves(st_sh.targets))  # indices, compact states
  assert not st_sh.importance["mlp.up_proj"].ibar.is_fully_replicated  # follows the weight
  p2 = jax.device_put(params, p_sh)
  s2 = jax.jit(tx.init, out_shardings=s_sh)(p2)
  step_sh = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p),
                    in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh),
                    donate_argnums=(0, 1))
  for g in grads:
    p2, s2 = step_sh(p2, s2, jax.device_put(g, p_sh))
  assert p2["model"]["layers"][0]["mlp"]["up_proj"]["kernel"].sharding == p_sh["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
  t1, t2 = losia_jax.find_losia_state(s1).targets, losia_jax.find_losia_state(s2).targets
  for role in t1:
    np.testing.assert_array_equal(t1[role].rows, t2[role].rows)
    np.testing.assert_array_equal(t1[role].cols, t2[role].cols)
  assert int(t1["mlp.up_proj"].last_relocalization.min()) >= 0  # every layer relocalized
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)


def _optax_step(tx):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return step


WRAPPED = {
    "optax.chain(clip, losia)": lambda cfg: optax.chain(optax.clip_by_global_norm(1.0),
                                                        losia_jax.losia(0.02, cfg)),
    "optax.MultiSteps(losia)": lambda cfg: optax.MultiSteps(losia_jax.losia(0.02, cfg), 2),
    "optax.apply_if_finite(losia)": lambda cfg: optax.apply_if_finite(
        losia_jax.losia(0.02, cfg), 3),
    "optax.inject_hyperparams(losia)": lambda cfg: optax.inject_hyperparams(
        losia_jax.losia, static_args=("config",))(learning_rate=0.02, config=cfg),
    "losia_jax.MultiSteps(chain(clip, losia, adamw)), fused": lambda cfg: losia_jax.MultiSteps(
        losia_jax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(cfg),
                        optax.adamw(0.02, weight_decay=0.01)), 2),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_state_shardings_through_optax_wrappers(name):
  """state_shardings works for any wrapper around LoSiA; the sharded run equals the
  single-device one."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=1)
  tx = WRAPPED[name](cfg)
  fused = name.endswith("fused")
  make_step = (lambda: (lambda p, s, g: tx.apply_gradients(g, s, p))) if fused else \
      (lambda: _optax_step(tx))
  params = params_tree()
  rng = np.random.default_rng(1)
  grads = [random_grads(params, rng) for _ in range(6)]
  p_sh = jax.tree.map(lambda x: fsdp(mesh, x), params)
  s_sh = losia_jax.state_shardings(tx, params, p_sh)

  rep = NamedSharding(mesh, P())
  st_sh = losia_jax.find_losia_state(s_sh)
  assert all(x.is_fully_replicated for x in jax.tree.leaves(st_sh.targets))
  assert st_sh.importance["mlp.up_proj"].ibar == fsdp(mesh, params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"])
  if isinstance(tx, optax.MultiSteps):  # the accumulated gradients follow the params
    assert jax.tree.structure(s_sh.acc_grads) == jax.tree.structure(p_sh)
    assert all(a == b for a, b in zip(jax.tree.leaves(s_sh.acc_grads), jax.tree.leaves(p_sh)))
    assert s_sh.mini_step == rep and s_sh.gradient_step == rep
  if name.startswith("optax.apply_if_finite"):
    assert s_sh.notfinite_count == rep and s_sh.last_finite == rep
  if name.startswith("optax.inject_hyperparams"):
    assert s_sh.hyperparams["learning_rate"] == rep

  step = jax.jit(make_step())
  p1, s1 = params, tx.init(params)
  for g in grads:
    p1, s1 = step(p1, s1, g)

  p2 = jax.device_put(params, p_sh)
  s2 = jax.jit(tx.init, out_shardings=s_sh)(p2)
  assert jax.tree.structure(s2) == jax.tree.structure(s1)
  step_sh = jax.jit(make_step(), in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh),
                    donate_argnums=(0, 1))
  for g in grads:
    p2, s2 = step_sh(p2, s2, jax.device_put(g, p_sh))
  t1, t2 = losia_jax.find_losia_state(s1).targets, losia_jax.find_losia_state(s2).targets
  for role in t1:
    np.testing.assert_array_equal(t1[role].rows, t2[role].rows)
    np.testing.assert_array_equal(t1[role].cols, t2[role].cols)
  assert int(losia_jax.find_losia_state(s2).count) == (3 if isinstance(tx, optax.MultiSteps) else 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1, s2)
