"""Schedule arithmetic of LOSIA_SPEC.md sections 5 and 6, on Python ints.

Both backends compute the same quantities on device; these plain versions are
the readable definition and the oracle of the tests.
"""

from __future__ import annotations


def total_slots(num_layers: int, output_is_target: bool) -> int:
  """``total = L + a``."""
  return num_layers + int(output_is_target)


def layer_id(layer_index: int | None, output_is_target: bool) -> int:
  """Decoder layer ``i`` has id ``i + a``; the output layer (index None) id 0."""
  return 0 if layer_index is None else layer_index + int(output_is_target)


def owner(step: int, period: int, total: int) -> int:
  """The layer id whose profiling slot contains 0-based step ``step``."""
  return (step // period) % total


def profiles(lid: int, step: int, period: int, total: int, schedule: str) -> bool:
  """Does layer ``lid`` profile (accumulate importance) during step ``step``?"""
  o = owner(step, period, total)
  return o == 0 if schedule == "sync" else o == lid


def relocalizes(lid: int, step: int, period: int, total: int, schedule: str) -> bool:
  """Does layer ``lid`` choose a new subnet at the end of step ``step``?"""
  return profiles(lid, step, period, total, schedule) and (step + 1) % period == 0


def rewarm(step: int, last_relocalization: int | None, period: int, enabled: bool = True) -> float:
  """``min(1, (s - r - 1) / T)`` after a relocalization at the end of step r; 1 before any."""
  if not enabled or last_relocalization is None:
    return 1.0
  return min(1.0, (step - last_relocalization - 1) / period)
