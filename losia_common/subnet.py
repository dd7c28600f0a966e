"""Framework-neutral subnet arithmetic: sizes, the seeded initial subnet and a
NumPy reference of the greedy localization (LOSIA_SPEC.md sections 2 and 4).

The reference selection is the oracle both backends are tested against; it is
not used on the training path.
"""

from __future__ import annotations

import math
import zlib

import numpy as np


def block_size(factor: float, dim: int) -> int:
  """``k = max(1, floor(factor * dim))`` (section 2)."""
  return max(1, int(math.floor(factor * dim)))


def _rng(seed: int, identity: str) -> np.random.Generator:
  entropy = [seed % (1 << 64), zlib.crc32(identity.encode("utf-8"))]
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def initial_indices(seed: int, identity: str, dim: int, k: int, axis: str) -> np.ndarray:
  """Sorted random ``k`` of ``range(dim)`` for one axis (``"rows"`` or ``"cols"``).

  Keyed on the config seed, the canonical target identity and the axis only, so
  both backends draw the same initial subnet for the same model (section 2).
  """
  if not 1 <= k <= dim:
    raise ValueError(f"cannot choose {k} of {dim} indices")
  rng = _rng(seed, f"{identity}/{axis}")
  return np.sort(rng.permutation(dim)[:k]).astype(np.int64)


def topk_lowest_index(x: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest entries; ties go to the lower index. Unsorted order."""
  return np.argsort(-np.asarray(x), kind="stable")[:k]


def reference_select(score: np.ndarray, k_out: int, k_in: int) -> tuple[np.ndarray, np.ndarray]:
  """NumPy reference of the greedy best-of-three localization (section 4).

  ``score`` is ``[d_out, d_in]``; returns sorted ``(rows, cols)``.
  """
  s = np.asarray(score, dtype=np.float64)
  r1 = topk_lowest_index(s.sum(1), k_out)
  c1 = topk_lowest_index(s.sum(0), k_in)
  c2 = topk_lowest_index(s[r1].sum(0), k_in)
  r3 = topk_lowest_index(s[:, c1].sum(1), k_out)
  cands = [(r1, c1), (r1, c2), (r3, c1)]
  sums = [s[np.ix_(r, c)].sum() for r, c in cands]
  best = int(np.argmax(sums))  # first maximum: the earlier candidate wins ties
  r, c = cands[best]
  return np.sort(r), np.sort(c)


def reference_importance(kind: str, w: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Instantaneous importance I of section 3 (NumPy reference)."""
  p = np.asarray(w, np.float64) * np.asarray(g, np.float64)
  if kind == "param_mix":
    return np.abs(p - 0.5 * p * p)
  if kind == "param_first":
    return np.abs(p)
  if kind == "param_second":
    return p * p
  raise ValueError(f"unknown importance kind {kind!r}")
