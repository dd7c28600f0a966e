"""Schedule arithmetic of LOSIA_SPEC.md sections 5 and 6 for the torch backend.

The step counter lives on the host (a Python int), so the plain definitions of
``losia_common.schedule`` are used directly; the factors that enter the
arithmetic are rounded to fp32 exactly as the JAX backend computes them.
"""

from __future__ import annotations

import numpy as np

from losia_common.schedule import layer_id, owner, profiles, relocalizes, total_slots

__all__ = ["adam_bias_correction", "ends_slot", "layer_id", "owner", "profiles",
           "relocalizes", "rewarm_factor", "total_slots"]


def ends_slot(step: int, period: int) -> bool:
  """True in the last step of a slot, after which the profiling layer relocalizes."""
  return (step + 1) % period == 0


def rewarm_factor(step: int, last_relocalization: int, period: int) -> float:
  """``min(1, (s - r - 1) / T)`` in fp32; 1 before any relocalization (``r < 0``).

  Exactly 0 on the first step of a new subnet, rising linearly to 1 over ``T`` steps.
  """
  if last_relocalization is None or last_relocalization < 0:
    return 1.0
  ramp = np.float32(step - last_relocalization - 1) / np.float32(period)
  return float(np.clip(ramp, np.float32(0.0), np.float32(1.0)))


def adam_bias_correction(beta: float, count: int) -> float:
  """``1 - beta**count`` in fp32 (as ``optax.scale_by_adam`` computes it)."""
  return float(np.float32(1.0) - np.float32(beta) ** np.float32(count))
