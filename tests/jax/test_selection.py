"""select_subnet / select_rows against the NumPy reference, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from losia_common.subnet import reference_select
from losia_jax.selection import select_rows, select_subnet
from tests.common.test_subnet_and_names import SPEC_S


def test_spec_example():
  rows, cols = select_subnet(jnp.asarray(SPEC_S, jnp.float32), 2, 2)
  assert rows.tolist() == [3, 4] and cols.tolist() == [1, 3]
  assert rows.dtype == jnp.int32


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_random_with_ties(seed):
  rng = np.random.default_rng(seed)
  d_out, d_in = rng.integers(3, 40, size=2)
  # small integers: many exact ties in sums and top-k
  s = rng.integers(0, 4, size=(d_out, d_in)).astype(np.float32)
  k_out, k_in = int(rng.integers(1, d_out + 1)), int(rng.integers(1, d_in + 1))
  r, c = jax.jit(select_subnet, static_argnums=(1, 2))(jnp.asarray(s), k_out, k_in)
  rr, cc = reference_select(s, k_out, k_in)
  assert r.tolist() == rr.tolist() and c.tolist() == cc.tolist()


def test_all_equal_scores_pick_lowest_indices():
  r, c = select_subnet(jnp.zeros((6, 5)), 3, 2)
  assert r.tolist() == [0, 1, 2] and c.tolist() == [0, 1]


def test_select_rows_and_errors():
  s = jnp.asarray([[1, 1], [5, 0], [0, 0], [2, 2]], jnp.float32)
  assert select_rows(s, 2).tolist() == [1, 3]
  with pytest.raises(ValueError, match="k_out"):
    select_subnet(s, 5, 1)
  with pytest.raises(ValueError, match="2-D"):
    select_subnet(jnp.ones(3), 1, 1)
