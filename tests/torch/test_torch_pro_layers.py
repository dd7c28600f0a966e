"""LoSiA-Pro as layer classes swapped into the model: checkpoints, hooks, restore, no
reference from the model to the optimizer, refusals."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig

transformers = pytest.importorskip("transformers")

CFG = LoSiAConfig(rank_factor=0.25, period=2)


def _llama(seed=0):
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))


def _train(model, opt, steps, seed=1):
  g = torch.Generator().manual_seed(seed)
  for _ in range(steps):
    ids = torch.randint(0, 64, (2, 8), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def _ids():
  return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(7))


def test_checkpoints_load_across_pro_and_plain_models(tmp_path):
  plain = _llama()
  keys = list(plain.state_dict())
  model = _llama()
  opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, pro=True, verbose=False)
  q = model.model.layers[0].self_attn.q_proj
  assert isinstance(q, torch.nn.Linear) and isinstance(q, losia_torch.ProLayer)
  assert list(model.state_dict()) == keys  # the same keys, in the same order
  _train(model, opt, 3)
  # A checkpoint saved from the Pro model loads into a plain one ...
  model.save_pretrained(tmp_path / "pro")
  loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pro")
  assert not any(isinstance(m, losia_torch.ProLayer) for m in loaded.modules())
  for k, v in model.state_dict().items():
    assert torch.equal(loaded.state_dict()[k], v), k
  with torch.no_grad():
    torch.testing.assert_close(loaded(input_ids=_ids()).logits, model(input_ids=_ids()).logits,
                               rtol=0, atol=0)
  # ... and one saved from a plain model loads into the Pro model, in place (the
  # optimizer keeps its parameters) and with the same key check as a plain model.
  other = _llama(seed=3)
  other.save_pretrained(tmp_path / "plain")
  from safetensors.torch import load_file
  sd = load_file(tmp_path / "plain" / "model.safetensors")
  assert model.load_state_dict(sd, strict=False) == plain.load_state_dict(sd, strict=False)
  model.load_state_dict(other.state_dict())  # strict
  for k, v in other.state_dict().items():
    assert torch.equal(model.state_dict()[k], v), k
  assert all(t.param is p for t, p in zip(opt.plan.targets,
                                          [model.get_parameter(t.name) for t in opt.plan.targets]))
  _train(model, opt, 1)  # Pro still trains the loaded weights
  assert opt.losia_step == 4


def test_forward_hooks_on_target_modules_keep_working():
  calls = []

  def scale_input(mod, args):  # a pre-hook that changes the input, as PEFT-style hooks do
    calls.append("pre")
    return (args[0] * 2.0,)

  def record_output(mod, args, out):
    calls.append(("post", tuple(out.shape)))

  runs = []
  for pro in (False, True):
    model = _llama()
    q = model.model.layers[1].self_attn.q_proj
    q.register_forward_pre_hook(scale_input)  # before Pro is switched on
    opt = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2)
    if pro:
      opt.enable_pro(model)
      assert isinstance(q, losia_torch.ProLayer) and model.model.layers[1].self_attn.q_proj is q
    handle = q.register_forward_hook(record_output)  # after
    calls.clear()
    out = model(input_ids=_ids(), labels=_ids())
    out.loss.backward()
    assert calls == ["pre", ("post", (2, 8, 32))]
    t = opt.target("model.layers.1.self_attn.q_proj.weight")
    assert not opt.profiles(t)  # step 0: layer 0 profiles; layer 1 runs Pro's backward
    if pro:
      assert q.weight.grad is None
      grad = q.losia_block.delta.grad
    else:
      rows, cols = opt.subnet(t.name)
      grad = q.weight.grad[rows[:, None], cols[None, :]]
    runs.append((out.logits.detach(), grad.clone()))
    handle.remove()
    calls.clear()
    with torch.no_grad():
      model(input_ids=_ids())
    assert calls == ["pre"]
    if pro:
      opt.disable_pro()
      with torch.no_grad():
        model(input_ids=_ids())
      assert calls == ["pre", "pre"]  # the hook stays after the class goes back
  torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)
  torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-7)


def test_accelerate_hooks_added_after_pro():
  hooks = pytest.importorskip("accelerate.hooks")

  class Count(hooks.ModelHook):
    n = 0

    def pre_forward(self, module, *args, **kwargs):
      Count.n += 1
      return args, kwargs

  model = _llama()
  opt = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2)
  opt.enable_pro(model)
  up = model.model.layers[1].mlp.up_proj
  hooks.add_hook_to_module(up, Count())
  model(input_ids=_ids(), labels=_ids()).loss.backward()
  assert Count.n == 1 and up.weight.grad is None and up.losia_block.delta.grad is not None
  opt.zero_grad()
  opt.disable_pro()  # the hook's saved forward (Pro's) now runs the ordinary one
  model(input_ids=_ids(), labels=_ids()).loss.backward()
  assert Count.n == 2 and up.weight.grad is not None
  hooks.remove_hook_from_module(up)
  model.zero_grad()
  model(input_ids=_ids(), labels=_ids()).loss.backward()
  assert Count.n == 2 and up.weight.grad is not None


def test_a_forward_replaced_before_pro_is_refused():
  hooks = pytest.importorskip("accelerate.hooks")
  model = _llama()
  hooks.add_hook_to_module(model.model.layers[0].mlp.down_proj, hooks.ModelHook())
  opt = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight \(its forward "
                                       r"is replaced on the instance"):
    opt.enable_pro(model)
  assert not opt.pro_blocks  # refused before switching any
  assert not any(isinstance(m, losia_torch.ProLayer) for m in model.modules())


def test_disable_pro_restores_the_original_modules():
  model = _llama()
  before = {n: (m, type(m), sorted(m.__dict__)) for n, m in model.named_modules()}
  opt = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2)
  names = opt.enable_pro(model)
  assert len(names) == 14
  assert type(model.model.layers[0].mlp.gate_proj) is losia_torch.pro.ProLinear
  assert "ProLinear(in_features=32, out_features=64" in repr(model)
  _train(model, opt, 2)
  opt.disable_pro()
  after = {n: (m, type(m), sorted(m.__dict__)) for n, m in model.named_modules()}
  assert after == before  # same objects, classes and attributes
  assert not opt.pro_blocks and all(len(g["params"]) == len(g["param_names"])
                                    for g in opt.param_groups)
  assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
  assert len(opt.enable_pro(model)) == 14  # and it can be switched on again


def test_conv1d_targets_get_their_class_back():
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16))
  conv = type(model.transformer.h[0].attn.c_attn)
  opt = losia_torch.LoSiAOptimizer(model, LoSiAConfig(target_modules=("c_attn", "c_fc")))
  assert len(opt.enable_pro(model)) == 4
  pro = model.transformer.h[0].attn.c_attn
  assert type(pro).__name__ == "ProConv1D" and isinstance(pro, conv)
  opt.disable_pro()
  assert type(model.transformer.h[0].attn.c_attn) is conv


def test_the_model_holds_no_reference_to_the_optimizer():
  model = _llama()
  opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, pro=True, verbose=False)
  _train(model, opt, 1)
  ref = weakref.ref(opt)
  del opt
  gc.collect()
  assert ref() is None
  model(input_ids=_ids(), labels=_ids()).loss.backward()  # the Pro layers still run alone


def test_what_pro_cannot_switch_is_refused():
  model = _llama()
  opt = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2)
  opt.enable_pro(model)
  other = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2)
  with pytest.raises(ValueError, match="already a LoSiA-Pro layer of another optimizer"):
    other.enable_pro(model)
  opt.disable_pro()
  other.enable_per_layer_step()
  with pytest.raises(ValueError, match="per-layer stepping"):
    other.enable_pro(model)
  other.disable_per_layer_step()
  # Two modules sharing one weight: Pro would see only one module's gradient.
  model = _llama()
  layer = model.model.layers[0].self_attn
  twin = torch.nn.Linear(32, 32, bias=False)
  twin.weight = layer.q_proj.weight
  model.twin = twin
  opt = losia_torch.LoSiAOptimizer(model, CFG, lr=1e-2)
  with pytest.raises(ValueError, match=r"q_proj\.weight \(shared by modules "
                                       r"model\.layers\.0\.self_attn\.q_proj, twin\)"):
    opt.enable_pro(model)
