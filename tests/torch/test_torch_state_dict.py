"""Saving and resuming the optimizer: exact, indices included, also for bf16 models."""

import io

import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig
from tests.torch.torch_helpers import Toy


def _batches(n, vocab=16):
  g = torch.Generator().manual_seed(123)
  return [torch.randint(0, vocab, (3, 7), generator=g) for _ in range(n)]


def _train(model, opt, batches, sched=None):
  losses = []
  for ids in batches:
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
      sched.step()
    opt.zero_grad()
    losses.append(loss.item())
  return losses


def _make(dtype, cfg):
  torch.manual_seed(0)
  # ff = 600 so that indices go well past 256 (bf16 holds integers exactly only up to 256)
  model = Toy(layers=2, d=16, ff=600, vocab=300).to(dtype)
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2, weight_decay=0.01)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
  return model, opt, sched


@pytest.mark.parametrize("schedule", ["async", "sync"])
def test_bf16_resume_is_bit_exact(schedule):
  cfg = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.05, schedule=schedule)
  batches = _batches(14, vocab=300)
  model_a, opt_a, sched_a = _make(torch.bfloat16, cfg)
  losses_a = _train(model_a, opt_a, batches, sched_a)

  model_b, opt_b, sched_b = _make(torch.bfloat16, cfg)
  losses_b = _train(model_b, opt_b, batches[:7], sched_b)  # stops mid-window (s = 7)
  assert opt_b.importance, "the checkpoint should hold live importance buffers"
  buf = io.BytesIO()
  torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(),
              "sched": sched_b.state_dict()}, buf)
  idx = opt_b.state[opt_b.target("layers.1.mlp.up_proj.weight").param]["rows"]
  assert idx.max() > 256
  buf.seek(0)
  ckpt = torch.load(buf, weights_only=True)

  model_c, opt_c, sched_c = _make(torch.bfloat16, cfg)
  model_c.load_state_dict(ckpt["model"])
  opt_c.load_state_dict(ckpt["opt"])
  sched_c.load_state_dict(ckpt["sched"])
  for t in opt_c.plan.targets:
    st, old = opt_c.state[t.param], opt_b.state[opt_b.target(t.name).param]
    assert st["rows"].dtype == torch.int64 and torch.equal(st["rows"], old["rows"])
    assert torch.equal(st["cols"], old["cols"])
    assert st["exp_avg"].dtype == torch.float32 and torch.equal(st["exp_avg"], old["exp_avg"])
    assert st["step"] == old["step"]
    assert st["last_relocalization"] == old["last_relocalization"]
    assert st["exp_avg"] is not old["exp_avg"]  # loaded state does not alias the saved one
  for p in opt_c.state:
    if "exp_avg" in opt_c.state[p]:
      assert opt_c.state[p]["exp_avg"].dtype == torch.float32
  assert opt_c.losia_step == 7
  losses_c = losses_b + _train(model_c, opt_c, batches[7:], sched_c)
  assert losses_c == losses_a
  for (n, pa), pc in zip(model_a.named_parameters(), model_c.parameters()):
    assert torch.equal(pa, pc), n
  for t in opt_a.plan.targets:
    assert torch.equal(opt_a.state[t.param]["rows"], opt_c.state[opt_c.target(t.name).param]["rows"])


def test_state_dict_without_serialization_and_mismatch_errors():
  cfg = LoSiAConfig(rank_factor=0.25, period=2)
  model, opt, _ = _make(torch.float32, cfg)
  _train(model, opt, _batches(3, vocab=300))
  sd = opt.state_dict()
  assert sd["losia"]["step"] == 3 and sd["losia"]["config"] == cfg.to_dict()
  _, opt2, _ = _make(torch.float32, cfg)
  opt2.load_state_dict(sd)
  assert opt2.losia_step == 3
  _, opt3, _ = _make(torch.float32, cfg.replace(period=3))
  with pytest.raises(ValueError, match="period"):
    opt3.load_state_dict(sd)
  plain = torch.optim.AdamW(model.parameters()).state_dict()
  with pytest.raises(ValueError, match="losia"):
    opt2.load_state_dict(plain)
