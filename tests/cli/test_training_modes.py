"""--grad-accum, --precision bf16, --gradient-checkpointing and padding to the longest.

Backends (torch, and JAX where the flag means the same thing) on the tiny model
of ``tests.cli.tiny_model``:

- accumulation over 2 micro-batches equals one batch of twice the size: the
  same losses, weights within 1e-5 and the same LoSiA subnets, step by step
  through a relocalization (the loss of a step is the token-weighted mean of
  its micro-batches, so micro-batches with different loss-token counts still
  give the batch's mean);
- bf16 (autocast / bf16 compute on fp32 weights) trains, keeps fp32 weights
  and is close to fp32 on the first step;
- gradient checkpointing (torch) recomputes each decoder layer and gives the
  same loss, gradients and weights as without;
- the padding width does not change training.

The driver: ``--batch-size B --grad-accum N`` trains on the batches of
``--batch-size B·N``; a resumed run keeps its precision and accumulation.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from losia_cli import checkpoints as ck
from losia_cli import main as main_mod
from losia_cli import report as R
from losia_cli.backend import Batch, ModelSource
from losia_cli.torch_backend import TorchBackend
from tests.cli.test_torch_backend import make_batch, settings
from tests.cli.tiny_model import FakeBackend, make_tiny_model

METHODS = ("losia", "losia-pro", "full", "lora")
STEPS = 4  # LOSIA has period 3: the first relocalization ends at step 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
  return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def source(tiny) -> ModelSource:
  return ModelSource("hf", tiny, "tiny")


def cat(*batches: Batch) -> Batch:
  return Batch(*(np.concatenate(xs) for xs in zip(*batches)))


def double_batch(k: int) -> Batch:
  """8 sequences: make_batch(2k) then make_batch(2k + 1) (different loss-token counts)."""
  return cat(make_batch(2 * k), make_batch(2 * k + 1))


def torch_backend(source, method, **kw) -> TorchBackend:
  return TorchBackend(source, settings(method, batch_size=8, **kw), device="cpu")


def jax_backend(source, method, **kw):
  from losia_cli.jax_backend import JaxBackend
  return JaxBackend(source, settings(method, batch_size=8, **kw))


def torch_weights(be) -> list[np.ndarray]:
  return [v.detach().cpu().numpy().copy() for v in be.model.state_dict().values()]


def jax_weights(be) -> list[np.ndarray]:
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(be._trainable_tree())]


BACKENDS = {"torch": (torch_backend, torch_weights), "jax": (jax_backend, jax_weights)}


def run(make, weights_of, source, method, **kw):
  be = make(source, method, **kw)
  losses, weights, subnets = [], [], []
  for k in range(STEPS):
    losses.append(be.train_step(double_batch(k))["loss"])
    weights.append(weights_of(be))
    subnets.append(be.subnets())
  return be, losses, weights, subnets


def assert_same_subnets(a, b):
  if a is None:
    assert b is None
    return
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key][0], b[key][0], err_msg=key)
    np.testing.assert_array_equal(a[key][1], b[key][1], err_msg=key)


# --- gradient accumulation -------------------------------------------------------------------

@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("method", METHODS)
def test_two_micro_batches_equal_one_batch_of_twice_the_size(source, backend, method):
  if backend == "jax":
    pytest.importorskip("jax")
  make, weights_of = BACKENDS[backend]
  # the two halves of every step carry different numbers of loss tokens
  assert all(make_batch(2 * k).loss_mask.sum() != make_batch(2 * k + 1).loss_mask.sum()
             for k in range(STEPS))
  _, one_loss, one_w, one_sub = run(make, weights_of, source, method)
  _, acc_loss, acc_w, acc_sub = run(make, weights_of, source, method, grad_accum=2)
  np.testing.assert_allclose(acc_loss, one_loss, rtol=0, atol=1e-5)
  # Summing two micro-batches reorders fp32 sums; where an entry's gradient is
  # near zero, Adam's m / sqrt(v) turns that rounding into up to ~0.1% of a
  # step (lr 1e-2: seen 1.05e-5 on full-jax). A wrong accumulation (unweighted
  # micro-batches, a dropped half) moves entries by a sizeable part of lr.
  for step in range(STEPS):
    for a, b in zip(acc_w[step], one_w[step]):
      np.testing.assert_allclose(a, b, rtol=0, atol=5e-5)
    assert_same_subnets(acc_sub[step], one_sub[step])
  if method.startswith("losia"):  # the run went through a relocalization
    first, last = one_sub[0], one_sub[-1]
    assert any(not np.array_equal(first[k][0], last[k][0]) for k in first)


def test_unweighted_accumulation_would_differ(source):
  """The token weighting matters: the plain mean of the micro-batch means is another loss."""
  be = torch_backend(source, "full", grad_accum=2)
  halves = (make_batch(0), make_batch(1))
  means = []
  for h in halves:
    be2 = torch_backend(source, "full")
    means.append(be2.train_step(h)["loss"])
  loss = be.train_step(cat(*halves))["loss"]
  counts = [float(h.loss_mask[:, :-1].sum()) for h in halves]
  weighted = sum(m * c for m, c in zip(means, counts)) / sum(counts)
  assert abs(loss - weighted) < 1e-5
  assert abs(loss - sum(means) / 2) > 1e-3


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_batch_that_does_not_split_is_refused(source, backend):
  if backend == "jax":
    pytest.importorskip("jax")
  be = BACKENDS[backend][0](source, "full", grad_accum=3)
  with pytest.raises(ValueError, match="8 sequences cannot be split into 3"):
    be.train_step(double_batch(0))


# --- bf16 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("method", ("losia", "losia-pro", "full"))
def test_bf16_trains_on_fp32_weights_close_to_fp32(source, backend, method):
  if backend == "jax":
    pytest.importorskip("jax")
  make, weights_of = BACKENDS[backend]
  fp32 = make(source, method)
  bf16 = make(source, method, precision="bf16")
  assert "bf16" in bf16.describe()
  batch = double_batch(0)
  first32, first16 = fp32.train_step(batch)["loss"], bf16.train_step(batch)["loss"]
  assert first16 != first32  # it did compute in bf16
  assert abs(first16 - first32) < 2e-3 * abs(first32), (first16, first32)
  losses = [first16] + [bf16.train_step(batch)["loss"] for _ in range(5)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
  assert all(w.dtype == np.float32 for w in weights_of(bf16))  # no bf16 weights


def test_bf16_torch_forward_runs_in_bf16(source):
  be = torch_backend(source, "losia", precision="bf16")
  seen = []
  layer = be.base_model.model.layers[0].mlp.down_proj
  handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
  be.train_step(double_batch(0))
  handle.remove()
  assert seen == [torch.bfloat16]


# --- gradient checkpointing (torch) --------------------------------------------------------------

def grads(be) -> list[torch.Tensor]:
  """Every gradient the optimizer will read (LoSiA-Pro's compact block leaves included)."""
  return [p.grad.clone() for g in be.optimizer.param_groups for p in g["params"]
          if p.grad is not None]


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(source, method):
  plain = torch_backend(source, method)
  ckpt = torch_backend(source, method, gradient_checkpointing=True)
  assert all(layer.gradient_checkpointing for layer in ckpt.base_model.model.layers)
  assert "gradient checkpointing" in ckpt.describe()
  # Count the runs of a module inside a checkpointed layer (forward hooks are not
  # called again when torch recomputes, so count calls of its forward itself).
  calls = []
  mlp = ckpt.base_model.model.layers[1].mlp
  forward = mlp.forward
  mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
  ckpt.model.train()
  batch = double_batch(0)
  loss_c = ckpt._forward_backward(batch)
  del mlp.forward
  assert len(calls) == 2  # the forward, and its recomputation in the backward
  plain.model.train()
  loss_p = plain._forward_backward(batch)
  assert abs(loss_c - loss_p) <= 1e-6
  gc, gp = grads(ckpt), grads(plain)
  assert len(gc) == len(gp) > 0
  for a, b in zip(gc, gp):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
  for be in (plain, ckpt):
    be.optimizer.zero_grad(set_to_none=True)
  for k in range(3):
    la, lb = plain.train_step(double_batch(k))["loss"], ckpt.train_step(double_batch(k))["loss"]
    assert abs(la - lb) <= 1e-6
  for a, b in zip(torch_weights(plain), torch_weights(ckpt)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert_same_subnets(plain.subnets(), ckpt.subnets())


def test_gradient_checkpointing_with_accumulation_and_bf16(source):
  a = torch_backend(source, "losia-pro", grad_accum=2, precision="bf16")
  b = torch_backend(source, "losia-pro", grad_accum=2, precision="bf16",
                    gradient_checkpointing=True)
  for k in range(2):
    assert abs(a.train_step(double_batch(k))["loss"] - b.train_step(double_batch(k))["loss"]) \
        <= 1e-6


def test_jax_refuses_gradient_checkpointing_and_bad_settings(source):
  pytest.importorskip("jax")
  with pytest.raises(ValueError, match="gradient checkpointing needs the torch backend"):
    jax_backend(source, "losia", gradient_checkpointing=True)
  with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
    jax_backend(source, "losia", precision="fp16")
  with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
    torch_backend(source, "losia", precision="fp16")
  with pytest.raises(ValueError, match="grad_accum must be >= 1"):
    torch_backend(source, "losia", grad_accum=0)


# --- padding -------------------------------------------------------------------------------------

def widen(batch: Batch, width: int) -> Batch:
  pad = width - batch.input_ids.shape[1]
  return Batch(*(np.pad(x, ((0, 0), (0, pad))) for x in batch))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_padding_width_does_not_change_training(source, backend):
  if backend == "jax":
    pytest.importorskip("jax")
  make, weights_of = BACKENDS[backend]
  narrow, wide = make(source, "losia"), make(source, "losia")
  for k in range(2):
    b = double_batch(k)
    ln, lw = narrow.train_step(b)["loss"], wide.train_step(widen(b, 40))["loss"]
    assert abs(ln - lw) <= 1e-5
  for a, b in zip(weights_of(narrow), weights_of(wide)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


# --- the driver ----------------------------------------------------------------------------------

@pytest.fixture
def fake(monkeypatch):
  seen = []

  class Recording(FakeBackend):
    def train_step(self, batch):
      seen.append((self.settings.grad_accum, batch.input_ids.shape))
      return super().train_step(batch)

  monkeypatch.setattr(main_mod, "make_backend",
                      lambda cfg, settings: Recording(cfg.model, settings))
  monkeypatch.setattr(FakeBackend, "fail_at_step", None)
  return seen


@pytest.fixture
def data_file(tmp_path):
  path = tmp_path / "d.jsonl"
  # prompts of very different lengths: batch widths vary
  path.write_text("".join(json.dumps({"prompt": "What is " + "very " * (i % 7) + f"{i}?",
                                      "response": str(i + 1)}) + "\n" for i in range(40)))
  return str(path)


def flags(tiny, data_file, out, *extra):
  return ["--model", tiny, "--data", data_file, "--steps", "6", "--seq-len", "64",
          "--save-every", "3", "--no-export", "--no-plots", "--quiet", "--backend", "torch",
          "--output-dir", out, *extra]


def trajectory(out):
  return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
          for r in R.read_metrics(os.path.join(out, "metrics.jsonl"))]


def test_driver_steps_on_batch_size_times_grad_accum(tiny, fake, data_file, tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert main_mod.main(flags(tiny, data_file, a, "--batch-size", "4")) == 0
  assert main_mod.main(flags(tiny, data_file, b, "--batch-size", "2", "--grad-accum", "2")) == 0
  assert trajectory(a) == trajectory(b)  # the same data, step by step
  assert {s[0] for s in fake[:6]} == {1} and {s[0] for s in fake[6:]} == {2}
  assert all(shape[0] == 4 for _, shape in fake)
  widths = {shape[1] for _, shape in fake}
  assert all(w % 8 == 0 and w < 64 for w in widths), widths  # padded to the longest, not 64
  with open(os.path.join(b, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["config"]["grad_accum"] == 2 and summary["config"]["precision"] == "fp32"


def one_error_line(err):
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def test_resume_keeps_precision_and_accumulation(tiny, fake, data_file, tmp_path, capsys):
  out = str(tmp_path / "run")
  FakeBackend.fail_at_step = 4
  assert main_mod.main(flags(tiny, data_file, out, "--batch-size", "2", "--grad-accum",
                             "2")) == 1
  FakeBackend.fail_at_step = None
  capsys.readouterr()
  for changed, name in ((["--grad-accum", "1"], "grad_accum"),
                        (["--precision", "bf16"], "precision")):
    assert main_mod.main(["--resume", "--output-dir", out, "--quiet", *changed]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "different settings" in line and name in line, line
  # Gradient checkpointing changes memory, not the trajectory: it may be switched on.
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet",
                        "--gradient-checkpointing"]) == 0
  straight = str(tmp_path / "straight")
  assert main_mod.main(flags(tiny, data_file, straight, "--batch-size", "2", "--grad-accum",
                             "2")) == 0
  assert trajectory(out) == trajectory(straight)


def test_checkpoints_from_before_the_flags_resume_as_fp32_without_accumulation(
    tiny, fake, data_file, tmp_path, capsys):
  out = str(tmp_path / "old")
  FakeBackend.fail_at_step = 4
  assert main_mod.main(flags(tiny, data_file, out, "--batch-size", "4")) == 1
  FakeBackend.fail_at_step = None
  capsys.readouterr()
  (step, path), = ck.list_checkpoints(out)
  driver = os.path.join(path, "driver.json")
  with open(driver, encoding="utf-8") as f:
    saved = json.load(f)
  for key in ("grad_accum", "precision", "gradient_checkpointing"):
    del saved["config"][key]  # as written before these flags existed
  with open(driver, "w", encoding="utf-8") as f:
    json.dump(saved, f)
  ck.write_manifest(path)
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet", "--grad-accum", "2"]) == 2
  assert "grad_accum" in one_error_line(capsys.readouterr().err)
  assert main_mod.main(["--resume", "--output-dir", out, "--quiet"]) == 0
