"""LoSiA-Pro's compact block gradients, averaged across ranks (FSDP2 and DDP).

A non-profiling Pro target has no weight gradient; its block gradient lands in a plain
``[k_out, k_in]`` delta leaf on each rank (``pro.py``), outside the data-parallel
wrapper's own reduction. :class:`CompactGradReducer` averages it as the wrapper
averages the gradients it reduces, at the end of each backward:

- FSDP2 (``fully_shard``): the sum over the mesh divided by the gradient divide factor
  of the FSDP module holding the weight (``set_gradient_divide_factor``; the mesh size
  when unset, as FSDP's ``ReduceOp.AVG``), in the backwards where that module reduces
  (``set_requires_gradient_sync``). Under ``set_requires_gradient_sync(False)`` the
  local gradients wait, summed, for the next backward that syncs; a step before that
  raises :data:`UNREDUCED_MESSAGE`.
- DDP: scaled by one over the process group's size, then summed (DDP's reducer does
  the same before its all-reduce when no comm hook is registered), in every backward,
  ``no_sync()`` included (the blocks are small, and the averages of the micro-batches
  add up to the same total).

All blocks of one backward travel in one flat fp32 all-reduce: block-sized, never a
matrix. How: a tensor hook on each delta takes the gradient arriving for it and passes
zeros on to ``.grad``; a callback queued on autograd's engine runs at the end of that
backward, all-reduces what the hooks took and adds the averages into ``delta.grad``.
So after backward every rank holds the same averaged block gradient, accumulated over
backwards as the wrapper accumulates its own, and ``clip_grad_norm_``, ``GradScaler``
and the step read it like any gradient.

The wrapper's own side. Under FSDP2 a Pro layer runs inside the forward of the FSDP
module holding its weight, where ``module.weight`` is the unsharded tensor FSDP
all-gathered; the autograd function saves it, as ``F.linear`` does. With
``reshard_after_forward=True`` FSDP frees that storage after the forward and
all-gathers into the same storage before the module's backward, so the compact
backward reads the full weight in both modes. A weight without a gradient is left out
of FSDP's reduce-scatter (its sharded ``.grad`` stays None). DDP, whose buckets hold a
full-size slot for every parameter, all-reduces that slot anyway: with
``find_unused_parameters=False`` the weight's ``.grad`` becomes zeros, with ``True`` it
stays None. The step reads neither.

Uses private FSDP2 attributes (a module's parameter groups, their divide factor and
sync flag), since torch has no public getter for them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

UNREDUCED_MESSAGE = (
    "LoSiA-Pro under FSDP2: the compact block gradients of the last backward were not "
    "averaged across ranks, because it ran with set_requires_gradient_sync(False). Run the "
    "last micro-batch's backward with gradient sync on (as FSDP needs for its own gradients) "
    "before clip_grad_norm_ or step.")

NOT_WRAPPED_MESSAGE = (
    "LoSiA-Pro under torch.distributed averages its compact block gradients the way the "
    "data-parallel wrapper averages the others, so enable_pro needs that wrapper: pass the "
    "DistributedDataParallel module (opt.enable_pro(ddp), after wrapping) or a model whose "
    "layers are fully_shard-ed (FSDP2); got a {kind}.")


class FSDPAveraging:
  """How FSDP2 averages the gradients of one parameter group (read at each backward)."""

  predivide = False

  def __init__(self, group, world: int):
    self.group = group
    self.world = world

  def factor(self) -> float:
    f = getattr(self.group, "gradient_divide_factor", None)
    return float(self.world if f is None else f)

  def syncs(self) -> bool:
    return bool(getattr(self.group, "reduce_grads", True))


class DDPAveraging:
  """DDP's default averaging: scale by one over the group's size, then sum (every
  backward)."""

  predivide = True

  def __init__(self, world: int):
    self.world = world

  def factor(self) -> float:
    return float(self.world)

  def syncs(self) -> bool:
    return True


def _param_groups(module) -> list:
  """The FSDP2 parameter groups of an ``FSDPModule`` (several with a per-parameter mesh
  in newer torch)."""
  state = module._get_fsdp_state()
  groups = getattr(state, "_fsdp_param_groups", None)
  if groups is None:  # torch < 2.8: one group per module
    groups = [state._fsdp_param_group]
  return [g for g in groups if g is not None]


def fsdp_averaging(model: torch.nn.Module, targets: list, world: int) -> dict[int, FSDPAveraging]:
  """``{id(weight): FSDPAveraging}`` of ``targets``, from the FSDP modules of ``model``.

  Raises:
    NotImplementedError: naming targets that no ``fully_shard``-ed module of ``model``
      holds (or a torch whose FSDP2 internals differ).
  """
  from torch.distributed.fsdp import FSDPModule
  by_param = {}
  for mod in model.modules():
    if isinstance(mod, FSDPModule):
      for group in _param_groups(mod):
        for fp in group.fsdp_params:
          by_param[id(fp.sharded_param)] = group
  missing = [t.name for t in targets if id(t.param) not in by_param]
  if missing:
    raise NotImplementedError(
        "LoSiA-Pro under FSDP2 averages each compact block gradient as the FSDP module "
        "holding the weight averages its gradients, but no fully_shard module of the model "
        "passed to enable_pro holds " + ", ".join(missing[:4]) + ". Pass the fully_shard-ed "
        "model itself.")
  return {id(t.param): FSDPAveraging(by_param[id(t.param)], world) for t in targets}


def ddp_averaging(model: torch.nn.Module, targets: list) -> tuple[dist.ProcessGroup, dict]:
  """``(process group, {id(weight): DDPAveraging})`` under ``DistributedDataParallel``.

  Raises:
    NotImplementedError: ``model`` is not the DDP wrapper (see :data:`NOT_WRAPPED_MESSAGE`).
  """
  if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
    raise NotImplementedError(NOT_WRAPPED_MESSAGE.format(kind=type(model).__name__))
  avg = DDPAveraging(model.process_group.size())
  return model.process_group, {id(t.param): avg for t in targets}


def distributed() -> bool:
  """Is a process group of more than one process initialized?"""
  return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CompactGradReducer:
  """Averages LoSiA-Pro's compact block gradients across ranks after each backward.

  Attributes:
    blocks: ``(ProBlock, averaging)`` in a fixed order, the same on every rank (the
      order of the targets): the order in the flat buffer.
    pending: ``{id(block): local gradient}`` taken by the hooks, not averaged yet.
  """

  def __init__(self, group: dist.ProcessGroup):
    self.group = group
    self.blocks: list[tuple] = []
    self.pending: dict[int, torch.Tensor] = {}
    self._handles: list = []

  def add(self, block, averaging) -> None:
    self.blocks.append((block, averaging))
    self._handles.append(block.delta.register_hook(self._hook_for(block)))

  def remove(self) -> None:
    for h in self._handles:
      h.remove()
    self._handles.clear()
    self.blocks.clear()
    self.pending.clear()

  def _hook_for(self, block):
    def hook(grad: torch.Tensor) -> torch.Tensor:
      key = id(block)
      prev = self.pending.get(key)
      self.pending[key] = grad if prev is None else prev + grad
      # One callback per hook call rather than a "queued" flag, which a backward that
      # raised (its callbacks dropped) would leave set; the first callback at the end
      # of the backward reduces everything, the others find nothing (on every rank).
      torch.autograd.Variable._execution_engine.queue_callback(self._reduce)
      return torch.zeros_like(grad)  # .grad gets the average, added by _reduce
    return hook

  @torch.no_grad()
  def _reduce(self) -> None:
    """End of a backward: one flat all-reduce of the taken gradients of every block
    whose wrapper syncs in this backward, then ``delta.grad += average``."""
    todo = [(b, a) for b, a in self.blocks if id(b) in self.pending and a.syncs()]
    if not todo:
      return
    parts = []
    for b, a in todo:
      g = self.pending[id(b)].reshape(-1).to(torch.float32)
      parts.append(g * (1.0 / a.factor()) if a.predivide else g)  # DDP: grad * (1 / size)
    flat = torch.cat(parts)
    dist.all_reduce(flat, group=self.group)
    offset = 0
    for block, a in todo:
      local = self.pending.pop(id(block))
      avg = flat[offset:offset + local.numel()].view(local.shape)
      offset += local.numel()
      avg = (avg if a.predivide else avg / a.factor()).to(block.delta.dtype)
      if block.delta.grad is None:
        block.delta.grad = avg
      else:
        block.delta.grad.add_(avg)

  def check_reduced(self) -> None:
    """Raises ``RuntimeError`` if a backward left compact gradients un-averaged."""
    if self.pending:
      raise RuntimeError(UNREDUCED_MESSAGE)


def make_reducer(group: dist.ProcessGroup, blocks: list, averaging: dict,
                 reducer: Optional[CompactGradReducer] = None) -> CompactGradReducer:
  """``reducer`` (a new one over ``group`` if None) with ``blocks`` (``(target,
  ProBlock)``) added, each with its averaging (``averaging[id(weight)]``)."""
  reducer = CompactGradReducer(group) if reducer is None else reducer
  for t, block in blocks:
    reducer.add(block, averaging[id(t.param)])
  return reducer
