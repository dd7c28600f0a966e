"""Smoke test of ``benchmarks/peers.py``: a tiny run end to end, both backends.

Checks the JSON it writes has every method row with finite figures. Nothing
about timing is asserted: the figures of a shared CPU say nothing here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.parity_fixtures import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "peers.py")


def _peers_module():
  return load_script("peers_under_test", SCRIPT)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_peers_tiny_run_reports_every_method(tmp_path):
  out = tmp_path / "results.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one host device, as a benchmark run has
  subprocess.run(
      [sys.executable, SCRIPT, "--tiny", "--workloads", "smollm2-135m", "--steps", "2",
       "--rounds", "1", "--warmup", "1", "--isolation", "inline", "--json-out", str(out),
       "--model-dir", str(tmp_path / "models")],
      check=True, cwd=ROOT, env=env, timeout=300)
  doc = json.loads(out.read_text())
  assert doc["partial"] is None
  peers = _peers_module()
  (w,) = doc["workloads"]
  specs = peers.method_specs(w)
  by_name = {s["name"]: s for s in specs}
  # the default rows leave the output layer out; one Pro row adds it in row mode
  assert {s.get("output_rank_factor") for s in specs if s["method"] == "losia-pro"} == {0.0, 0.125}
  assert set(doc["results"]) == {"jax/smollm2-135m", "torch/smollm2-135m"}
  for key, res in doc["results"].items():
    backend = key.split("/")[0]
    want = {s["name"] for s in specs if s["backends"] is None or backend in s["backends"]}
    assert set(res["rows"]) == want, key
    assert res["best_lora"] in res["rows"] and res["matched_lora"] in res["rows"]
    for name, row in res["rows"].items():
      assert row["trainable_params"] > 0 and row["opt_state_bytes"] >= 0, (key, name)
      if name.startswith("losia"):
        assert row["plan_block_params"] == peers.losia_block_params(
            w["config"], by_name[name]["output_rank_factor"]), (key, name)
        if name in ("losia", "losia-pro"):
          assert row["plan_block_params"] == res["losia_block_params"], (key, name)
      if name == "losia (non_target=train)":
        continue  # built for its optimizer state only
      assert len(row["times_s"]) == 2, (key, name)
      for k in ("median_s", "min_s", "max_s", "ratio_full", "ratio_best_lora", "peak_bytes"):
        assert _finite(row[k]) and row[k] > 0, (key, name, k)
      if backend == "jax":
        assert _finite(row["compile_s"]) and _finite(row["gflops"]), (key, name)
    for t in res["targets"].values():
      assert _finite(t["value"]) and isinstance(t["met"], bool), (key, t)
  # LoSiA with trained non-targets keeps Adam moments for them: more state than frozen.
  for res in doc["results"].values():
    rows = res["rows"]
    assert rows["losia (non_target=train)"]["opt_state_bytes"] > rows["losia"]["opt_state_bytes"]
