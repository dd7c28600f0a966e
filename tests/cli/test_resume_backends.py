"""Damaged checkpoints and preemption on the real JAX and torch backends.

Every damage of the issue (a missing or truncated optimizer.pt, a truncated
model.safetensors or Orbax state, an invalid driver.json, a missing or edited
backend.json, a garbage subnets.npz) is one line on stderr, exit 2, no
traceback, nothing changed on disk; "rehashed" cases rewrite the manifest after
the damage, so that the backend's (or the driver's) own checks must catch it.
A real SIGTERM sent to a run in another process stops it after the current
step with a checkpoint, and the resumed run equals the uninterrupted one bit
for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from losia_cli import checkpoints as ck
from losia_cli import main as main_mod
from losia_cli import report as R
from tests.cli.test_resume import one_error_line, snapshot, truncate
from tests.cli.tiny_model import make_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "sums.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n"
                          for a in range(6) for b in range(5)))
  return str(path)


def argv(tiny, data_file, out, backend):
  return ["--backend", backend, "--method", "losia", "--model", tiny, "--data", data_file,
          "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16", "--save-every", "3",
          "--period", "1", "--warmup-steps", "1", "--eval-size", "0", "--max-grad-norm", "0",
          "--no-plots", "--output-dir", out, "--quiet"]


@pytest.fixture(scope="module", params=["jax", "torch"])
def straight(request, tiny, data_file, tmp_path_factory):
  """``(backend, output dir)`` of an uninterrupted run with checkpoints at steps 3 and 6."""
  out = str(tmp_path_factory.mktemp(f"straight-{request.param}") / "run")
  assert main_mod.main(argv(tiny, data_file, out, request.param)) == 0
  assert [s for s, _ in ck.list_checkpoints(out)] == [3, STEPS]
  return request.param, out


def losses(out):
  return [r["loss"] for r in R.read_metrics(os.path.join(out, "metrics.jsonl"))]


def assert_same_export(a, b):
  wa = safetensors.numpy.load_file(os.path.join(a, "model", "model.safetensors"))
  wb = safetensors.numpy.load_file(os.path.join(b, "model", "model.safetensors"))
  assert wa.keys() == wb.keys()
  for k in wa:
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


# --- damage -------------------------------------------------------------------------------

def _edit_json(path, **changes):
  with open(path) as f:
    d = json.load(f)
  for k, v in changes.items():
    if v is None:
      d.pop(k, None)
    else:
      d[k] = v
  with open(path, "w") as f:
    json.dump(d, f)


def _largest_state_file(c):
  files = [os.path.join(p, n) for p, _, ns in os.walk(os.path.join(c, "state")) for n in ns]
  return max(files, key=os.path.getsize)


def _garbage(path):
  with open(path, "wb") as f:
    f.write(b"\x00not an npz\xff" * 9)


DAMAGE = {  # name: (backends, damage(checkpoint dir), rehash the manifest afterwards)
    "missing optimizer.pt": (("torch",), lambda c: os.remove(f"{c}/optimizer.pt"), False),
    "truncated optimizer.pt": (("torch",), lambda c: truncate(f"{c}/optimizer.pt"), False),
    "truncated optimizer.pt, rehashed": (("torch",), lambda c: truncate(f"{c}/optimizer.pt"),
                                         True),
    "truncated model.safetensors": (("torch",), lambda c: truncate(f"{c}/model.safetensors"),
                                    False),
    "truncated model.safetensors, rehashed": (
        ("torch",), lambda c: truncate(f"{c}/model.safetensors"), True),
    "truncated Orbax state": (("jax",), lambda c: truncate(_largest_state_file(c)), False),
    "truncated Orbax state, rehashed": (("jax",), lambda c: truncate(_largest_state_file(c)),
                                        True),
    "invalid driver.json": (("jax", "torch"),
                            lambda c: open(f"{c}/driver.json", "w").write("{\"step\": "), False),
    "invalid driver.json, rehashed": (
        ("jax", "torch"), lambda c: open(f"{c}/driver.json", "w").write("[]"), True),
    "missing backend.json": (("jax", "torch"), lambda c: os.remove(f"{c}/backend.json"), False),
    "missing backend.json, rehashed": (("jax", "torch"),
                                       lambda c: os.remove(f"{c}/backend.json"), True),
    "garbage subnets.npz": (("jax", "torch"), lambda c: _garbage(f"{c}/subnets.npz"), False),
    "garbage subnets.npz, rehashed": (("jax", "torch"), lambda c: _garbage(f"{c}/subnets.npz"),
                                      True),
    "backend.json of another method": (
        ("jax", "torch"), lambda c: _edit_json(f"{c}/backend.json", method="full"), True),
    "backend.json of another backend": (
        ("jax", "torch"), lambda c: _edit_json(f"{c}/backend.json", backend="other"), True),
    "backend.json without a version": (
        ("jax", "torch"), lambda c: _edit_json(f"{c}/backend.json", format=None), True),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_one_line_and_touches_nothing(straight, tmp_path, capsys, case):
  backend, source = straight
  backends, damage, rehash = DAMAGE[case]
  if backend not in backends:
    pytest.skip(f"{case} is a {'/'.join(backends)} file")
  out = str(tmp_path / "run")
  shutil.copytree(source, out)
  newest = os.path.join(out, "checkpoints", f"step-{STEPS:06d}")
  damage(newest)
  if rehash:
    ck.write_manifest(newest)
  before = snapshot(out)
  capsys.readouterr()
  rc = main_mod.main(["--resume-from", newest, "--quiet"])
  err = capsys.readouterr().err
  line = one_error_line(err)
  assert rc == 2, err
  assert newest in line, line
  assert snapshot(out) == before


def test_resume_skips_a_damaged_newest_checkpoint(straight, tmp_path, capsys):
  backend, source = straight
  out = str(tmp_path / "run")
  shutil.copytree(source, out)
  newest = os.path.join(out, "checkpoints", f"step-{STEPS:06d}")
  truncate(f"{newest}/optimizer.pt" if backend == "torch" else _largest_state_file(newest))
  capsys.readouterr()
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet"]) == 0
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("losia-finetune")]
  assert len(err) == 1 and "step-000006 is damaged" in err[0], err
  assert losses(out) == losses(source)
  assert_same_export(source, out)


# --- preemption ---------------------------------------------------------------------------

def test_sigterm_checkpoints_and_the_resumed_run_is_identical(straight, tiny, data_file,
                                                              tmp_path):
  backend, source = straight
  out = str(tmp_path / "preempted")
  ready = str(tmp_path / "ready")
  env = {**os.environ, "LOSIA_TEST_BLOCK_AT_STEP": "3", "LOSIA_TEST_READY_FILE": ready,
         "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.Popen([sys.executable, "-m", "tests.cli.preempt_runner",
                           *argv(tiny, data_file, out, backend)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 600
    while not os.path.exists(ready) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert os.path.exists(ready), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)  # inside step 4 (0-based step 3)
    _, err = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert "Traceback" not in err, err
  stopped = [l for l in err.splitlines() if l.startswith("losia-finetune: stopped")]
  assert len(stopped) == 1 and "by SIGTERM after step 4 of 6" in stopped[0], err
  assert f"--resume --output-dir {out}" in stopped[0]
  assert [s for s, _ in ck.list_checkpoints(out)] == [3, 4]
  assert losses(out) == losses(source)[:4]
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet"]) == 0
  assert losses(out) == losses(source)
  assert_same_export(source, out)
