"""LoSiAConfig against the shared JSON schema; validation and JSON round trips."""

import json
import pathlib

import jsonschema
import pytest

from losia_common import LoSiAConfig, LoSiAConfigError

SCHEMA = json.loads((pathlib.Path(__file__).parents[2] / "shared" / "losia_config.schema.json").read_text())


def test_fields_and_defaults_match_schema():
  cfg = LoSiAConfig()
  d = cfg.to_dict()
  assert list(d) == list(SCHEMA["properties"])  # same names, same order
  for k, v in d.items():
    assert SCHEMA["properties"][k]["default"] == v, k
  jsonschema.validate(d, SCHEMA)


def test_json_round_trip_identical(tmp_path):
  cfg = LoSiAConfig(rank_factor=0.25, output_rank_factor=0.1, period=7, schedule="sync",
                    importance="param_second", importance_beta1=0.5, importance_beta2=0.0,
                    scale=2.0, rewarm=False, non_target="freeze",
                    target_modules=["q_proj", r"model\.layers\.\d+\.mlp\..*"], seed=-3)
  text = cfg.to_json()
  assert LoSiAConfig.from_json(text) == cfg
  assert LoSiAConfig.from_json(text).to_json() == text
  jsonschema.validate(json.loads(text), SCHEMA)
  cfg.save(tmp_path / "c.json")
  assert LoSiAConfig.load(tmp_path / "c.json") == cfg


BAD = [
    ("rank_factor", 0.0), ("rank_factor", 1.5), ("rank_factor", "0.1"), ("rank_factor", True),
    ("output_rank_factor", -0.1), ("output_rank_factor", 2),
    ("period", 0), ("period", 1.5), ("period", True),
    ("schedule", "round_robin"), ("importance", "fisher"),
    ("importance_beta1", 1.0), ("importance_beta2", -0.1),
    ("scale", 0), ("scale", -1.0), ("rewarm", 1), ("non_target", "lora"),
    ("target_modules", []), ("target_modules", "q_proj"), ("target_modules", [""]),
    ("seed", 1.5),
]


@pytest.mark.parametrize("field,value", BAD)
def test_out_of_range_rejected_by_both_class_and_schema(field, value):
  with pytest.raises(LoSiAConfigError, match=field):
    LoSiAConfig.from_dict({field: value})
  d = LoSiAConfig().to_dict()
  d[field] = value
  with pytest.raises(jsonschema.ValidationError):
    jsonschema.validate(d, SCHEMA)


def test_unknown_field_and_bad_regex():
  with pytest.raises(LoSiAConfigError, match="unknown LoSiA config field.*'rank'"):
    LoSiAConfig.from_dict({"rank": 8})
  with pytest.raises(LoSiAConfigError, match="not a valid regular expression"):
    LoSiAConfig(target_modules=["q_proj", "("])
  with pytest.raises(LoSiAConfigError, match="not valid JSON"):
    LoSiAConfig.from_json("{rank_factor: 1}")


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
  path = tmp_path / "c.json"
  LoSiAConfig(period=5).save(path)
  import os
  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError):
    LoSiAConfig(period=9).save(path)
  assert LoSiAConfig.load(path).period == 5
