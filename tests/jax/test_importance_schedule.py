"""Importance statistics and schedule arithmetic against the plain definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

import losia_jax
from losia_common import schedule
from losia_common.subnet import reference_importance


@pytest.mark.parametrize("kind", ["param_mix", "param_first", "param_second"])
def test_importance_ema(kind):
  rng = np.random.default_rng(0)
  w, g1, g2 = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
  st = losia_jax.ImportanceState(jnp.zeros((4, 5)), jnp.zeros((4, 5)))
  st = losia_jax.update_importance(st, w, g1, kind, 0.85, 0.7)
  st = losia_jax.update_importance(st, w, g2, kind, 0.85, 0.7)
  i1, i2 = reference_importance(kind, w, g1), reference_importance(kind, w, g2)
  ib1 = 0.15 * i1
  ub1 = 0.3 * np.abs(i1 - ib1)
  ib2 = 0.85 * ib1 + 0.15 * i2
  ub2 = 0.7 * ub1 + 0.3 * np.abs(i2 - ib2)
  np.testing.assert_allclose(st.ibar, ib2, rtol=1e-5)
  np.testing.assert_allclose(st.ubar, ub2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losia_jax.importance_score(st), ib2 * ub2, rtol=1e-5, atol=1e-8)


def test_schedule_matches_reference():
  for s in range(40):
    assert int(losia_jax.slot_owner(jnp.int32(s), 3, 5)) == schedule.owner(s, 3, 5)
    assert bool(losia_jax.ends_slot(jnp.int32(s), 3)) == ((s + 1) % 3 == 0)
    for r in (-1, 2, 11):
      want = schedule.rewarm(s, None if r < 0 else r, 4)
      if r >= 0 and s <= r:
        continue  # not reachable: a step is never before its own relocalization
      assert float(losia_jax.rewarm_factor(jnp.int32(s), jnp.int32(r), 4)) == pytest.approx(want)
