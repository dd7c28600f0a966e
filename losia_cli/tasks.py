"""The embedded tasks: multi-digit arithmetic word problems, and cities (see geo_tasks).

``losia-finetune`` with no ``--data`` fine-tunes on problems generated here, so
the default run needs no files and no network. A problem is an addition, a
subtraction or a multiplication by one digit, dressed in one of a few short
templates; the response is just the number, so the model has to learn both the
answer format and the arithmetic.

Splits never share a problem: whether the underlying arithmetic ``(op, x, y)``
belongs to the held-out pool is decided by a hash of the arithmetic itself,
not by the order of generation, so no seed, size or template choice can put
the same sum into both splits (``347 + 128`` and ``128 + 347`` count as the
same problem).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Callable, Optional

import numpy as np

TASKS = ("arithmetic", "cities")

# One problem in HELDOUT_MODULUS goes to the held-out pool (by hash of the arithmetic).
HELDOUT_MODULUS = 10

# Default number of distinct training problems. The default run draws 80 × 8 =
# 640 of them, so 4096 means no problem is seen twice in a default run while
# generation stays instant.
DEFAULT_TRAIN_SIZE = 4096

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon",
          "Kira", "Leo", "Maya", "Nina", "Omar", "Pia")
_ITEMS = ("apples", "stamps", "marbles", "cards", "coins", "books", "shells", "pens")

# Short templates: the embedded model's chat template costs ~30 tokens, and the
# default --seq-len of 64 must hold the template, the question and the answer.
_TEMPLATES = {
    "add": (
        "{name} has {x} {items} and gets {y} more. How many {items} does {name} have now?",
        "A shop sold {x} {items} on Monday and {y} on Tuesday. How many {items} in total?",
        "What is {x} plus {y}?",
    ),
    "sub": (
        "{name} had {x} {items} and gave away {y}. How many {items} are left?",
        "A box holds {x} {items}. {name} takes out {y}. How many {items} stay in the box?",
        "What is {x} minus {y}?",
    ),
    "mul": (
        "{name} buys {x} bags with {y} {items} in each. How many {items} is that?",
        "What is {x} times {y}?",
    ),
}
_OPS = ("add", "sub", "mul")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One generated word problem.

  Attributes:
    prompt: the question text.
    answer: the integer answer.
    key: the arithmetic it asks, ``(op, x, y)`` with commutative operands sorted;
      two problems with the same key are the same problem in other words.
  """

  prompt: str
  answer: int
  key: tuple[str, int, int]

  @property
  def response(self) -> str:
    return str(self.answer)


def _key(op: str, x: int, y: int) -> tuple[str, int, int]:
  if op in ("add", "mul"):
    x, y = min(x, y), max(x, y)
  return (op, x, y)


def is_heldout(key: tuple[str, int, int]) -> bool:
  """Does this arithmetic belong to the held-out pool? (A pure function of the key.)"""
  op, x, y = key
  return zlib.crc32(f"{op}:{x}:{y}".encode()) % HELDOUT_MODULUS == 0


def _operands(rng: np.random.Generator, op: str) -> tuple[int, int]:
  if op == "add":
    return int(rng.integers(10, 1000)), int(rng.integers(10, 1000))
  if op == "sub":
    x = int(rng.integers(20, 1000))
    return x, int(rng.integers(10, x))
  return int(rng.integers(10, 100)), int(rng.integers(2, 10))


def _answer(op: str, x: int, y: int) -> int:
  return x + y if op == "add" else x - y if op == "sub" else x * y


def _draw(rng: np.random.Generator) -> Problem:
  op = _OPS[int(rng.integers(len(_OPS)))]
  x, y = _operands(rng, op)
  templates = _TEMPLATES[op]
  text = templates[int(rng.integers(len(templates)))].format(
      name=_NAMES[int(rng.integers(len(_NAMES)))],
      items=_ITEMS[int(rng.integers(len(_ITEMS)))], x=x, y=y)
  return Problem(text, _answer(op, x, y), _key(op, x, y))


def generate(n: int, seed: int, heldout: bool) -> list[Problem]:
  """``n`` distinct problems from one pool (held-out or training), a pure function of the seed.

  The two pools use different random streams, so asking for more eval
  problems never changes the training problems and vice versa.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0; got {n}")
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(heldout), 7919])))
  out: list[Problem] = []
  seen: set[tuple[str, int, int]] = set()
  # The held-out pool is ~1/10 of ~900k possible problems: far more than any
  # sensible eval size, so the loop ends; the bound guards against misuse.
  for _ in range(200 * n + 1000):
    if len(out) == n:
      break
    p = _draw(rng)
    if is_heldout(p.key) != heldout or p.key in seen:
      continue
    seen.add(p.key)
    out.append(p)
  else:
    raise ValueError(f"could not generate {n} distinct problems")
  return out


def splits(seed: int, train_size: int = DEFAULT_TRAIN_SIZE,
           eval_size: int = 64) -> tuple[list[Problem], list[Problem]]:
  """The training and held-out problems of the embedded task."""
  return generate(train_size, seed, heldout=False), generate(eval_size, seed, heldout=True)


_INT = re.compile(r"-?\d+(?:,\d{3})*")


def first_integer(text: str) -> Optional[int]:
  """The first integer in ``text`` (``"1,998"`` reads as 1998), or None."""
  m = _INT.search(text)
  return int(m.group().replace(",", "")) if m else None


@dataclasses.dataclass(frozen=True)
class Scorer:
  """How a generated answer is judged.

  Attributes:
    name: what the score is called in reports (``"accuracy"``, ``"exact match"``).
    kind: ``"first_integer"`` (the arithmetic task), ``"exact"`` (JSONL data:
      the prediction equals the response after stripping whitespace), ``"text"``
      (the cities task: the first line equals the response after :func:`normalize`)
      or ``"contains"`` (knowledge probes: the response appears as a whole word).
  """

  name: str
  kind: str

  def correct(self, prediction: str, target: str) -> bool:
    if self.kind == "first_integer":
      got = first_integer(prediction)
      return got is not None and got == int(target)
    if self.kind == "text":
      lines = prediction.strip().splitlines()
      return bool(lines) and normalize(lines[0]) == normalize(target)
    if self.kind == "contains":
      return re.search(r"(?<!\w)" + re.escape(normalize(target)) + r"(?!\w)",
                       normalize(prediction)) is not None
    return prediction.strip() == target.strip()


def normalize(text: str) -> str:
  """Case-folded, whitespace collapsed, surrounding spaces and final ``.!`` removed."""
  return " ".join(text.casefold().split()).rstrip(".!").strip()


TASK_SCORER = Scorer("accuracy", "first_integer")
EXACT_MATCH = Scorer("exact match", "exact")
TEXT_MATCH = Scorer("accuracy", "text")
"""The first line of the answer equals the target, ignoring case and a final period."""
CONTAINS = Scorer("recall", "contains")
"""The target appears as a whole word (case-insensitive) anywhere in the answer."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """An embedded task, as ``losia-finetune --task NAME`` uses it.

  Attributes:
    name: the ``--task`` value.
    splits: ``splits(seed, train_size=None, eval_size=64) -> (train, heldout)``;
      each item has ``prompt``, ``response`` and a ``key`` no two splits share.
      ``train_size`` None: the task's default.
    scorer: how an answer is judged.
    max_new_tokens: generation length at evaluation.
  """

  name: str
  splits: Callable[..., tuple[list[Any], list[Any]]]
  scorer: Scorer
  max_new_tokens: int


def _arithmetic_splits(seed: int, train_size: Optional[int] = None, eval_size: int = 64):
  return splits(seed, DEFAULT_TRAIN_SIZE if train_size is None else train_size, eval_size)


def get_task(name: str) -> TaskSpec:
  """The :class:`TaskSpec` of ``name`` (one of :data:`TASKS`)."""
  from losia_cli import geo_tasks
  specs = {
      "arithmetic": TaskSpec("arithmetic", _arithmetic_splits, TASK_SCORER, 8),
      "cities": TaskSpec("cities", geo_tasks.city_splits, TEXT_MATCH,
                         geo_tasks.CITY_MAX_NEW_TOKENS),
  }
  if name not in specs:
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
  return specs[name]
