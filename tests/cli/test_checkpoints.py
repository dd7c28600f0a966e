"""Atomic checkpoints, retention, latest-checkpoint discovery, and the driver's resume.

The driver tests run ``main()`` end to end on a deterministic fake backend
(``tests.cli.tiny_model.FakeBackend``), so they check the driver's own
bookkeeping (data order, metrics, checkpoints, resume) in about a second each;
the real backends are exercised by their own tests.
"""

from __future__ import annotations

import json
import os

import pytest

from losia_cli import checkpoints as ck
from losia_cli import main as main_mod
from losia_cli import report as R
from tests.cli.tiny_model import FakeBackend, make_tiny_model


def backend_writer(content):
  def save(directory):
    os.makedirs(directory)  # the backend contract: the directory does not exist yet
    with open(os.path.join(directory, "weights.bin"), "w") as f:
      f.write(content)
  return save


def test_write_and_find(tmp_path):
  out = str(tmp_path)
  assert ck.latest_checkpoint(out) is None
  for step in (5, 10, 15):
    path = ck.write_checkpoint(out, step, backend_writer(f"w{step}"), {"step": step})
    assert os.path.basename(path) == f"step-{step:06d}"
  step, path = ck.latest_checkpoint(out)
  assert step == 15
  assert open(os.path.join(path, "weights.bin")).read() == "w15"
  assert ck.read_driver_state(path) == {"step": 15}
  assert [s for s, _ in ck.list_checkpoints(out)] == [5, 10, 15]


@pytest.mark.parametrize("where", ["backend", "extra"])
def test_failed_save_leaves_previous_checkpoint(tmp_path, where):
  out = str(tmp_path)
  ck.write_checkpoint(out, 10, backend_writer("good"), {"step": 10})

  def bad_backend(directory):
    backend_writer("half")(directory)
    raise OSError("disk full")

  def bad_extra(directory):
    raise RuntimeError("boom")

  with pytest.raises((OSError, RuntimeError)):
    if where == "backend":
      ck.write_checkpoint(out, 20, bad_backend, {"step": 20})
    else:
      ck.write_checkpoint(out, 20, backend_writer("half"), {"step": 20}, extra=bad_extra)
  assert ck.latest_checkpoint(out)[0] == 10
  assert os.listdir(os.path.join(out, "checkpoints")) == ["step-000010"]  # no partial left
  assert open(os.path.join(out, "checkpoints", "step-000010", "weights.bin")).read() == "good"


def test_rewriting_a_step_replaces_it_only_when_complete(tmp_path):
  out = str(tmp_path)
  ck.write_checkpoint(out, 10, backend_writer("old"), {"step": 10})
  with pytest.raises(OSError):
    ck.write_checkpoint(out, 10, lambda d: (_ for _ in ()).throw(OSError("x")), {"step": 10})
  path = ck.latest_checkpoint(out)[1]
  assert open(os.path.join(path, "weights.bin")).read() == "old"
  ck.write_checkpoint(out, 10, backend_writer("new"), {"step": 10})
  assert open(os.path.join(path, "weights.bin")).read() == "new"
  assert os.listdir(os.path.join(out, "checkpoints")) == ["step-000010"]


def test_latest_ignores_temporaries_and_incomplete(tmp_path):
  out = str(tmp_path)
  ck.write_checkpoint(out, 10, backend_writer("a"), {"step": 10})
  root = os.path.join(out, "checkpoints")
  os.makedirs(os.path.join(root, ".tmp-step-000030-99999"))
  with open(os.path.join(root, ".tmp-step-000030-99999", "driver.json"), "w") as f:
    f.write("{}")
  os.makedirs(os.path.join(root, "step-000020"))  # no driver.json: never completed
  os.makedirs(os.path.join(root, "step-abc"))
  with open(os.path.join(root, "step-000040"), "w") as f:  # a file, not a directory
    f.write("x")
  assert ck.latest_checkpoint(out)[0] == 10


def test_retention(tmp_path):
  out = str(tmp_path)
  for step in (1, 2, 3, 4):
    ck.write_checkpoint(out, step, backend_writer(str(step)), {"step": step})
    ck.apply_retention(out, 2)
  assert [s for s, _ in ck.list_checkpoints(out)] == [3, 4]
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-000003", "step-000004"]
  with pytest.raises(ValueError):
    ck.apply_retention(out, 0)


def test_prepare_output_dir(tmp_path):
  out = str(tmp_path / "new" / "dir")
  ck.prepare_output_dir(out, resume=False)
  assert os.path.isdir(out) and os.listdir(out) == []
  with pytest.raises(ck.OutputDirError, match="no complete checkpoint"):
    ck.prepare_output_dir(out, resume=True)
  ck.write_checkpoint(out, 3, backend_writer("a"), {"step": 3})
  with pytest.raises(ck.OutputDirError, match="--resume"):
    ck.prepare_output_dir(out, resume=False)
  # a dead process's temporary is cleaned up; a live one's (ours) is left alone
  root = os.path.join(out, "checkpoints")
  dead, alive = ".tmp-step-000009-999999999", f".tmp-step-000009-{os.getpid()}"
  os.makedirs(os.path.join(root, dead))
  os.makedirs(os.path.join(root, alive))
  ck.prepare_output_dir(out, resume=True)
  assert not os.path.exists(os.path.join(root, dead))
  assert os.path.exists(os.path.join(root, alive))
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(ck.OutputDirError, match="is a file"):
    ck.prepare_output_dir(str(f), resume=False)


def test_build_dir_atomic_replaces_after_success(tmp_path):
  final = str(tmp_path / "model")

  def build(content):
    def fn(tmp):
      os.makedirs(tmp)
      with open(os.path.join(tmp, "x"), "w") as f:
        f.write(content)
    return fn

  ck.build_dir_atomic(final, build("1"), "model")
  with pytest.raises(ZeroDivisionError):
    ck.build_dir_atomic(final, lambda tmp: (build("2")(tmp), 1 / 0), "model")
  assert open(os.path.join(final, "x")).read() == "1"
  ck.build_dir_atomic(final, build("3"), "model")
  assert open(os.path.join(final, "x")).read() == "3"
  assert sorted(os.listdir(tmp_path)) == ["model"]


def test_write_json_atomic(tmp_path):
  path = str(tmp_path / "s.json")
  ck.write_json_atomic(path, {"a": (1, 2)})
  assert json.load(open(path)) == {"a": [1, 2]}
  with pytest.raises(TypeError):
    ck.write_json_atomic(path, {"a": object()})
  assert json.load(open(path)) == {"a": [1, 2]} and os.listdir(tmp_path) == ["s.json"]


# --- the driver, end to end on the fake backend ----------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def fake(monkeypatch):
  monkeypatch.setattr(main_mod, "make_backend",
                      lambda cfg, settings: FakeBackend(cfg.model, settings))
  monkeypatch.setattr(FakeBackend, "fail_at_step", None)
  return FakeBackend


@pytest.fixture
def data_file(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "response": str(i + 1)})
                          + "\n" for i in range(30)))
  return str(path)


TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


def trajectory(out):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in R.read_metrics(os.path.join(out, "metrics.jsonl"))]


def run(argv):
  return main_mod.main(argv + ["--quiet"])


def test_driver_run_and_outputs(tiny, fake, data_file, tmp_path):
  out = str(tmp_path / "run")
  rc = run(["--model", tiny, "--data", data_file, "--steps", "6", "--batch-size", "4",
            "--seq-len", "32", "--save-every", "2", "--keep-checkpoints", "2",
            "--output-dir", out, "--period", "2", "--warmup-steps", "1"])
  assert rc == 0
  assert [s for s, _ in ck.list_checkpoints(out)] == [4, 6]
  recs = R.read_metrics(os.path.join(out, "metrics.jsonl"))
  assert [r["step"] for r in recs] == list(range(1, 7))
  assert {"loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "grad_norm"} <= set(recs[0])
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["steps"] == 6 and summary["metric"] == "exact match"
  assert summary["eval_examples"] == 3 and len(summary["examples"]) == 3
  assert summary["losia"]["period"] == 2 and summary["final_loss"] == recs[-1]["loss"]
  for name in ("loss.png", "subnets.png", "subnets.npz", "model/config.json",
               "model/tokenizer.json"):
    assert os.path.exists(os.path.join(out, name)), name
  driver = ck.read_driver_state(ck.latest_checkpoint(out)[1])
  assert driver["step"] == 6 and driver["examples_seen"] == 24
  assert driver["eval_before"]["n"] == 3
  import transformers
  assert transformers.AutoTokenizer.from_pretrained(os.path.join(out, "model")).eos_token


def test_driver_resume_equals_uninterrupted(tiny, fake, data_file, tmp_path, capsys):
  common = ["--model", tiny, "--data", data_file, "--steps", "9", "--batch-size", "4",
            "--seq-len", "32", "--save-every", "3", "--period", "2", "--no-export",
            "--no-plots", "--seed", "5"]
  full = str(tmp_path / "full")
  assert run(common + ["--output-dir", full]) == 0
  part = str(tmp_path / "part")
  fake.fail_at_step = 7  # crash after the step-6 checkpoint, with step 7 already logged
  assert run(common + ["--output-dir", part]) == 1
  assert "simulated crash" in capsys.readouterr().err
  assert ck.latest_checkpoint(part)[0] == 6
  assert len(R.read_metrics(os.path.join(part, "metrics.jsonl"))) == 7
  fake.fail_at_step = None
  # resume without repeating the flags: the checkpoint's settings are used
  assert run(["--resume", "--output-dir", part, "--no-export", "--no-plots"]) == 0
  assert trajectory(part) == trajectory(full)
  summary = json.load(open(os.path.join(part, "summary.json")))
  assert summary["resumed_from_step"] == 6 and summary["steps"] == 9
  tracker_full = R.SubnetTracker.load(os.path.join(full, "checkpoints", "step-000009",
                                                   "subnets.npz"))
  tracker_part = R.SubnetTracker.load(os.path.join(part, "checkpoints", "step-000009",
                                                   "subnets.npz"))
  assert tracker_full.changes == tracker_part.changes


def test_driver_resume_with_conflicting_flags(tiny, fake, data_file, tmp_path, capsys):
  out = str(tmp_path / "o")
  base = ["--model", tiny, "--data", data_file, "--steps", "4", "--batch-size", "2",
          "--seq-len", "32", "--no-export", "--no-plots", "--output-dir", out]
  assert run(base) == 0
  capsys.readouterr()
  assert run(base + ["--resume", "--batch-size", "3"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("losia-finetune: error: --resume") and "batch_size" in err
  assert run(base + ["--resume", "--rank-factor", "0.5"]) == 2
  assert "LoSiA" in capsys.readouterr().err
  # the same flags (or soft ones) are fine: the run is complete, nothing to train
  assert run(base + ["--resume", "--keep-checkpoints", "3"]) == 0


def test_driver_task_and_full_method(tiny, fake, tmp_path, capsys):
  out = str(tmp_path / "o")
  rc = run(["--model", tiny, "--method", "full", "--steps", "2", "--eval-size", "4",
            "--output-dir", out, "--no-export"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "accuracy before training" in text and "accuracy before:" in text
  assert "no subnets.png" in text
  assert os.path.exists(os.path.join(out, "loss.png"))
  assert not os.path.exists(os.path.join(out, "subnets.png"))
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["losia"] is None and summary["metric"] == "accuracy"
