"""A plain NumPy LoSiA written straight from LOSIA_SPEC.md: the tests' oracle.

Deliberately naive (Python loops, one matrix at a time, float64 importance) so
that it reads like the spec. Both backends are checked against it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from losia_common import LoSiAConfig, schedule
from losia_common.names import OUTPUT_IDENTITY, target_identity
from losia_common.subnet import block_size, initial_indices, reference_importance, reference_select


@dataclasses.dataclass
class _Adam:
  b1: float
  b2: float
  eps: float
  mu: np.ndarray
  nu: np.ndarray
  t: int = 0

  def step(self, g):
    self.t += 1
    self.mu = self.b1 * self.mu + (1 - self.b1) * g
    self.nu = self.b2 * self.nu + (1 - self.b2) * g * g
    mh = self.mu / (1 - self.b1 ** self.t)
    nh = self.nu / (1 - self.b2 ** self.t)
    return mh / (np.sqrt(nh) + self.eps)


@dataclasses.dataclass
class OracleTarget:
  name: str
  layer_index: int | None  # None: the output layer (row mode)
  role: str
  w: np.ndarray  # [d_out, d_in], float32, updated in place
  rows: np.ndarray = None
  cols: np.ndarray = None
  adam: _Adam = None
  last: int | None = None
  ibar: np.ndarray = None
  ubar: np.ndarray = None


class OracleLoSiA:
  """Spec-literal LoSiA. ``targets``: name -> (layer_index or None, role, W[d_out, d_in])."""

  def __init__(self, config: LoSiAConfig, targets: dict, non_targets: dict,
               lr: float | Callable[[int], float], weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.cfg, self.lr, self.wd = config, lr, weight_decay
    self.b1, self.b2, self.eps = b1, b2, eps
    self.out = any(li is None for li, _, _ in targets.values())
    self.L = max(li + 1 for li, _, _ in targets.values() if li is not None)
    self.total = schedule.total_slots(self.L, self.out)
    self.targets = {}
    for name, (li, role, w) in targets.items():
      t = OracleTarget(name, li, role, np.array(w, np.float32))
      d_out, d_in = t.w.shape
      ident = OUTPUT_IDENTITY if li is None else target_identity(li, role)
      factor = config.output_rank_factor if li is None else config.rank_factor
      k_out = block_size(factor, d_out)
      t.rows = initial_indices(config.seed, ident, d_out, k_out, "rows")
      t.cols = (np.arange(d_in) if li is None else
                initial_indices(config.seed, ident, d_in, block_size(config.rank_factor, d_in), "cols"))
      t.adam = self._fresh(t)
      self.targets[name] = t
    self.non_targets = {k: np.array(v, np.float32) for k, v in non_targets.items()}
    self.nt_adam = {k: _Adam(b1, b2, eps, np.zeros_like(v, np.float64), np.zeros_like(v, np.float64))
                    for k, v in self.non_targets.items()}
    self.s = 0
    self.skipped = 0
    self.log = []  # (step, event, name)

  def _fresh(self, t):
    shape = (len(t.rows), len(t.cols))
    return _Adam(self.b1, self.b2, self.eps, np.zeros(shape), np.zeros(shape))

  def lid(self, t):
    return schedule.layer_id(t.layer_index, self.out)

  def profiling(self, t, s=None):
    s = self.s if s is None else s
    return schedule.profiles(self.lid(t), s, self.cfg.period, self.total, self.cfg.schedule)

  def step(self, grads: dict, nt_grads: dict | None = None):
    cfg, s = self.cfg, self.s
    nt_grads = nt_grads or {}
    # Skip rule: any gradient value the step reads is non-finite.
    reads = [g[np.ix_(self.targets[k].rows, self.targets[k].cols)] for k, g in grads.items()]
    reads += [g for k, g in grads.items() if self.profiling(self.targets[k])]
    if cfg.non_target == "train":
      reads += list(nt_grads.values())
    if not all(np.all(np.isfinite(r)) for r in reads):
      self.skipped += 1
      return False
    lr = self.lr(s) if callable(self.lr) else self.lr
    for name, t in self.targets.items():
      g = np.asarray(grads[name], np.float64)
      w_before = t.w.astype(np.float64).copy()
      ix = np.ix_(t.rows, t.cols)
      u = t.adam.step(cfg.scale * g[ix])
      u = u + self.wd * w_before[ix]
      rew = schedule.rewarm(s, t.last, cfg.period, cfg.rewarm)
      t.w[ix] = (t.w[ix] - (lr * rew * u)).astype(np.float32)
      if self.profiling(t):
        if t.ibar is None or (cfg.schedule == "async" and t.ibar is None):
          t.ibar = np.zeros_like(w_before)
          t.ubar = np.zeros_like(w_before)
        i = reference_importance(cfg.importance, w_before, g)
        t.ibar = cfg.importance_beta1 * t.ibar + (1 - cfg.importance_beta1) * i
        t.ubar = cfg.importance_beta2 * t.ubar + (1 - cfg.importance_beta2) * np.abs(i - t.ibar)
        self.log.append((s, "profile", name))
    for name, t in self.targets.items():
      if schedule.relocalizes(self.lid(t), s, cfg.period, self.total, cfg.schedule):
        score = t.ibar * t.ubar
        if t.layer_index is None:
          k = len(t.rows)
          t.rows = np.sort(np.argsort(-score.sum(1), kind="stable")[:k])
        else:
          t.rows, t.cols = reference_select(score, len(t.rows), len(t.cols))
        t.adam = self._fresh(t)
        t.last = s
        t.ibar = t.ubar = None
        self.log.append((s, "relocalize", name))
    if cfg.non_target == "train":
      for k, w in self.non_targets.items():
        u = self.nt_adam[k].step(np.asarray(nt_grads[k], np.float64))
        u = u + self.wd * w.astype(np.float64)
        self.non_targets[k] = (w - lr * u).astype(np.float32)
    self.s += 1
    return True
