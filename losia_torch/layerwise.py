"""Per-layer stepping: the optimizer update runs inside backward.

Each parameter is updated by a post-accumulate-grad hook as soon as its
gradient is complete, and the gradient is freed right away, so at most one
layer's gradients are alive at a time (the memory trick of the reference code).
``optimizer.step()`` then only closes the step: it relocalizes the profiling
layer at the end of its window and advances the step counter.

The arithmetic is LoSiA's (the hooks run ``losia_torch.step``'s ``collect`` and
``apply`` for one parameter, ``step()`` runs ``finish``), so a run gives the same
trajectory as the ordinary mode. What cannot work here is refused with a clear
error instead of being silently wrong:

- global gradient clipping: no global norm exists before the updates
  (``LoSiAOptimizer.clip_grad_norm_`` raises; ``torch.nn.utils.clip_grad_norm_``
  would see no gradients, since they are freed);
- gradient accumulation: a second gradient for a parameter before ``step()``
  raises (the first one was already applied);
- skipping a step on non-finite gradients: earlier layers are already updated
  when a later gradient turns out NaN/Inf, so this raises, naming the parameter;
- LoSiA-Pro (compact gradients are not parameter gradients): refused by the
  optimizer's ``enable_per_layer_step``.
"""

from __future__ import annotations

import functools

import torch

from losia_torch import step as _step
from losia_torch.gradients import all_finite


class PerLayerStep:
  """The hooks and the bookkeeping of one optimizer's per-layer stepping.

  Made by ``LoSiAOptimizer.enable_per_layer_step``, which holds it until
  ``disable_per_layer_step`` calls :meth:`remove`.

  Attributes:
    done: ids of the parameters updated in the current step.
    profiled: targets that profiled in the current step.
  """

  def __init__(self, opt):
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1:
      raise RuntimeError(
          "per-layer stepping does not work with data parallelism: each rank would apply its "
          "own, un-averaged gradient inside backward (the hooks run before DDP's all-reduce). "
          "Use the ordinary step() under DistributedDataParallel.")
    self.opt = opt
    self.done: set = set()
    self.profiled: list = []
    self.names: dict = {}  # id(param) -> name, for messages
    for g in opt.param_groups:
      for name, p in zip(g.get("param_names", [None] * len(g["params"])), g["params"]):
        self.names[id(p)] = name or f"parameter of shape {tuple(p.shape)}"
    self.handles = [p.register_post_accumulate_grad_hook(functools.partial(self._hook, group))
                    for group in opt.param_groups for p in group["params"] if p.requires_grad]

  def remove(self) -> None:
    if self.done:
      raise RuntimeError("call step() to close the current step before disabling per-layer "
                         "stepping")
    for h in self.handles:
      h.remove()

  @torch.no_grad()
  def _hook(self, group: dict, p: torch.Tensor) -> None:
    opt = self.opt
    name = self.names.get(id(p), "a parameter")
    if id(p) in self.done:
      raise RuntimeError(
          f"per-layer stepping: a second gradient for {name} arrived before optimizer.step(); "
          "gradient accumulation is not supported in this mode (each gradient is applied "
          "inside backward). Call step() after every backward, or disable_per_layer_step().")
    s = opt.losia_step
    work = _step.StepWork()
    _step.collect(opt, group, p, s, work)
    if not all_finite(work.checks):
      raise FloatingPointError(
          f"per-layer stepping: the gradient of {name} is NaN or infinite at step {s}. Other "
          "layers were already updated inside this backward, so the step cannot be skipped as "
          "the ordinary mode does; use the ordinary mode (disable_per_layer_step()) when "
          "gradients may overflow.")
    self.done.add(id(p))
    _step.apply(opt, work, s)
    self.profiled.extend(work.profiled())
    p.grad = None

  def finish(self) -> None:
    """``optimizer.step()`` in per-layer mode: relocalize if due, advance the counter."""
    if not self.done:
      return  # no backward since the last step: nothing happened
    _step.finish(self.opt, self.profiled, self.opt.losia_step)
    self.done.clear()
    self.profiled.clear()


def enable_per_layer_step(opt) -> None:
  """Registers the update hooks on every parameter of ``opt`` that requires grad
  (``opt.enable_per_layer_step()``)."""
  opt.enable_per_layer_step()


def disable_per_layer_step(opt) -> None:
  """Removes the hooks (``opt.disable_per_layer_step()``)."""
  opt.disable_per_layer_step()
