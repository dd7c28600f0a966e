"""Importance (LOSIA_SPEC.md section 3) in torch."""

import numpy as np
import pytest
import torch

from losia_common.subnet import reference_importance
from losia_torch import ImportanceSlot, instant_importance


@pytest.mark.parametrize("kind", ["param_mix", "param_first", "param_second"])
def test_instant_importance_matches_reference(kind):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((5, 7)).astype(np.float32)
  g = (3 * rng.standard_normal((5, 7))).astype(np.float32)
  got = instant_importance(kind, torch.from_numpy(w).bfloat16().float(), torch.from_numpy(g))
  want = reference_importance(kind, torch.from_numpy(w).bfloat16().float().numpy(), g)
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
  assert got.dtype == torch.float32


def test_instant_importance_values():
  w = torch.tensor([2.0, -1.0])
  g = torch.tensor([1.0, 4.0])  # P = [2, -4]
  assert instant_importance("param_mix", w, g).tolist() == [0.0, 12.0]
  assert instant_importance("param_first", w, g).tolist() == [2.0, 4.0]
  assert instant_importance("param_second", w, g).tolist() == [4.0, 16.0]
  with pytest.raises(ValueError, match="importance"):
    instant_importance("nope", w, g)


def test_ema_uses_the_new_ibar_and_fp32_buffers():
  slot = ImportanceSlot.zeros((2,))
  w = torch.tensor([1.0, 1.0], dtype=torch.bfloat16)
  g1 = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
  slot.update(w, g1, "param_first", 0.5, 0.25)
  assert slot.ibar.dtype == torch.float32
  assert slot.ibar.tolist() == [0.5, 0.25]
  assert slot.ubar.tolist() == [0.75 * 0.5, 0.75 * 0.25]
  slot.update(w, torch.tensor([3.0, 0.5], dtype=torch.bfloat16), "param_first", 0.5, 0.25)
  ibar = [0.5 * 0.5 + 0.5 * 3.0, 0.5 * 0.25 + 0.5 * 0.5]
  assert slot.ibar.tolist() == ibar
  ubar = [0.25 * 0.375 + 0.75 * abs(3.0 - ibar[0]), 0.25 * 0.1875 + 0.75 * abs(0.5 - ibar[1])]
  np.testing.assert_allclose(slot.ubar.numpy(), ubar, rtol=1e-7)
  torch.testing.assert_close(slot.score(), slot.ibar * slot.ubar)
