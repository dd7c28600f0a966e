"""LoSiA-Pro: compact backward, exact input gradient, same trajectory as LoSiA."""

import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig
from losia_torch import LoSiAProLinear

transformers = pytest.importorskip("transformers")


def test_pro_linear_gradients():
  torch.manual_seed(0)
  x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
  w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
  b = torch.randn(6, dtype=torch.float64, requires_grad=True)
  rows, cols = torch.tensor([0, 3, 5]), torch.tensor([1, 2, 7])
  delta = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
  y = LoSiAProLinear.apply(x, w, b, delta, rows, cols)
  dy = torch.randn_like(y)
  y.backward(dy)
  x2 = x.detach().clone().requires_grad_(True)
  w2 = w.detach().clone().requires_grad_(True)
  b2 = b.detach().clone().requires_grad_(True)
  y2 = torch.nn.functional.linear(x2, w2, b2)
  y2.backward(dy)
  torch.testing.assert_close(y, y2)
  torch.testing.assert_close(x.grad, x2.grad)  # exact, dense input gradient
  torch.testing.assert_close(b.grad, b2.grad)
  torch.testing.assert_close(delta.grad, w2.grad[rows[:, None], cols[None, :]])
  assert w.grad is None  # no full-size weight gradient


def _llama(tied=True, seed=0):
  cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                 tie_word_embeddings=tied)
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(cfg)


def _run(pro, cfg, steps, accumulate=1, max_norm=1e6):
  model = _llama()
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2, weight_decay=0.01)
  if pro:
    names = opt.enable_pro(model)
    assert len(names) == 14  # 7 projections x 2 layers; the tied output layer stays full
    layers = {n + ".weight": m for n, m in model.named_modules()
              if isinstance(m, losia_torch.ProLayer)}
    assert sorted(layers) == sorted(names)
  g = torch.Generator().manual_seed(1)
  losses, indices, checked, clipped = [], [], False, False
  for s in range(steps):
    for _ in range(accumulate):
      ids = torch.randint(0, 128, (2, 12), generator=g)
      loss = model(input_ids=ids, labels=ids).loss
      loss.backward()
    if pro:
      for t in opt.plan.targets:
        if t.row_mode:
          continue
        if opt.profiles(t):
          assert t.param.grad is not None and layers[t.name].losia_block.delta.grad is None
        else:
          assert t.param.grad is None, f"{t.name} got a full gradient at step {s}"
          assert layers[t.name].losia_block.delta.grad.shape == t.block_shape
          checked = True
    norm = opt.clip_grad_norm_(max_norm)
    clipped = clipped or float(norm) > max_norm
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
    indices.append({t.name: (opt.subnet(t.name)[0].tolist(), opt.subnet(t.name)[1].tolist())
                    for t in opt.plan.targets})
  assert checked or not pro
  assert clipped == (max_norm < 1e6)  # the clipped variant really clips
  return model, opt, losses, indices


@pytest.mark.parametrize("accumulate,max_norm", [(1, 1e6), (2, 1e6), (1, 0.5)],
                         ids=["plain", "accumulate", "clipped"])
def test_pro_gives_the_same_trajectory(accumulate, max_norm):
  cfg = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.1)
  steps = 2 * cfg.period * 3 + 2  # total = 3: each layer relocalizes at least twice
  m0, o0, l0, i0 = _run(False, cfg, steps, accumulate, max_norm)
  m1, o1, l1, i1 = _run(True, cfg, steps, accumulate, max_norm)
  assert i0 == i1
  changed = sum(i0[s] != i0[s + 1] for s in range(steps - 1))
  assert changed >= 4
  torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=1e-6)
  for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6, msg=n)
  relocs = [o1.state[t.param]["last_relocalization"] for t in o1.plan.targets]
  assert min(relocs) >= 2 * cfg.period  # everybody relocalized after the first round


def test_disable_pro_and_eval_forward():
  model = _llama()
  opt = losia_torch.LoSiAOptimizer(model, LoSiAConfig(period=2), lr=1e-2)
  opt.enable_pro(model)
  ids = torch.randint(0, 128, (1, 8))
  with torch.no_grad():
    a = model(input_ids=ids).logits
  opt.disable_pro()
  assert not opt.pro_blocks
  q = model.model.layers[0].self_attn.q_proj
  assert type(q) is torch.nn.Linear and "losia_block" not in q.__dict__
  with torch.no_grad():
    b = model(input_ids=ids).logits
  torch.testing.assert_close(a, b)
