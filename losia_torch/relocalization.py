"""Importance profiling and relocalization (LOSIA_SPEC.md sections 3 and 4).

During its profiling slot a target accumulates the smoothed importance of every
entry of its weight (``ImportanceSlot``, from the weight before the step's update
and the full gradient). At the end of the slot it picks a new block from those
scores, restarts its Adam state (step count included) and records the step, from
which its rewarm ramp starts again.

The buffers are keyed by :meth:`LoSiAOptimizer.slot_key`: the role in async mode
(``self_attn.q_proj``: one buffer per role, reused by each layer in turn), the
target's name in sync mode.
"""

from __future__ import annotations

import logging

from losia_torch.blocks import fresh_adam
from losia_torch.importance import ImportanceSlot
from losia_torch.selection import select_rows, select_subnet
from losia_torch.targets import TargetSpec

logger = logging.getLogger("losia_torch")


def accumulate_importance(importance: dict, key: str, t: TargetSpec, cfg) -> None:
  """Adds this step's importance of ``t`` (weight and ``.grad`` now) to ``importance[key]``,
  starting a zero buffer if there is none of ``t``'s shape."""
  slot = importance.get(key)
  if slot is None or slot.ibar.shape != t.param.shape:
    slot = importance[key] = ImportanceSlot.zeros(t.param.shape, t.param.device)
  slot.update(t.param, t.param.grad, cfg.importance, cfg.importance_beta1, cfg.importance_beta2)


def relocalize(importance: dict, key: str, t: TargetSpec, st: dict, s: int) -> None:
  """End of ``t``'s slot at step ``s``: new indices from ``importance[key]`` (consumed),
  fresh Adam state, ``last_relocalization = s``. Nothing happens without a buffer."""
  slot = importance.pop(key, None)
  if slot is None:
    return
  score = slot.score()  # in the parameter's layout
  if t.transposed:
    score = score.t()
  if t.row_mode:
    st["rows"] = select_rows(score, t.k_out).to(t.param.device)
  else:
    rows, cols = select_subnet(score, t.k_out, t.k_in)
    st["rows"], st["cols"] = rows.to(t.param.device), cols.to(t.param.device)
  st.update(fresh_adam(t))
  st["last_relocalization"] = s
  logger.debug("LoSiA relocalized %s at the end of step %d", t.name, s)
