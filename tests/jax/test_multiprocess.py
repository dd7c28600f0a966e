"""LoSiA across 2 JAX processes (jax.distributed, gloo CPU collectives) equals one process.

Two local processes with 2 CPU devices each form a 4-device global mesh; the params
are sharded FSDP-style over it (as in ``test_sharding.py``), gradients are global
arrays built from the same host data, and the jitted step runs SPMD across the
processes. The final params and indices must match a single-device run.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3 * 4 * 2 + 1  # three rounds of 4 layers, period 2


def _setup():
  import jax
  import optax
  import losia_jax
  from tests.jax.test_sharding import params_tree
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
  tx = losia_jax.chain(optax.clip_by_global_norm(1.0),
                       losia_jax.losia(0.02, cfg, weight_decay=0.01))
  params = params_tree()
  rng = np.random.default_rng(1)
  grads = [jax.tree.map(lambda p: np.asarray(rng.normal(0, 1.0, p.shape), np.float32), params)
           for _ in range(STEPS)]
  return tx, params, grads


def _indices(state):
  import losia_jax
  t = losia_jax.find_losia_state(state).targets
  return {role: (np.asarray(t[role].rows), np.asarray(t[role].cols)) for role in t}


def _worker(pid: int, port: int, out: str) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh
  import losia_jax
  from tests.jax.test_sharding import fsdp
  assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
  tx, params, grads = _setup()
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  p_sh = jax.tree.map(lambda x: fsdp(mesh, x), params)
  s_sh = losia_jax.state_shardings(tx, params, p_sh)
  # each process supplies only the shards of its own devices
  glob = lambda tree: jax.tree.map(
      lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda i: np.asarray(x)[i]),
      tree, p_sh)
  p = glob(params)
  s = jax.jit(tx.init, out_shardings=s_sh)(p)
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p),
                 in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
  for g in grads:
    p, s = step(p, s, glob(g))
  full = multihost_utils.process_allgather(p, tiled=True)
  idx = multihost_utils.process_allgather(
      {k: v for k, v in losia_jax.find_losia_state(s).targets.items()}, tiled=True)
  flat = {"/".join(str(k) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(full)[0]}
  for role, t in idx.items():
    flat[f"rows:{role}"], flat[f"cols:{role}"] = np.asarray(t.rows), np.asarray(t.cols)
  np.savez(os.path.join(out, f"proc{pid}.npz"), **flat)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  import jax
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  try:
    for pr in procs:
      outs.append(pr.communicate(timeout=300)[0])
  finally:
    for pr in procs:
      if pr.poll() is None:
        pr.kill()
  for pr, o in zip(procs, outs):
    assert pr.returncode == 0, o[-3000:]
  # the single-device run
  tx, params, grads = _setup()
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  p1, s1 = params, tx.init(params)
  for g in grads:
    p1, s1 = step(p1, s1, g)
  ref = {"/".join(str(k) for k in path): np.asarray(v)
         for path, v in jax.tree_util.tree_flatten_with_path(p1)[0]}
  for role, (rows, cols) in _indices(s1).items():
    ref[f"rows:{role}"], ref[f"cols:{role}"] = rows, cols
  import losia_jax
  t1 = losia_jax.find_losia_state(s1).targets
  assert int(t1["mlp.up_proj"].last_relocalization.min()) >= 0  # every layer relocalized
  for pid in range(2):
    got = np.load(tmp_path / f"proc{pid}.npz")
    assert sorted(got.files) == sorted(ref), pid
    for k, v in ref.items():
      if k.startswith(("rows:", "cols:")):
        np.testing.assert_array_equal(got[k], v, err_msg=k)
      else:
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
