"""Greedy best-of-three subnet localization (LOSIA_SPEC.md section 4), in torch."""

from __future__ import annotations

import torch


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
  """Indices of the ``k`` largest entries of a 1-D tensor; ties go to the lower index.

  ``torch.topk`` does not promise an order among equal values, so this uses a
  stable descending sort (equal values keep index order), matching
  ``losia_common.subnet.topk_lowest_index`` and ``jax.lax.top_k``. The result
  is in descending-value order, not sorted by index.
  """
  return torch.sort(x, descending=True, stable=True).indices[:k]


def _block_sum(s: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
  return s[rows[:, None], cols[None, :]].sum()


def _check(score: torch.Tensor, k_out: int, k_in: int | None) -> None:
  if not isinstance(score, torch.Tensor) or score.ndim != 2:
    raise ValueError(f"score must be a 2-D tensor [d_out, d_in]; got shape "
                     f"{tuple(getattr(score, 'shape', ()))}")
  d_out, d_in = score.shape
  if not 1 <= k_out <= d_out:
    raise ValueError(f"need 1 <= k_out <= {d_out}; got k_out={k_out}")
  if k_in is not None and not 1 <= k_in <= d_in:
    raise ValueError(f"need 1 <= k_in <= {d_in}; got k_in={k_in}")


def select_subnet(score: torch.Tensor, k_out: int, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
  """Chooses the core subnet of one target from its importance score.

  Three greedy candidates are built: *independent* (top rows by row sum, top
  columns by column sum), *rows then columns* (columns re-ranked over the chosen
  rows) and *columns then rows*; the one with the largest block sum wins, the
  earlier one on an exact tie. Sums are taken in fp32.

  Args:
    score: ``[d_out, d_in]`` non-negative scores (output neurons first).
    k_out: number of rows (output neurons) to keep.
    k_in: number of columns (input neurons) to keep.

  Returns:
    ``(rows, cols)``: int64 tensors of sizes ``k_out`` and ``k_in``, sorted ascending.

  Example:
    >>> import torch
    >>> from losia_torch import select_subnet
    >>> s = torch.tensor([[16, 9, 12, 4, 9, 34], [10, 30, 10, 1, 0, 28],
    ...                   [7, 26, 7, 36, 4, 28], [27, 34, 11, 33, 25, 21],
    ...                   [12, 25, 30, 33, 11, 21], [26, 3, 27, 16, 3, 36]], dtype=torch.float32)
    >>> rows, cols = select_subnet(s, 2, 2)
    >>> rows.tolist(), cols.tolist()
    ([3, 4], [1, 3])
  """
  _check(score, k_out, k_in)
  s = score.detach().to(torch.float32)
  r1 = top_k_indices(s.sum(dim=1), k_out)
  c1 = top_k_indices(s.sum(dim=0), k_in)
  c2 = top_k_indices(s.index_select(0, r1).sum(dim=0), k_in)
  r3 = top_k_indices(s.index_select(1, c1).sum(dim=1), k_out)
  sums = torch.stack([_block_sum(s, r1, c1), _block_sum(s, r1, c2), _block_sum(s, r3, c1)])
  best = int(torch.argmax(sums))  # first maximum: the earlier candidate wins exact ties
  rows = r3 if best == 2 else r1
  cols = c2 if best == 1 else c1
  return torch.sort(rows).values.to(torch.int64), torch.sort(cols).values.to(torch.int64)


def select_rows(score: torch.Tensor, k_out: int) -> torch.Tensor:
  """Output-layer (row) mode: the ``k_out`` rows with the largest row sums, sorted."""
  _check(score, k_out, None)
  rows = top_k_indices(score.detach().to(torch.float32).sum(dim=1), k_out)
  return torch.sort(rows).values.to(torch.int64)
