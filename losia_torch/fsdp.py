"""LoSiA on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 keeps every parameter as a ``DTensor`` sharded on dim 0 over a 1-D mesh:
rank ``r`` holds rows ``[lo, hi)`` of each matrix (``torch.chunk``'s split), and
after backward each rank holds the same rows of the averaged gradient. The
optimizer then works on local shards only:

- Indices ``rows``/``cols`` are small vectors kept whole and identical on every
  rank. Since ``rows`` is sorted, the block rows a rank holds are one contiguous
  slice ``rows[a:b]`` (``searchsorted`` of ``lo``/``hi``), so the compact Adam
  moments of that rank are ``[b - a, k_in]``: the state lives with its rows.
- The step gathers, updates and scatters the local rows of the block in place in
  the local shard; importance buffers are local shards of the matrix; trained
  non-targets get Adam(W) on their local shard.
- Relocalization (LOSIA_SPEC.md section 4) needs row sums, column sums and block
  sums of the score. Row sums are local to a shard and are assembled into the
  ``[d_out]`` vector by an all-reduce of a zero-padded vector (each entry has one
  non-zero contributor, so it is exact); column sums and block sums are partial
  per shard and all-reduced. Only vectors travel, never a matrix; the chosen
  indices are broadcast from the mesh's first rank so that every rank holds the
  same ones by construction.
- Global decisions are made together: the non-finite check is an all-reduce of
  one flag, the clip norm an all-reduce of one number.
- LoSiA-Pro: a non-profiling Pro target's block gradient is its compact delta's
  ``.grad``, already averaged and the same on every rank (``pro_reduce.py``); each
  rank reads the rows ``[a, b)`` of it it holds. The clip norm counts those
  replicated gradients once (on the mesh's first rank), the sharded ones on every rank.

Limits (refused with errors that say so): 1-D meshes with ``Shard(0)`` only
(no HSDP, no tensor parallelism), ``nn.Linear``/``nn.Embedding`` layouts only
(a transformers ``Conv1D`` stores ``[d_in, d_out]`` and would be sharded over
its input neurons), no per-layer stepping.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from typing import Any, Optional

import torch
import torch.distributed as dist

from losia_torch import schedule as _sched
from losia_torch import update as _update
from losia_torch.adam import adam_directions, adam_update_large
from losia_torch.blocks import initial_target_state as _initial_target_state
from losia_torch.checkpoint import check_compatible, groups_without_deltas
from losia_torch.gradients import NONFINITE_MESSAGE, all_finite, own_params
from losia_torch.importance import ImportanceSlot
from losia_torch.pro import add_delta
from losia_torch.selection import top_k_indices

logger = logging.getLogger("losia_torch")


def _dtensor_cls():
  try:
    from torch.distributed.tensor import DTensor
  except ImportError:  # torch without DTensor
    return None
  return DTensor


def is_sharded(p: torch.Tensor) -> bool:
  cls = _dtensor_cls()
  return cls is not None and isinstance(p, cls)


def any_sharded(params) -> bool:
  return any(is_sharded(p) for p in params)


def local(x: torch.Tensor) -> torch.Tensor:
  """The local shard of a DTensor (shares storage: in-place writes reach the parameter)."""
  return x.to_local() if is_sharded(x) else x


def chunk_span(n: int, rank: int, world: int) -> tuple[int, int]:
  """Rows ``[lo, hi)`` of ``n`` that ``Shard(0)`` gives ``rank`` (``torch.chunk``'s split)."""
  c = -(-n // world)
  lo = min(rank * c, n)
  return lo, min(lo + c, n)


@dataclasses.dataclass(eq=False)
class RowShard:
  """The dim-0 rows ``[lo, hi)`` of one parameter that this rank holds."""

  lo: int
  hi: int


class FSDPState:
  """What the optimizer needs to know about the sharding (one per optimizer)."""

  def __init__(self, opt):
    from torch.distributed.tensor import Shard
    params = [p for g in opt.param_groups for p in g["params"]]
    plain = [n for n, p in opt.plan.non_targets if not is_sharded(p)]
    plain += [t.name for t in opt.plan.targets if not is_sharded(t.param)]
    if plain:
      raise ValueError("LoSiA under FSDP2 needs every parameter sharded by fully_shard; not "
                       "DTensors: " + ", ".join(plain[:5]))
    mesh = params[0].device_mesh
    self.shards: dict[int, RowShard] = {}
    names = {id(p): n for n, p in opt.plan.non_targets}
    names.update({id(t.param): t.name for t in opt.plan.targets})
    for p in params:
      name = names.get(id(p), "?")
      if p.device_mesh != mesh:
        raise ValueError(f"LoSiA under FSDP2 needs one device mesh for all parameters; {name} "
                         "has another")
      if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"LoSiA under FSDP2 supports a 1-D mesh with Shard(0) placements; "
                         f"{name} has {tuple(p.placements)} on a {mesh.ndim}-D mesh (HSDP and "
                         "tensor parallelism are not supported)")
      lo, hi = chunk_span(p.shape[0], mesh.get_local_rank(), mesh.size())
      if p.to_local().shape[0] != hi - lo:
        raise ValueError(f"{name}: local shard has {p.to_local().shape[0]} rows; Shard(0) on "
                         f"{mesh.size()} ranks should give {hi - lo}")
      self.shards[id(p)] = RowShard(lo, hi)
    bad = [t.name for t in opt.plan.targets if t.transposed]
    if bad:
      raise ValueError("LoSiA under FSDP2 needs targets stored [d_out, d_in] (nn.Linear); "
                       f"these are transformers Conv1D ([d_in, d_out]): {', '.join(bad[:4])}")
    self.mesh = mesh
    self.group = mesh.get_group()
    self.rank = mesh.get_local_rank()
    self.world = mesh.size()
    self.src = dist.get_global_rank(self.group, 0)

  # --- the rows of a block this rank holds -------------------------------------

  def span(self, t, st: dict) -> tuple[int, int]:
    """``(a, b)``: the block rows ``rows[a:b]`` lie in this rank's shard."""
    sh = self.shards[id(t.param)]
    rows = st["rows"]
    return (int(torch.searchsorted(rows, sh.lo)), int(torch.searchsorted(rows, sh.hi)))

  def local_rows(self, t, st: dict) -> torch.Tensor:
    a, b = self.span(t, st)
    return st["rows"][a:b] - self.shards[id(t.param)].lo

  def fresh_adam(self, t, st: dict) -> dict:
    a, b = self.span(t, st)
    z = lambda: torch.zeros((b - a, t.k_in), dtype=torch.float32, device=local(t.param).device)
    return {"step": 0, "exp_avg": z(), "exp_avg_sq": z()}

  # --- collectives of vectors ----------------------------------------------------

  def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=self.group)
    return x

  def full_rows(self, vec_local: torch.Tensor, t) -> torch.Tensor:
    """The ``[d_out]`` vector whose rows ``[lo, hi)`` are ``vec_local`` on each rank."""
    sh = self.shards[id(t.param)]
    out = torch.zeros(t.d_out, dtype=vec_local.dtype, device=vec_local.device)
    out[sh.lo:sh.hi] = vec_local
    return self.all_reduce(out)

  def broadcast(self, x: torch.Tensor) -> torch.Tensor:
    dist.broadcast(x, src=self.src, group=self.group)
    return x


def _block(x: torch.Tensor, t, rows_local: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
  if t.row_mode:
    return x.index_select(0, rows_local)
  return x[rows_local[:, None], cols[None, :]]


def _scatter(w: torch.Tensor, t, rows_local: torch.Tensor, cols: torch.Tensor,
             blk: torch.Tensor) -> None:
  if t.row_mode:
    w.index_copy_(0, rows_local, blk)
  else:
    w.index_put_((rows_local[:, None], cols[None, :]), blk)


# --- state ------------------------------------------------------------------------

def initial_target_state(opt, t) -> dict:
  st = _initial_target_state(t, opt.config.seed)  # indices: whole, the same on every rank
  st.update(opt.fsdp_state.fresh_adam(t, st))
  return st


# --- gradients and clipping ---------------------------------------------------------

def target_grads(opt, t, st: dict, prof: bool) -> Optional[tuple]:
  """What the step reads of target ``t``'s gradient on this rank, or None if it has none:
  ``(local block rows [b - a, k_in], the full local shard when profiling, the whole
  compact block gradient under LoSiA-Pro)``. A Pro block's gradient is replicated (every
  rank holds the average, ``pro_reduce.py``); a weight's gradient is this rank's shard."""
  fs = opt.fsdp_state
  block = opt.pro_blocks.get(id(t.param))
  if block is not None and not prof:
    g = block.delta.grad
    if g is None:
      return None
    a, b = fs.span(t, st)
    return g[a:b], None, g
  if t.param.grad is None:
    return None
  g = local(t.param.grad)
  return _block(g, t, fs.local_rows(t, st), st["cols"]), g if prof else None, None


def read_grads(opt) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
  """The gradient values the next step reads (see ``gradients.read_grads``), as
  ``(this rank's pieces of sharded gradients, replicated compact Pro gradients)``."""
  sharded, replicated = [], []
  for group in opt.param_groups:
    for p in own_params(opt, group):
      t = opt.target_of(p)
      if t is None:
        if opt.config.non_target == "train" and p.grad is not None:
          sharded.append(local(p.grad))
        continue
      prof = opt.profiles(t)
      got = target_grads(opt, t, opt.state[p], prof)
      if got is None:
        continue
      gblk, full, compact = got
      if compact is not None:
        replicated.append(compact)
      else:
        sharded.append(full if prof else gblk)
  return sharded, replicated


def grad_norm(opt, norm_type: float = 2.0) -> torch.Tensor:
  """The global norm of :func:`read_grads` over all ranks (one all-reduced number).

  Sharded pieces are partial per rank and summed by the all-reduce; the replicated
  compact gradients are counted once, by the first rank of the mesh."""
  fs = opt.fsdp_state
  if opt.pro_reducer is not None:
    opt.pro_reducer.check_reduced()
  sharded, replicated = read_grads(opt)
  pieces = [g for g in sharded + (replicated if fs.rank == 0 else []) if g.numel()]
  norm_type = float(norm_type)
  if norm_type == math.inf:
    part = torch.stack([g.detach().abs().max().float() for g in pieces]).max() if pieces \
        else torch.zeros(())
    return fs.all_reduce(part.reshape(1), dist.ReduceOp.MAX)[0]
  part = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float32)
                      ** norm_type for g in pieces]).sum() if pieces else torch.zeros(())
  return fs.all_reduce(part.reshape(1))[0] ** (1.0 / norm_type)


def clip_grad_norm_(opt, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
  total = grad_norm(opt, norm_type)
  if error_if_nonfinite and not bool(torch.isfinite(total)):
    raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite")
  coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip_grads_with_norm_
  # local shards of sharded gradients and Pro's replicated compact ones (the same
  # coefficient on every rank keeps them replicated)
  grads = [local(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None]
  if grads:
    torch._foreach_mul_(grads, coef)
  return total


# --- the step -------------------------------------------------------------------------

def step(opt) -> None:
  """One LoSiA step on local shards (the FSDP2 form of ``LoSiAOptimizer.step``)."""
  if opt.pro_reducer is not None:
    opt.pro_reducer.check_reduced()
  try:
    _step(opt)
  finally:
    for block in opt.pro_blocks.values():  # Pro's compact gradients are used up
      block.zero_grad(True)
  opt.sync_pro_blocks()  # Pro layers learn their new indices and profiling flags


def _step(opt) -> None:
  fs, cfg, s = opt.fsdp_state, opt.config, opt.losia_step
  work, nt_work, checks = [], [], []
  for group in opt.param_groups:
    for p in own_params(opt, group):
      t = opt.target_of(p)
      if t is None:
        if cfg.non_target == "train" and p.grad is not None:
          nt_work.append((group, p))
          checks.append(local(p.grad))
        continue
      st = opt.state[p]
      prof = opt.profiles(t, s)
      got = target_grads(opt, t, st, prof)
      if got is None:
        continue
      gblk, full, compact = got
      checks.append(gblk if compact is None else compact)
      if prof:
        checks.append(full)
      work.append((group, t, st, gblk, prof, fs.local_rows(t, st)))
  if not work and not nt_work:
    return  # FSDP gives every rank a gradient for the same parameters: all ranks agree
  finite = torch.tensor([1.0 if all_finite(checks) else 0.0])
  if not bool(fs.all_reduce(finite, dist.ReduceOp.MIN)[0]):  # one rank's NaN skips all
    opt.num_skipped_steps += 1
    logger.warning("%s (step %d; %d skipped so far)", NONFINITE_MESSAGE, s,
                   opt.num_skipped_steps)
    return
  for _, t, _, _, prof, _ in work:  # importance from the weights before the update
    if prof:
      w = local(t.param)
      key = opt.slot_key(t)
      slot = opt.importance.get(key)
      if slot is None or slot.ibar.shape != w.shape:
        slot = opt.importance[key] = ImportanceSlot.zeros(w.shape, w.device)
      slot.update(w, local(t.param.grad), cfg.importance, cfg.importance_beta1,
                  cfg.importance_beta2)
  _update_targets(opt, work, s)
  _update_non_targets(opt, nt_work, s)
  if _sched.ends_slot(s, cfg.period):
    for _, t, st, _, prof, _ in work:
      if prof:
        relocalize(opt, t, st, s)
  opt.losia_step = s + 1


def _update_targets(opt, work: list, s: int) -> None:
  """``update.update_targets`` on the local rows of each block (elementwise,
  so each entry gets exactly the arithmetic of the single-process step)."""
  cfg = opt.config
  by_hp: dict[tuple, list] = defaultdict(list)
  for item in work:
    by_hp[(item[0]["betas"], item[0]["eps"])].append(item)
  for (betas, eps), items in by_hp.items():
    gs = [it[3].to(torch.float32) for it in items]
    if cfg.scale != 1.0:
      gs = torch._foreach_mul(gs, cfg.scale)
    for it in items:
      it[2]["step"] += 1
    us = adam_directions([it[2]["exp_avg"] for it in items],
                         [it[2]["exp_avg_sq"] for it in items], gs,
                         [it[2]["step"] for it in items], betas[0], betas[1], eps)
    for (group, t, st, _, _, rl), u in zip(items, us):
      w = local(t.param)
      wblk = _block(w, t, rl, st["cols"])
      _scatter(w, t, rl, st["cols"], _update.block_after(wblk, u, group, st, cfg, s))


def _update_non_targets(opt, nt_work: list, s: int) -> None:
  """Adam(W) on each non-target's local shard, with its moments local too."""
  by_hp: dict[tuple, list] = defaultdict(list)
  for group, p in nt_work:
    by_hp[(group["betas"], group["eps"])].append((group, p))
  for (betas, eps), items in by_hp.items():
    small, big = [], []
    for group, p in items:
      st = opt.state[p]
      w = local(p)
      if "exp_avg" not in st:
        st["exp_avg"] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        st["exp_avg_sq"] = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
      # the single-process path picks by the whole tensor's size; so does this one
      (small if p.numel() < _update.BIG else big).append((group, p, w, st))
    us = adam_directions([x[3]["exp_avg"] for x in small], [x[3]["exp_avg_sq"] for x in small],
                         [local(x[1].grad).to(torch.float32) for x in small],
                         [s + 1] * len(small), betas[0], betas[1], eps)
    for (group, p, w, _), u in zip(small, us):
      if group["weight_decay"]:
        u.add_(w.to(torch.float32) * group["weight_decay"])
      u.mul_(-float(group["lr"]))
      w.add_(u.to(w.dtype))
    for group, p, w, st in big:
      g = local(p.grad)
      g = g if g.dtype == torch.float32 else g.to(torch.float32)
      adam_update_large(w, st["exp_avg"], st["exp_avg_sq"], g.contiguous(), s + 1, betas[0],
                        betas[1], eps, float(group["lr"]), group["weight_decay"])


# --- relocalization: vector-sized collectives only -------------------------------------

def select_sharded(fs: FSDPState, t, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """:func:`losia_torch.selection.select_subnet` (or ``select_rows`` in row mode) of the
  whole matrix, from this rank's rows ``score`` of it; the result is the same on all ranks.
  """
  s = score.detach().to(torch.float32)
  sh = fs.shards[id(t.param)]
  if t.row_mode:
    rows = torch.sort(top_k_indices(fs.full_rows(s.sum(dim=1), t), t.k_out)).values
    cols = torch.arange(t.d_in, dtype=torch.int64, device=s.device)
  else:
    def mine(r):  # the entries of global row indices r that lie in this shard, shifted
      return r[(r >= sh.lo) & (r < sh.hi)] - sh.lo

    r1 = top_k_indices(fs.full_rows(s.sum(dim=1), t), t.k_out)
    c1 = top_k_indices(fs.all_reduce(s.sum(dim=0)), t.k_in)
    c2 = top_k_indices(fs.all_reduce(s.index_select(0, mine(r1)).sum(dim=0)), t.k_in)
    r3 = top_k_indices(fs.full_rows(s.index_select(1, c1).sum(dim=1), t), t.k_out)
    part = lambda r, c: s[mine(r)[:, None], c[None, :]].sum()
    sums = fs.all_reduce(torch.stack([part(r1, c1), part(r1, c2), part(r3, c1)]))
    best = int(torch.argmax(sums))  # the earlier candidate wins exact ties, as in one process
    rows = torch.sort(r3 if best == 2 else r1).values
    cols = torch.sort(c2 if best == 1 else c1).values
  # Every rank computed from the same all-reduced vectors; the broadcast makes the
  # agreement hold by construction (ranks must agree on which rows form the block).
  return fs.broadcast(rows.to(torch.int64)), fs.broadcast(cols.to(torch.int64).clone())


def relocalize(opt, t, st: dict, s: int) -> None:
  slot = opt.importance.pop(opt.slot_key(t), None)
  if slot is None:
    return
  st["rows"], st["cols"] = select_sharded(opt.fsdp_state, t, slot.score())
  st.update(opt.fsdp_state.fresh_adam(t, st))
  st["last_relocalization"] = s


# --- checkpoints (torch.distributed.checkpoint) ---------------------------------------

def _slot_keys(opt) -> dict[str, Any]:
  """Every importance slot key the schedule can use -> a target with that key."""
  out = {}
  for t in opt.plan.targets:
    out.setdefault(opt.slot_key(t), t)
  return out


def _as_dtensor(x: torch.Tensor, like: torch.Tensor):
  from torch.distributed.tensor import DTensor
  return DTensor.from_local(x, like.device_mesh, like.placements, run_check=False,
                            shape=like.shape, stride=like.stride())


def _block_dtensor(fs: FSDPState, t, st: dict, x: torch.Tensor):
  """A compact moment (this rank's rows ``[a, b)`` of the block) as a ``Shard(0)``
  DTensor of the whole ``[k_out, k_in]`` block, which DCP can save and reshard.
  The block's rows are regrouped by one all-reduce of a block-sized tensor (checkpoint
  time only; the block is ``rank_factor²`` of the matrix)."""
  from torch.distributed.tensor import DTensor, Shard
  a, b = fs.span(t, st)
  full = torch.zeros(t.block_shape, dtype=x.dtype, device=x.device)
  full[a:b] = x
  fs.all_reduce(full)
  lo, hi = chunk_span(t.k_out, fs.rank, fs.world)
  return DTensor.from_local(full[lo:hi].clone(), fs.mesh, [Shard(0)], run_check=False,
                            shape=torch.Size(t.block_shape), stride=full.stride())


def state_dict(opt, base_state_dict) -> dict[str, Any]:
  """A state dict for ``torch.distributed.checkpoint``: every tensor that is a piece of
  something sharded is a DTensor, indices and counters are replicated values.

  Importance buffers of every slot key are included (zeros where not live, with the
  live keys listed), so the state dict of a freshly built optimizer is a complete
  template for ``dcp.load`` at any step."""
  fs = opt.fsdp_state
  groups = opt.param_groups
  opt.param_groups = groups_without_deltas(opt)  # a checkpoint is the same with Pro
  try:
    sd = base_state_dict()
  finally:
    opt.param_groups = groups
  state = {}
  params = [p for g in groups_without_deltas(opt) for p in g["params"]]
  for i, p in enumerate(params):
    st = opt.state.get(p, {})
    t = opt.target_of(p)
    if t is not None:
      # counters as tensors: DCP does not load plain ints nested this deep in place
      state[i] = {"rows": st["rows"], "cols": st["cols"],
                  "step": torch.tensor(st["step"], dtype=torch.int64),
                  "last_relocalization": torch.tensor(st["last_relocalization"],
                                                      dtype=torch.int64),
                  "exp_avg": _block_dtensor(fs, t, st, st["exp_avg"]),
                  "exp_avg_sq": _block_dtensor(fs, t, st, st["exp_avg_sq"])}
    elif opt.config.non_target == "train" and p.requires_grad:
      z = lambda k: st[k] if k in st else torch.zeros(local(p).shape, dtype=torch.float32)
      state[i] = {"exp_avg": _as_dtensor(z("exp_avg"), p),
                  "exp_avg_sq": _as_dtensor(z("exp_avg_sq"), p)}
  sd["state"] = state
  importance = {}
  for key, t in _slot_keys(opt).items():
    slot = opt.importance.get(key) or ImportanceSlot.zeros(local(t.param).shape)
    importance[key] = {"ibar": _as_dtensor(slot.ibar, t.param),
                       "ubar": _as_dtensor(slot.ubar, t.param)}
  sd["losia"] = {"step": opt.losia_step, "num_skipped_steps": opt.num_skipped_steps,
                 "importance": importance, "live": ",".join(sorted(opt.importance)),
                 "config": opt.config.to_dict(),
                 "targets": ",".join(t.name for t in opt.plan.targets)}
  return sd


def load_state_dict(opt, sd: dict[str, Any], base_load_state_dict) -> None:
  fs = opt.fsdp_state
  extra = sd.get("losia")
  if not isinstance(extra, dict):
    raise ValueError("not a LoSiAOptimizer state dict: it has no 'losia' entry")
  targets = extra.get("targets", "")
  check_compatible(opt, extra.get("config", {}),
                   targets.split(",") if isinstance(targets, str) else list(targets))
  saved = sd.get("state", {})
  opt.param_groups = groups_without_deltas(opt)
  try:
    base_load_state_dict({"state": {}, "param_groups": sd["param_groups"]})
  finally:
    for t in opt.plan.targets:  # Pro's deltas go back into the (new) groups
      block = opt.pro_blocks.get(id(t.param))
      if block is not None:
        add_delta(opt.param_groups, t.param, block.delta, t.name)
  params = [p for g in groups_without_deltas(opt) for p in g["params"]]
  full = lambda x: x.full_tensor() if is_sharded(x) else x
  for i, p in enumerate(params):
    v = saved.get(i)
    if v is None:
      continue
    t = opt.target_of(p)
    if t is not None:
      st = {"rows": v["rows"].detach().clone().to(torch.int64),
            "cols": v["cols"].detach().clone().to(torch.int64),
            "step": int(v["step"]), "last_relocalization": int(v["last_relocalization"])}
      a, b = fs.span(t, st)
      for k in ("exp_avg", "exp_avg_sq"):  # this rank's rows of the whole block
        st[k] = full(v[k]).to(torch.float32)[a:b].clone()
      opt.state[p] = st
    else:
      opt.state[p] = {k: local(v[k]).detach().clone() for k in ("exp_avg", "exp_avg_sq")}
  live = [k for k in extra.get("live", "").split(",") if k]
  opt.importance = {k: ImportanceSlot(local(extra["importance"][k]["ibar"]).detach().clone(),
                                       local(extra["importance"][k]["ubar"]).detach().clone())
                     for k in live}
  opt.losia_step = int(extra["step"])
  opt.num_skipped_steps = int(extra.get("num_skipped_steps", 0))
  opt.sync_pro_blocks()


def optimizer_state_nbytes(opt: torch.optim.Optimizer) -> int:
  """Bytes of this rank's optimizer state tensors (local shards of DTensors)."""
  n = 0
  for st in opt.state.values():
    for v in st.values():
      if isinstance(v, torch.Tensor):
        v = local(v)
        n += v.numel() * v.element_size()
  for slot in getattr(opt, "importance", {}).values():
    n += 2 * slot.ibar.numel() * 4
  return n
