"""LoSiA-Pro for torch: a linear map whose backward computes only the block gradient.

LOSIA_SPEC.md section 8. For a target ``nn.Linear`` that is not profiling, the
forward saves only ``x[..., cols]`` and the backward produces

- the exact, dense input gradient ``dy @ W``, and
- the block gradient ``dy[..., rows]ᵀ · x[..., cols]`` (``[k_out, k_in]``),
  written into a compact zero "delta" leaf the optimizer holds, never into
  ``W.grad``: no full-size weight gradient exists for that target.

A target whose layer is profiling (it needs its full gradient for importance)
runs the ordinary full backward during its window. The optimizer reads each
target's block gradient from the delta leaf or from ``W.grad`` accordingly, so
the training trajectory is LoSiA's, up to floating-point reduction order.

Limits: only targets owned by an ``nn.Linear`` (the output layer and tied
embeddings keep the ordinary path); ``torch.autocast`` and
``DistributedDataParallel`` are not supported (DDP would not all-reduce the
compact gradients); global-norm clipping must go through
``LoSiAOptimizer.clip_grad_norm_`` so that it sees the block gradients.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F


class LoSiAProLinear(torch.autograd.Function):
  """``y = x Wᵀ + b`` with a compact weight gradient (the block ``rows`` x ``cols``).

  Inputs: ``x [..., d_in]``, ``weight [d_out, d_in]``, ``bias [d_out]`` or None,
  ``delta [k_out, k_in]`` (the leaf that receives the block gradient), ``rows``
  and ``cols`` (int64 indices). ``weight`` gets no gradient.
  """

  @staticmethod
  def forward(ctx, x, weight, bias, delta, rows, cols):
    ctx.save_for_backward(x.index_select(-1, cols), weight, rows)
    ctx.has_bias = bias is not None
    return F.linear(x, weight, bias)

  @staticmethod
  def backward(ctx, dy):
    x_cols, weight, rows = ctx.saved_tensors
    dx = dbias = dblock = None
    if ctx.needs_input_grad[0]:
      dx = dy.matmul(weight)
    if ctx.needs_input_grad[3]:
      dy_rows = dy.index_select(-1, rows)
      dblock = dy_rows.reshape(-1, dy_rows.shape[-1]).t().matmul(
          x_cols.reshape(-1, x_cols.shape[-1]))
    if ctx.has_bias and ctx.needs_input_grad[2]:
      dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, None, dbias, dblock, None, None


def pro_linear(x: torch.Tensor, weight: torch.Tensor, bias, delta: torch.Tensor,
               rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
  """Functional form of :class:`LoSiAProLinear`."""
  return LoSiAProLinear.apply(x, weight, bias, delta, rows, cols)


@dataclasses.dataclass(eq=False)
class ProHandle:
  """The Pro state of one target: its module, and the compact gradient leaf."""

  name: str
  module: torch.nn.Linear
  delta: torch.Tensor

  def zero_grad(self, set_to_none: bool = True) -> None:
    if self.delta.grad is None:
      return
    if set_to_none:
      self.delta.grad = None
    else:
      self.delta.grad.zero_()


def _pro_forward(module: torch.nn.Linear, handle: ProHandle, optimizer, x: torch.Tensor):
  t = optimizer._spec[id(module.weight)]
  full = (not torch.is_grad_enabled() or not module.weight.requires_grad
          or optimizer.profiles(t))
  if full:
    return F.linear(x, module.weight, module.bias)
  if torch.is_autocast_enabled(x.device.type):
    raise RuntimeError(
        f"LoSiA-Pro ({handle.name}) does not support torch.autocast: its backward mixes the "
        "autocast dtype with the weight's. Train the model in its own dtype (e.g. bf16 "
        "weights), or call optimizer.disable_pro().")
  st = optimizer.state[module.weight]
  return LoSiAProLinear.apply(x, module.weight, module.bias, handle.delta, st["rows"],
                              st["cols"])


def enable_pro(model: torch.nn.Module, optimizer) -> list[str]:
  """Makes the target ``nn.Linear`` modules of ``model`` compute only block gradients.

  Args:
    model: the model the optimizer was built for (not a DDP wrapper).
    optimizer: a :class:`losia_torch.LoSiAOptimizer` over ``model``'s parameters.

  Returns:
    Names of the targets switched to Pro (targets not owned by an ``nn.Linear``,
    e.g. the output layer in row mode, keep the ordinary path).

  Raises:
    NotImplementedError: under ``torch.distributed`` with more than one process.
  """
  if torch.distributed.is_available() and torch.distributed.is_initialized() \
      and torch.distributed.get_world_size() > 1:
    raise NotImplementedError(
        "LoSiA-Pro does not support DistributedDataParallel: the compact block gradients "
        "would not be all-reduced. Use the ordinary LoSiA path under DDP.")
  if isinstance(model, torch.nn.parallel.DistributedDataParallel):
    raise NotImplementedError("LoSiA-Pro does not support DistributedDataParallel")
  done = []
  for mod_name, mod in model.named_modules():
    if type(mod) is not torch.nn.Linear and not isinstance(mod, torch.nn.Linear):
      continue
    t = optimizer._spec.get(id(mod.weight))
    if t is None or t.row_mode or id(mod.weight) in optimizer._pro:
      continue
    delta = torch.zeros(t.block_shape, dtype=mod.weight.dtype, device=mod.weight.device,
                        requires_grad=True)
    handle = ProHandle(t.name, mod, delta)
    optimizer._pro[id(mod.weight)] = handle
    mod.forward = functools.partial(_pro_forward, mod, handle, optimizer)
    done.append(t.name)
  return done


def disable_pro(optimizer) -> None:
  """Restores the ordinary forward of every module :func:`enable_pro` switched."""
  for handle in list(optimizer._pro.values()):
    if "forward" in handle.module.__dict__:
      del handle.module.forward
  optimizer._pro.clear()
