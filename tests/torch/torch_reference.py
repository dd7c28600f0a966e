"""A slow, plain NumPy (float64) LoSiA written directly from LOSIA_SPEC.md.

Used as the oracle of the torch optimizer tests. Targets are described by hand
(layer id, role, identity, row mode), not by ``losia_torch``'s planner, and the
schedule, selection and importance come from the readable ``losia_common``
definitions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from losia_common import LoSiAConfig
from losia_common import schedule as S
from losia_common import subnet


@dataclasses.dataclass
class RefTarget:
  layer_id: int
  role: str
  identity: str
  k_out: int
  k_in: int
  row_mode: bool = False


class ReferenceLoSiA:
  """LoSiA + Adam(W) on float64 NumPy weights, one step at a time."""

  def __init__(self, weights: dict[str, np.ndarray], targets: dict[str, RefTarget],
               cfg: LoSiAConfig, total: int, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    self.W = {k: np.array(v, np.float64) for k, v in weights.items()}
    self.targets, self.cfg, self.total = targets, cfg, total
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, wd
    self.rows, self.cols, self.m, self.v, self.t, self.last = {}, {}, {}, {}, {}, {}
    for name, tg in targets.items():
      d_out, d_in = self.W[name].shape
      self.rows[name] = subnet.initial_indices(cfg.seed, tg.identity, d_out, tg.k_out, "rows")
      self.cols[name] = (np.arange(d_in) if tg.row_mode else
                         subnet.initial_indices(cfg.seed, tg.identity, d_in, tg.k_in, "cols"))
      self._reset(name)
      self.last[name] = None
    self.nt_m = {k: np.zeros_like(v) for k, v in self.W.items() if k not in targets}
    self.nt_v = {k: np.zeros_like(v) for k, v in self.W.items() if k not in targets}
    self.imp: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self.s = 0
    self.skipped = 0
    self.history: list[dict] = []  # per step: which targets profiled / relocalized

  def _reset(self, name):
    tg = self.targets[name]
    k_in = self.W[name].shape[1] if tg.row_mode else tg.k_in
    self.m[name] = np.zeros((tg.k_out, k_in))
    self.v[name] = np.zeros((tg.k_out, k_in))
    self.t[name] = 0

  def _adam(self, m, v, g, t):
    m[...] = self.b1 * m + (1 - self.b1) * g
    v[...] = self.b2 * v + (1 - self.b2) * g * g
    mh = m / (1 - self.b1 ** t)
    vh = v / (1 - self.b2 ** t)
    return mh / (np.sqrt(vh) + self.eps)

  def step(self, grads: dict[str, np.ndarray], lr=None):
    cfg, s = self.cfg, self.s
    lr = self.lr if lr is None else lr
    G = {k: np.array(v, np.float64) for k, v in grads.items()}
    prof = {n: S.profiles(tg.layer_id, s, cfg.period, self.total, cfg.schedule)
            for n, tg in self.targets.items()}
    # Skip on any non-finite value the step reads.
    read = []
    for n in self.targets:
      read.append(G[n][np.ix_(self.rows[n], self.cols[n])])
      if prof[n]:
        read.append(G[n])
    if cfg.non_target == "train":
      read += [G[k] for k in self.nt_m]
    if not all(np.isfinite(x).all() for x in read):
      self.skipped += 1
      self.history.append({"skipped": True})
      return
    # Importance from the weights before the update.
    for n, tg in self.targets.items():
      if prof[n]:
        key = tg.role if cfg.schedule == "async" else n
        ibar, ubar = self.imp.get(key, (np.zeros_like(G[n]), np.zeros_like(G[n])))
        i = subnet.reference_importance(cfg.importance, self.W[n], G[n])
        ibar = cfg.importance_beta1 * ibar + (1 - cfg.importance_beta1) * i
        ubar = cfg.importance_beta2 * ubar + (1 - cfg.importance_beta2) * np.abs(i - ibar)
        self.imp[key] = (ibar, ubar)
    for n, tg in self.targets.items():
      ix = np.ix_(self.rows[n], self.cols[n])
      g = cfg.scale * G[n][ix]
      self.t[n] += 1
      u = self._adam(self.m[n], self.v[n], g, self.t[n])
      u = u + self.wd * self.W[n][ix]
      r = S.rewarm(s, self.last[n], cfg.period, cfg.rewarm)
      self.W[n][ix] -= lr * r * u
    if cfg.non_target == "train":
      for k in self.nt_m:
        u = self._adam(self.nt_m[k], self.nt_v[k], G[k], s + 1)
        self.W[k] -= lr * (u + self.wd * self.W[k])
    reloc = []
    for n, tg in self.targets.items():
      if prof[n] and (s + 1) % cfg.period == 0:
        key = tg.role if cfg.schedule == "async" else n
        ibar, ubar = self.imp[key]
        score = ibar * ubar
        if tg.row_mode:
          self.rows[n] = np.sort(subnet.topk_lowest_index(score.sum(1), tg.k_out))
        else:
          self.rows[n], self.cols[n] = subnet.reference_select(score, tg.k_out, tg.k_in)
        self._reset(n)
        self.last[n] = s
        reloc.append(n)
    for n, tg in self.targets.items():
      if n in reloc:
        self.imp.pop(tg.role if cfg.schedule == "async" else n, None)
    self.history.append({"profiled": sorted(n for n in prof if prof[n]), "relocalized": reloc})
    self.s += 1
