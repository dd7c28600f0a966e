"""The learning-rate schedule of ``losia-finetune``, shared by both backends.

:func:`lr_multiplier` is plain Python so that the torch backend (through
``torch.optim.lr_scheduler.LambdaLR``) and the JAX backend (through an optax
schedule it builds from the same function) use the same numbers for the same
step; a run is then comparable across backends step by step.
"""

from __future__ import annotations

import math

from losia_cli.backend import LR_SCHEDULES


def lr_multiplier(step: int, schedule: str, warmup_steps: int, total_steps: int) -> float:
  """Factor on the base learning rate for the optimizer step ``step`` (0-based).

  Linear warmup: step ``s < warmup_steps`` gets ``(s + 1) / warmup_steps``, so
  the first step already moves (a 0 there would waste a step, and LoSiA's own
  rewarm ramp already starts at 0 after each relocalization) and step
  ``warmup_steps - 1`` reaches 1. Then, with ``progress = (s - warmup_steps) /
  (total_steps - warmup_steps)``:

  - ``"constant"``: 1;
  - ``"linear"``: ``1 - progress``, 0 at ``s = total_steps``;
  - ``"cosine"``: ``(1 + cos(pi * progress)) / 2``, 0 at ``s = total_steps``.

  Steps at or past ``total_steps`` get 0 under the decaying schedules.

  Args:
    step: the optimizer step about to be taken (0 for the first one).
    schedule: one of ``losia_cli.backend.LR_SCHEDULES``.
    warmup_steps: length of the warmup (0: none).
    total_steps: optimizer steps of the whole run.

  Raises:
    ValueError: an unknown schedule or a negative count.
  """
  if schedule not in LR_SCHEDULES:
    raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {schedule!r}")
  if warmup_steps < 0 or total_steps < 0 or step < 0:
    raise ValueError(f"step, warmup_steps and total_steps must be >= 0; got step={step}, "
                     f"warmup_steps={warmup_steps}, total_steps={total_steps}")
  if step < warmup_steps:
    return (step + 1) / warmup_steps
  if schedule == "constant":
    return 1.0
  # max(1, .): a run whose warmup covers all of it still gets a defined decay.
  progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
  if schedule == "linear":
    return 1.0 - progress
  return 0.5 * (1.0 + math.cos(math.pi * progress))
