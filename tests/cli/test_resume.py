"""Trustworthy resume on the fake backend: manifests, damaged checkpoints, --resume-from,
moved runs, preemption signals and environment errors, each one line and nothing lost.

Like test_checkpoints.py these run ``main()`` end to end on
``tests.cli.tiny_model.FakeBackend`` (a second each); the real backends'
files are damaged in test_resume_backends.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import pytest

from losia_cli import args as A
from losia_cli import checkpoints as ck
from losia_cli import data as D
from losia_cli import main as main_mod
from losia_cli import report as R
from tests.cli.tiny_model import FakeBackend, make_tiny_model


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


def flags(tiny, data_file, out, steps=9):
  return ["--model", tiny, "--data", data_file, "--steps", str(steps), "--batch-size", "4",
          "--seq-len", "32", "--save-every", "3", "--keep-checkpoints", "3", "--period", "2",
          "--no-export", "--no-plots", "--seed", "5", "--output-dir", out, "--quiet"]


def trajectory(out):
  return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
          for r in R.read_metrics(os.path.join(out, "metrics.jsonl"))]


def snapshot(directory):
  """{relative path: bytes} of every file under ``directory``."""
  out = {}
  for dirpath, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def one_error_line(err):
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("losia-finetune: error: "), err
  return lines[0]


@pytest.fixture
def full_run(tiny, fake, data_file, tmp_path):
  out = str(tmp_path / "full")
  assert main_mod.main(flags(tiny, data_file, out)) == 0
  return out


@pytest.fixture
def crashed_run(tiny, fake, data_file, tmp_path, capsys):
  """A run that crashed after its step-6 checkpoint: checkpoints at steps 3 and 6."""
  out = str(tmp_path / "part")
  fake.fail_at_step = 7
  assert main_mod.main(flags(tiny, data_file, out)) == 1
  fake.fail_at_step = None
  capsys.readouterr()
  assert [s for s, _ in ck.list_checkpoints(out)] == [3, 6]
  return out


def step_dir(out, step):
  return os.path.join(out, "checkpoints", f"step-{step:06d}")


# --- the manifest ------------------------------------------------------------------------------

def writer(directory):
  os.makedirs(os.path.join(directory, "state"))
  with open(os.path.join(directory, "state", "weights.bin"), "wb") as f:
    f.write(b"w" * 100)


def test_manifest_records_every_file_and_verify_names_the_damage(tmp_path):
  path = ck.write_checkpoint(str(tmp_path), 5, writer, {"step": 5})
  manifest = json.load(open(os.path.join(path, "manifest.json")))
  assert sorted(manifest["files"]) == ["driver.json", "state/weights.bin"]
  assert manifest["files"]["state/weights.bin"]["bytes"] == 100
  assert ck.verify_checkpoint(path) is None
  weights = os.path.join(path, "state", "weights.bin")
  with open(weights, "r+b") as f:  # same size, one byte changed
    f.seek(50)
    f.write(b"x")
  assert "state/weights.bin does not match its checksum" in ck.verify_checkpoint(path)
  with open(weights, "wb") as f:
    f.write(b"w" * 10)
  assert "has 10 bytes, 100 when saved" in ck.verify_checkpoint(path)
  os.remove(weights)
  assert ck.verify_checkpoint(path) == "state/weights.bin is missing"
  with open(os.path.join(path, "manifest.json"), "w") as f:
    f.write("{not json")
  assert "manifest.json is unreadable" in ck.verify_checkpoint(path)
  os.remove(os.path.join(path, "manifest.json"))
  assert "no manifest.json" in ck.verify_checkpoint(path)


# --- damaged checkpoints: fall back, or one line and exit 2 --------------------------------------

def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def rehash(checkpoint):
  """Re-records the manifest, as if the damage had been there when it was saved."""
  ck.write_manifest(checkpoint)


def garbage(path):
  with open(path, "wb") as f:
    f.write(b"\x00garbage\xff" * 7)


DAMAGE = {
    "missing params": lambda c: os.remove(os.path.join(c, "params.npy")),
    "truncated params": lambda c: truncate(os.path.join(c, "params.npy")),
    "invalid driver.json": lambda c: open(os.path.join(c, "driver.json"), "w").write("{"),
    "invalid driver.json, rehashed": lambda c: (
        open(os.path.join(c, "driver.json"), "w").write("{"), rehash(c)),
    "driver.json without step, rehashed": lambda c: (
        json.dump({**json.load(open(os.path.join(c, "driver.json"))), "step": "six"},
                  open(os.path.join(c, "driver.json"), "w")), rehash(c)),
    "garbage subnets.npz": lambda c: garbage(os.path.join(c, "subnets.npz")),
    "garbage subnets.npz, rehashed": lambda c: (garbage(os.path.join(c, "subnets.npz")),
                                                rehash(c)),
    "no manifest": lambda c: os.remove(os.path.join(c, "manifest.json")),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_named_by_resume_from_is_one_line(crashed_run, capsys, case):
  out = crashed_run
  DAMAGE[case](step_dir(out, 6))
  before = snapshot(out)
  rc = main_mod.main(["--resume-from", step_dir(out, 6), "--quiet"])
  line = one_error_line(capsys.readouterr().err)
  assert rc == 2
  assert step_dir(out, 6) in line or "step-000006" in line, line
  assert snapshot(out) == before  # nothing touched, the good step-3 checkpoint included


@pytest.mark.parametrize("case", ["truncated params", "garbage subnets.npz", "no manifest"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(full_run, crashed_run, capsys, case):
  out = crashed_run
  DAMAGE[case](step_dir(out, 6))
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet"]) == 0
  text = capsys.readouterr()
  warnings = [l for l in text.err.splitlines() if l.strip()]
  assert len(warnings) == 1 and "step-000006 is damaged" in warnings[0], text.err
  assert f"resuming from {step_dir(out, 3)}" in text.out
  assert trajectory(out) == trajectory(full_run)
  assert json.load(open(os.path.join(out, "summary.json")))["resumed_from_step"] == 3
  assert ck.verify_checkpoint(step_dir(out, 6)) is None  # rewritten by the resumed run


def test_no_intact_checkpoint_is_one_line(crashed_run, capsys):
  out = crashed_run
  truncate(os.path.join(step_dir(out, 6), "params.npy"))
  os.remove(os.path.join(step_dir(out, 3), "params.npy"))
  before = snapshot(out)
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet"]) == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(lines) == 3 and all("Traceback" not in l for l in lines)
  assert "step-000006 is damaged" in lines[0] and "step-000003 is damaged" in lines[1]
  assert lines[2].startswith("losia-finetune: error: --resume: no intact checkpoint")
  assert snapshot(out) == before


def test_resume_from_an_older_checkpoint(full_run, crashed_run, capsys):
  out = crashed_run
  assert main_mod.main(["--resume-from", step_dir(out, 3), "--quiet"]) == 0
  assert trajectory(out) == trajectory(full_run)


def test_resume_from_another_runs_checkpoint_into_a_new_output_dir(full_run, crashed_run,
                                                                    tmp_path):
  new = str(tmp_path / "continued")
  assert main_mod.main(["--resume-from", step_dir(crashed_run, 6), "--output-dir", new,
                        "--quiet"]) == 0
  assert trajectory(new) == trajectory(full_run)  # the run's metrics came along
  assert [s for s, _ in ck.list_checkpoints(crashed_run)] == [3, 6]  # the source is left as is


def test_resume_from_a_loose_copy_of_a_checkpoint(full_run, crashed_run, tmp_path):
  elsewhere = str(tmp_path / "saved" / "step-6")
  shutil.copytree(step_dir(crashed_run, 6), elsewhere)
  new = str(tmp_path / "continued")
  assert main_mod.main(["--resume-from", elsewhere, "--output-dir", new, "--quiet"]) == 0
  # Without the run's metrics the smoothed loss restarts; the training is the same.
  def unsmoothed(records):
    return [{k: v for k, v in r.items() if k != "loss_smoothed"} for r in records]
  assert unsmoothed(trajectory(new)) == unsmoothed(trajectory(full_run)[6:])


def test_resume_from_bad_places(crashed_run, full_run, tmp_path, capsys):
  loose = str(tmp_path / "loose")
  shutil.copytree(step_dir(crashed_run, 6), loose)
  assert main_mod.main(["--resume-from", loose, "--quiet"]) == 2
  assert "pass --output-dir" in one_error_line(capsys.readouterr().err)
  assert main_mod.main(["--resume-from", str(tmp_path / "nope"), "--quiet"]) == 2
  assert "no such directory" in one_error_line(capsys.readouterr().err)
  # a checkpoint of another run into a directory that has its own checkpoints
  assert main_mod.main(["--resume-from", loose, "--output-dir", full_run, "--quiet"]) == 2
  assert "already holds checkpoints" in one_error_line(capsys.readouterr().err)


# --- portable runs ----------------------------------------------------------------------------

def test_moved_output_dir_data_and_model_still_resume(full_run, crashed_run, tiny, data_file,
                                                      tmp_path, capsys):
  moved_out = str(tmp_path / "node2" / "run")
  shutil.move(crashed_run, moved_out)
  moved_data = str(tmp_path / "node2" / "data.jsonl")
  shutil.move(data_file, moved_data)
  copied_model = str(tmp_path / "node2" / "model-copy")
  shutil.copytree(tiny, copied_model)
  # the recorded data path is gone: one line saying what to pass
  assert main_mod.main(["--resume", "--output-dir", moved_out, "--quiet"]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "--data" in line and "no longer exists" in line
  assert main_mod.main(["--resume", "--output-dir", moved_out, "--data", moved_data,
                        "--model", copied_model, "--quiet"]) == 0
  assert trajectory(moved_out) == trajectory(full_run)


def test_changed_model_or_data_contents_are_refused(crashed_run, tiny, data_file, tmp_path,
                                                    capsys):
  other_model = make_tiny_model(str(tmp_path / "other"), seed=1)
  capsys.readouterr()
  assert main_mod.main(["--resume", "--output-dir", crashed_run, "--model", other_model,
                        "--quiet"]) == 2
  assert "model (its weights" in one_error_line(capsys.readouterr().err)
  with open(data_file, "a") as f:
    f.write(json.dumps({"prompt": "x", "response": "y"}) + "\n")
  assert main_mod.main(["--resume", "--output-dir", crashed_run, "--quiet"]) == 2
  assert "data file contents" in one_error_line(capsys.readouterr().err)


def test_extending_a_finished_run_says_how_to_continue(full_run, capsys):
  before = snapshot(full_run)
  assert main_mod.main(["--resume", "--output-dir", full_run, "--steps", "12", "--quiet"]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "planned for 9 steps" in line and "12 steps asked" in line
  assert f"--model {os.path.join(full_run, 'model')}" in line
  assert snapshot(full_run) == before


# --- preemption -------------------------------------------------------------------------------

def signal_at(fake, monkeypatch, step, signums):
  """The fake backend's ``train_step`` delivers real signals to this process mid-step."""
  real = fake.train_step

  def train_step(self, batch):
    if self.step == step:
      for s in signums:
        os.kill(os.getpid(), s)
    return real(self, batch)
  monkeypatch.setattr(fake, "train_step", train_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(
    full_run, tiny, fake, data_file, tmp_path, monkeypatch, capsys, signum):
  out = str(tmp_path / "preempted")
  signal_at(fake, monkeypatch, 4, [signum])  # during step 5, between the step-3 and -6 saves
  rc = main_mod.main(flags(tiny, data_file, out))
  assert rc == 128 + signum
  err = capsys.readouterr().err
  final = [l for l in err.splitlines() if l.startswith("losia-finetune: stopped")]
  assert len(final) == 1 and "after step 5 of 9" in final[0], err
  assert f"--resume --output-dir {out}" in final[0]
  assert [s for s, _ in ck.list_checkpoints(out)] == [3, 5]
  assert len(R.read_metrics(os.path.join(out, "metrics.jsonl"))) == 5
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back
  monkeypatch.undo()
  monkeypatch.setattr(main_mod, "make_backend",
                      lambda cfg, settings: FakeBackend(cfg.model, settings))
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet"]) == 0
  assert trajectory(out) == trajectory(full_run)


def test_second_ctrl_c_stops_at_once(tiny, fake, data_file, tmp_path, monkeypatch, capsys):
  out = str(tmp_path / "twice")
  signal_at(fake, monkeypatch, 4, [signal.SIGINT, signal.SIGINT])
  assert main_mod.main(flags(tiny, data_file, out)) == 130
  assert "interrupted" in capsys.readouterr().err
  assert [s for s, _ in ck.list_checkpoints(out)] == [3]


# --- the environment --------------------------------------------------------------------------

def test_read_only_checkpoints_dir_is_refused_before_training(crashed_run, monkeypatch, capsys):
  root = os.path.join(crashed_run, "checkpoints")
  real = ck._probe_writable

  def probe(directory):
    if directory == root:  # what chmod a-w does for a non-root user
      raise PermissionError(errno.EACCES, "Permission denied", directory)
    real(directory)

  os.chmod(root, 0o555)
  try:
    if os.geteuid() == 0:  # root writes through permission bits
      monkeypatch.setattr(ck, "_probe_writable", probe)
    before = snapshot(crashed_run)
    assert main_mod.main(["--resume", "--output-dir", crashed_run, "--quiet"]) == 2
  finally:
    os.chmod(root, 0o755)
  line = one_error_line(capsys.readouterr().err)
  assert f"{root} is not writable" in line and "chmod" in line
  assert snapshot(crashed_run) == before  # no step trained, no metrics rewritten


def test_full_disk_at_a_checkpoint_is_one_line_and_resumes(full_run, tiny, fake, data_file,
                                                           tmp_path, monkeypatch, capsys):
  out = str(tmp_path / "full-disk")
  real = fake.save_checkpoint

  def save(self, directory):
    if self.step == 6:
      real(self, directory)
      raise OSError(errno.ENOSPC, "No space left on device", directory)
    real(self, directory)
  monkeypatch.setattr(fake, "save_checkpoint", save)
  assert main_mod.main(flags(tiny, data_file, out)) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "No space left on device" in line and "step 3" in line and "--resume" in line
  assert [s for s, _ in ck.list_checkpoints(out)] == [3]
  monkeypatch.setattr(fake, "save_checkpoint", real)
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet"]) == 0
  assert trajectory(out) == trajectory(full_run)


# --- smaller items ----------------------------------------------------------------------------

def test_bad_input_leaves_no_output_dir(tiny, fake, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a"}\n')
  out = tmp_path / "never"
  assert main_mod.main(["--model", tiny, "--data", str(bad), "--output-dir", str(out),
                        "--quiet"]) == 2
  one_error_line(capsys.readouterr().err)
  assert not out.exists()


def test_abbreviated_flags_are_refused():
  with pytest.raises(A.UsageError, match="unrecognized arguments: --step 2"):
    A.parse_flags(["--step", "2"])  # with abbreviations on, this was --steps 2
  with pytest.raises(A.UsageError, match="--save"):
    A.parse_flags(["--save", "3"])


def test_utf8_bom_is_accepted(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "response": "r"}).encode()
                   + b"\n")
  assert D.load_jsonl(str(path)) == [D.Example("p", "r")]


def test_broken_config_json_is_named(tiny, tmp_path, capsys):
  broken = str(tmp_path / "broken")
  shutil.copytree(tiny, broken)
  with open(os.path.join(broken, "config.json"), "w") as f:
    f.write('{"model_type": "llama",')
  out = tmp_path / "o"
  assert main_mod.main(["--model", broken, "--output-dir", str(out), "--quiet"]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "config.json" in line and "tokenizer" not in line, line
  assert not out.exists()


def test_hub_id_gets_the_offline_hint(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert main_mod.main(["--model", "HuggingFaceTB/SmolLM2-135M"]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert "Hub id" in line and "offline" in line and "--local-dir" in line
  with pytest.raises(A.UsageError) as e:
    A.resolve_model("./no/such/dir")  # a relative path is not taken for an id
  assert "Hub" not in str(e.value)


def test_progress_smoothing_is_constant_time(monkeypatch):
  losses = [3.0, 2.5, float("nan"), 2.0, 1.5]
  expected = R.smooth(losses + [1.0, 0.5])
  history = [{"loss": x} for x in losses]
  p = R.Progress(7, 5, True, history)

  def no_rescan(*a, **k):
    raise AssertionError("Progress.update recomputed the history")
  monkeypatch.setattr(R, "smooth", no_rescan)
  assert p.update(1.0, 10, 0.1)[0] == expected[-2]
  assert p.update(0.5, 10, 0.1)[0] == expected[-1]
  p.close()


def test_a_failed_write_after_training_is_one_line(tiny, fake, data_file, tmp_path,
                                                   monkeypatch, capsys):
  out = str(tmp_path / "o")
  real = ck.write_json_atomic

  def write(path, obj):
    if path.endswith("summary.json"):  # the disk fills up at the very end
      raise OSError(errno.ENOSPC, "No space left on device", path)
    real(path, obj)
  monkeypatch.setattr(ck, "write_json_atomic", write)
  assert main_mod.main(flags(tiny, data_file, out)) == 2
  line = one_error_line(capsys.readouterr().err)
  assert os.path.join(out, "summary.json") in line and "No space left" in line, line
  assert "--resume" in line and ck.verify_checkpoint(step_dir(out, 9)) is None
