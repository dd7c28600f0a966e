"""torch.compile: a compiled step is the eager step; a compiled Pro model compiles once per
profiling variant, not once per step."""

from __future__ import annotations

import torch
import transformers

import losia_torch
from losia_torch import LoSiAConfig


def _llama(seed=0):
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))


def _train(compile_step: bool, steps: int, cfg: LoSiAConfig):
  model = _llama()
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2)
  step = torch.compile(opt.step, backend="eager") if compile_step else opt.step
  g = torch.Generator().manual_seed(1)
  for _ in range(steps):
    ids = torch.randint(0, 64, (2, 8), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.clip_grad_norm_(1.0)
    step()
    opt.zero_grad()
  return model, opt


def test_compiled_step_is_the_eager_step():
  torch._dynamo.reset()
  cfg = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.1)
  steps = 2 * cfg.period * 3 + 1  # total = 3: every slot relocalizes twice
  m0, o0 = _train(False, steps, cfg)
  m1, o1 = _train(True, steps, cfg)
  assert o1.losia_step == o0.losia_step == steps  # it relocalizes, as eager does
  for t0, t1 in zip(o0.plan.targets, o1.plan.targets):
    assert torch.equal(o0.subnet(t0.name)[0], o1.subnet(t1.name)[0])
    assert torch.equal(o0.subnet(t0.name)[1], o1.subnet(t1.name)[1])
    assert o1.state[t1.param]["last_relocalization"] >= 2 * cfg.period
  for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
    assert torch.equal(p0, p1), n


def test_compiled_pro_model_compiles_once_per_profiling_variant():
  torch._dynamo.reset()
  compiles = []

  def counting_backend(gm, example_inputs):
    compiles.append(len(gm.graph.nodes))
    return gm.forward

  cfg = LoSiAConfig(rank_factor=0.25, period=2)  # no output target: total = 2 slots
  model = _llama()
  opt = losia_torch.get_losia_optimizer(model, cfg, lr=1e-2, pro=True, verbose=False)
  fwd = torch.compile(model, backend=counting_backend)
  g = torch.Generator().manual_seed(1)
  variants, per_round = set(), []
  rounds, per = 3, cfg.period * 2
  for r in range(rounds):
    for _ in range(per):
      variants.add(tuple(opt.profiles(t) for t in opt.plan.targets))
      ids = torch.randint(0, 64, (2, 8), generator=g)
      fwd(input_ids=ids, labels=ids).loss.backward()
      opt.step()
      opt.zero_grad()
    per_round.append(len(compiles))
  assert opt.losia_step == rounds * per
  # One graph per profiling variant (which layer profiles); later rounds reuse them.
  assert len(variants) == 2
  assert per_round[0] <= len(variants)
  assert per_round[-1] == per_round[0], per_round
