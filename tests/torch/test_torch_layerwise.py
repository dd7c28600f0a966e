"""Per-layer stepping (updates inside backward): same trajectory, limits refused clearly."""

import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig
from tests.torch.torch_helpers import Toy

CFG = LoSiAConfig(rank_factor=0.34, period=2, output_rank_factor=0.25)


def _batches(n):
  g = torch.Generator().manual_seed(0)
  return [torch.randint(0, 16, (3, 7), generator=g) for _ in range(n)]


def _run(layerwise, steps):
  torch.manual_seed(0)
  model = Toy(layers=2, tied=True)
  opt = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2, weight_decay=0.01)
  if layerwise:
    opt.enable_per_layer_step()
  losses = []
  for ids in _batches(steps):
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    if layerwise:
      assert all(p.grad is None for p in model.parameters())  # applied and freed in backward
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
  return model, opt, losses


def test_same_trajectory_as_the_ordinary_step():
  steps = 2 * CFG.period * 3 + 1  # each of the 3 slots relocalizes twice
  m0, o0, l0 = _run(False, steps)
  m1, o1, l1 = _run(True, steps)
  assert o1.losia_step == steps
  assert l0 == pytest.approx(l1, rel=1e-6)
  for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
    torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-7, msg=n)
  for t in o0.plan.targets:
    assert o0.subnet(t.name)[0].tolist() == o1.subnet(t.name)[0].tolist()
    assert o0.subnet(t.name)[1].tolist() == o1.subnet(t.name)[1].tolist()
    assert o1.state[o1.target(t.name).param]["last_relocalization"] >= 2 * CFG.period


def test_limits_are_refused_clearly():
  torch.manual_seed(0)
  model = Toy(layers=2)
  opt = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2)
  opt.enable_per_layer_step()
  ids = _batches(1)[0]
  model.loss(ids[:, :-1], ids[:, 1:]).backward()
  with pytest.raises(RuntimeError, match="clip"):
    opt.clip_grad_norm_(1.0)
  with pytest.raises(RuntimeError, match="accumulation"):
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
  opt.step()
  opt.disable_per_layer_step()
  opt.enable_pro(model)
  with pytest.raises(ValueError, match="Pro"):
    opt.enable_per_layer_step()
  opt.disable_pro()
  opt.enable_per_layer_step()
  before = opt.losia_step
  loss = model.loss(ids[:, :-1], ids[:, 1:]) * float("nan")
  with pytest.raises(FloatingPointError, match="NaN or infinite"):
    loss.backward()
  assert opt.losia_step == before
