"""LoSiA as a ``torch.optim.Optimizer``.

Implements LOSIA_SPEC.md: every target matrix trains only its core block
``W[rows][:, cols]`` with compact Adam moments; one layer at a time (async) or
all layers together (sync) accumulate gradient importance, and at the end of
their profiling slot choose a new block, restart their Adam state (step count
included) and ramp their learning rate back up (rewarm). Works in an ordinary
loop (``loss.backward(); clip_grad_norm_(...); opt.step(); opt.zero_grad()``),
with gradient accumulation, LR schedulers and ``DistributedDataParallel``.

Reference: Wang, Qi, Xu, "LoSiA: Efficient High-Rank Fine-Tuning via Subnet
Localization and Optimization", arXiv:2507.04487 (EMNLP 2025).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Callable, Optional

import torch

from losia_common import LoSiAConfig
from losia_common.subnet import initial_indices
from losia_torch import checkpoint as _ckpt
from losia_torch import fsdp as _fsdp
from losia_torch import pro as _pro
from losia_torch import schedule as _sched
from losia_torch.adam import adam_directions, adam_update_large
from losia_torch.importance import ImportanceSlot
from losia_torch.selection import select_rows, select_subnet
from losia_torch.targets import (LoSiAPlan, TargetSpec, layouts_of, make_plan,
                                 named_parameters_of)

logger = logging.getLogger("losia_torch")

_BIG = 1 << 20  # non-targets with at least this many entries get the in-place Adam path

NONFINITE_MESSAGE = ("LoSiA skipped a step: a gradient value the step reads (a target block, "
                     "the full gradient of a profiling target, or a trained non-target) is NaN "
                     "or infinite; parameters and optimizer state are unchanged and the step "
                     "counter did not advance")


def _check_hparams(lr, betas, eps, weight_decay) -> None:
  def num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

  if isinstance(lr, torch.Tensor):
    lr = float(lr)
  if not num(lr) or lr < 0:
    raise ValueError(f"`lr` must be a finite number >= 0; got {lr!r}")
  if not (isinstance(betas, (tuple, list)) and len(betas) == 2
          and all(num(b) and 0.0 <= b < 1.0 for b in betas)):
    raise ValueError(f"`betas` must be two numbers in [0, 1); got {betas!r}")
  if not num(eps) or eps < 0:
    raise ValueError(f"`eps` must be a finite number >= 0; got {eps!r}")
  if not num(weight_decay) or weight_decay < 0:
    raise ValueError(f"`weight_decay` must be a finite number >= 0; got {weight_decay!r}")


def _all_finite(tensors: list) -> bool:
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
  """

  def __init__(self, params: Any, config: Optional[LoSiAConfig] = None, lr: float = 1e-3,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, output_module: str = "lm_head",
               model: Optional[torch.nn.Module] = None):
    config = LoSiAConfig() if config is None else config
    if not isinstance(config, LoSiAConfig):
      raise TypeError(f"`config` must be a LoSiAConfig; got {type(config).__name__}")
    _check_hparams(lr, betas, eps, weight_decay)
    if not isinstance(output_module, str) or not output_module:
      raise ValueError(f"`output_module` must be a non-empty string; got {output_module!r}")
    groups = None
    if isinstance(params, (list, tuple)) and params and isinstance(params[0], dict):
      groups = [dict(g) for g in params]
      named = []
      for g in groups:
        g_named, _ = named_parameters_of(g["params"])
        g["params"] = g_named
        named.extend(g_named)
        _check_hparams(g.get("lr", lr), g.get("betas", betas), g.get("eps", eps),
                       g.get("weight_decay", weight_decay))
      output_param = None
    else:
      named, output_param = named_parameters_of(params)
      groups = [{"params": named}]
      if isinstance(params, torch.nn.Module):
        model = params
    layouts = None
    if model is not None:
      _, model_output = named_parameters_of(model)
      output_param = output_param if output_param is not None else model_output
      layouts = layouts_of(model)
    plan = make_plan(named, config, output_param=output_param, output_module=output_module,
                     layouts=layouts)
    defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    super().__init__(groups, defaults)
    for g in self.param_groups:
      g["betas"] = tuple(g["betas"])
    self.config = config
    self.plan: LoSiAPlan = plan
    self._spec: dict[int, TargetSpec] = {id(t.param): t for t in plan.targets}
    self.losia_step = 0
    self.num_skipped_steps = 0
    self._importance: dict[str, ImportanceSlot] = {}
    self._pro: dict[int, Any] = {}  # id(param) -> losia_torch.pro.ProHandle
    self._layerwise = None  # losia_torch.layerwise.LayerwiseState when stepping in backward
    # FSDP2 (fully_shard): DTensor parameters; the step works on local shards (fsdp.py)
    self._fsdp = _fsdp.FSDPState(self) if _fsdp.any_sharded(
        p for g in self.param_groups for p in g["params"]) else None
    for t in plan.targets:
      self.state[t.param].update(self._initial_target_state(t) if self._fsdp is None
                                 else _fsdp.initial_target_state(self, t))

  # --- per-target state --------------------------------------------------------

  def _initial_target_state(self, t: TargetSpec) -> dict:
    dev = t.param.device
    seed = self.config.seed
    rows = torch.as_tensor(initial_indices(seed, t.identity, t.d_out, t.k_out, "rows"),
                           dtype=torch.int64, device=dev)
    if t.row_mode:  # the output layer trains whole rows: cols holds all columns
      cols = torch.arange(t.d_in, dtype=torch.int64, device=dev)
    else:
      cols = torch.as_tensor(initial_indices(seed, t.identity, t.d_in, t.k_in, "cols"),
                             dtype=torch.int64, device=dev)
    st = {"rows": rows, "cols": cols, "last_relocalization": -1}
    st.update(self._fresh_adam(t))
    return st

  @staticmethod
  def _fresh_adam(t: TargetSpec) -> dict:
    z = lambda: torch.zeros(t.block_shape, dtype=torch.float32, device=t.param.device)
    return {"step": 0, "exp_avg": z(), "exp_avg_sq": z()}

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

  def _slot_key(self, t: TargetSpec) -> str:
    return t.role if self.config.schedule == "async" else t.name

  @property
  def notfinite_count(self) -> int:
    """Alias of ``num_skipped_steps`` (the name of the counter in ``losia_jax``'s state)."""
    return self.num_skipped_steps

  def summary(self) -> str:
    return self.plan.summary(self.config.non_target)

  def state_nbytes(self) -> int:
    """Bytes held by optimizer state tensors (moments, indices, importance buffers)."""
    n = 0
    for st in self.state.values():
      for v in st.values():
        if isinstance(v, torch.Tensor):
          n += v.numel() * v.element_size()
    for slot in self._importance.values():
      n += 2 * slot.ibar.numel() * 4
    return n

  # --- gradients ---------------------------------------------------------------

  @staticmethod
  def _gather(x: torch.Tensor, t: TargetSpec, st: dict) -> torch.Tensor:
    """The ``[k_out, k_in]`` block of ``x`` (a weight or its gradient)."""
    if t.row_mode:
      return x.index_select(0, st["rows"])
    if t.transposed:  # Conv1D: x is [d_in, d_out]
      return x[st["cols"][:, None], st["rows"][None, :]].t()
    return x[st["rows"][:, None], st["cols"][None, :]]

  @staticmethod
  def _scatter(w: torch.Tensor, t: TargetSpec, st: dict, blk: torch.Tensor) -> None:
    """Writes the ``[k_out, k_in]`` block ``blk`` into ``w``."""
    if t.row_mode:
      w.index_copy_(0, st["rows"], blk)
    elif t.transposed:
      w.index_put_((st["cols"][:, None], st["rows"][None, :]), blk.t())
    else:
      w.index_put_((st["rows"][:, None], st["cols"][None, :]), blk)

  def _own_params(self, group: dict):
    """The group's parameters without LoSiA-Pro's delta leaves (see ``pro.py``)."""
    deltas = self._delta_ids
    return [p for p in group["params"] if id(p) not in deltas] if deltas else group["params"]

  @property
  def _delta_ids(self) -> set:
    return {id(h.delta) for h in self._pro.values()}

  def _block_grad(self, t: TargetSpec, st: dict, profiling: bool) -> Optional[torch.Tensor]:
    handle = self._pro.get(id(t.param))
    if handle is not None and not profiling:
      return handle.delta.grad  # Pro: the compact block gradient (None if no backward)
    if t.param.grad is None:
      return None
    return self._gather(t.param.grad, t, st)

  def _grad_holders(self) -> list[torch.Tensor]:
    return [p for g in self.param_groups for p in g["params"]]  # Pro's deltas included

  def _read_grads(self) -> list[torch.Tensor]:
    """The gradient values the next step reads: the block of each non-profiling
    target, the full gradient of profiling targets, trained non-targets."""
    out = []
    for group in self.param_groups:
      for p in self._own_params(group):
        t = self._spec.get(id(p))
        if t is None:
          if self.config.non_target == "train" and p.grad is not None:
            out.append(p.grad)
          continue
        prof = self.profiles(t)
        blk = self._block_grad(t, self.state[p], prof)
        if blk is not None:
          out.append(p.grad if prof else blk)
    return out

  def grad_norm(self, norm_type: float = 2.0) -> torch.Tensor:
    """The norm :meth:`clip_grad_norm_` clips by, without clipping."""
    if self._fsdp is not None:
      return _fsdp.grad_norm(self, norm_type)
    self.follow_parameters()
    return torch.nn.utils.get_total_norm(self._read_grads(), norm_type)

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
    if self._fsdp is not None:
      return _fsdp.clip_grad_norm_(self, max_norm, norm_type, error_if_nonfinite)
    self.follow_parameters()
    total = torch.nn.utils.get_total_norm(self._read_grads(), norm_type, error_if_nonfinite,
                                          foreach)
    # clip_grads_with_norm_ takes the tensors whose .grad it scales (params and
    # Pro's compact deltas), not the gradients themselves.
    holders = [x for x in self._grad_holders() if x.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(holders, max_norm, total, foreach)
    return total

  # --- the step ------------------------------------------------------------------

  def _collect(self, group: dict, p: torch.Tensor, s: int, work: list, nt_work: list,
               checks: list) -> None:
    """Adds what step ``s`` does with parameter ``p`` to ``work``/``nt_work``, and the
    gradient values it reads to ``checks``."""
    t = self._spec.get(id(p))
    if t is None:
      if self.config.non_target == "train" and p.grad is not None:
        if p.grad.is_sparse:
          raise RuntimeError(f"LoSiA does not support sparse gradients ({tuple(p.shape)})")
        nt_work.append((group, p))
        checks.append(p.grad)
      return
    st = self.state[p]
    prof = self.profiles(t, s)
    gblk = self._block_grad(t, st, prof)
    if gblk is None:
      return
    checks.append(gblk)
    if prof:
      checks.append(p.grad)
    work.append((group, t, st, gblk, prof))

  def _apply(self, work: list, nt_work: list, s: int) -> None:
    """Profiling (weights before the update), then the updates of step ``s``."""
    cfg = self.config
    for _, t, st, _, prof in work:
      if prof:
        key = self._slot_key(t)
        slot = self._importance.get(key)
        if slot is None or slot.ibar.shape != t.param.shape:
          slot = self._importance[key] = ImportanceSlot.zeros(t.param.shape, t.param.device)
        slot.update(t.param, t.param.grad, cfg.importance, cfg.importance_beta1,
                    cfg.importance_beta2)
    if work:
      self._update_targets(work, s)
    if nt_work:
      self._update_non_targets(nt_work, s)

  def _finish(self, profiled: list, s: int) -> None:
    """End of step ``s``: relocalize the profiling targets if their window ends."""
    if _sched.ends_slot(s, self.config.period):
      for t in profiled:
        self._relocalize(t, self.state[t.param], s)
    self.losia_step = s + 1
    _pro.sync_handles(self)  # Pro layers learn their new indices and profiling flags

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
      from losia_torch.layerwise import finish_step
      finish_step(self)
      return loss
    if self._fsdp is not None:
      _fsdp.step(self)
      return loss
    self.follow_parameters()
    s = self.losia_step
    work, nt_work, checks = [], [], []
    for group in self.param_groups:
      for p in self._own_params(group):
        self._collect(group, p, s, work, nt_work, checks)
    if not work and not nt_work:
      return loss  # no gradient at all (like torch's optimizers): a no-op, s stays
    if not _all_finite(checks):
      self.num_skipped_steps += 1
      logger.warning("%s (step %d; %d skipped so far)", NONFINITE_MESSAGE, s,
                     self.num_skipped_steps)
      self._consume_pro_grads()
      return loss
    self._apply(work, nt_work, s)
    self._finish([t for _, t, _, _, prof in work if prof], s)
    self._consume_pro_grads()
    return loss

  def follow_parameters(self) -> None:
    """Moves the state to the parameters' devices if the model moved (done by ``step``)."""
    _ckpt.follow_parameters(self)

  def _update_targets(self, work: list, s: int) -> None:
    cfg = self.config
    by_hp: dict[tuple, list] = defaultdict(list)
    for item in work:
      g = item[0]
      by_hp[(g["betas"], g["eps"])].append(item)
    for (betas, eps), items in by_hp.items():
      gs = [gblk.to(torch.float32) for _, _, _, gblk, _ in items]
      if cfg.scale != 1.0:
        gs = torch._foreach_mul(gs, cfg.scale)
      for _, _, st, _, _ in items:
        st["step"] += 1
      us = adam_directions([it[2]["exp_avg"] for it in items],
                           [it[2]["exp_avg_sq"] for it in items], gs,
                           [it[2]["step"] for it in items], betas[0], betas[1], eps)
      for (group, t, st, _, _), u in zip(items, us):
        w = t.param
        wblk = self._gather(w, t, st)
        wd = group["weight_decay"]
        if wd:
          u.add_(wblk.to(torch.float32) * wd)
        if cfg.rewarm:
          u.mul_(_sched.rewarm_factor(s, st["last_relocalization"], cfg.period))
        u.mul_(-float(group["lr"]))
        self._scatter(w, t, st, wblk + u.to(w.dtype))

  def _update_non_targets(self, nt_work: list, s: int) -> None:
    by_hp: dict[tuple, list] = defaultdict(list)
    for group, p in nt_work:
      by_hp[(group["betas"], group["eps"])].append((group, p))
    for (betas, eps), items in by_hp.items():
      ms, vs = [], []
      for _, p in items:
        st = self.state[p]
        if "exp_avg" not in st:
          st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
          st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        ms.append(st["exp_avg"])
        vs.append(st["exp_avg_sq"])
      small = [i for i, (_, p) in enumerate(items) if p.numel() < _BIG]
      gs = [items[i][1].grad.to(torch.float32) for i in small]
      us = adam_directions([ms[i] for i in small], [vs[i] for i in small], gs,
                           [s + 1] * len(small), betas[0], betas[1], eps)
      for i, u in zip(small, us):
        group, p = items[i]
        wd = group["weight_decay"]
        if wd:
          u.add_(p.to(torch.float32) * wd)
        u.mul_(-float(group["lr"]))
        p.add_(u.to(p.dtype))
      for i, (group, p) in enumerate(items):
        if p.numel() >= _BIG:
          g = p.grad if p.grad.dtype == torch.float32 else p.grad.to(torch.float32)
          adam_update_large(p.data, ms[i], vs[i], g, s + 1, betas[0], betas[1], eps,
                            float(group["lr"]), group["weight_decay"])

  def _relocalize(self, t: TargetSpec, st: dict, s: int) -> None:
    slot = self._importance.pop(self._slot_key(t), None)
    if slot is None:
      return
    score = slot.score()  # in the parameter's layout
    if t.transposed:
      score = score.t()
    if t.row_mode:
      st["rows"] = select_rows(score, t.k_out).to(t.param.device)
    else:
      rows, cols = select_subnet(score, t.k_out, t.k_in)
      st["rows"], st["cols"] = rows.to(t.param.device), cols.to(t.param.device)
    st.update(self._fresh_adam(t))
    st["last_relocalization"] = s
    logger.debug("LoSiA relocalized %s at the end of step %d", t.name, s)

  def _consume_pro_grads(self) -> None:
    for h in self._pro.values():
      h.zero_grad(True)

  # --- LoSiA-Pro -------------------------------------------------------------------

  def enable_pro(self, model: torch.nn.Module) -> list[str]:
    """Switches the targets' ``nn.Linear`` modules of ``model`` to LoSiA-Pro.

    See :func:`losia_torch.pro.enable_pro`. Returns the names of the targets
    that now run the compact backward.
    """
    return _pro.enable_pro(model, self)

  def disable_pro(self) -> None:
    """Restores the ordinary ``nn.Linear`` forward of every Pro target."""
    _pro.disable_pro(self)

  # --- per-layer stepping --------------------------------------------------------------

  def enable_per_layer_step(self) -> None:
    """Update each parameter inside backward, as soon as its gradient is ready.

    See :func:`losia_torch.layerwise.enable_per_layer_step` (limits: no global
    gradient clipping, no gradient accumulation, no Pro, non-finite gradients raise).
    """
    from losia_torch.layerwise import enable_per_layer_step
    enable_per_layer_step(self)

  def disable_per_layer_step(self) -> None:
    from losia_torch.layerwise import disable_per_layer_step
    disable_per_layer_step(self)

  # --- checkpoints -------------------------------------------------------------------

  def state_dict(self) -> dict[str, Any]:
    """Torch's optimizer state dict plus a ``"losia"`` entry (step, importance, config).

    Per-parameter state keeps its dtypes on :meth:`load_state_dict` (int64
    indices, fp32 moments), unlike torch's default, which would cast it to the
    parameter's dtype (bf16 holds integers exactly only up to 256). LoSiA-Pro's
    delta leaves are not part of it (see ``losia_torch.checkpoint``).
    """
    if self._fsdp is not None:
      return _fsdp.state_dict(self, super().state_dict)
    return _ckpt.state_dict(self, super().state_dict)

  def load_state_dict(self, state_dict: dict[str, Any]) -> None:
    if self._fsdp is not None:
      return _fsdp.load_state_dict(self, state_dict, super().load_state_dict)
    _ckpt.load_state_dict(self, state_dict, super().load_state_dict)
