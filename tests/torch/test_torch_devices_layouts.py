"""State follows the parameters (build, then model.double(), then step); GPT-2 Conv1D
targets are read in their [d_in, d_out] layout, with and without Pro; unknown layouts refused."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import losia_torch
from losia_torch import LoSiAConfig

CFG = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.1)


def _llama(seed=0):
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))


def _steps(model, opt, n, device="cpu"):
  g = torch.Generator().manual_seed(1)
  for _ in range(n):
    ids = torch.randint(0, 64, (2, 8), generator=g).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("pro", [False, True], ids=["losia", "pro"])
def test_state_follows_model_double(pro):
  steps = 2 * CFG.period * 3 + 1
  ref = _llama().double()  # built after the cast
  ropt = losia_torch.get_losia_optimizer(ref, CFG, lr=1e-2, pro=pro, verbose=False)
  _steps(ref, ropt, steps)
  model = _llama()
  opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, pro=pro, verbose=False)
  model.double()  # built before the cast, as Trainer / accelerate do with model.to(device)
  _steps(model, opt, steps)
  for t in opt.plan.targets:
    assert opt.state[t.param]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.subnet(t.name)[0], ropt.subnet(t.name)[0])
  for b in opt.pro_blocks.values():
    assert b.delta.dtype == torch.float64
  for (n, p0), p1 in zip(ref.named_parameters(), model.parameters()):
    assert torch.equal(p0, p1), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_follows_model_to_cuda():
  model = _llama()
  opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, pro=True, verbose=False)
  model.to("cuda")
  _steps(model, opt, 3, "cuda")
  assert all(opt.state[t.param]["rows"].is_cuda for t in opt.plan.targets)


def _gpt2(seed=0):
  torch.manual_seed(seed)
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16, attn_pdrop=0.0,
      resid_pdrop=0.0, embd_pdrop=0.0))


def _as_linear(model):
  """The same GPT-2 with every Conv1D replaced by the equivalent nn.Linear ([d_out, d_in])."""
  for name, mod in list(model.named_modules()):
    if type(mod).__name__ == "Conv1D":
      lin = nn.Linear(mod.nx, mod.nf)
      with torch.no_grad():
        lin.weight.copy_(mod.weight.t())
        lin.bias.copy_(mod.bias)
      parent, leaf = name.rsplit(".", 1)
      setattr(model.get_submodule(parent), leaf, lin)
  return model


GPT2_CFG = LoSiAConfig(rank_factor=0.25, period=2, target_modules=("c_attn", "c_fc"))


@pytest.mark.parametrize("pro", [False, True], ids=["losia", "pro"])
def test_conv1d_targets_train_as_their_linear_twins(pro):
  conv = _gpt2()
  lin = _as_linear(_gpt2())
  oc = losia_torch.get_losia_optimizer(conv, GPT2_CFG, lr=1e-2, pro=pro, verbose=False)
  ol = losia_torch.get_losia_optimizer(lin, GPT2_CFG, lr=1e-2, pro=pro, verbose=False)
  t = oc.target("transformer.h.0.attn.c_attn.weight")
  assert t.transposed and (t.d_out, t.d_in) == (96, 32)  # Conv1D weight is [32, 96]
  if pro:
    assert len(oc.pro_blocks) == len(ol.pro_blocks) == 4  # all four Conv1D targets use Pro
    assert type(conv.transformer.h[0].attn.c_attn).__name__ == "ProConv1D"
  for model, opt in ((conv, oc), (lin, ol)):
    g = torch.Generator().manual_seed(1)
    for _ in range(2 * GPT2_CFG.period * 2 + 1):
      ids = torch.randint(0, 64, (2, 8), generator=g)
      model(input_ids=ids, labels=ids).loss.backward()
      opt.clip_grad_norm_(0.5)
      opt.step()
      opt.zero_grad()
  for a, b in zip(oc.plan.targets, ol.plan.targets):
    assert torch.equal(oc.subnet(a.name)[0], ol.subnet(b.name)[0])
    assert torch.equal(oc.subnet(a.name)[1], ol.subnet(b.name)[1])
    assert oc.state[a.param]["last_relocalization"] >= 0
    torch.testing.assert_close(a.param.t(), b.param, rtol=1e-5, atol=1e-6)


class _Custom(nn.Module):
  def __init__(self):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(8, 4))


def test_target_of_unknown_layout_is_refused():
  model = nn.Module()
  model.layers = nn.ModuleList([nn.Module()])
  model.layers[0].q_proj = _Custom()
  with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight \(owned by _Custom\)"):
    losia_torch.LoSiAOptimizer(model, LoSiAConfig(target_modules=("q_proj",)))
