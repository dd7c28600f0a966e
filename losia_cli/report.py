"""Progress, ``metrics.jsonl``, the subnet history and the pictures of a run.

Everything here writes so that a crash leaves usable files: metrics are
appended and flushed one line per step, pictures are drawn to a temporary file
and renamed into place. Matplotlib runs on the Agg backend (no display).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable, Optional

import numpy as np

SMOOTHING = 0.9  # EMA factor of the displayed loss


# --- metrics.jsonl ------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.floating, np.integer)):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
  return x


class MetricsWriter:
  """Appends one JSON object per step to ``metrics.jsonl``, flushed at once."""

  def __init__(self, path: str):
    self.path = path
    self._f = open(path, "a", encoding="utf-8")

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class NullWriter(MetricsWriter):
  """Writes nothing (torchrun's processes other than rank 0)."""

  def __init__(self):  # pylint: disable=super-init-not-called
    self.path = None

  def write(self, record: dict[str, Any]) -> None:
    del record

  def close(self) -> None:
    pass


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of ``metrics.jsonl``; a torn last line (crash mid-write) is ignored."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(rec, dict) and isinstance(rec.get("step"), int):
        out.append(rec)
  return out


def truncate_metrics(path: str, step: int) -> list[dict[str, Any]]:
  """Keeps the records of steps ``<= step`` (resume), rewriting the file atomically.

  Returns the kept records; steps written after the checkpoint are dropped
  since the resumed run repeats them.
  """
  kept = [r for r in read_metrics(path) if r["step"] <= step]
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in kept:
      f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return kept


class Smoother:
  """Bias-corrected exponential moving average, one value at a time (O(1) per value).

  A non-finite value is skipped: the previous average is repeated (NaN before
  the first finite value).
  """

  def __init__(self, factor: float = SMOOTHING):
    self.factor, self.avg, self.n = factor, 0.0, 0
    self.last = float("nan")

  def add(self, v: Optional[float]) -> float:
    if v is not None and math.isfinite(v):
      self.n += 1
      self.avg = self.factor * self.avg + (1 - self.factor) * v
      self.last = self.avg / (1 - self.factor ** self.n)
    return self.last


def smooth(values: Iterable[float], factor: float = SMOOTHING) -> list[float]:
  """Bias-corrected exponential moving average (the first value is not damped)."""
  s = Smoother(factor)
  return [s.add(v) for v in values]


# --- progress ----------------------------------------------------------------------------

class Progress:
  """A tqdm bar over steps on stderr: smoothed loss, real (non-pad) tokens/s, tqdm's ETA."""

  def __init__(self, total: int, initial: int, quiet: bool, history: list[dict[str, Any]]):
    from tqdm.auto import tqdm
    self.bar = tqdm(total=total, initial=initial, desc="training", unit="step",
                    file=sys.stderr, disable=quiet, dynamic_ncols=True)
    # The smoothed loss carries on from the resumed history; each step then costs
    # O(1) (recomputing it over the whole history made a run O(n^2)).
    self._smoother = Smoother()
    for r in history:
      self._smoother.add(r.get("loss"))
    self._window: list[tuple[int, float]] = []

  def update(self, loss: float, tokens: int, seconds: float) -> tuple[float, float]:
    """Advances one step; returns ``(smoothed loss, tokens/s over the last 10 steps)``."""
    smoothed = self._smoother.add(loss)
    self._window = (self._window + [(tokens, seconds)])[-10:]
    spent = sum(s for _, s in self._window)
    rate = sum(t for t, _ in self._window) / spent if spent > 0 else 0.0
    self.bar.set_postfix_str(f"loss {smoothed:.4f}, {rate:,.0f} tok/s", refresh=False)
    self.bar.update(1)
    return smoothed, rate

  def write(self, text: str) -> None:
    self.bar.write(text, file=sys.stderr)

  def close(self) -> None:
    self.bar.close()


# --- subnet history ------------------------------------------------------------------------

class SubnetTracker:
  """Where each LoSiA target's block sat over the run, stored only when it changes.

  For each identity (``layer3.self_attn.q_proj``, ``output``) the history is a
  list of segments ``(start, rows, cols)``: that block was in use from
  optimizer step ``start`` (0-based, the first step it was used for) until
  the next segment's start or the end of the run.
  """

  def __init__(self):
    self.segments: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    self.changes: list[tuple[int, str]] = []  # (step, identity) of each relocalization

  def observe(self, steps_done: int, subnets: Optional[dict[str, tuple[Any, Any]]]) -> int:
    """Records the subnets in use from step ``steps_done`` on; returns how many changed."""
    if not subnets:
      return 0
    changed = 0
    for ident, (rows, cols) in subnets.items():
      rows = np.asarray(rows, dtype=np.int64).copy()
      cols = np.asarray(cols, dtype=np.int64).copy()
      segs = self.segments.setdefault(ident, [])
      if segs and np.array_equal(segs[-1][1], rows) and np.array_equal(segs[-1][2], cols):
        continue
      if segs:
        changed += 1
        self.changes.append((steps_done, ident))
        if segs[-1][0] == steps_done:  # replaced before it was ever used
          segs.pop()
      segs.append((steps_done, rows, cols))
    return changed

  def occupancy(self, ident: str, total_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps each output row / input column spent in the block, over ``total_steps`` steps."""
    segs = self.segments[ident]
    n_rows = max(int(s[1].max()) + 1 if s[1].size else 0 for s in segs)
    n_cols = max(int(s[2].max()) + 1 if s[2].size else 0 for s in segs)
    rows, cols = np.zeros(n_rows), np.zeros(n_cols)
    for i, (start, r, c) in enumerate(segs):
      end = segs[i + 1][0] if i + 1 < len(segs) else total_steps
      length = max(0, end - start)
      rows[r] += length
      cols[c] += length
    return rows, cols

  def save(self, path: str) -> None:
    arrays: dict[str, np.ndarray] = {
        "changes_step": np.array([s for s, _ in self.changes], dtype=np.int64),
        "changes_identity": np.array([i for _, i in self.changes], dtype=np.str_),
    }
    for ident, segs in self.segments.items():
      for k, (start, rows, cols) in enumerate(segs):
        arrays[f"{ident}|{k}|{start}|rows"] = rows
        arrays[f"{ident}|{k}|{start}|cols"] = cols
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "SubnetTracker":
    t = cls()
    with np.load(path) as z:
      t.changes = list(zip(z["changes_step"].tolist(), z["changes_identity"].tolist()))
      parts: dict[str, dict[int, list]] = {}
      for key in z.files:
        if "|" not in key:
          continue
        ident, k, start, which = key.split("|")
        entry = parts.setdefault(ident, {}).setdefault(int(k), [int(start), None, None])
        entry[1 if which == "rows" else 2] = z[key]
    for ident, segs in parts.items():
      t.segments[ident] = [tuple(segs[k]) for k in sorted(segs)]
    return t


# --- pictures ------------------------------------------------------------------------------

def _plt():
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def plot_loss(records: list[dict[str, Any]], path: str, title: str = "") -> None:
  """``loss.png``: loss per step, its smoothed curve, and the learning rate on a twin axis."""
  plt = _plt()
  steps = [r["step"] for r in records]
  loss = [r.get("loss") if isinstance(r.get("loss"), (int, float)) else float("nan")
          for r in records]
  lr = [r.get("lr", float("nan")) for r in records]
  fig, ax = plt.subplots(figsize=(8, 4.5))
  try:
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss (per step)")
    ax.plot(steps, smooth(loss), color="tab:blue", lw=2, label=f"loss (EMA {SMOOTHING})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, lr, color="tab:orange", lw=1.2, ls="--", label="learning rate")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax2.tick_params(axis="y", colors="tab:orange")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [l.get_label() for l in lines], loc="upper right")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    _save(fig, path)
  finally:
    plt.close(fig)


def _roles(tracker: SubnetTracker) -> dict[str, dict[int, str]]:
  """``{role: {layer: identity}}`` of the per-layer targets (``output`` excluded)."""
  out: dict[str, dict[int, str]] = {}
  for ident in tracker.segments:
    head, _, role = ident.partition(".")
    if head.startswith("layer") and head[5:].isdigit() and role:
      out.setdefault(role, {})[int(head[5:])] = ident
  return out


def plot_subnets(tracker: SubnetTracker, total_steps: int, path: str, title: str = "") -> bool:
  """``subnets.png``: when layers relocalized, and where each role's blocks sat.

  Top: one mark per relocalization (step × layer). Below, per role, two
  heatmaps (layer × neuron index): the share of steps each output neuron (row)
  and each input neuron (column) spent in the block. A fixed block shows as a
  few bright stripes; a block that moved spreads dimmer over more neurons.
  Returns False (nothing drawn) when there are no per-layer subnets.
  """
  roles = _roles(tracker)
  if not roles or total_steps < 1:
    return False
  plt = _plt()
  names = sorted(roles, key=_role_order)
  ncols = len(names)
  from matplotlib.ticker import MaxNLocator
  fig = plt.figure(figsize=(max(8.0, 2.4 * ncols + 1.5), 9.0), layout="constrained")
  grid = fig.add_gridspec(3, ncols, height_ratios=[1.1, 1, 1])
  try:
    top = fig.add_subplot(grid[0, :])
    layer_of = {ident: layer for role in roles.values() for layer, ident in role.items()}
    moved = sorted({(s, layer_of[i]) for s, i in tracker.changes if i in layer_of})
    if moved:
      top.scatter([s for s, _ in moved], [l for _, l in moved], s=12, color="tab:red")
    outs = sorted({s for s, i in tracker.changes if i not in layer_of})
    for s in outs:
      top.axvline(s, color="tab:green", lw=0.8, alpha=0.6)
    top.set_xlim(0, total_steps)
    nl = 1 + max(max(r) for r in roles.values())
    top.set_ylim(-0.5, nl - 0.5)
    top.set_xlabel("optimizer step")
    top.set_ylabel("layer")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(f"relocalizations: {len(moved)} layer events"
                  + (f", output layer at steps {', '.join(map(str, outs[:6]))}"
                     + ("..." if len(outs) > 6 else "") + " (green)" if outs else ""))
    top.grid(alpha=0.3)
    image = None
    for j, role in enumerate(names):
      layers = roles[role]
      occ = {l: tracker.occupancy(i, total_steps) for l, i in layers.items()}
      for row, which in ((1, 0), (2, 1)):
        width = max(len(o[which]) for o in occ.values())
        mat = np.full((nl, width), np.nan)
        for l, o in occ.items():
          mat[l, :len(o[which])] = o[which] / total_steps
        ax = fig.add_subplot(grid[row, j])
        image = ax.imshow(mat, aspect="auto", origin="lower", interpolation="nearest",
                          cmap="viridis", vmin=0, vmax=1,
                          extent=(-0.5, width - 0.5, -0.5, nl - 0.5))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        short = role.split(".")[-1]
        ax.set_title(f"{short}: {'output rows' if which == 0 else 'input cols'}", fontsize=9)
        ax.set_xlabel("neuron index", fontsize=8)
        if j == 0:
          ax.set_ylabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
    if image is not None:
      bar = fig.colorbar(image, ax=fig.axes[1:], shrink=0.9)
      bar.set_label("share of steps in the trained block")
    fig.suptitle(title or "LoSiA subnets", fontsize=12)
    _save(fig, path)
  finally:
    plt.close(fig)
  return True


_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _role_order(role: str) -> tuple[int, str]:
  short = role.split(".")[-1]
  return (_ORDER.index(short) if short in _ORDER else len(_ORDER), role)


def now() -> float:
  return time.perf_counter()
