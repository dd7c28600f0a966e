"""get_losia_optimizer on transformers LLaMA-family models built from tiny configs."""

import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig
from losia_common.subnet import block_size

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def _model(kind, tied):
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
         "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
  torch.manual_seed(0)
  return cls[1](cls[0](tie_word_embeddings=tied, **TINY))


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", True),
                                       ("mistral", False)])
def test_finds_targets_and_reports(kind, tied, capsys):
  model = _model(kind, tied)
  cfg = LoSiAConfig(rank_factor=0.125, output_rank_factor=0.25, period=2)
  opt = losia_torch.get_losia_optimizer(model, cfg, lr=1e-2)
  report = capsys.readouterr().out
  plan = opt.plan
  assert len(plan.targets) == 15 and plan.num_layers == 2 and plan.total == 3
  out = [t for t in plan.targets if t.row_mode]
  assert len(out) == 1 and out[0].param is model.get_output_embeddings().weight
  assert out[0].name == ("model.embed_tokens.weight" if tied else "lm_head.weight")
  q = opt.target("model.layers.1.self_attn.q_proj.weight")
  assert (q.layer_id, q.identity, q.k_out, q.k_in) == (2, "layer1.self_attn.q_proj", 8, 8)
  k = opt.target("model.layers.0.self_attn.k_proj.weight")
  assert (k.d_out, k.k_out) == (32, 4)
  blocks = 2 * (2 * 8 * 8 + 2 * 4 * 8 + 3 * 16 * 8) + block_size(0.25, 128) * 64
  assert plan.trainable_block_params == blocks
  assert "15 target matrices" in report and f"{blocks:,}" in report
  assert opt.report in report
  if kind == "qwen2":  # q/k/v biases stay non-targets
    assert "model.layers.0.self_attn.q_proj.bias" in {n for n, _ in plan.non_targets}
  # it trains
  ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
  losses = []
  for _ in range(12):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
  assert losses[-1] < losses[0] - 0.5


def test_pro_flag_and_quiet(capsys):
  model = _model("llama", True)
  opt = losia_torch.get_losia_optimizer(model, LoSiAConfig(), pro=True, verbose=False)
  assert capsys.readouterr().out == ""
  assert "LoSiA-Pro: 14 of 14 targets" in opt.report
  with pytest.raises(TypeError, match="nn.Module"):
    losia_torch.get_losia_optimizer([("a", torch.zeros(1))])


@pytest.mark.parametrize("pro,output", [(False, 0.0), (True, 0.0), (True, 0.25)])
def test_freeze_mode_skips_non_target_gradients_and_trains_identically(pro, output):
  """non_target="freeze": the helper sets requires_grad=False on the non-targets, so
  autograd computes no gradient for them (e.g. the tied embedding's, when the output
  layer is not a target); the trajectory equals that of the optimizer alone, which
  discards those gradients."""
  cfg = LoSiAConfig(rank_factor=0.25, output_rank_factor=output, period=2, non_target="freeze")
  ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
  runs = []
  for helper in (True, False):
    model = _model("llama", True)
    if helper:
      opt = losia_torch.get_losia_optimizer(model, cfg, lr=1e-2, pro=pro, verbose=False)
      assert "requires_grad=False on" in opt.report
    else:
      opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2)
      if pro:
        opt.enable_pro(model)
    emb = model.get_input_embeddings().weight
    assert emb.requires_grad == (not helper or output > 0)
    frozen = {n for n, _ in opt.plan.non_targets}
    for _ in range(7):  # across relocalizations (total = 3 or 4 slots, period 2)
      model(input_ids=ids, labels=ids).loss.backward()
      grads = {n for n, p in model.named_parameters() if p.grad is not None}
      if helper:
        assert not grads & frozen
      opt.step()
      opt.zero_grad()
    runs.append({n: p.detach().clone() for n, p in model.named_parameters()})
  for n, w in runs[0].items():
    torch.testing.assert_close(w, runs[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_freeze_non_targets_argument_is_checked():
  with pytest.raises(ValueError, match='freeze_non_targets=True needs config.non_target="freeze"'):
    losia_torch.get_losia_optimizer(_model("llama", False), LoSiAConfig(non_target="train"),
                                    freeze_non_targets=True, verbose=False)
  with pytest.raises(TypeError, match="freeze_non_targets must be"):
    losia_torch.get_losia_optimizer(_model("llama", False), LoSiAConfig(non_target="freeze"),
                                    freeze_non_targets="yes", verbose=False)
  model = _model("llama", False)
  opt = losia_torch.get_losia_optimizer(model, LoSiAConfig(non_target="freeze"),
                                        freeze_non_targets=False, verbose=False)
  assert all(p.requires_grad for p in model.parameters()) and "requires_grad" not in opt.report
  model = _model("llama", False)
  losia_torch.get_losia_optimizer(model, LoSiAConfig(non_target="train"), verbose=False)
  assert all(p.requires_grad for p in model.parameters())
