"""LoSiA-Pro for torch: linear layers whose backward computes only the block gradient.

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

How it attaches. As PEFT swaps its layer classes in for the targets, Pro swaps
the *class* of each target module: an ``nn.Linear`` becomes a :class:`ProLinear`
(a subclass of ``nn.Linear`` whose ``forward`` calls :class:`LoSiAProLinear`), a
``Conv1D`` a ``ProConv1D``, in place, as ``torch.nn.utils.parametrize`` does. The
module object stays the same, so ``model.state_dict()`` keys, checkpoints in
either direction, references to the module and its hooks
(``register_forward_hook``, ``register_forward_pre_hook``, accelerate's
``add_hook_to_module`` added afterwards) are all unchanged; :func:`swap_out`
restores the original class.

The layer reads a :class:`ProBlock` (the delta leaf, the indices, a ``full``
flag), a small object it shares with the optimizer, which updates it after every
step. The block refers to neither, so the model holds no reference to the
optimizer, and ``torch.compile`` guards on one bool per layer, not on the
optimizer's step counter.

The delta leaves sit in the optimizer's ``param_groups`` (next to their weight),
so everything that walks an optimizer's parameters sees the compact gradients:
``zero_grad``, ``torch.amp.GradScaler.unscale_`` (unscaling, inf detection) and
accelerate. The optimizer hides them from ``state_dict`` and from its own
update loop.

Supported owners: ``nn.Linear`` (``weight [d_out, d_in]``) and transformers'
GPT-2 ``Conv1D`` (``weight [d_in, d_out]``, ``y = x W + b``). Under
``torch.autocast`` the compact backward computes in the autocast dtype, as the
ordinary autocast ``linear`` does.

With more than one process the compact gradients are per-rank leaves outside the
data-parallel wrapper's reduction; ``pro_reduce.py`` averages them at the end of each
backward as the wrapper averages its own gradients (FSDP2 ``fully_shard``: the FSDP
module's divide factor; DDP: the group's size), in one flat block-sized all-reduce.
Under FSDP2 the layer's ``weight`` in forward and backward is the unsharded tensor
FSDP all-gathered (re-gathered into the same storage before backward when
``reshard_after_forward=True`` freed it), so the compact backward is the same; each
rank then updates the block rows its shard holds (``fsdp.py``). Under DDP pass the
wrapper to ``enable_pro``; a weight without a gradient still gets DDP's full-size
bucket slot (zeros in ``.grad`` unless ``find_unused_parameters=True``), so Pro saves
the weight-gradient matmul there, not gradient memory.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from losia_torch.targets import TargetSpec, is_conv1d


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
class ProBlock:
  """All a Pro layer reads besides its own weight and bias.

  Attributes:
    delta: the compact ``[k_out, k_in]`` leaf whose ``.grad`` is the block gradient.
    rows, cols: the target's current indices (the optimizer's state tensors).
    full: the target profiles in the next step: run the ordinary full backward.
    transposed: ``Conv1D`` layout (weight ``[d_in, d_out]``).
  """

  delta: torch.Tensor
  rows: torch.Tensor
  cols: torch.Tensor
  full: bool
  transposed: bool

  @classmethod
  def for_target(cls, t: TargetSpec, rows: torch.Tensor, cols: torch.Tensor,
                 full: bool) -> "ProBlock":
    w = t.param
    delta = torch.zeros(t.block_shape, dtype=w.dtype, device=w.device, requires_grad=True)
    return cls(delta, rows, cols, full, t.transposed)

  @torch._dynamo.disable
  def follow(self, weight: torch.Tensor) -> None:
    """Takes ``weight``'s device (indices, delta) and dtype (delta) after the model moved.

    The delta changes in place (``.data``, as ``nn.Module.to`` changes a parameter),
    so it stays the tensor the optimizer's ``param_groups`` hold.
    """
    if self.delta.device != weight.device or self.delta.dtype != weight.dtype:
      self.delta.grad = None
      self.delta.data = torch.zeros(self.delta.shape, dtype=weight.dtype, device=weight.device)
    self.rows, self.cols = self.rows.to(weight.device), self.cols.to(weight.device)

  def zero_grad(self, set_to_none: bool = True) -> None:
    if self.delta.grad is None:
      return
    if set_to_none:
      self.delta.grad = None
    else:
      self.delta.grad.zero_()


class ProLayer:
  """The forward of every LoSiA-Pro layer class (:class:`ProLinear`, ``ProConv1D``).

  ``isinstance(module, ProLayer)`` tells a switched module. Attributes:
    losia_block: its :class:`ProBlock`.
    _losia_base: the class it was swapped in for (``nn.Linear``, ``Conv1D``).
  """

  _losia_base: type
  losia_block: ProBlock

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(self, ProLayer):
      # swap_out restored the class, but a wrapper made while this was a Pro layer
      # (accelerate's add_hook_to_module keeps the bound forward) still calls this.
      return type(self).forward(self, x)
    block, w = self.losia_block, self.weight
    if block.full or not torch.is_grad_enabled() or not w.requires_grad:
      return self._losia_base.forward(self, x)  # the ordinary forward and full backward
    if block.delta.device != w.device or block.delta.dtype != w.dtype \
        or block.rows.device != w.device:
      block.follow(w)  # the model moved (model.to / .double()) since the last step
    b = self.bias
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
      # Cast as autocast's own linear would (every floating input to the autocast dtype)
      # and run the compact backward in that dtype; the casts' backward brings dx and
      # dbias back to their dtypes, and the block gradient is cast to the delta's.
      dt = torch.get_autocast_dtype(dev)
      with torch.autocast(dev, enabled=False):
        return LoSiAProLinear.apply(x.to(dt), w.to(dt), None if b is None else b.to(dt),
                                    block.delta, block.rows, block.cols, block.transposed)
    return LoSiAProLinear.apply(x, w, b, block.delta, block.rows, block.cols, block.transposed)


class ProLinear(ProLayer, torch.nn.Linear):
  """``nn.Linear`` under LoSiA-Pro (a target ``nn.Linear`` after :func:`swap_in`)."""

  _losia_base = torch.nn.Linear


_PRO_CLASSES: dict[type, type] = {torch.nn.Linear: ProLinear}


def pro_class(base: type) -> type:
  """The Pro layer class for modules of class ``base`` (``ProConv1D`` for ``Conv1D``,
  made once per class; ``ProLinear`` for ``nn.Linear``)."""
  cls = _PRO_CLASSES.get(base)
  if cls is None:
    cls = type(f"Pro{base.__name__}", (ProLayer, base),
               {"__module__": __name__, "_losia_base": base,
                "__doc__": f"``{base.__name__}`` under LoSiA-Pro."})
    _PRO_CLASSES[base] = cls
  return cls


def swap_in(module: torch.nn.Module, block: ProBlock) -> None:
  """Makes ``module`` a Pro layer reading ``block`` (same object, parameters, hooks)."""
  module.losia_block = block  # first: a ProLayer always has its block
  module.__class__ = pro_class(type(module))


def swap_out(module: torch.nn.Module) -> None:
  """Gives a Pro layer its original class back (and drops its block)."""
  module.__class__ = module._losia_base
  del module.losia_block


def target_modules(model: torch.nn.Module, targets: list) -> list[tuple]:
  """``(target, module)`` for each of ``targets`` whose weight a module of ``model`` owns.

  Raises:
    ValueError: naming every target Pro cannot switch (before switching any): owned by
      neither ``nn.Linear`` nor ``Conv1D``, shared by several modules, already a Pro
      layer of another optimizer, or with a ``forward`` replaced on the instance.
  """
  owners: dict[int, list] = {}
  for name, mod in model.named_modules():
    w = getattr(mod, "_parameters", {}).get("weight")
    if w is not None:
      owners.setdefault(id(w), []).append((name, mod))
  found, bad = [], []
  for t in targets:
    mods = owners.get(id(t.param))
    if not mods:
      continue  # not a parameter of this model
    mod = mods[0][1]
    if len(mods) > 1:
      bad.append(f"{t.name} (shared by modules {', '.join(n for n, _ in mods)})")
    elif isinstance(mod, ProLayer):
      bad.append(f"{t.name} (already a LoSiA-Pro layer of another optimizer)")
    elif not (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)):
      bad.append(f"{t.name} ({type(mod).__name__})")
    elif "forward" in mod.__dict__:
      bad.append(f"{t.name} (its forward is replaced on the instance, as accelerate's "
                 "add_hook_to_module does: enable Pro first, then add such hooks)")
    else:
      found.append((t, mod))
  if bad:
    raise ValueError("LoSiA-Pro supports targets owned by nn.Linear or transformers Conv1D; "
                     "these are not: " + ", ".join(bad))
  return found


def add_delta(groups: list, weight: torch.Tensor, delta: torch.Tensor, name: str) -> None:
  """Puts ``delta`` into the param group of ``weight`` (see the module docstring)."""
  for g in groups:
    if any(q is weight for q in g["params"]):
      g["params"].append(delta)
      if "param_names" in g:
        g["param_names"].append(name + ":losia_pro_delta")
      return
  raise KeyError(f"{name}: parameter not in any param group")


def remove_delta(groups: list, delta: torch.Tensor) -> None:
  for g in groups:
    for i, q in enumerate(g["params"]):
      if q is delta:
        del g["params"][i]
        if "param_names" in g:
          del g["param_names"][i]
        return


def enable_pro(model: torch.nn.Module, optimizer) -> list[str]:
  """Swaps Pro layers in for the target modules of ``model``: ``optimizer.enable_pro(model)``.

  Args:
    model: the model the optimizer was built for; under DDP its
      ``DistributedDataParallel`` wrapper, under FSDP2 the ``fully_shard``-ed model.
    optimizer: a :class:`losia_torch.LoSiAOptimizer` over ``model``'s parameters.

  Returns:
    Names of the targets switched to Pro. Targets in row mode (the output layer,
    tied embeddings) keep the ordinary path.

  Raises:
    NotImplementedError: with more than one process, if ``model`` is neither the
      ``DistributedDataParallel`` wrapper nor ``fully_shard``-ed (``pro_reduce.py``).
    ValueError: naming the targets Pro cannot switch (see :func:`target_modules`).
  """
  return optimizer.enable_pro(model)


def disable_pro(optimizer) -> None:
  """Gives every module :func:`enable_pro` switched its original class back."""
  optimizer.disable_pro()
