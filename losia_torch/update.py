"""The parameter updates of one step: Adam on each target's block, Adam(W) on non-targets.

LOSIA_SPEC.md section 6. Per target with block gradient ``g`` (fp32, times
``config.scale``): Adam on the compact moments with the target's own step count;
``u += weight_decay * W_block`` (decoupled decay, the block only); ``W_block -= lr *
rewarm(s) * u``, with ``lr`` the param group's current value. Trained non-targets get
full Adam(W) with the global step ``s + 1``. Items are grouped by ``(betas, eps)`` so
that one fused ``_foreach`` Adam runs per hyper-parameter set.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from losia_torch import schedule as _sched
from losia_torch.adam import adam_directions, adam_update_large
from losia_torch.blocks import gather, scatter

BIG = 1 << 20  # non-targets with at least this many entries get the in-place Adam path


def update_targets(items: list, s: int, cfg) -> None:
  """Step ``s`` for each ``(group, t, st, gblk, profiling)`` in ``items``.

  Args:
    items: per target its param group, :class:`TargetSpec`, state dict, block
      gradient ``[k_out, k_in]`` and whether it profiles (unused here).
    s: the step being taken (the rewarm ramp is measured from it).
    cfg: the :class:`LoSiAConfig` (``scale``, ``rewarm``, ``period``).
  """
  by_hp: dict[tuple, list] = defaultdict(list)
  for item in items:
    g = item[0]
    by_hp[(g["betas"], g["eps"])].append(item)
  for (betas, eps), group_items in by_hp.items():
    gs = [gblk.to(torch.float32) for _, _, _, gblk, _ in group_items]
    if cfg.scale != 1.0:
      gs = torch._foreach_mul(gs, cfg.scale)
    for _, _, st, _, _ in group_items:
      st["step"] += 1
    us = adam_directions([it[2]["exp_avg"] for it in group_items],
                         [it[2]["exp_avg_sq"] for it in group_items], gs,
                         [it[2]["step"] for it in group_items], betas[0], betas[1], eps)
    for (group, t, st, _, _), u in zip(group_items, us):
      w = t.param
      wblk = gather(w, t, st)
      scatter(w, t, st, block_after(wblk, u, group, st, cfg, s))


def block_after(wblk: torch.Tensor, u: torch.Tensor, group: dict, st: dict, cfg, s: int
                ) -> torch.Tensor:
  """The block after step ``s`` (LOSIA_SPEC section 6, 4-5): ``u`` (the inner Adam
  direction, fp32, consumed) gains the decoupled decay of the block, then the rewarm
  factor and ``-lr`` scale it. Shared with the FSDP2 path, which passes local rows."""
  wd = group["weight_decay"]
  if wd:
    u.add_(wblk.to(torch.float32) * wd)
  if cfg.rewarm:
    u.mul_(_sched.rewarm_factor(s, st["last_relocalization"], cfg.period))
  u.mul_(-float(group["lr"]))
  return wblk + u.to(wblk.dtype)


def update_non_targets(items: list, s: int, state) -> None:
  """Adam(W) step ``s`` for each ``(group, param)`` in ``items``; moments live in
  ``state[param]`` (created on first use). Parameters of at least :data:`BIG` entries
  take the chunked in-place path, which never holds a full-size temporary."""
  by_hp: dict[tuple, list] = defaultdict(list)
  for group, p in items:
    by_hp[(group["betas"], group["eps"])].append((group, p))
  for (betas, eps), group_items in by_hp.items():
    ms, vs = [], []
    for _, p in group_items:
      st = state[p]
      if "exp_avg" not in st:
        st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
      ms.append(st["exp_avg"])
      vs.append(st["exp_avg_sq"])
    small = [i for i, (_, p) in enumerate(group_items) if p.numel() < BIG]
    gs = [group_items[i][1].grad.to(torch.float32) for i in small]
    us = adam_directions([ms[i] for i in small], [vs[i] for i in small], gs,
                         [s + 1] * len(small), betas[0], betas[1], eps)
    for i, u in zip(small, us):
      group, p = group_items[i]
      wd = group["weight_decay"]
      if wd:
        u.add_(p.to(torch.float32) * wd)
      u.mul_(-float(group["lr"]))
      p.add_(u.to(p.dtype))
    for i, (group, p) in enumerate(group_items):
      if p.numel() >= BIG:
        g = p.grad if p.grad.dtype == torch.float32 else p.grad.to(torch.float32)
        adam_update_large(p.data, ms[i], vs[i], g, s + 1, betas[0], betas[1], eps,
                          float(group["lr"]), group["weight_decay"])
