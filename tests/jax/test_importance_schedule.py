"""Importance statistics and schedule arithmetic against the plain definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from losia_common import schedule
from losia_common.subnet import reference_importance
from losia_jax.importance import (ImportanceState, accumulate_importance, importance_score,
                                  update_importance)
from losia_jax.schedule import ends_slot, rewarm_factor, slot_owner


@pytest.mark.parametrize("kind", ["param_mix", "param_first", "param_second"])
def test_importance_ema(kind):
  rng = np.random.default_rng(0)
  w, g1, g2 = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
  st = ImportanceState(jnp.zeros((4, 5)), jnp.zeros((4, 5)))
  st = update_importance(st, w, g1, kind, 0.85, 0.7)
  st = update_importance(st, w, g2, kind, 0.85, 0.7)
  i1, i2 = reference_importance(kind, w, g1), reference_importance(kind, w, g2)
  ib1 = 0.15 * i1
  ub1 = 0.3 * np.abs(i1 - ib1)
  ib2 = 0.85 * ib1 + 0.15 * i2
  ub2 = 0.7 * ub1 + 0.3 * np.abs(i2 - ib2)
  np.testing.assert_allclose(st.ibar, ib2, rtol=1e-5)
  np.testing.assert_allclose(st.ubar, ub2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(importance_score(st), ib2 * ub2, rtol=1e-5, atol=1e-8)


def test_accumulate_importance_masks_and_resets():
  """The masked, product-form update: active -> update_importance exactly; inactive ->
  the state unchanged; fresh -> as if the statistics were zero."""
  rng = np.random.default_rng(1)
  w, g = (jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(2))
  st = ImportanceState(*(jnp.asarray(rng.random((6, 3)), jnp.float32)
                                   for _ in range(2)))
  zero = ImportanceState(jnp.zeros((6, 3)), jnp.zeros((6, 3)))
  p = w * g
  ref = update_importance(st, w, g, "param_mix", 0.85, 0.7)
  from_zero = update_importance(zero, w, g, "param_mix", 0.85, 0.7)
  acc = lambda **kw: accumulate_importance(st, p, "param_mix", 0.85, 0.7, **kw)
  for got, want in ((acc(), ref), (acc(active=jnp.array(True)), ref),
                    (acc(active=jnp.array(False)), st),
                    (acc(active=jnp.array(False), fresh=jnp.array(True)), st),
                    (acc(active=jnp.array(True), fresh=jnp.array(True)), from_zero),
                    (acc(fresh=jnp.array(False)), ref)):
    np.testing.assert_array_equal(got.ibar, want.ibar)
    np.testing.assert_array_equal(got.ubar, want.ubar)
  assert float(jnp.abs(ref.ibar - st.ibar).max()) > 0  # the cases differ


def test_schedule_matches_reference():
  for s in range(40):
    assert int(slot_owner(jnp.int32(s), 3, 5)) == schedule.owner(s, 3, 5)
    assert bool(ends_slot(jnp.int32(s), 3)) == ((s + 1) % 3 == 0)
    for r in (-1, 2, 11):
      want = schedule.rewarm(s, None if r < 0 else r, 4)
      if r >= 0 and s <= r:
        continue  # not reachable: a step is never before its own relocalization
      assert float(rewarm_factor(jnp.int32(s), jnp.int32(r), 4)) == pytest.approx(want)
