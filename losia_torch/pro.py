"""LoSiA-Pro for torch: a linear map whose backward computes only the block gradient.

LOSIA_SPEC.md section 8. For a target linear map that is not profiling, the
forward saves only ``x[..., cols]`` and the backward produces

- the exact, dense input gradient ``dy @ W``, and
- the block gradient ``dy[..., rows]ᵀ · x[..., cols]`` (``[k_out, k_in]``),
  written into a compact zero "delta" leaf, never into ``W.grad``: no
  full-size weight gradient exists for that target.

A target whose layer is profiling (it needs its full gradient for importance)
runs the ordinary full backward during its window. The optimizer reads each
target's block gradient from the delta leaf or from ``W.grad`` accordingly, so
the training trajectory is LoSiA's, up to floating-point reduction order.

The delta leaves sit in the optimizer's ``param_groups`` (next to their weight),
so everything that walks an optimizer's parameters sees the compact gradients:
``zero_grad``, ``torch.amp.GradScaler.unscale_`` (unscaling, inf detection) and
accelerate. The optimizer hides them from ``state_dict`` and from its own
update loop.

The forward reads only its :class:`ProHandle` (indices, and a ``full`` flag the
optimizer sets after every step), never the optimizer: ``torch.compile`` then
guards on one bool per target instead of the optimizer's step counter, and the
model holds no reference to the optimizer (the handle keeps a weak one).

Supported owners: ``nn.Linear`` (``weight [d_out, d_in]``) and transformers'
GPT-2 ``Conv1D`` (``weight [d_in, d_out]``, ``y = x W + b``). Under
``torch.autocast`` the compact backward computes in the autocast dtype, as the
ordinary autocast ``linear`` does. Not under ``DistributedDataParallel`` (DDP
would not all-reduce the compact gradients).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F

from losia_torch.targets import is_conv1d


class LoSiAProLinear(torch.autograd.Function):
  """``y = x Wᵀ + b`` (or ``x W + b`` when ``transposed``) with a compact weight gradient.

  Inputs: ``x [..., d_in]``, ``weight [d_out, d_in]`` (``[d_in, d_out]`` when
  ``transposed``), ``bias [d_out]`` or None, ``delta [k_out, k_in]`` (the leaf
  that receives the block gradient), ``rows`` and ``cols`` (int64 indices into
  the ``[d_out, d_in]`` orientation). ``weight`` gets no gradient.
  """

  @staticmethod
  def forward(ctx, x, weight, bias, delta, rows, cols, transposed=False):
    ctx.save_for_backward(x.index_select(-1, cols), weight, rows)
    ctx.has_bias = bias is not None
    ctx.transposed = transposed
    ctx.delta_dtype = delta.dtype
    return F.linear(x, weight.t() if transposed else weight, bias)

  @staticmethod
  def backward(ctx, dy):
    x_cols, weight, rows = ctx.saved_tensors
    dx = dbias = dblock = None
    if ctx.needs_input_grad[0]:
      dx = dy.matmul(weight.t() if ctx.transposed else weight)
    if ctx.needs_input_grad[3]:
      dy_rows = dy.index_select(-1, rows)
      dblock = dy_rows.reshape(-1, dy_rows.shape[-1]).t().matmul(
          x_cols.reshape(-1, x_cols.shape[-1])).to(ctx.delta_dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
      dbias = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dx, None, dbias, dblock, None, None, None


def pro_linear(x: torch.Tensor, weight: torch.Tensor, bias, delta: torch.Tensor,
               rows: torch.Tensor, cols: torch.Tensor, transposed: bool = False) -> torch.Tensor:
  """Functional form of :class:`LoSiAProLinear`."""
  return LoSiAProLinear.apply(x, weight, bias, delta, rows, cols, transposed)


@dataclasses.dataclass(eq=False)
class ProHandle:
  """The Pro state of one target, all the forward reads.

  Attributes:
    name: the target's parameter name.
    module: the ``nn.Linear`` or ``Conv1D`` that owns it.
    delta: the compact ``[k_out, k_in]`` leaf whose ``.grad`` is the block gradient.
    rows, cols: the target's current indices (the optimizer's state tensors).
    full: the target profiles in the next step: run the ordinary full backward.
    transposed: ``Conv1D`` layout.
    optimizer: weak reference to the optimizer (moves state after ``model.to``).
  """

  name: str
  module: torch.nn.Module
  delta: torch.Tensor
  rows: torch.Tensor
  cols: torch.Tensor
  full: bool
  transposed: bool
  optimizer: Any = None

  def zero_grad(self, set_to_none: bool = True) -> None:
    if self.delta.grad is None:
      return
    if set_to_none:
      self.delta.grad = None
    else:
      self.delta.grad.zero_()


def _pro_forward(module: torch.nn.Module, handle: ProHandle, x: torch.Tensor):
  w = module.weight
  if not torch.is_grad_enabled() or not w.requires_grad or handle.full:
    return type(module).forward(module, x)  # the ordinary forward and full backward
  if handle.delta.device != w.device or handle.delta.dtype != w.dtype \
      or handle.rows.device != w.device:
    opt = handle.optimizer() if handle.optimizer is not None else None
    if opt is None:
      raise RuntimeError(f"LoSiA-Pro ({handle.name}): the optimizer no longer exists; "
                         "call disable_pro() before dropping it")
    opt.follow_parameters()  # the model moved (model.to / .double()): move the state
  b = module.bias
  dev = x.device.type
  if torch.is_autocast_enabled(dev):
    # Cast as autocast's own linear would (every floating input to the autocast dtype)
    # and run the compact backward in that dtype; the casts' backward brings dx and
    # dbias back to their dtypes, and the block gradient is cast to the delta's.
    dt = torch.get_autocast_dtype(dev)
    with torch.autocast(dev, enabled=False):
      return LoSiAProLinear.apply(x.to(dt), w.to(dt), None if b is None else b.to(dt),
                                  handle.delta, handle.rows, handle.cols, handle.transposed)
  return LoSiAProLinear.apply(x, w, b, handle.delta, handle.rows, handle.cols,
                              handle.transposed)


def _group_of(optimizer, p: torch.Tensor) -> dict:
  for g in optimizer.param_groups:
    if any(q is p for q in g["params"]):
      return g
  raise KeyError("parameter not in any param group")


def attach_delta(optimizer, handle: ProHandle) -> None:
  """Puts ``handle.delta`` into the param group of its weight (see the module docstring)."""
  g = _group_of(optimizer, handle.module.weight)
  g["params"].append(handle.delta)
  if "param_names" in g:
    g["param_names"].append(handle.name + ":losia_pro_delta")


def detach_delta(optimizer, handle: ProHandle) -> None:
  for g in optimizer.param_groups:
    for i, q in enumerate(g["params"]):
      if q is handle.delta:
        del g["params"][i]
        if "param_names" in g:
          del g["param_names"][i]
        return


def new_delta(t, w: torch.Tensor) -> torch.Tensor:
  return torch.zeros(t.block_shape, dtype=w.dtype, device=w.device, requires_grad=True)


def enable_pro(model: torch.nn.Module, optimizer) -> list[str]:
  """Makes the target linear modules of ``model`` compute only block gradients.

  Args:
    model: the model the optimizer was built for (not a DDP wrapper).
    optimizer: a :class:`losia_torch.LoSiAOptimizer` over ``model``'s parameters.

  Returns:
    Names of the targets switched to Pro. Targets in row mode (the output layer,
    tied embeddings) keep the ordinary path.

  Raises:
    NotImplementedError: under ``torch.distributed`` with more than one process.
    ValueError: naming the targets whose owner is neither ``nn.Linear`` nor ``Conv1D``.
  """
  if optimizer._fsdp is not None:
    from losia_torch.fsdp import PRO_MESSAGE
    raise NotImplementedError(PRO_MESSAGE)
  if torch.distributed.is_available() and torch.distributed.is_initialized() \
      and torch.distributed.get_world_size() > 1:
    raise NotImplementedError(
        "LoSiA-Pro does not support DistributedDataParallel: the compact block gradients "
        "would not be all-reduced. Use the ordinary LoSiA path under DDP.")
  if isinstance(model, torch.nn.parallel.DistributedDataParallel):
    raise NotImplementedError("LoSiA-Pro does not support DistributedDataParallel")
  optimizer.follow_parameters()
  owners: dict[int, torch.nn.Module] = {}
  for _, mod in model.named_modules():
    w = getattr(mod, "_parameters", {}).get("weight")
    if w is not None and id(w) in optimizer._spec:
      owners.setdefault(id(w), mod)
  unsupported = []
  done = []
  for t in optimizer.plan.targets:
    if t.row_mode or id(t.param) in optimizer._pro:
      continue
    mod = owners.get(id(t.param))
    if mod is None:
      continue  # not a parameter of this model
    if not (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)):
      unsupported.append(f"{t.name} ({type(mod).__name__})")
      continue
    st = optimizer.state[t.param]
    handle = ProHandle(t.name, mod, new_delta(t, t.param), st["rows"], st["cols"],
                       optimizer.profiles(t), t.transposed, weakref.ref(optimizer))
    optimizer._pro[id(t.param)] = handle
    attach_delta(optimizer, handle)
    mod.forward = functools.partial(_pro_forward, mod, handle)
    done.append(t.name)
  if unsupported:
    disable_pro(optimizer)
    raise ValueError("LoSiA-Pro supports targets owned by nn.Linear or transformers Conv1D; "
                     "these are not: " + ", ".join(unsupported))
  return done


def disable_pro(optimizer) -> None:
  """Restores the ordinary forward of every module :func:`enable_pro` switched."""
  for handle in list(optimizer._pro.values()):
    if "forward" in handle.module.__dict__:
      del handle.module.forward
    detach_delta(optimizer, handle)
  optimizer._pro.clear()


def sync_handles(optimizer) -> None:
  """After a step or a load: each handle gets its target's indices and profiling flag."""
  for t in optimizer.plan.targets:
    h: Optional[ProHandle] = optimizer._pro.get(id(t.param))
    if h is None:
      continue
    st = optimizer.state[t.param]
    h.rows, h.cols = st["rows"], st["cols"]
    h.full = optimizer.profiles(t)
