"""Tests of ``losia_cli.torch_backend`` (and the shared ``losia_cli.schedules``).

Everything runs on a tiny LLaMA built from a config and saved to a temporary
directory (and once written as a GGUF file), so nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np
import pytest
import torch
import transformers

from losia_cli.backend import Batch, ModelSource, TrainSettings
from losia_cli.schedules import lr_multiplier
from losia_cli.torch_backend import TorchBackend, masked_next_token_loss
from losia_common import LoSiAConfig

VOCAB, SEQ, BATCH = 64, 16, 4
# period 3 with 2 layers + output layer: a relocalization ends every third step.
LOSIA = LoSiAConfig(rank_factor=0.25, period=3, output_rank_factor=0.125)
METHODS = ("losia", "losia-pro", "full", "lora")


def tiny_config() -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[ModelSource, transformers.LlamaForCausalLM]:
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(tiny_config()).eval()
  path = str(tmp_path_factory.mktemp("tiny"))
  model.save_pretrained(path)
  return ModelSource("hf", path, "tiny"), model


@pytest.fixture(scope="module")
def source(tiny_model) -> ModelSource:
  return tiny_model[0]


def make_backend(source: ModelSource, s: TrainSettings) -> TorchBackend:
  # CPU even where CUDA exists: the resume tests compare bit for bit, and GPU
  # kernels (e.g. the embedding backward) need not be deterministic.
  return TorchBackend(source, s, device="cpu")


def settings(method: str, **kw) -> TrainSettings:
  base = TrainSettings(method=method, losia=LOSIA, lr=1e-2, lr_schedule="cosine", warmup_steps=2,
                       total_steps=40, weight_decay=0.01, max_grad_norm=1.0, lora_rank=4,
                       lora_alpha=8.0, seed=0, seq_len=SEQ, batch_size=BATCH)
  return dataclasses.replace(base, **kw)


def make_batch(seed: int) -> Batch:
  """Right-padded sequences of different lengths; the loss covers a response part."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((BATCH, SEQ), np.int32)
  attn = np.zeros((BATCH, SEQ), np.int32)
  mask = np.zeros((BATCH, SEQ), np.float32)
  for i in range(BATCH):
    n = int(rng.integers(8, SEQ + 1))
    prompt = int(rng.integers(2, n - 2))
    ids[i, :n] = rng.integers(3, VOCAB, n)
    attn[i, :n] = 1
    mask[i, prompt - 1:n - 1] = 1.0  # position t predicts ids[t + 1], a response token
  return Batch(ids, attn, mask)


def weights(backend: TorchBackend) -> dict[str, torch.Tensor]:
  return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


# --- the LR schedule -------------------------------------------------------------


def test_lr_multiplier_hand_computed():
  # warmup 4 of total 12: (s+1)/4 during warmup, then progress = (s-4)/8
  assert [lr_multiplier(s, "constant", 4, 12) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
  assert lr_multiplier(4, "linear", 4, 12) == 1.0
  assert lr_multiplier(6, "linear", 4, 12) == pytest.approx(0.75)
  assert lr_multiplier(11, "linear", 4, 12) == pytest.approx(0.125)
  assert lr_multiplier(12, "linear", 4, 12) == 0.0
  assert lr_multiplier(8, "cosine", 4, 12) == pytest.approx(0.5)
  assert lr_multiplier(6, "cosine", 4, 12) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
  assert lr_multiplier(12, "cosine", 4, 12) == pytest.approx(0.0)
  assert lr_multiplier(50, "cosine", 4, 12) == pytest.approx(0.0)
  assert lr_multiplier(0, "linear", 0, 10) == 1.0
  assert lr_multiplier(5, "linear", 0, 10) == 0.5
  assert lr_multiplier(3, "cosine", 10, 5) == 0.4  # warmup longer than the run
  with pytest.raises(ValueError, match="lr_schedule"):
    lr_multiplier(0, "step", 0, 10)


def test_reported_lr_follows_the_schedule(source):
  be = make_backend(source, settings("full", lr=0.1, lr_schedule="linear", warmup_steps=2,
                                     total_steps=6))
  lrs = [be.train_step(make_batch(0))["lr"] for _ in range(6)]
  want = [0.1 * lr_multiplier(s, "linear", 2, 6) for s in range(6)]
  np.testing.assert_allclose(lrs, want, rtol=1e-12)
  assert be.step == 6


# --- training ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(source, method):
  be = make_backend(source, settings(method, lr_schedule="constant", warmup_steps=0))
  batch = make_batch(0)
  out = [be.train_step(batch) for _ in range(20)]
  assert out[-1]["loss"] < out[0]["loss"] - 0.3, [o["loss"] for o in out]
  assert all({"loss", "lr", "grad_norm"} <= set(o) and "skipped" not in o for o in out)
  assert be.step == 20
  assert be.trainable_params() > 0
  text = be.describe()
  assert "tiny" in text and method in text and "estimate" not in text
  assert ("LoSiA-Pro" in text) == (method == "losia-pro")


def test_trainable_params_and_describe_before_a_step(source):
  full = make_backend(source, settings("full"))
  n = sum(p.numel() for p in full.model.parameters())
  assert full.trainable_params() == n and "estimate" in full.describe()
  losia = make_backend(source, settings("losia"))
  plan = losia.losia_opt.plan
  assert losia.trainable_params() == plan.trainable_block_params + plan.non_target_params
  frozen = make_backend(source, settings("losia", losia=LOSIA.replace(non_target="freeze")))
  assert frozen.trainable_params() == plan.trainable_block_params
  lora = make_backend(source, settings("lora"))
  # 2 layers x (q, o: 32x32; k, v: 16x32; gate, up, down: 64x32), each r * (d_in + d_out)
  assert lora.trainable_params() == 2 * 4 * (2 * (32 + 32) + 2 * (16 + 32) + 3 * (64 + 32))
  assert full.max_positions == 128 and full.vocab_size == VOCAB and full.name == "torch"


def test_clipping_off_reports_no_grad_norm(source):
  out = make_backend(source, settings("losia", max_grad_norm=0.0)).train_step(make_batch(0))
  assert "grad_norm" not in out and np.isfinite(out["loss"])


def test_loss_masking_matches_a_hand_computation(source):
  be = make_backend(source, settings("full"))
  batch = make_batch(3)
  with torch.no_grad():
    logits = be.model(input_ids=torch.as_tensor(batch.input_ids, dtype=torch.int64),
                      attention_mask=torch.as_tensor(batch.attention_mask,
                                                     dtype=torch.int64)).logits.double()
  logp = torch.log_softmax(logits, -1)
  total, count = 0.0, 0.0
  for b in range(BATCH):
    for t in range(SEQ - 1):
      if batch.loss_mask[b, t]:
        total -= float(logp[b, t, int(batch.input_ids[b, t + 1])])
        count += 1
  want = total / count
  got = masked_next_token_loss(logits.float(), torch.as_tensor(batch.input_ids, dtype=torch.int64),
                               torch.as_tensor(batch.loss_mask))
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert be.train_step(batch)["loss"] == pytest.approx(want, rel=1e-5)  # loss before the update
  empty = masked_next_token_loss(logits.float(), torch.zeros((BATCH, SEQ), dtype=torch.int64),
                                 torch.zeros((BATCH, SEQ)))
  assert float(empty) == 0.0


@pytest.mark.parametrize("method", ["losia", "full"])
def test_non_finite_loss_skips_the_step(source, method):
  be = make_backend(source, settings(method))
  with torch.no_grad():
    be.base_model.model.norm.weight[0] = float("nan")
  before = weights(be)
  out = be.train_step(make_batch(0))
  assert out["skipped"] == 1.0 and not np.isfinite(out["loss"])
  after = weights(be)
  for k in before:  # nothing moved (NaN stays NaN)
    assert torch.equal(before[k].nan_to_num(7.0), after[k].nan_to_num(7.0)), k
  assert be.step == 1


# --- LoSiA subnets -----------------------------------------------------------------


def test_losia_subnets(source):
  be = make_backend(source, settings("losia"))
  sub = be.subnets()
  roles = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
  assert set(sub) == {f"layer{i}.{r}" for i in range(2) for r in roles} | {"output"}
  # rank_factor 0.25: k = floor(0.25 d); q is 32x32, k 16x32, up 64x32, down 32x64
  assert [len(x) for x in sub["layer0.self_attn.q_proj"]] == [8, 8]
  assert [len(x) for x in sub["layer1.self_attn.k_proj"]] == [4, 8]
  assert [len(x) for x in sub["layer0.mlp.up_proj"]] == [16, 8]
  assert [len(x) for x in sub["layer0.mlp.down_proj"]] == [8, 16]
  rows, cols = sub["output"]  # row mode: 0.125 * 64 rows, every column
  assert len(rows) == 8 and np.array_equal(cols, np.arange(32))
  assert all(r.dtype.kind == "i" and c.dtype.kind == "i" for r, c in sub.values())
  # Each layer relocalizes at the end of its profiling window: in 9 steps
  # (3 windows of 3) every layer, the output layer included, does once.
  for _ in range(9):
    be.train_step(make_batch(0))
  later = be.subnets()
  for key in ("output", "layer0.self_attn.q_proj", "layer1.mlp.down_proj"):
    r0, c0 = sub[key]
    r1, c1 = later[key]
    same = np.array_equal(np.sort(r0), np.sort(r1)) and np.array_equal(np.sort(c0), np.sort(c1))
    assert not same, key
  assert make_backend(source, settings("full")).subnets() is None
  assert make_backend(source, settings("lora")).subnets() is None


@pytest.mark.parametrize("method", ["losia", "lora"])
def test_bad_target_modules(source, method):
  bad = settings(method, losia=LoSiAConfig(target_modules=("nope",)))
  with pytest.raises(ValueError, match="target_modules"):
    make_backend(source, bad)


# --- checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_resume_gives_the_same_trajectory(source, tmp_path, method):
  """2N steps straight == N steps, save, a fresh backend, restore, N steps.

  N = 4 with period 3: the checkpoint falls inside a profiling window (its
  importance buffers are live) and relocalizations follow the restore.
  """
  n = 4
  batches = [make_batch(i) for i in range(2 * n)]
  s = settings(method, total_steps=2 * n)
  straight = make_backend(source, s)
  want = [straight.train_step(b)["loss"] for b in batches]

  first = make_backend(source, s)
  got = [first.train_step(b)["loss"] for b in batches[:n]]
  first.save_checkpoint(str(tmp_path / "ckpt"))
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["backend.json", "model.safetensors",
                                                   "optimizer.pt"]
  resumed = make_backend(source, s)
  resumed.restore_checkpoint(str(tmp_path / "ckpt"))
  assert resumed.step == n
  got += [resumed.train_step(b)["loss"] for b in batches[n:]]
  assert got == want
  a, b = weights(straight), weights(resumed)
  assert a.keys() == b.keys()
  for k in a:
    assert torch.equal(a[k], b[k]), k
  if method.startswith("losia"):
    for key, (r, c) in straight.subnets().items():
      r2, c2 = resumed.subnets()[key]
      assert np.array_equal(r, r2) and np.array_equal(c, c2), key
    assert resumed.losia_opt.losia_step == straight.losia_opt.losia_step == 2 * n


def test_restore_refuses_another_method(source, tmp_path):
  be = make_backend(source, settings("full"))
  be.train_step(make_batch(0))
  be.save_checkpoint(str(tmp_path / "ckpt"))
  with pytest.raises(ValueError, match="method"):
    make_backend(source, settings("losia")).restore_checkpoint(str(tmp_path / "ckpt"))
  with pytest.raises(FileExistsError):
    be.save_checkpoint(str(tmp_path / "ckpt"))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
  with torch.no_grad():
    return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["losia-pro", "lora"])
def test_export_reloads_with_the_same_logits(source, tmp_path, method):
  be = make_backend(source, settings(method))
  for i in range(4):
    be.train_step(make_batch(i))
  ids = torch.as_tensor(make_batch(9).input_ids, dtype=torch.int64)
  be.model.eval()
  want = logits_of(be.model, ids)
  be.export_hf(str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"),
                                                               dtype=torch.float32)
  assert type(reloaded) is transformers.LlamaForCausalLM
  torch.testing.assert_close(logits_of(reloaded, ids), want, atol=1e-5, rtol=0)
  # The export leaves the training state alone (LoRA merges a copy).
  torch.testing.assert_close(logits_of(be.model, ids), want, atol=0, rtol=0)
  assert be.train_step(make_batch(5))["loss"] > 0


# --- generation --------------------------------------------------------------------


def greedy_reference(model, prompt: list[int], n: int, eos) -> list[int]:
  """Greedy decoding by full forwards over the unpadded sequence, no cache."""
  seq = list(prompt)
  out = []
  for _ in range(n):
    nxt = int(logits_of(model, torch.tensor([seq]))[0, -1].argmax())
    if nxt == eos:
      break
    out.append(nxt)
    seq.append(nxt)
  return out


@pytest.mark.parametrize("method", ["full", "lora"])
def test_generate_matches_a_manual_greedy_loop(source, method):
  be = make_backend(source, settings(method))
  for i in range(3):  # move away from the initial weights (and LoRA's B = 0)
    be.train_step(make_batch(i))
  prompts = [[5, 9, 17, 33, 4, 12, 60], [7], [3, 3, 40, 21]]
  be.model.eval()
  want = [greedy_reference(be.model, p, 6, None) for p in prompts]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. about sampling flags of the generation config
    assert be.generate(prompts, 6, None) == want
  assert all(len(w) == 6 for w in want)
  # EOS: take a token the first continuation produces; output stops before it.
  eos = want[0][3]
  got = be.generate(prompts, 6, eos)
  assert got == [greedy_reference(be.model, p, 6, eos) for p in prompts]
  assert got[0] == want[0][:want[0].index(eos)]


# --- GGUF --------------------------------------------------------------------------


def write_gguf(model: transformers.LlamaForCausalLM, path: str) -> None:
  """Writes ``model`` (tied embeddings) as an F32 llama GGUF file, as llama.cpp would."""
  import gguf
  cfg = model.config
  w = gguf.GGUFWriter(path, "llama")
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(10000.0)
  w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  w.add_tokenizer_model("llama")
  w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
  w.add_token_scores([0.0] * cfg.vocab_size)
  w.add_token_types([1] * cfg.vocab_size)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)

  def permute(x, heads):  # llama.cpp's rotary layout of q and k
    return x.reshape(heads, 2, x.shape[0] // heads // 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)

  names = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight"}
  for i in range(cfg.num_hidden_layers):
    for hf, gg in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                   ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                   ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                   ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                   ("post_attention_layernorm", "ffn_norm")]:
      names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
  sd = model.state_dict()
  for hf, gg in names.items():
    x = sd[hf].numpy().astype(np.float32)
    if gg.endswith("attn_q.weight"):
      x = permute(x, cfg.num_attention_heads)
    elif gg.endswith("attn_k.weight"):
      x = permute(x, cfg.num_key_value_heads)
    w.add_tensor(gg, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_source_trains_and_exports(tiny_model, tmp_path):
  pytest.importorskip("gguf")
  _, model = tiny_model
  path = str(tmp_path / "tiny.gguf")
  write_gguf(model, path)
  be = make_backend(ModelSource("gguf", path, "tiny (GGUF F32)"),
                    settings("losia", lr_schedule="constant", warmup_steps=0))
  assert "quantization_config" not in be.base_model.config.to_dict()
  ids = torch.as_tensor(make_batch(9).input_ids, dtype=torch.int64)
  torch.testing.assert_close(logits_of(be.model, ids), logits_of(model, ids), atol=1e-5, rtol=0)
  losses = [be.train_step(make_batch(0))["loss"] for _ in range(6)]
  assert losses[-1] < losses[0]
  be.model.eval()
  be.export_hf(str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"),
                                                               dtype=torch.float32)
  assert "quantization_config" not in reloaded.config.to_dict()
  torch.testing.assert_close(logits_of(reloaded, ids), logits_of(be.model, ids), atol=1e-5, rtol=0)


def test_a_jax_only_method_is_refused_by_the_backend_itself(tiny_model):
  """Callers that bypass the CLI's check must not fall into another method's branch."""
  source, _ = tiny_model
  with pytest.raises(ValueError, match="'galore' runs on the jax backend"):
    TorchBackend(source, settings("galore"))
