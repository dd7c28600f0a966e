"""LoSiA across 2 JAX processes (jax.distributed, gloo CPU collectives) equals one process,
and an Orbax checkpoint the 2 processes write together resumes there and in one process.

Two local processes with 2 CPU devices each form a 4-device global mesh; the params
are sharded FSDP-style over it (as in ``test_sharding.py``), gradients are global
arrays built from the same host data, and the jitted step runs SPMD across the
processes. The final params and indices must match a single-device run.

Mid-run (in a profiling window, importance buffers full) the processes save with
``losia_jax.checkpoint``: each writes the shards of its own devices into one shared
directory, as Orbax does on several hosts. They then restore it onto the same global
mesh and run on; that run must equal the uninterrupted one bit for bit. The test
process restores the same checkpoint onto 1 device and onto a 4-device mesh of its
own, values identical to what was saved, and a run on from there matches too.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3 * 4 * 2 + 1  # three rounds of 4 layers, period 2
SAVE_AT = 11  # steps run when the checkpoint is written: the second step of a window


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


def _flat(tree) -> dict:
  """Every array of ``tree`` by its key path, as numpy."""
  import jax
  return {jax.tree_util.keystr(path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _result(params, state) -> dict:
  """Params and the indices of every target: what the runs must agree on."""
  import losia_jax
  out = _flat(params)
  for role, t in losia_jax.find_losia_state(state).targets.items():
    out[f"rows:{role}"], out[f"cols:{role}"] = np.asarray(t.rows), np.asarray(t.cols)
  return out


def _worker(pid: int, port: int, out: str) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh
  import losia_jax
  from losia_jax import checkpoint
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
  gather = lambda tree: multihost_utils.process_allgather(tree, tiled=True)
  save = lambda name, p, s: np.savez(os.path.join(out, f"{name}{pid}.npz"),
                                     **_result(gather(p), gather(s)))
  p = glob(params)
  s = jax.jit(tx.init, out_shardings=s_sh)(p)
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p),
                 in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
  ckpt = os.path.join(out, "ckpt")
  for i, g in enumerate(grads):
    if i == SAVE_AT:  # every process calls save; Orbax writes each one's shards
      checkpoint.save(checkpoint.checkpoint_manager(ckpt), SAVE_AT, p, s)
      np.savez(os.path.join(out, f"saved{pid}.npz"), **_flat(gather((p, s))))
    p, s = step(p, s, glob(g))
  save("straight", p, s)

  # resume, as a restarted job would: a fresh manager, the target from the placed params
  manager = checkpoint.checkpoint_manager(ckpt)
  _, p, s = checkpoint.restore(manager, glob(params), tx)
  got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, (p, s)))
  assert got == checkpoint._aligned((p, s), (p_sh, s_sh)), "restored off the global mesh"
  # the saved partition specs laid over the mesh give the same arrays
  _, p_m, s_m = checkpoint.restore(manager, params, tx, mesh=mesh)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), gather((p, s)), gather((p_m, s_m)))
  assert all(jax.tree.leaves(same)), "restore(mesh=...) differs from restore(params_like)"
  for g in grads[SAVE_AT:]:
    p, s = step(p, s, glob(g))
  save("resumed", p, s)
  manager.close()
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """Runs the 2-process job once; its directory holds the npz results and ``ckpt``."""
  out = tmp_path_factory.mktemp("two_processes")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(out)],
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
  return out


@pytest.fixture(scope="module")
def one_device():
  """The single-device run: ``(tx, params, grads, params and state after SAVE_AT, result)``."""
  import jax
  import losia_jax
  tx, params, grads = _setup()
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  p, s = params, tx.init(params)
  for i, g in enumerate(grads):
    if i == SAVE_AT:
      at_save = (p, s)
    p, s = step(p, s, g)
  assert int(losia_jax.find_losia_state(s).targets["mlp.up_proj"].last_relocalization.min()) >= 0
  return tx, params, grads, at_save, _result(p, s)


def _assert_matches(got, ref, what):
  assert sorted(got) == sorted(ref), what
  for k, v in ref.items():  # indices and counters exactly, floats to rounding
    if not np.issubdtype(v.dtype, np.floating):
      np.testing.assert_array_equal(got[k], v, err_msg=f"{what}: {k}")
    else:
      np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {k}")


@pytest.mark.slow
def test_two_processes_equal_one(two_processes, one_device):
  ref = one_device[-1]
  for pid in range(2):
    _assert_matches(dict(np.load(two_processes / f"straight{pid}.npz")), ref, f"process {pid}")


@pytest.mark.slow
def test_two_processes_resume_their_checkpoint_exactly(two_processes, one_device):
  import losia_jax
  # the checkpoint holds a mid-window state, written by both processes
  st = losia_jax.find_losia_state(one_device[3][1])
  assert any(float(b.ibar.sum()) != 0 for b in st.importance.values())
  for item in ("params", "opt_state"):  # each process wrote the shards of its own devices
    for pid in range(2):
      assert os.listdir(two_processes / "ckpt" / str(SAVE_AT) / item / f"ocdbt.process_{pid}" / "d")
  for pid in range(2):
    straight = dict(np.load(two_processes / f"straight{pid}.npz"))
    resumed = dict(np.load(two_processes / f"resumed{pid}.npz"))
    assert sorted(resumed) == sorted(straight)
    for k in straight:  # same processes, same mesh, same steps: bit for bit
      np.testing.assert_array_equal(resumed[k], straight[k], err_msg=f"process {pid}: {k}")
    _assert_matches(resumed, one_device[-1], f"resumed process {pid}")


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(two_processes, one_device):
  import jax
  from jax.sharding import Mesh
  import losia_jax
  from losia_jax import checkpoint
  from tests.jax.test_sharding import fsdp
  tx, params, grads, at_save, ref = one_device
  saved = dict(np.load(two_processes / "saved0.npz"))  # (params, state) at the save
  _assert_matches(saved, _flat(at_save), "saved by 2 processes vs 1 device at the save")
  manager = checkpoint.checkpoint_manager(two_processes / "ckpt")
  dev0 = jax.devices()[0]
  mesh4 = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  p_sh4 = jax.tree.map(lambda x: fsdp(mesh4, x), params)
  restored = {}
  for name, like, kw in (("1 device", jax.device_put(params, dev0), {}),
                         ("1-device mesh", params, {"mesh": Mesh(np.array([dev0]), ("fsdp",))}),
                         ("4-device mesh", params, {"shardings": p_sh4}),
                         ("4-device mesh, saved specs", params, {"mesh": mesh4})):
    _, p, s = checkpoint.restore(manager, like, tx, **kw)
    got = _flat((p, s))
    assert sorted(got) == sorted(saved), name
    for k in saved:
      np.testing.assert_array_equal(got[k], saved[k], err_msg=f"{name}: {k}")
    devices = {dev0} if name.startswith("1") else set(mesh4.devices.flat)
    assert all(x.sharding.device_set == devices for x in jax.tree.leaves((p, s)) if x.ndim), name
    restored[name] = (p, s)
  # a single-device run on from the 2-process checkpoint ends where the straight run does
  p, s = restored["1 device"]
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  for g in grads[SAVE_AT:]:
    p, s = step(p, s, g)
  _assert_matches(_result(p, s), ref, "resumed on 1 device")


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
