"""One LoSiA step in three parts: collect, apply, finish.

``LoSiAOptimizer.step`` runs them over all parameters at once; per-layer stepping
(``layerwise.py``) runs ``collect`` and ``apply`` for one parameter inside backward,
as soon as its gradient is ready, and ``finish`` from ``step()``. So both modes do the
same arithmetic.

- :func:`collect` decides what step ``s`` does with a parameter: a target's block
  update (with profiling if its layer profiles), a non-target's Adam(W) update, or
  nothing (no gradient, or a frozen non-target); it also lists the gradient values
  read, for the caller's non-finite check.
- :func:`apply` accumulates importance (from the weights *before* the update), then
  updates.
- :func:`finish` relocalizes the profiling targets if their slot ends with ``s``,
  advances ``losia_step`` and tells LoSiA-Pro layers their new indices and flags.

These functions use only the optimizer's documented interface (see
:class:`losia_torch.LoSiAOptimizer`, "Interface for the package's modules").
"""

from __future__ import annotations

import dataclasses

import torch

from losia_torch import relocalization as _reloc
from losia_torch import schedule as _sched
from losia_torch import update as _update
from losia_torch.gradients import block_grad


@dataclasses.dataclass
class StepWork:
  """What one step does, filled by :func:`collect`.

  Attributes:
    targets: ``(group, target, state, block gradient, profiling)`` per target.
    non_targets: ``(group, parameter)`` per trained non-target.
    checks: every gradient value read (for the non-finite check).
  """

  targets: list = dataclasses.field(default_factory=list)
  non_targets: list = dataclasses.field(default_factory=list)
  checks: list = dataclasses.field(default_factory=list)

  def empty(self) -> bool:
    return not self.targets and not self.non_targets

  def profiled(self) -> list:
    return [t for _, t, _, _, prof in self.targets if prof]


def collect(opt, group: dict, p: torch.Tensor, s: int, work: StepWork) -> None:
  """Adds what step ``s`` does with parameter ``p`` (of param group ``group``) to ``work``."""
  t = opt.target_of(p)
  if t is None:
    if opt.config.non_target == "train" and p.grad is not None:
      if p.grad.is_sparse:
        raise RuntimeError(f"LoSiA does not support sparse gradients ({tuple(p.shape)})")
      work.non_targets.append((group, p))
      work.checks.append(p.grad)
    return
  st = opt.state[p]
  prof = opt.profiles(t, s)
  gblk = block_grad(opt, t, st, prof)
  if gblk is None:
    return
  work.checks.append(gblk)
  if prof:
    work.checks.append(p.grad)
  work.targets.append((group, t, st, gblk, prof))


def apply(opt, work: StepWork, s: int) -> None:
  """Profiling (weights before the update), then the updates of step ``s``."""
  for _, t, _, _, prof in work.targets:
    if prof:
      _reloc.accumulate_importance(opt.importance, opt.slot_key(t), t, opt.config)
  if work.targets:
    _update.update_targets(work.targets, s, opt.config)
  if work.non_targets:
    _update.update_non_targets(work.non_targets, s, opt.state)


def finish(opt, profiled: list, s: int) -> None:
  """End of step ``s``: relocalize the profiling targets if their slot ends."""
  if _sched.ends_slot(s, opt.config.period):
    for t in profiled:
      _reloc.relocalize(opt.importance, opt.slot_key(t), t, opt.state[t.param], s)
  opt.losia_step = s + 1
  opt.sync_pro_blocks()  # Pro layers learn their new indices and profiling flags
