"""``losia-finetune`` end to end on the real backends, a tiny local model and JSONL data.

(The driver's own logic, with a fake backend, is covered in test_checkpoints.py
and test_args.py; here the real JAX and torch backends train, checkpoint,
resume and export.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from losia_cli import main as main_mod
from losia_cli import report as R
from tests.cli.tiny_model import make_tiny_model

STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "sums.jsonl"
  rng = np.random.default_rng(0)
  lines = []
  for _ in range(40):
    a, b = (int(x) for x in rng.integers(0, 10, 2))
    lines.append(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n")
  path.write_text("".join(lines))
  return str(path)


def argv(tiny, data_file, out, backend, method="losia-pro", steps=STEPS):
  return ["--backend", backend, "--method", method, "--model", tiny, "--data", data_file,
          "--steps", str(steps), "--batch-size", "4", "--seq-len", "16", "--save-every", "3",
          "--period", "1", "--warmup-steps", "1", "--eval-size", "4", "--max-grad-norm", "0",
          "--output-dir", out, "--quiet"]


def losses(out):
  return [r["loss"] for r in R.read_metrics(os.path.join(out, "metrics.jsonl"))]


def exported(out):
  return safetensors.numpy.load_file(os.path.join(out, "model", "model.safetensors"))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_run_writes_everything_and_the_export_loads(tiny, data_file, tmp_path, backend):
  out = str(tmp_path / "run")
  assert main_mod.main(argv(tiny, data_file, out, backend)) == 0
  assert len(losses(out)) == STEPS
  for name in ("loss.png", "subnets.png", "summary.json", "model/config.json",
               "model/tokenizer.json", "checkpoints/step-000006/driver.json"):
    assert os.path.exists(os.path.join(out, name)), name
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["steps"] == STEPS
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "model"))
  base = transformers.AutoModelForCausalLM.from_pretrained(tiny)
  ids = torch.as_tensor([tok("3+4=\n")["input_ids"]])
  with torch.no_grad():
    after, before = model(ids).logits, base(ids).logits
  assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_interrupted_run_resumes_exactly(tiny, data_file, tmp_path, monkeypatch, backend):
  straight = str(tmp_path / "straight")
  assert main_mod.main(argv(tiny, data_file, straight, backend)) == 0

  real = main_mod.make_backend

  def interrupted(cfg, settings):
    b = real(cfg, settings)
    step = b.train_step

    def train_step(batch):
      if b.step == 4:  # after the step-3 checkpoint, before step 5
        raise KeyboardInterrupt
      return step(batch)
    b.train_step = train_step
    return b

  out = str(tmp_path / "resumed")
  monkeypatch.setattr(main_mod, "make_backend", interrupted)
  assert main_mod.main(argv(tiny, data_file, out, backend)) == 130
  monkeypatch.setattr(main_mod, "make_backend", real)
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet"]) == 0
  assert losses(out) == losses(straight)
  a, b = exported(straight), exported(out)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_model_without_the_targets_is_refused(tiny, data_file, tmp_path, capsys, backend):
  out = str(tmp_path / "run")
  rc = main_mod.main(argv(tiny, data_file, out, backend) + ["--target-modules", "c_attn"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "losia-finetune: error:" in err and "target_modules" in err and "c_attn" in err


def test_backends_give_the_same_run(tiny, data_file, tmp_path):
  """Same flags, same data, same model: the JAX and torch runs agree step by step."""
  runs = {}
  for backend in ("jax", "torch"):
    out = str(tmp_path / backend)
    assert main_mod.main(argv(tiny, data_file, out, backend, method="losia")) == 0
    runs[backend] = losses(out)
  np.testing.assert_allclose(runs["jax"], runs["torch"], rtol=1e-5)
