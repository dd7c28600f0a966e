"""AMP: GradScaler unscales, clips and detects infs in LoSiA-Pro's compact gradients;
Pro under torch.autocast equals plain LoSiA under the same autocast."""

from __future__ import annotations

import math

import torch
import transformers

import losia_torch
from losia_torch import LoSiAConfig

CFG = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.1)
STEPS = 2 * CFG.period * 3 + 1  # total = 3: every slot relocalizes twice


def _llama(seed=0):
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))


def _run(pro: bool, *, scaler=None, autocast=False, max_norm=0.05, steps=STEPS):
  model = _llama()
  opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, pro=pro, verbose=False)
  g = torch.Generator().manual_seed(1)
  norms, indices = [], []
  for _ in range(steps):
    ids = torch.randint(0, 64, (2, 8), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      loss = model(input_ids=ids, labels=ids).loss
    if scaler is None:
      loss.backward()
      norms.append(float(opt.clip_grad_norm_(max_norm)))
      opt.step()
    else:
      scaler.scale(loss).backward()
      scaler.unscale_(opt)
      norms.append(float(opt.clip_grad_norm_(max_norm)))
      scaler.step(opt)
      scaler.update()
    opt.zero_grad()
    indices.append([opt.subnet(t.name)[0].tolist() + opt.subnet(t.name)[1].tolist()
                    for t in opt.plan.targets])
  return model, opt, norms, indices


def _same(a, b, rtol, atol):
  m0, o0, n0, i0 = a
  m1, o1, n1, i1 = b
  assert o0.losia_step == o1.losia_step
  assert i0 == i1
  torch.testing.assert_close(torch.tensor(n1), torch.tensor(n0), rtol=rtol, atol=atol)
  for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
    torch.testing.assert_close(p1, p0, rtol=rtol, atol=atol, msg=n)


def test_grad_scaler_unscales_pro_compact_gradients():
  ref = _run(False)  # fp32, no scaler, an active clip
  assert max(ref[2]) > 0.05
  plain = _run(False, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
  pro = _run(True, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
  _same(ref, plain, 1e-5, 1e-6)  # the scale is a power of two: unscaling is exact-ish
  _same(ref, pro, 1e-5, 1e-6)    # the clip saw unscaled compact gradients


def test_grad_scaler_skips_a_step_when_a_compact_gradient_overflows():
  model = _llama()
  opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, pro=True, verbose=False)
  opt.losia_step = 2 * CFG.period  # slot 2: layer 1 profiles, layer 0 does not
  opt.sync_pro_blocks()
  scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
  before = [p.detach().clone() for p in model.parameters()]
  ids = torch.randint(0, 64, (2, 8))
  scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
  block = model.model.layers[0].mlp.up_proj.losia_block
  assert block.delta.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is None
  block.delta.grad[0, 0] = math.inf  # only a compact gradient overflows
  scaler.unscale_(opt)
  scaler.step(opt)
  scaler.update()
  assert scaler.get_scale() < 2.0 ** 16  # the scaler saw the inf ...
  assert opt.losia_step == 2 * CFG.period  # ... and skipped the step
  for p0, p1 in zip(before, model.parameters()):
    assert torch.equal(p0, p1)


def test_pro_under_autocast_equals_plain_under_autocast():
  plain = _run(False, autocast=True)
  pro = _run(True, autocast=True)
  # bf16 matmuls of a block and of the full matrix may round differently.
  _same(plain, pro, 2e-3, 1e-4)


def _accelerate_run(pro: bool, steps=STEPS):
  import accelerate
  from accelerate.state import AcceleratorState
  # An earlier Trainer test in this process leaves an fp32 AcceleratorState behind;
  # a fresh process (as a user's script is) has none.
  AcceleratorState._reset_state(reset_partial_state=True)
  acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
  model = _llama()
  opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, pro=pro, verbose=False)
  model, aopt = acc.prepare(model, opt)
  g = torch.Generator().manual_seed(1)
  norms = []
  for _ in range(steps):
    ids = torch.randint(0, 64, (2, 8), generator=g)
    acc.backward(model(input_ids=ids, labels=ids).loss)
    acc.unscale_gradients()  # a no-op in bf16; with fp16 it unscales Pro's deltas too
    norms.append(float(opt.clip_grad_norm_(0.05)))
    aopt.step()
    aopt.zero_grad()
  return model, opt, norms, None


def test_accelerate_bf16_pro_equals_plain():
  plain, pro = _accelerate_run(False), _accelerate_run(True)
  assert plain[1].losia_step == pro[1].losia_step == STEPS
  for t in plain[1].plan.targets:
    assert torch.equal(plain[1].subnet(t.name)[0], pro[1].subnet(t.name)[0])
  torch.testing.assert_close(torch.tensor(pro[2]), torch.tensor(plain[2]), rtol=2e-3, atol=1e-4)
  for (n, p0), p1 in zip(plain[0].named_parameters(), pro[0].parameters()):
    torch.testing.assert_close(p1, p0, rtol=2e-3, atol=1e-4, msg=n)
