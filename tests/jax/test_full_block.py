"""An analytic limit: LoSiA whose block is the whole matrix is AdamW.

With ``rank_factor = output_rank_factor = 1`` every target's block is all of
its rows and columns, and before the first relocalization the rewarm factor is
1 and the inner state is never reset, so every spelling of LoSiA must follow
``optax.adamw`` step by step, targets and non-targets alike (decoupled decay,
bias correction, eps placement). If this breaks, the gap between LoSiA and
full fine-tuning in docs/QUALITY.md is no longer a question of block size.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import losia_jax
from tests.jax.helpers import random_grads, tiny_params

STEPS = 6
LR, B1, B2, WD = 3e-3, 0.9, 0.95, 0.1
CFG = losia_jax.LoSiAConfig(rank_factor=1.0, output_rank_factor=1.0, period=10 * STEPS)


def _spellings():
  return {
      "losia": lambda: losia_jax.losia(LR, CFG, b1=B1, b2=B2, weight_decay=WD,
                                       output_module="embed_tokens"),
      "chain": lambda: losia_jax.chain(losia_jax.losia(CFG, output_module="embed_tokens"),
                                       optax.adamw(LR, b1=B1, b2=B2, weight_decay=WD)),
  }


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "optax"])
@pytest.mark.parametrize("name", list(_spellings()))
def test_whole_matrix_block_is_adamw(name, fused):
  params = tiny_params(layers=2)
  rng = np.random.default_rng(3)
  grads = [random_grads(params, rng) for _ in range(STEPS)]

  ref = optax.adamw(LR, b1=B1, b2=B2, weight_decay=WD)
  want, s = params, ref.init(params)
  for g in grads:
    u, s = ref.update(g, s, want)
    want = optax.apply_updates(want, u)

  tx = _spellings()[name]()
  if fused:
    step = jax.jit(lambda p, s, g: losia_jax.apply_gradients(tx, g, s, p))
  else:
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    step = jax.jit(step)
  got, s = params, tx.init(params)
  for g in grads:
    got, s = step(got, s, g)

  for (path, w), x in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(w), rtol=0, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
