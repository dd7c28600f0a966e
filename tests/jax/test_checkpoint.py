"""Orbax: stop in the middle of a profiling window, resume, same trajectory bit for bit."""

import jax
import numpy as np
import optax

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
