"""Per-layer stepping: the optimizer update runs inside backward.

Each parameter is updated by a post-accumulate-grad hook as soon as its
gradient is complete, and the gradient is freed right away, so at most one
layer's gradients are alive at a time (the memory trick of the reference code).
``optimizer.step()`` then only closes the step: it relocalizes the profiling
layer at the end of its window and advances the step counter.

The arithmetic is LoSiA's, so a run gives the same trajectory as the ordinary
mode. What cannot work here is refused with a clear error instead of being
silently wrong:

- global gradient clipping: no global norm exists before the updates
  (``LoSiAOptimizer.clip_grad_norm_`` raises; ``torch.nn.utils.clip_grad_norm_``
  would see no gradients, since they are freed);
- gradient accumulation: a second gradient for a parameter before ``step()``
  raises (the first one was already applied);
- skipping a step on non-finite gradients: earlier layers are already updated
  when a later gradient turns out NaN/Inf, so this raises, naming the parameter;
- LoSiA-Pro (compact gradients are not parameter gradients): refused.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from losia_torch.optimizer import _all_finite


@dataclasses.dataclass
class LayerwiseState:
  handles: list
  done: set  # ids of parameters updated in the current step
  profiled: list  # targets that profiled in the current step
  names: dict  # id(param) -> name, for messages


def enable_per_layer_step(opt) -> None:
  """Registers the update hooks on every parameter of ``opt`` that requires grad."""
  if opt._pro:
    raise ValueError("per-layer stepping does not work with LoSiA-Pro; call disable_pro() first")
  if opt._layerwise is not None:
    return
  if torch.distributed.is_available() and torch.distributed.is_initialized() \
      and torch.distributed.get_world_size() > 1:
    raise RuntimeError(
        "per-layer stepping does not work with data parallelism: each rank would apply its "
        "own, un-averaged gradient inside backward (the hooks run before DDP's all-reduce). "
        "Use the ordinary step() under DistributedDataParallel.")
  names = {}
  for g in opt.param_groups:
    for name, p in zip(g.get("param_names", [None] * len(g["params"])), g["params"]):
      names[id(p)] = name or f"parameter of shape {tuple(p.shape)}"
  state = LayerwiseState([], set(), [], names)
  for group in opt.param_groups:
    for p in group["params"]:
      if p.requires_grad:
        state.handles.append(
            p.register_post_accumulate_grad_hook(functools.partial(_hook, opt, group)))
  opt._layerwise = state


def disable_per_layer_step(opt) -> None:
  state = opt._layerwise
  if state is None:
    return
  if state.done:
    raise RuntimeError("call step() to close the current step before disabling per-layer stepping")
  for h in state.handles:
    h.remove()
  opt._layerwise = None


@torch.no_grad()
def _hook(opt, group, p) -> None:
  state = opt._layerwise
  name = state.names.get(id(p), "a parameter")
  if id(p) in state.done:
    raise RuntimeError(
        f"per-layer stepping: a second gradient for {name} arrived before optimizer.step(); "
        "gradient accumulation is not supported in this mode (each gradient is applied "
        "inside backward). Call step() after every backward, or disable_per_layer_step().")
  s = opt.losia_step
  work, nt_work, checks = [], [], []
  opt._collect(group, p, s, work, nt_work, checks)
  if not _all_finite(checks):
    raise FloatingPointError(
        f"per-layer stepping: the gradient of {name} is NaN or infinite at step {s}. Other "
        "layers were already updated inside this backward, so the step cannot be skipped as "
        "the ordinary mode does; use the ordinary mode (disable_per_layer_step()) when "
        "gradients may overflow.")
  state.done.add(id(p))
  opt._apply(work, nt_work, s)
  state.profiled.extend(t for _, t, _, _, prof in work if prof)
  p.grad = None


def finish_step(opt) -> None:
  """``optimizer.step()`` in per-layer mode: relocalize if due, advance the counter."""
  state = opt._layerwise
  if not state.done:
    return  # no backward since the last step: nothing happened
  opt._finish(state.profiled, opt.losia_step)
  state.done.clear()
  state.profiled.clear()
