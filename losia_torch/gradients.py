"""Which gradient values a LoSiA step reads, the non-finite check, the clip norm.

A step reads, per target, the block of its gradient (``[k_out, k_in]``), plus the full
gradient of each target whose layer profiles in that step (importance needs every
entry), plus the gradients of trained non-targets. Under LoSiA-Pro a non-profiling
target's block gradient is the ``.grad`` of its compact delta leaf (``pro.py``) and its
weight has no gradient at all.

Those values, and only those, are what the step checks for NaN/Inf and what the
global clip norm measures, so that switching Pro on or off leaves the trajectory
unchanged even under an active clip.
"""

from __future__ import annotations

from typing import Optional

import torch

from losia_torch.blocks import gather
from losia_torch.targets import TargetSpec

NONFINITE_MESSAGE = ("LoSiA skipped a step: a gradient value the step reads (a target block, "
                     "the full gradient of a profiling target, or a trained non-target) is NaN "
                     "or infinite; parameters and optimizer state are unchanged and the step "
                     "counter did not advance")


def all_finite(tensors: list) -> bool:
  """True if no tensor holds a NaN or an infinity (one host sync for all of them).

  Uses ``aminmax`` (one vectorized reduction, NaN propagates) rather than
  ``isfinite(x).all()``, which writes a full-size mask and is ~10x slower on CPU.
  """
  vals = []
  for c in tensors:
    if c.numel():
      vals.extend(torch.aminmax(c.detach().reshape(-1)))
  if not vals:
    return True
  dev = vals[0].device
  return bool(torch.isfinite(torch.stack([v.to(device=dev, dtype=torch.float32)
                                          for v in vals])).all())


def own_params(opt, group: dict) -> list:
  """The group's parameters without LoSiA-Pro's delta leaves (they sit in the param
  groups only so that ``zero_grad``, ``GradScaler`` and accelerate see their gradients)."""
  deltas = {id(b.delta) for b in opt.pro_blocks.values()}
  return [p for p in group["params"] if id(p) not in deltas] if deltas else group["params"]


def block_grad(opt, t: TargetSpec, st: dict, profiling: bool) -> Optional[torch.Tensor]:
  """The block gradient of target ``t`` (None if it got no gradient in this step)."""
  block = opt.pro_blocks.get(id(t.param))
  if block is not None and not profiling:
    return block.delta.grad  # Pro: the compact block gradient (None if no backward)
  if t.param.grad is None:
    return None
  return gather(t.param.grad, t, st)


def read_grads(opt) -> list[torch.Tensor]:
  """The gradient values the next step reads (see the module docstring)."""
  out = []
  for group in opt.param_groups:
    for p in own_params(opt, group):
      t = opt.target_of(p)
      if t is None:
        if opt.config.non_target == "train" and p.grad is not None:
          out.append(p.grad)
        continue
      prof = opt.profiles(t)
      blk = block_grad(opt, t, opt.state[p], prof)
      if blk is not None:
        out.append(p.grad if prof else blk)
  return out


def grad_norm(opt, norm_type: float = 2.0) -> torch.Tensor:
  """The norm of :func:`read_grads`."""
  return torch.nn.utils.get_total_norm(read_grads(opt), norm_type)


def clip_grad_norm_(opt, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach=None) -> torch.Tensor:
  """Scales every gradient the optimizer holds so that :func:`grad_norm` is at most
  ``max_norm`` (torch's rule, ``clip_grads_with_norm_``); returns the norm before."""
  total = torch.nn.utils.get_total_norm(read_grads(opt), norm_type, error_if_nonfinite, foreach)
  # clip_grads_with_norm_ takes the tensors whose .grad it scales (params and
  # Pro's compact deltas), not the gradients themselves.
  holders = [x for g in opt.param_groups for x in g["params"] if x.grad is not None]
  torch.nn.utils.clip_grads_with_norm_(holders, max_norm, total, foreach)
  return total
