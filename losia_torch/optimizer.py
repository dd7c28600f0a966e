"""LoSiA as a ``torch.optim.Optimizer``.

Implements LOSIA_SPEC.md: every target matrix trains only its core block
``W[rows][:, cols]`` with compact Adam moments; one layer at a time (async) or
all layers together (sync) accumulate gradient importance, and at the end of
their profiling slot choose a new block, restart their Adam state (step count
included) and ramp their learning rate back up (rewarm). Works in an ordinary
loop (``loss.backward(); clip_grad_norm_(...); opt.step(); opt.zero_grad()``),
with gradient accumulation, LR schedulers and ``DistributedDataParallel``.

This module holds the optimizer class: construction, the public methods and the
outline of a step; the pieces are in the modules listed in ``losia_torch/__init__.py``.

Reference: Wang, Qi, Xu, "LoSiA: Efficient High-Rank Fine-Tuning via Subnet
Localization and Optimization", arXiv:2507.04487 (EMNLP 2025).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from losia_common import LoSiAConfig
from losia_torch import checkpoint as _ckpt
from losia_torch import fsdp as _fsdp
from losia_torch import gradients as _grads
from losia_torch import layerwise as _layerwise
from losia_torch import pro as _pro
from losia_torch import pro_reduce as _pro_reduce
from losia_torch import schedule as _sched
from losia_torch import step as _step
from losia_torch.blocks import initial_target_state
from losia_torch.gradients import NONFINITE_MESSAGE
from losia_torch.importance import ImportanceSlot
from losia_torch.param_groups import groups_and_plan
from losia_torch.targets import LoSiAPlan, TargetSpec

logger = logging.getLogger("losia_torch")

__all__ = ["LoSiAOptimizer", "NONFINITE_MESSAGE"]


class LoSiAOptimizer(torch.optim.Optimizer):
  """LoSiA with Adam on each target's core block (decoupled, block-only weight decay).

  Per target and step ``s`` (LOSIA_SPEC.md section 6): ``g = scale * G[rows][:, cols]``
  (fp32); Adam on the compact block with the target's own step count (restarted at
  each relocalization); ``u += weight_decay * W_block``; ``W_block -= lr * rewarm(s) * u``
  with ``lr`` the param group's current learning rate (LR schedulers work as usual).
  Non-targets get full Adam(W) (``non_target="train"``) or nothing (``"freeze"``).
  Profiling, relocalization and rewarm follow sections 3-5 of the spec; the
  importance buffers exist for the profiling layer only (async: one per role).

  Non-finite gradients: if any gradient value the step reads (the target blocks,
  the full gradients of the profiling layer, trained non-targets) is NaN or
  infinite, the step is skipped: zero updates, state unchanged except
  ``num_skipped_steps`` (alias ``notfinite_count``, as in ``losia_jax``); the
  step counter does not advance. The torch backend also logs
  :data:`NONFINITE_MESSAGE` as a warning on the ``losia_torch`` logger.

  Distributed: under ``DistributedDataParallel`` every rank sees the same
  all-reduced gradients and runs the same deterministic step, so ranks select
  identical indices and keep identical weights (build the optimizer from the
  model or the DDP wrapper; names are looked up through ``.module``).

  Args:
    params: a model (``nn.Module``; its ``get_output_embeddings()`` is the output
      layer) or ``(name, parameter)`` pairs (``model.named_parameters()``), or a
      list of param-group dicts whose ``"params"`` are such pairs.
    config: a :class:`losia_common.LoSiAConfig` (defaults if None).
    lr, betas, eps, weight_decay: Adam(W) hyper-parameters (torch names).
    output_module: module name (or regex) of the output layer, used when
      ``config.output_rank_factor > 0`` and ``params`` is not a model with
      ``get_output_embeddings()``.
    model: the model that ``params`` (pairs or groups) belong to: gives the
      output layer (``get_output_embeddings()``) and each target's layout (its
      owning module, see :func:`losia_torch.targets.layouts_of`). Without a
      model, ``(name, tensor)`` pairs are read in ``nn.Linear``'s
      ``[d_out, d_in]`` layout.

  Attributes:
    config: the configuration.
    plan: a :class:`LoSiAPlan` (the targets, layer count, ...).
    losia_step: ``s``, the number of completed (non-skipped) steps.
    num_skipped_steps: steps skipped for non-finite gradients.

  Interface for the package's modules (``step``, ``gradients``, ``checkpoint``,
  ``layerwise``, ``fsdp``; users need none of it): besides ``state``,
  ``param_groups`` and the attributes above,

  - ``importance``: the live importance buffers, ``{slot_key: ImportanceSlot}``;
  - ``pro_blocks``: ``{id(weight): pro.ProBlock}`` of the targets switched to Pro
    (written only by :meth:`enable_pro` / :meth:`disable_pro`);
  - ``pro_reducer``: a ``pro_reduce.CompactGradReducer`` averaging Pro's compact
    gradients across ranks (FSDP2, DDP), else None;
  - ``fsdp_state``: a ``fsdp.FSDPState`` under FSDP2, else None;
  - :meth:`target_of`, :meth:`slot_key`, :meth:`profiles`,
    :meth:`sync_pro_blocks`, :meth:`follow_parameters`.
  """

  def __init__(self, params: Any, config: Optional[LoSiAConfig] = None, lr: float = 1e-3,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, output_module: str = "lm_head",
               model: Optional[torch.nn.Module] = None):
    config = LoSiAConfig() if config is None else config
    if not isinstance(config, LoSiAConfig):
      raise TypeError(f"`config` must be a LoSiAConfig; got {type(config).__name__}")
    groups, plan = groups_and_plan(params, config, lr, betas, eps, weight_decay,
                                   output_module, model)
    defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    super().__init__(groups, defaults)
    for g in self.param_groups:
      g["betas"] = tuple(g["betas"])
    self.config = config
    self.plan: LoSiAPlan = plan
    self._spec: dict[int, TargetSpec] = {id(t.param): t for t in plan.targets}
    self.losia_step = 0
    self.num_skipped_steps = 0
    self.importance: dict[str, ImportanceSlot] = {}
    self.pro_blocks: dict[int, _pro.ProBlock] = {}
    self.pro_reducer: Optional[_pro_reduce.CompactGradReducer] = None  # Pro, > 1 process
    self._pro_modules: list[torch.nn.Module] = []  # the modules enable_pro switched
    self._layerwise: Optional[_layerwise.PerLayerStep] = None
    # FSDP2 (fully_shard): DTensor parameters; the step works on local shards (fsdp.py)
    self.fsdp_state = _fsdp.FSDPState(self) if _fsdp.any_sharded(
        p for g in self.param_groups for p in g["params"]) else None
    for t in plan.targets:
      self.state[t.param].update(initial_target_state(t, config.seed) if self.fsdp_state is None
                                 else _fsdp.initial_target_state(self, t))

  # --- inspection ----------------------------------------------------------------

  def target(self, name: str) -> TargetSpec:
    """The :class:`TargetSpec` of the target called ``name``."""
    for t in self.plan.targets:
      if t.name == name:
        return t
    raise KeyError(f"{name!r} is not a LoSiA target; targets: "
                   + ", ".join(t.name for t in self.plan.targets[:8]) + ", ...")

  def subnet(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of a target now (in row mode ``cols`` is all columns)."""
    st = self.state[self.target(name).param]
    return st["rows"], st["cols"]

  def profiles(self, t: TargetSpec, step: Optional[int] = None) -> bool:
    """Does target ``t`` profile (needs its full gradient) in step ``step`` (default: next)?"""
    s = self.losia_step if step is None else step
    return _sched.profiles(t.layer_id, s, self.config.period, self.plan.total,
                           self.config.schedule)

  def target_of(self, p: torch.Tensor) -> Optional[TargetSpec]:
    """The :class:`TargetSpec` whose parameter is ``p``; None for a non-target."""
    return self._spec.get(id(p))

  def slot_key(self, t: TargetSpec) -> str:
    """The key of ``t``'s importance buffer: its role (async: one buffer per role, used
    by one layer at a time) or its name (sync)."""
    return t.role if self.config.schedule == "async" else t.name

  @property
  def notfinite_count(self) -> int:
    """Alias of ``num_skipped_steps`` (the name of the counter in ``losia_jax``'s state)."""
    return self.num_skipped_steps

  @property
  def _importance(self) -> dict[str, ImportanceSlot]:
    # The earlier name of ``importance``, still read by benchmarks/peers_torch.py.
    return self.importance

  def summary(self) -> str:
    return self.plan.summary(self.config.non_target)

  def state_nbytes(self) -> int:
    """Bytes held by optimizer state tensors (moments, indices, importance buffers)."""
    n = 0
    for st in self.state.values():
      for v in st.values():
        if isinstance(v, torch.Tensor):
          n += v.numel() * v.element_size()
    for slot in self.importance.values():
      n += 2 * slot.ibar.numel() * 4
    return n

  # --- gradients -------------------------------------------------------------------

  def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
    """The norm :meth:`clip_grad_norm_` clips by, without clipping."""
    if self.fsdp_state is not None:
      return _fsdp.grad_norm(self, norm_type)
    self.follow_parameters()
    return _grads.grad_norm(self, norm_type)

  @torch._dynamo.disable
  def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                      error_if_nonfinite: bool = False, foreach=None) -> torch.Tensor:
    """Clips by the norm of every gradient value the step reads; returns that norm.

    The norm covers the block gradient of each non-profiling target, the full
    gradient of the profiling targets and the trained non-targets, with or
    without LoSiA-Pro, so switching to Pro (where non-profiling targets have
    only their block gradient) does not change the trajectory. It differs from
    ``torch.nn.utils.clip_grad_norm_(model.parameters())``, which would also
    count gradient entries LoSiA never uses.
    """
    if self._layerwise is not None:
      raise RuntimeError(
          "clip_grad_norm_ cannot work with per-layer stepping: each parameter is updated "
          "inside backward and its gradient freed before a global norm exists. Call "
          "disable_per_layer_step() to clip.")
    if self.fsdp_state is not None:
      return _fsdp.clip_grad_norm_(self, max_norm, norm_type, error_if_nonfinite)
    self.follow_parameters()
    return _grads.clip_grad_norm_(self, max_norm, norm_type, error_if_nonfinite, foreach)

  # --- the step ----------------------------------------------------------------------

  # Dynamo must not trace the step: it would bake the Python step counter and the
  # schedule's branches into a graph, and a compiled step silently stopped
  # relocalizing. Under ``torch.compile(opt.step)`` this runs eagerly (a graph
  # break), so it is exactly the eager step.
  @torch._dynamo.disable
  @torch.no_grad()
  def step(self, closure: Optional[Callable[[], Any]] = None):
    """One LoSiA step from the gradients in ``.grad`` (see the class docstring)."""
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    if self._layerwise is not None:
      self._layerwise.finish()  # the updates already ran inside backward
      return loss
    if self.fsdp_state is not None:
      _fsdp.step(self)
      return loss
    self.follow_parameters()
    if self.pro_reducer is not None:
      self.pro_reducer.check_reduced()
    s = self.losia_step
    work = _step.StepWork()
    for group in self.param_groups:
      for p in _grads.own_params(self, group):
        _step.collect(self, group, p, s, work)
    if work.empty():
      return loss  # no gradient at all (like torch's optimizers): a no-op, s stays
    if not _grads.all_finite(work.checks):
      self.num_skipped_steps += 1
      logger.warning("%s (step %d; %d skipped so far)", NONFINITE_MESSAGE, s,
                     self.num_skipped_steps)
    else:
      _step.apply(self, work, s)
      _step.finish(self, work.profiled(), s)
    for block in self.pro_blocks.values():  # Pro's compact gradients are used up
      block.zero_grad(True)
    return loss

  def follow_parameters(self) -> None:
    """Moves the state to the parameters' devices if the model moved (done by ``step``)."""
    _ckpt.follow_parameters(self)

  # --- LoSiA-Pro -------------------------------------------------------------------

  def enable_pro(self, model: torch.nn.Module) -> list[str]:
    """Swaps LoSiA-Pro layers in for the targets' ``nn.Linear`` / ``Conv1D`` modules.

    See :mod:`losia_torch.pro`. Returns the names of the targets that now run the
    compact backward (targets in row mode keep the ordinary path). Raises before
    switching any module if one cannot be switched. With more than one process pass
    the ``DistributedDataParallel`` wrapper or the ``fully_shard``-ed model: the
    compact gradients are averaged as it averages the others (``pro_reduce.py``).
    """
    if self._layerwise is not None:
      raise ValueError("LoSiA-Pro does not work with per-layer stepping; call "
                       "disable_per_layer_step() first")
    if self.fsdp_state is None:
      self.follow_parameters()
    todo = [t for t in self.plan.targets if not t.row_mode and id(t.param) not in self.pro_blocks]
    found = _pro.target_modules(model, todo)
    # With more than one process: how the wrapper averages gradients, which the
    # compact ones follow (pro_reduce.py); checked before any module is switched.
    group, averaging = None, None
    if self.fsdp_state is not None:
      group = self.fsdp_state.group
      averaging = _pro_reduce.fsdp_averaging(model, [t for t, _ in found],
                                             self.fsdp_state.world)
    elif _pro_reduce.distributed():
      group, averaging = _pro_reduce.ddp_averaging(model, [t for t, _ in found])
    blocks = []
    for t, module in found:
      st = self.state[t.param]
      block = _pro.ProBlock.for_target(t, st["rows"], st["cols"], self.profiles(t))
      _pro.swap_in(module, block)
      self.pro_blocks[id(t.param)] = block
      self._pro_modules.append(module)
      _pro.add_delta(self.param_groups, t.param, block.delta, t.name)
      blocks.append((t, block))
    if averaging is not None:
      self.pro_reducer = _pro_reduce.make_reducer(group, blocks, averaging, self.pro_reducer)
    return [t.name for t, _ in found]

  def disable_pro(self) -> None:
    """Gives every module :meth:`enable_pro` switched its original class back."""
    if self.pro_reducer is not None:
      self.pro_reducer.remove()
      self.pro_reducer = None
    for module in self._pro_modules:
      _pro.swap_out(module)
    for block in self.pro_blocks.values():
      _pro.remove_delta(self.param_groups, block.delta)
    self._pro_modules.clear()
    self.pro_blocks.clear()

  def sync_pro_blocks(self) -> None:
    """After a step or a load: each Pro layer's block gets its target's indices and
    profiling flag for the next step."""
    for t in self.plan.targets:
      block = self.pro_blocks.get(id(t.param))
      if block is not None:
        st = self.state[t.param]
        block.rows, block.cols, block.full = st["rows"], st["cols"], self.profiles(t)

  # --- per-layer stepping --------------------------------------------------------------

  def enable_per_layer_step(self) -> None:
    """Update each parameter inside backward, as soon as its gradient is ready.

    See :mod:`losia_torch.layerwise` (limits: no global gradient clipping, no gradient
    accumulation, no Pro, non-finite gradients raise).
    """
    if self.pro_blocks:
      raise ValueError("per-layer stepping does not work with LoSiA-Pro; call disable_pro() "
                       "first")
    if self._layerwise is None:
      self._layerwise = _layerwise.PerLayerStep(self)

  def disable_per_layer_step(self) -> None:
    if self._layerwise is not None:
      self._layerwise.remove()
      self._layerwise = None

  # --- checkpoints -------------------------------------------------------------------

  def state_dict(self) -> dict[str, Any]:
    """Torch's optimizer state dict plus a ``"losia"`` entry (step, importance, config).

    Per-parameter state keeps its dtypes on :meth:`load_state_dict` (int64
    indices, fp32 moments), unlike torch's default, which would cast it to the
    parameter's dtype (bf16 holds integers exactly only up to 256). LoSiA-Pro's
    delta leaves are not part of it (see ``losia_torch.checkpoint``).
    """
    if self.fsdp_state is not None:
      return _fsdp.state_dict(self, super().state_dict)
    return _ckpt.state_dict(self, super().state_dict)

  def load_state_dict(self, state_dict: dict[str, Any]) -> None:
    if self.fsdp_state is not None:
      return _fsdp.load_state_dict(self, state_dict, super().load_state_dict)
    _ckpt.load_state_dict(self, state_dict, super().load_state_dict)
