"""Orbax: stop in the middle of a profiling window, resume, same trajectory bit for bit;
a checkpoint written on 8 devices restores onto 4 and onto 1 with identical values."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding

import losia_jax
from losia_jax import checkpoint
from tests.jax.helpers import random_grads, tiny_params


def test_resume_mid_window_is_bit_identical(tmp_path):
  cfg = losia_jax.LoSiAConfig(rank_factor=0.34, period=3, output_rank_factor=0.2)
  tx = losia_jax.chain(optax.clip_by_global_norm(1.0),
                       losia_jax.losia(optax.cosine_decay_schedule(0.05, 30), cfg,
                                       weight_decay=0.01, output_module="embed_tokens"))
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  rng = np.random.default_rng(0)
  params0 = tiny_params()
  grads = [random_grads(params0, rng) for _ in range(20)]

  p, s = params0, tx.init(params0)
  for g in grads:
    p, s = step(p, s, g)
  reference = (p, s)

  stop = 10  # steps 9..11 are layer 2's window (ids: output 0, layers 1..3; T = 3)
  p, s = params0, tx.init(params0)
  for g in grads[:stop]:
    p, s = step(p, s, g)
  st = losia_jax.find_losia_state(s)
  assert float(st.importance["mlp.down_proj"].ibar.sum()) != 0  # mid-window: buffers hold data
  mngr = checkpoint.checkpoint_manager(tmp_path / "ckpt")
  checkpoint.save(mngr, stop, p, s)
  del p, s

  restored_step, p, s = checkpoint.restore(checkpoint.checkpoint_manager(tmp_path / "ckpt"),
                                           params0, tx)
  assert restored_step == stop
  for g in grads[stop:]:
    p, s = step(p, s, g)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), (p, s), reference)
  assert all(jax.tree.leaves(same))
  assert jax.tree.structure(s) == jax.tree.structure(reference[1])


# --- restore on another mesh ------------------------------------------------------------

_SUBPROCESS_RESTORE = r"""
import sys
import jax, numpy as np, optax
from jax.sharding import Mesh
import losia_jax
from losia_jax import checkpoint
from tests.jax.test_checkpoint import _sharded_setup
from tests.jax.test_sharding import fsdp
assert jax.device_count() == 4, jax.devices()
params, tx = _sharded_setup()
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
placed = jax.device_put(params, jax.tree.map(lambda x: fsdp(mesh, x), params))
want = np.load(sys.argv[2])
for kw in ({}, {"mesh": mesh}):  # shardings from the placed params, or the saved specs
  _, p, s = checkpoint.restore(checkpoint.checkpoint_manager(sys.argv[1]), placed, tx, **kw)
  leaves = jax.tree.leaves((p, s))
  assert all(x.sharding.device_set == set(jax.devices()) for x in leaves if x.ndim), kw
  assert all(np.array_equal(np.asarray(x), want[str(i)]) for i, x in enumerate(leaves)), kw
print("restored on 4 devices")
"""


def _sharded_setup():
  from tests.jax.test_sharding import params_tree
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
  tx = losia_jax.chain(optax.clip_by_global_norm(1.0),
                       losia_jax.losia(0.02, cfg, weight_decay=0.01))
  return params_tree(), tx


@pytest.fixture(scope="module")
def saved_on_8(tmp_path_factory):
  """Three FSDP steps on 8 devices (mid-window: importance buffers hold data), saved.

  Returns ``(directory, params, tx, (params, opt_state) as saved)``.
  """
  from tests.jax.test_sharding import fsdp
  assert jax.device_count() >= 8, "tests/conftest.py asks XLA for 8 host devices"
  directory = tmp_path_factory.mktemp("on8") / "ckpt"
  params, tx = _sharded_setup()
  mesh8 = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  p_sh = jax.tree.map(lambda x: fsdp(mesh8, x), params)
  s_sh = losia_jax.state_shardings(tx, params, p_sh)
  p, s = jax.device_put(params, p_sh), jax.jit(tx.init, out_shardings=s_sh)(
      jax.device_put(params, p_sh))
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p), out_shardings=(p_sh, s_sh))
  rng = np.random.default_rng(0)
  for _ in range(3):
    p, s = step(p, s, jax.device_put(random_grads(params, rng), p_sh))
  assert float(losia_jax.find_losia_state(s).importance["mlp.up_proj"].ibar.sum()) != 0
  checkpoint.save(checkpoint.checkpoint_manager(directory), 3, p, s)
  return directory, params, tx, (p, s)


def _same_values(restored, saved):
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      restored, saved)
  return all(jax.tree.leaves(same))


def test_restore_written_on_8_devices_onto_4_and_onto_1(saved_on_8):
  from tests.jax.test_sharding import fsdp
  directory, params, tx, saved = saved_on_8
  manager = checkpoint.checkpoint_manager(directory)

  # onto 4 devices, FSDP over them: the state follows the params (state_shardings)
  mesh4 = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  p_sh4 = jax.tree.map(lambda x: fsdp(mesh4, x), params)
  s_sh4 = losia_jax.state_shardings(tx, params, p_sh4)
  for kw in ({"shardings": p_sh4}, {"mesh": mesh4}):  # given, or the saved specs on mesh4
    _, p, s = checkpoint.restore(manager, params, tx, **kw)
    assert _same_values((p, s), saved), kw
    got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, (p, s)))
    # (state_shardings may give one sharding for an array-less subtree: match by path)
    assert got == checkpoint._aligned((p, s), (p_sh4, s_sh4))
  # ... and it trains there: a step on the 4-device mesh equals the step on 8
  g = random_grads(params, np.random.default_rng(9))
  step4 = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p), in_shardings=(p_sh4, s_sh4, p_sh4))
  p4, _ = step4(p, s, jax.device_put(g, p_sh4))
  p8, _ = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))(*saved, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p4, p8)

  # onto 1 device: a one-device mesh, or plain arrays on the default device
  mesh1 = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  for kw, like in (({"mesh": mesh1}, params), ({}, jax.device_put(params, jax.devices()[0]))):
    _, p, s = checkpoint.restore(manager, like, tx, **kw)
    assert _same_values((p, s), saved), kw
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves((p, s)))


def test_restore_in_a_process_with_only_4_devices(saved_on_8, tmp_path):
  """Where the 8 writing devices do not exist (Orbax: 'Topology mismatch detected')."""
  directory, _, _, saved = saved_on_8
  np.savez(tmp_path / "want.npz", **{str(i): np.asarray(x)
                                     for i, x in enumerate(jax.tree.leaves(saved))})
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  # first: XLA stops reading flags at a malformed one
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 " + flags,
             JAX_PLATFORMS="cpu", PYTHONPATH=root)
  run = subprocess.run([sys.executable, "-c", _SUBPROCESS_RESTORE, str(directory),
                        str(tmp_path / "want.npz")], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "restored on 4 devices" in run.stdout


def test_restore_refuses_unclear_targets(saved_on_8):
  directory, params, tx, _ = saved_on_8
  manager = checkpoint.checkpoint_manager(directory)
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  with pytest.raises(ValueError, match="not both"):
    checkpoint.restore(manager, params, tx, mesh=mesh, shardings=params)
  with pytest.raises(ValueError, match="saved with PartitionSpec.*axes \\('data',\\)"):
    checkpoint.restore(manager, params, tx, mesh=mesh)
  with pytest.raises(ValueError, match="one jax.sharding.Sharding per array"):
    checkpoint.restore(manager, params, tx, shardings={"model": None})
