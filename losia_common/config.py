"""The LoSiA configuration shared by both backends (LOSIA_SPEC.md section 10).

The field names, defaults and valid ranges are the contract described by
``shared/losia_config.schema.json``; a test checks this module against that
schema. The class is framework-neutral (no JAX, no torch) so that a config file
written by one backend is read by the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

SCHEDULES = ("async", "sync")
IMPORTANCE_KINDS = ("param_mix", "param_first", "param_second")
NON_TARGET_POLICIES = ("train", "freeze")


class LoSiAConfigError(ValueError):
  """A configuration value is missing, unknown or out of range."""


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(name: str, x: Any, lo: float, hi: float, lo_open: bool,
                  hi_open: bool, rule: str) -> float:
  if not _is_number(x) or not math.isfinite(x):
    raise LoSiAConfigError(f"`{name}` must be a finite number {rule}; got {x!r}")
  ok_lo = x > lo if lo_open else x >= lo
  ok_hi = x < hi if hi_open else x <= hi
  if not (ok_lo and ok_hi):
    raise LoSiAConfigError(f"`{name}` must be {rule}; got {x!r}")
  return float(x)


def _check_choice(name: str, x: Any, allowed: Sequence[str]) -> str:
  if x not in allowed:
    raise LoSiAConfigError(
        f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}; got {x!r}")
  return x


@dataclasses.dataclass(frozen=True)
class LoSiAConfig:
  """Hyper-parameters of LoSiA (see LOSIA_SPEC.md; names are shared by both backends).

  Attributes:
    rank_factor: p, the fraction of output and of input neurons in a target's
      core subnet (``k = max(1, floor(p * d))``); the block holds p² of the matrix.
    output_rank_factor: fraction of vocabulary rows trained in the output layer;
      0 leaves the output layer to the ``non_target`` policy.
    period: T, steps per profiling slot and length of the rewarm ramp.
    schedule: ``"async"`` (one layer profiles at a time, round-robin) or
      ``"sync"`` (all layers profile together in slots owned by id 0).
    importance: Taylor importance variant: ``"param_mix"`` = |P - P²/2|,
      ``"param_first"`` = |P|, ``"param_second"`` = P², with P = W ⊙ G.
    importance_beta1: EMA factor of the importance Ī.
    importance_beta2: EMA factor of the uncertainty Ū.
    scale: multiplier of the block gradient before the inner optimizer.
    rewarm: ramp the learning rate of a target from 0 to 1 over ``period``
      steps after each relocalization.
    non_target: ``"train"`` (full update with the inner optimizer) or
      ``"freeze"`` for parameters that are not targets.
    target_modules: module names or regular expressions selecting targets; a
      name matches a module-path component, a regex the whole dotted module path.
    seed: seed of the initial random subnets.
  """

  rank_factor: float = 0.125
  output_rank_factor: float = 0.0
  period: int = 100
  schedule: str = "async"
  importance: str = "param_mix"
  importance_beta1: float = 0.85
  importance_beta2: float = 0.85
  scale: float = 1.0
  rewarm: bool = True
  non_target: str = "train"
  target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
  seed: int = 0

  def __post_init__(self):
    put = lambda k, v: object.__setattr__(self, k, v)
    put("rank_factor", _check_number(
        "rank_factor", self.rank_factor, 0, 1, True, False, "in (0, 1]"))
    put("output_rank_factor", _check_number(
        "output_rank_factor", self.output_rank_factor, 0, 1, False, False, "in [0, 1]"))
    if (not isinstance(self.period, int) or isinstance(self.period, bool)
        or self.period < 1):
      raise LoSiAConfigError(f"`period` must be an integer >= 1; got {self.period!r}")
    _check_choice("schedule", self.schedule, SCHEDULES)
    _check_choice("importance", self.importance, IMPORTANCE_KINDS)
    for name in ("importance_beta1", "importance_beta2"):
      put(name, _check_number(name, getattr(self, name), 0, 1, False, True, "in [0, 1)"))
    put("scale", _check_number("scale", self.scale, 0, math.inf, True, True, "> 0"))
    if not isinstance(self.rewarm, bool):
      raise LoSiAConfigError(f"`rewarm` must be a bool (true or false); got {self.rewarm!r}")
    _check_choice("non_target", self.non_target, NON_TARGET_POLICIES)
    mods = self.target_modules
    if isinstance(mods, str) or not isinstance(mods, (list, tuple)):
      raise LoSiAConfigError(
          "`target_modules` must be a non-empty list of module names or regexes; "
          f"got {mods!r}")
    if not mods:
      raise LoSiAConfigError("`target_modules` must not be empty")
    for m in mods:
      if not isinstance(m, str) or not m:
        raise LoSiAConfigError(
            f"`target_modules` entries must be non-empty strings; got {m!r}")
      try:
        re.compile(m)
      except re.error as e:
        raise LoSiAConfigError(
            f"`target_modules` entry {m!r} is not a valid regular expression: {e}") from None
    put("target_modules", tuple(mods))
    if not isinstance(self.seed, int) or isinstance(self.seed, bool):
      raise LoSiAConfigError(f"`seed` must be an integer; got {self.seed!r}")

  # --- JSON form -------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["target_modules"] = list(self.target_modules)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LoSiAConfig":
    if not isinstance(d, Mapping):
      raise LoSiAConfigError(f"a LoSiA config must be a JSON object; got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise LoSiAConfigError(
          f"unknown LoSiA config field(s) {', '.join(map(repr, unknown))}; "
          f"allowed fields: {', '.join(sorted(known))}")
    return cls(**dict(d))

  def to_json(self, indent: int | None = 2) -> str:
    """Deterministic JSON text (field order of the schema); identical in both backends."""
    return json.dumps(self.to_dict(), indent=indent)

  @classmethod
  def from_json(cls, text: str) -> "LoSiAConfig":
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise LoSiAConfigError(f"LoSiA config is not valid JSON: {e}") from None
    return cls.from_dict(d)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the JSON form atomically (a failed write leaves the old file intact)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(self.to_json() + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "LoSiAConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_json(f.read())

  def replace(self, **changes: Any) -> "LoSiAConfig":
    return dataclasses.replace(self, **changes)
