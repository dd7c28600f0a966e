"""The core block of each target: its per-target state and its view of a weight.

A target's state (``optimizer.state[param]``) is ``rows``/``cols`` (int64 indices into
the ``[d_out, d_in]`` orientation), ``last_relocalization``, and Adam moments of the
block's shape ``[k_out, k_in]`` (fp32) with their own ``step`` count, restarted at
every relocalization (LOSIA_SPEC.md sections 2 and 6).

:func:`gather` and :func:`scatter` read and write that block of a full-size tensor in
the parameter's own layout: ``nn.Linear`` stores ``[d_out, d_in]``, transformers'
``Conv1D`` ``[d_in, d_out]`` (``t.transposed``), and a target in row mode (the output
layer) trains whole rows.
"""

from __future__ import annotations

import torch

from losia_common.subnet import initial_indices
from losia_torch.targets import TargetSpec


def fresh_adam(t: TargetSpec) -> dict:
  """Zero compact moments and step count 0 (at the start and after each relocalization)."""
  z = lambda: torch.zeros(t.block_shape, dtype=torch.float32, device=t.param.device)
  return {"step": 0, "exp_avg": z(), "exp_avg_sq": z()}


def initial_target_state(t: TargetSpec, seed: int) -> dict:
  """The state of target ``t`` before step 0: seeded indices (the same in ``losia_jax``)."""
  dev = t.param.device
  rows = torch.as_tensor(initial_indices(seed, t.identity, t.d_out, t.k_out, "rows"),
                         dtype=torch.int64, device=dev)
  if t.row_mode:  # the output layer trains whole rows: cols holds all columns
    cols = torch.arange(t.d_in, dtype=torch.int64, device=dev)
  else:
    cols = torch.as_tensor(initial_indices(seed, t.identity, t.d_in, t.k_in, "cols"),
                           dtype=torch.int64, device=dev)
  st = {"rows": rows, "cols": cols, "last_relocalization": -1}
  st.update(fresh_adam(t))
  return st


def gather(x: torch.Tensor, t: TargetSpec, st: dict) -> torch.Tensor:
  """The ``[k_out, k_in]`` block of ``x`` (a weight or its gradient)."""
  if t.row_mode:
    return x.index_select(0, st["rows"])
  if t.transposed:  # Conv1D: x is [d_in, d_out]
    return x[st["cols"][:, None], st["rows"][None, :]].t()
  return x[st["rows"][:, None], st["cols"][None, :]]


def scatter(w: torch.Tensor, t: TargetSpec, st: dict, blk: torch.Tensor) -> None:
  """Writes the ``[k_out, k_in]`` block ``blk`` into ``w``."""
  if t.row_mode:
    w.index_copy_(0, st["rows"], blk)
  elif t.transposed:
    w.index_put_((st["cols"][:, None], st["rows"][None, :]), blk.t())
  else:
    w.index_put_((st["rows"][:, None], st["cols"][None, :]), blk)
