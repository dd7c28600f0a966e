"""Schedule arithmetic of the torch backend against the plain definitions."""

import numpy as np

from losia_common import schedule as S
from losia_torch.schedule import adam_bias_correction, ends_slot, rewarm_factor


def test_rewarm_factor():
  assert rewarm_factor(5, -1, 4) == 1.0
  assert rewarm_factor(5, None, 4) == 1.0
  assert [rewarm_factor(s, 9, 4) for s in range(10, 16)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
  for s in range(10, 40):
    for r in range(0, s):
      assert rewarm_factor(s, r, 7) == np.float32(S.rewarm(s, r, 7))


def test_ends_slot_and_bias_correction():
  assert [ends_slot(s, 3) for s in range(6)] == [False, False, True, False, False, True]
  assert adam_bias_correction(0.9, 1) == np.float32(1) - np.float32(0.9)
  assert abs(adam_bias_correction(0.999, 1000) - (1 - 0.999 ** 1000)) < 1e-5
