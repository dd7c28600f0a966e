"""Greedy best-of-three localization in torch against the spec and the NumPy reference."""

import numpy as np
import pytest
import torch

from losia_common.subnet import reference_select, topk_lowest_index
from losia_torch import select_rows, select_subnet, top_k_indices

SPEC_S = [[16, 9, 12, 4, 9, 34], [10, 30, 10, 1, 0, 28], [7, 26, 7, 36, 4, 28],
          [27, 34, 11, 33, 25, 21], [12, 25, 30, 33, 11, 21], [26, 3, 27, 16, 3, 36]]


def test_spec_example():
  s = torch.tensor(SPEC_S, dtype=torch.float32)
  rows, cols = select_subnet(s, 2, 2)
  assert rows.tolist() == [3, 4] and cols.tolist() == [1, 3]  # rows then columns, sum 125
  assert rows.dtype == torch.int64 and cols.dtype == torch.int64
  assert s[rows][:, cols].sum().item() == 125


def test_earlier_candidate_wins_exact_ties():
  # All candidates give the same block sum: the independent one must win.
  s = torch.ones(4, 4)
  rows, cols = select_subnet(s, 2, 2)
  assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]


def test_topk_ties_go_to_the_lower_index():
  x = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0])
  assert top_k_indices(x, 3).tolist() == [1, 2, 4]
  big = torch.zeros(1000)
  big[[999, 500, 3]] = 1.0
  assert sorted(top_k_indices(big, 5).tolist()) == [0, 1, 3, 500, 999]


@pytest.mark.parametrize("seed", range(30))
def test_matches_reference_on_random_scores_with_ties(seed):
  rng = np.random.default_rng(seed)
  d_out, d_in = rng.integers(1, 24, size=2)
  k_out, k_in = int(rng.integers(1, d_out + 1)), int(rng.integers(1, d_in + 1))
  if seed % 3 == 0:
    s = rng.integers(0, 3, size=(d_out, d_in)).astype(np.float32)  # many exact ties
  elif seed % 3 == 1:
    s = np.repeat(rng.integers(0, 4, size=(d_out, 1)), d_in, 1).astype(np.float32)
  else:
    s = rng.random((d_out, d_in)).astype(np.float32)
  r, c = select_subnet(torch.from_numpy(s), k_out, k_in)
  rr, rc = reference_select(s, k_out, k_in)
  assert r.tolist() == rr.tolist() and c.tolist() == rc.tolist()
  rows = select_rows(torch.from_numpy(s), k_out)
  assert rows.tolist() == sorted(topk_lowest_index(s.astype(np.float64).sum(1), k_out).tolist())


def test_bad_arguments():
  s = torch.ones(3, 4)
  with pytest.raises(ValueError, match="k_out"):
    select_subnet(s, 0, 2)
  with pytest.raises(ValueError, match="k_in"):
    select_subnet(s, 2, 5)
  with pytest.raises(ValueError, match="2-D"):
    select_subnet(torch.ones(3), 1, 1)
