"""Training data: JSONL loading, prompt formatting, tokenization and batching.

A data file holds one JSON object per line with string fields ``"prompt"`` and
``"response"`` (other fields are ignored; other spellings such as
``instruction``/``output`` are not accepted, so a typo cannot silently train on
nothing). Blank lines are skipped.

The loss is taken on the response only: prompt and response are tokenized
separately and concatenated, so the boundary between them is known exactly
(tokenizing the joined text could merge tokens across it).

Batch ``k`` of a run is a pure function of ``(seed, k)``: the examples form one
endless stream, epoch ``e`` being a permutation drawn from ``(seed, e)``, and
batch ``k`` is stream positions ``[k·B, (k+1)·B)`` (a batch may straddle two
epochs; nothing is dropped). Resuming at step ``k`` therefore needs only ``k``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from losia_cli.backend import Batch


class DataError(ValueError):
  """The data cannot be used; the message names the file and line where it applies."""


@dataclasses.dataclass(frozen=True)
class Example:
  """A prompt and the response the model should learn to give."""

  prompt: str
  response: str


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Token ids of one example; the loss covers ``target_ids`` (response + EOS)."""

  prompt_ids: tuple[int, ...]
  target_ids: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.prompt_ids) + len(self.target_ids)


def load_jsonl(path: str) -> list[Example]:
  """Reads ``{"prompt": str, "response": str}`` lines; errors name ``path:line``."""
  examples = []
  try:
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of line 1's JSON.
    f = open(path, encoding="utf-8-sig")
  except OSError as e:
    raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
  with f:
    try:
      lines = f.readlines()
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{where}: expected a JSON object with \"prompt\" and \"response\"; "
                      f"got {type(obj).__name__}")
    for key in ("prompt", "response"):
      if key not in obj:
        raise DataError(f"{where}: missing key \"{key}\" (each line needs \"prompt\" and "
                        f"\"response\" strings; found keys: {', '.join(sorted(obj)) or 'none'})")
      if not isinstance(obj[key], str):
        raise DataError(f"{where}: \"{key}\" must be a string; got {type(obj[key]).__name__}")
    if not obj["response"].strip():
      raise DataError(f"{where}: \"response\" is empty (nothing to learn)")
    examples.append(Example(obj["prompt"], obj["response"]))
  if not examples:
    raise DataError(f"{path}: no examples (the file is empty)")
  return examples


def heldout_split(examples: Sequence[Example], eval_size: int,
                  seed: int) -> tuple[list[Example], list[Example]]:
  """Deterministic train/eval split: 10% of the file, at most ``eval_size``.

  At least one example stays in training, and at least one goes to eval when
  ``eval_size > 0`` and the file has two or more.
  """
  n = len(examples)
  k = min(eval_size, n // 10)
  if eval_size > 0 and n >= 2:
    k = max(k, 1)
  if k == 0:
    return list(examples), []
  perm = _permutation(seed, -1, n)  # epoch -1: a stream no training epoch uses
  held = set(perm[:k].tolist())
  train = [e for i, e in enumerate(examples) if i not in held]
  evals = [examples[i] for i in sorted(held)]
  return train, evals


class Formatter:
  """Turns an :class:`Example` into token ids with the tokenizer's conventions.

  With a chat template the prompt is the user turn plus the generation prompt
  (the template adds its own special tokens, so none are added on top); without
  one it is ``prompt + "\\n"`` with the tokenizer's usual special tokens (BOS).
  The target is the response followed by EOS when the tokenizer has one.
  """

  def __init__(self, tokenizer: Any):
    self.tokenizer = tokenizer
    self.chat = bool(getattr(tokenizer, "chat_template", None))
    self.eos_id: Optional[int] = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    self.pad_id: int = int(pad if pad is not None else
                           self.eos_id if self.eos_id is not None else 0)

  def prompt_text(self, prompt: str) -> str:
    if self.chat:
      return self.tokenizer.apply_chat_template(
          [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return prompt + "\n"

  def prompt_ids(self, prompt: str) -> tuple[int, ...]:
    ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=not self.chat)["input_ids"]
    return tuple(int(i) for i in ids)

  def target_ids(self, response: str) -> tuple[int, ...]:
    ids = [int(i) for i in self.tokenizer(response, add_special_tokens=False)["input_ids"]]
    if self.eos_id is not None:
      ids.append(int(self.eos_id))
    return tuple(ids)

  def encode(self, example: Example) -> Encoded:
    return Encoded(self.prompt_ids(example.prompt), self.target_ids(example.response))

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def encode_all(examples: Sequence[Example], formatter: Formatter,
               seq_len: int) -> tuple[list[Example], list[Encoded], int]:
  """Encodes examples, dropping those longer than ``seq_len`` tokens.

  Returns ``(kept examples, their encodings, number dropped)``.
  """
  kept, enc, dropped = [], [], 0
  for ex in examples:
    e = formatter.encode(ex)
    if len(e) > seq_len or not e.target_ids:
      dropped += 1
      continue
    kept.append(ex)
    enc.append(e)
  return kept, enc, dropped


PAD_MULTIPLE = 8  # batch widths are multiples of this: few distinct shapes (JAX compiles per shape)


def padded_width(longest: int, seq_len: int, multiple: int = PAD_MULTIPLE) -> int:
  """``longest`` rounded up to a multiple of ``multiple``, at most ``seq_len`` (and at least 2)."""
  return max(2, min(seq_len, -(-max(longest, 1) // multiple) * multiple))


def make_batch(encoded: Sequence[Encoded], seq_len: int, pad_id: int,
               multiple: int = PAD_MULTIPLE) -> Batch:
  """Right-pads to the longest example, rounded up to a multiple of ``multiple``
  (at most ``seq_len``); ``loss_mask[t] = 1`` iff ``ids[t+1]`` is a target token.

  Padding does not change the loss (attention is causal and the padding is on
  the right, outside the loss mask), only the work: a batch of short examples
  is not padded to ``seq_len``.
  """
  b = len(encoded)
  for e in encoded:
    if len(e) > seq_len:
      raise ValueError(f"example of {len(e)} tokens does not fit seq_len={seq_len}")
  width = padded_width(max((len(e) for e in encoded), default=1), seq_len, multiple)
  ids = np.full((b, width), pad_id, dtype=np.int32)
  attn = np.zeros((b, width), dtype=np.int32)
  mask = np.zeros((b, width), dtype=np.float32)
  for i, e in enumerate(encoded):
    n = len(e)
    ids[i, :n] = e.prompt_ids + e.target_ids
    attn[i, :n] = 1
    # Positions predicting target tokens: t + 1 in [len(prompt), n), so t in [len(prompt)-1, n-1).
    mask[i, max(len(e.prompt_ids) - 1, 0):n - 1] = 1.0
  return Batch(input_ids=ids, attention_mask=attn, loss_mask=mask)


def loss_tokens(batch: Batch) -> float:
  """Positions the loss covers (``loss_mask`` without its last column, which predicts nothing)."""
  return float(np.asarray(batch.loss_mask)[:, :-1].sum())


def micro_batches(batch: Batch, n: int, multiple: int = PAD_MULTIPLE,
                  trim: bool = True) -> list[Batch]:
  """Splits ``batch`` row-wise into ``n`` equal micro-batches (gradient accumulation).

  With ``trim`` each micro-batch drops the padding columns it does not need
  (its own longest sequence, rounded up to ``multiple``), so a micro-batch of
  short examples is not padded to the longest of the whole step.

  Raises:
    ValueError: the batch's rows are not a multiple of ``n``.
  """
  rows = int(np.asarray(batch.input_ids).shape[0])
  if n < 1 or rows % n:
    raise ValueError(f"a batch of {rows} sequences cannot be split into {n} equal "
                     "micro-batches")
  size = rows // n
  out = []
  for j in range(n):
    part = Batch(*(np.asarray(x)[j * size:(j + 1) * size] for x in batch))
    if trim:
      part = _trim(part, multiple)
    out.append(part)
  return out


def _trim(batch: Batch, multiple: int) -> Batch:
  """Drops trailing columns that hold no real token and no loss position."""
  width = batch.input_ids.shape[1]
  attn = np.flatnonzero(batch.attention_mask.any(axis=0))
  mask = np.flatnonzero(batch.loss_mask.any(axis=0))
  # loss_mask[t] concerns ids[t + 1]: that column must stay.
  need = max(attn[-1] + 1 if attn.size else 1, mask[-1] + 2 if mask.size else 1)
  keep = padded_width(int(need), width, multiple)
  return batch if keep == width else Batch(*(x[:, :keep] for x in batch))


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF,
                                                                     epoch + 1, n, 4242])))
  perm = rng.permutation(n)
  perm.flags.writeable = False
  return perm


class BatchOrder:
  """Which examples make batch ``k``: a pure function of ``(seed, k)``.

  Stream position ``p`` is example ``perm(seed, p // n)[p % n]``; batch ``k``
  is positions ``k·B .. k·B + B - 1``.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if num_examples < 1:
      raise ValueError("no training examples")
    self.n, self.batch_size, self.seed = num_examples, batch_size, seed

  def indices(self, k: int) -> list[int]:
    out = []
    for p in range(k * self.batch_size, (k + 1) * self.batch_size):
      out.append(int(_permutation(self.seed, p // self.n, self.n)[p % self.n]))
    return out

  def epoch_of(self, k: int) -> float:
    """Epochs completed after batch ``k`` (0-based) has been trained on."""
    return (k + 1) * self.batch_size / self.n


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
  """Optimizer steps that cover ``epochs`` passes over the data (rounded up)."""
  return max(1, math.ceil(epochs * num_examples / batch_size - 1e-9))


def file_fingerprint(path: str) -> dict[str, Any]:
  """Identifies a data file for resume checks (size and a content hash)."""
  import hashlib
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}
