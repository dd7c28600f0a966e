"""``losia-finetune`` across processes (torchrun: DDP and FSDP2) and across JAX devices.

Real launches, as a user types them: ``python -m torch.distributed.run
--nproc-per-node 2 -m losia_cli --backend torch ...`` (gloo on the CPU), and
``python -m losia_cli --backend jax --devices 4`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``. Each is compared with the
single-process run of the same flags (run in this process): the same per-step
losses, clip norms (the gradient's size, which Adam's update would hide) and
exported weights within 1e-5, the same LoSiA subnets through the relocalizations
of every layer (``--period 1``: one per step). A checkpoint of such a run resumes
under the same launch exactly (DDP: rank 0's ordinary checkpoint; FSDP2:
torch.distributed.checkpoint shards), and a JAX checkpoint written on 4 devices
continues on 2 and on 1. A SIGTERM that reaches one process stops both after the
same step. What cannot run as launched is refused in one line from rank 0 before
any work.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from losia_cli import distributed as P
from losia_cli import main as main_mod
from losia_cli import report as R
from tests.cli.test_cli_e2e import data_file, tiny  # noqa: F401 (the same fixtures)

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
RESUME_AT = 4
TIMEOUT = 600  # a hung collective must fail the test, not the CI job




def flags(tiny, data_file, backend, out, *extra):
  # period 1: each of the 3 slots (2 layers, the output layer) relocalizes every third step
  return ["--backend", backend, "--method", "losia", "--model", tiny, "--data", data_file,
          "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "16", "--save-every", "2",
          "--keep-checkpoints", "3", "--period", "1", "--warmup-steps", "1", "--eval-size", "2",
          "--no-plots", "--quiet", "--output-dir", str(out), *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **extra)


def _torchrun():
  return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
          "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]


def launch(argv, *, torchrun=False, devices=None):
  """Runs ``python -m losia_cli argv`` (under torchrun with 2 processes); returns the result."""
  env = _env()
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  prefix = _torchrun() if torchrun else [sys.executable]
  proc = _start(prefix + ["-m", "losia_cli", *argv], env)
  with _stopped_at_the_end(proc):
    out, err = proc.communicate(timeout=TIMEOUT)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _start(cmd, env) -> subprocess.Popen:
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


class _stopped_at_the_end:
  """Ends a launch that is still running (a timeout, a failed assertion): SIGTERM first,
  on which torchrun stops its workers (they live in sessions of their own, so killing
  torchrun alone would leave them waiting in a collective), then SIGKILL."""

  def __init__(self, proc: subprocess.Popen):
    self.proc = proc

  def __enter__(self):
    return self.proc

  def __exit__(self, *exc):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.communicate(timeout=90)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.communicate()


def succeeded(result):
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
  return result


def losses(out):
  return [r["loss"] for r in R.read_metrics(os.path.join(out, "metrics.jsonl"))]


def grad_norms(out):
  """The torch backend's clip norms: the size of the gradient, which Adam's update hides."""
  return [r.get("grad_norm") for r in R.read_metrics(os.path.join(out, "metrics.jsonl"))]


def exported(out):
  return safetensors.numpy.load_file(os.path.join(out, "model", "model.safetensors"))


def subnets(out):
  """The subnet history of the final checkpoint: ``{identity: [(start, rows, cols)]}``."""
  tracker = R.SubnetTracker.load(os.path.join(out, "checkpoints", f"step-{STEPS:06d}",
                                              "subnets.npz"))
  return tracker.segments


def assert_same_run(a, b, exact=False):
  la, lb = losses(a), losses(b)
  assert len(la) == len(lb) == STEPS
  wa, wb = exported(a), exported(b)
  assert wa.keys() == wb.keys()
  if exact:
    assert la == lb and grad_norms(a) == grad_norms(b)
    for k in wa:
      np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
  else:
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-5)
    if None not in grad_norms(a) + grad_norms(b):
      np.testing.assert_allclose(grad_norms(a), grad_norms(b), rtol=1e-5)
    for k in wa:
      np.testing.assert_allclose(wa[k], wb[k], rtol=0, atol=1e-5, err_msg=k)
  sa, sb = subnets(a), subnets(b)
  assert sa.keys() == sb.keys()
  for ident in sa:
    assert len(sa[ident]) == len(sb[ident]), ident
    for (s0, r0, c0), (s1, r1, c1) in zip(sa[ident], sb[ident]):
      assert s0 == s1 and np.array_equal(r0, r1) and np.array_equal(c0, c1), ident
  # every target moved its block at least once
  assert all(len(segs) >= 2 for segs in sa.values()), {k: len(v) for k, v in sa.items()}


def one_error_line(stderr):
  """Our report from rank 0 only, and no traceback from a losia_cli frame (torchrun adds
  its own summary of the failed workers after it)."""
  ours = [line for line in stderr.splitlines() if line.startswith("losia-finetune")]
  assert len(ours) == 1, stderr
  assert os.path.join("losia_cli", "") not in stderr, stderr
  return ours[0]


# --- torch: torchrun --nproc-per-node 2 ---------------------------------------------------

@pytest.fixture(scope="module")
def torch_single(tiny, data_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("torch") / "single"
  assert main_mod.main(flags(tiny, data_file, "torch", out)) == 0
  return str(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_equals_one_process_and_resumes_exactly(tiny, data_file, torch_single,
                                                         tmp_path, mode):
  extra = ["--fsdp"] if mode == "fsdp" else []
  out = tmp_path / mode
  result = succeeded(launch(flags(tiny, data_file, "torch", out, *extra), torchrun=True))
  # rank 0 alone prints: one plan, one summary line
  assert result.stdout.count("loading model") == 1 and result.stdout.count("summary:") == 1
  across = "FSDP2 (fully_shard) over 2 processes" if extra else "DDP over 2 processes"
  assert across in result.stdout, result.stdout
  assert_same_run(torch_single, str(out))
  checkpoint = out / "checkpoints" / f"step-{RESUME_AT:06d}"
  if extra:  # every process wrote its shards, rank 0 the rest
    assert (checkpoint / "dcp" / ".metadata").is_file()
    assert len(list((checkpoint / "dcp").glob("*.distcp"))) == 2
  else:  # rank 0's ordinary checkpoint
    assert (checkpoint / "model.safetensors").is_file()
  # resume under torchrun in a new output directory: the same run, bit for bit
  resumed = tmp_path / f"{mode}-resumed"
  result = succeeded(launch(["--resume-from", str(checkpoint), "--output-dir", str(resumed),
                             "--quiet"], torchrun=True))
  assert f"resuming from {checkpoint}" in result.stdout
  assert_same_run(str(out), str(resumed), exact=True)


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(
    tiny, data_file, tmp_path):
  # with 2 micro-batches of 2 per step: each process 1 row of each, the first backward
  # without DDP's all-reduce (no_sync), as one process accumulating the same 2 x 2
  accumulate = ["--batch-size", "2", "--grad-accum", "2"]
  single = tmp_path / "single"
  assert main_mod.main(flags(tiny, data_file, "torch", single, *accumulate)) == 0
  out, ready = tmp_path / "preempted", str(tmp_path / "ready")
  env = _env(LOSIA_TEST_BLOCK_AT_STEP="2", LOSIA_TEST_READY_FILE=ready,
             LOSIA_TEST_SIGNAL_RANK="1")
  proc = _start(_torchrun() + ["-m", "tests.cli.preempt_runner",
                                *flags(tiny, data_file, "torch", out, *accumulate)], env)
  with _stopped_at_the_end(proc):
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(ready) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    assert os.path.exists(ready), proc.communicate(timeout=60)
    with open(ready, encoding="utf-8") as f:
      os.kill(int(f.read()), signal.SIGTERM)  # rank 1 alone, inside step 3
    _, err = proc.communicate(timeout=300)  # processes that disagree would hang here
  assert proc.returncode != 0
  stopped = [line for line in err.splitlines() if line.startswith("losia-finetune")]
  assert len(stopped) == 1 and "stopped by SIGTERM after step 3 of 6" in stopped[0], err
  assert "continue with: torchrun --nproc-per-node 2 -m losia_cli --resume" in stopped[0]
  assert os.path.join("losia_cli", "") not in err, err
  assert [name.name for name in sorted((out / "checkpoints").iterdir())] == [
      "step-000002", "step-000003"]
  np.testing.assert_allclose(losses(out), losses(single)[:3], rtol=0, atol=1e-5)
  # the checkpoint rank 0 wrote when both stopped continues, here in one process
  assert main_mod.main(["--resume", "--output-dir", str(out), "--quiet"]) == 0
  assert_same_run(str(single), str(out))


def test_torchrun_refuses_a_batch_it_cannot_split(tiny, data_file, tmp_path):
  out = tmp_path / "odd"
  result = launch(flags(tiny, data_file, "torch", out, "--batch-size", "3"), torchrun=True)
  assert result.returncode != 0
  line = one_error_line(result.stderr)
  assert "--batch-size: 3 sequences" in line and "over 2 processes" in line, line
  assert "multiple of 2" in line
  assert not out.exists()


TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
REFUSED = [
    # (environment, extra flags, backend, what the line says)
    ({}, ["--fsdp"], "torch", "launch with torchrun --nproc-per-node N"),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, ["--fsdp"], "torch", "WORLD_SIZE 1"),
    ({}, ["--fsdp", "--method", "lora"], "torch", "--fsdp: supports --method losia"),
    ({}, ["--fsdp"], "jax", "--fsdp: needs --backend torch"),
    ({}, ["--devices", "2"], "torch", "--devices: applies to --backend jax"),
    (TORCHRUN_ENV, [], "jax", "add --backend torch"),
    ({}, ["--devices", "3"], "jax", "4 sequences cannot be split evenly over --devices 3"),
    ({}, ["--devices", "0"], "jax", "--devices: must be >= 1"),
    # more devices than this process has (tests/conftest.py gives it 8 CPU devices)
    ({}, ["--devices", "64", "--batch-size", "64"], "jax",
     "XLA_FLAGS=--xla_force_host_platform_device_count=64"),
]


@pytest.mark.parametrize("env,extra,backend,says", REFUSED,
                         ids=[f"{' '.join(e)}-{b}" + ("-torchrun" if v else "")
                              for v, e, b, _ in REFUSED])
def test_what_cannot_run_as_launched_is_one_line(tiny, data_file, tmp_path, capsys,
                                                 monkeypatch, env, extra, backend, says):
  for key in TORCHRUN_ENV:
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  out = tmp_path / "run"
  assert main_mod.main(flags(tiny, data_file, backend, out, *extra)) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("losia-finetune: error: ") and says in lines[0], lines[0]
  assert not out.exists()


@pytest.mark.parametrize("under_torchrun", [True, False], ids=["torchrun", "env-only"])
def test_other_ranks_leave_the_report_to_rank_0(tiny, data_file, tmp_path, capsys,
                                                monkeypatch, under_torchrun):
  """Rank 1 meets the same bad input: under torchrun it waits first (torchrun stops it once
  rank 0 has reported; returning at once let torchrun stop rank 0 before it printed), and
  only if it outlives the wait does it say the error itself, marked with its rank."""
  for key, value in TORCHRUN_ENV.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("RANK", "1")
  if under_torchrun:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
  else:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
  waits = []

  def sleep(seconds):
    waits.append((seconds, capsys.readouterr().err))

  monkeypatch.setattr(P.time, "sleep", sleep)
  assert main_mod.main(flags(tiny, data_file, "torch", tmp_path / "run", "--batch-size",
                             "3")) == 2
  assert waits == ([(P.REPORT_WAIT_S, "")] if under_torchrun else [])
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("losia-finetune (rank 1): error: argument "
                                                 "--batch-size: 3 sequences"), lines


# --- JAX: --devices N ----------------------------------------------------------------------

def test_jax_devices_equal_one_device_and_resume_on_fewer(tiny, data_file, tmp_path):
  one, four = tmp_path / "one", tmp_path / "four"
  assert main_mod.main(flags(tiny, data_file, "jax", one, "--devices", "1")) == 0
  result = succeeded(launch(flags(tiny, data_file, "jax", four, "--devices", "4"), devices=4))
  assert "4 devices: parameters sharded FSDP-style" in result.stdout, result.stdout
  assert_same_run(str(one), str(four))
  checkpoint = four / "checkpoints" / f"step-{RESUME_AT:06d}"
  # on a machine with 2 devices, and in this process on 1
  on_two = tmp_path / "two"
  succeeded(launch(["--resume-from", str(checkpoint), "--output-dir", str(on_two),
                    "--devices", "2", "--quiet"], devices=2))
  assert_same_run(str(four), str(on_two))
  on_one = tmp_path / "on-one"
  assert main_mod.main(["--resume-from", str(checkpoint), "--output-dir", str(on_one),
                        "--devices", "1", "--quiet"]) == 0
  assert_same_run(str(four), str(on_one))
  # without --devices the run keeps its 4, which a 2-device machine does not have
  result = launch(["--resume-from", str(checkpoint), "--output-dir", str(tmp_path / "x"),
                   "--quiet"], devices=2)
  assert result.returncode == 2
  line = one_error_line(result.stderr)
  assert "4 devices asked, but JAX sees 2" in line and "--devices 2" in line, line
