"""Gradient-based importance of weights (LOSIA_SPEC.md section 3), in torch."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from losia_common import IMPORTANCE_KINDS


def instant_importance(kind: str, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
  """``I`` from ``P = W ⊙ G`` in fp32.

  ``param_mix``: ``|P - P²/2|``; ``param_first``: ``|P|``; ``param_second``: ``P²``.
  """
  return _instant_importance(kind, w, g, None)


def _instant_importance(kind: str, w: torch.Tensor, g: torch.Tensor,
                        scratch: Optional[torch.Tensor]) -> torch.Tensor:
  """:func:`instant_importance` with ``scratch`` (fp32, ``w``'s shape, or None) as the
  temporary of ``param_mix``.

  Why: on CPU every fresh matrix-sized tensor comes from a new ``mmap`` and pays a
  page fault per 4 KiB on first touch, which costs several times the arithmetic
  (measured: a 4096 x 4096 ``mul`` into a new tensor 78 ms, in place 4 ms). The
  operations and their order are those of the plain formula, so results are bitwise
  the same.
  """
  p = w.to(torch.float32) * g.to(torch.float32)
  if kind == "param_mix":  # |P - (0.5 P) P|, in place on the temporary P
    q = torch.mul(p, 0.5, out=scratch) if scratch is not None else p.mul(0.5)
    return p.sub_(q.mul_(p)).abs_()
  if kind == "param_first":
    return p.abs_()
  if kind == "param_second":
    return p.mul_(p)
  raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}; got {kind!r}")


@dataclasses.dataclass
class ImportanceSlot:
  """fp32 profiling statistics of one matrix, in the weight's ``[d_out, d_in]`` layout.

  Attributes:
    ibar: EMA of the instantaneous importance ``I`` (``Ī``).
    ubar: EMA of the uncertainty ``|I - Ī|`` (``Ū``).
  """

  ibar: torch.Tensor
  ubar: torch.Tensor

  @classmethod
  def zeros(cls, shape, device=None) -> "ImportanceSlot":
    return cls(torch.zeros(shape, dtype=torch.float32, device=device),
               torch.zeros(shape, dtype=torch.float32, device=device))

  def update(self, w: torch.Tensor, g: torch.Tensor, kind: str, beta1: float,
             beta2: float) -> None:
    """One profiling step, in place: ``Ī ← β1 Ī + (1-β1) I``; ``Ū ← β2 Ū + (1-β2) |I - Ī|``."""
    update_importance(self.ibar, self.ubar, w, g, kind, beta1, beta2)

  def score(self) -> torch.Tensor:
    """The localization score ``S = Ī ⊙ Ū``."""
    return importance_score(self.ibar, self.ubar)

  def state_dict(self) -> dict:
    return {"ibar": self.ibar, "ubar": self.ubar}


def update_importance(ibar: torch.Tensor, ubar: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                      kind: str, beta1: float, beta2: float) -> None:
  """In-place EMA update of ``(ibar, ubar)`` from weights ``w`` and full gradient ``g``.

  The new ``Ī`` is used in the uncertainty term (LOSIA_SPEC.md section 3).
  """
  # Two matrix-sized temporaries (``I`` and one scratch) instead of one per operation.
  scratch = torch.empty(ibar.shape, dtype=torch.float32, device=ibar.device)
  i = _instant_importance(kind, w, g, scratch)
  ibar.mul_(beta1).add_(torch.mul(i, 1.0 - beta1, out=scratch))
  ubar.mul_(beta2).add_(i.sub_(ibar).abs_().mul_(1.0 - beta2))


def importance_score(ibar: torch.Tensor, ubar: torch.Tensor) -> torch.Tensor:
  """``S = Ī ⊙ Ū``."""
  return ibar * ubar
