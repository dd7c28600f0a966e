"""Hugging Face conversion and IO of the NNX LLaMA model: round trips, errors, GGUF."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from losia_jax.models import (
  LlamaForCausalLM,
  ModelConfig,
  from_hf_state_dict,
  load_gguf,
  load_hf,
  save_hf,
  to_hf_state_dict,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _ids(vocab, shape=(2, 10), seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@nnx.jit
def _forward(model, ids):
  return model(ids)


def _numpy_sd(torch_model, tied):
  """The state dict as safetensors files hold it (no tied ``lm_head.weight``)."""
  sd = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
  if tied:
    sd.pop("lm_head.weight")
  return sd


@pytest.mark.parametrize("kind,overrides", [
    ("llama", dict(attention_bias=True, mlp_bias=True)),
    ("llama", dict(tie_word_embeddings=True)),
    ("qwen2", dict()),
])
def test_state_dict_round_trip_is_exact(kind, overrides, tiny_hf):
  hf_config, torch_model = tiny_hf(kind, seed=2, **overrides)
  sd = _numpy_sd(torch_model, hf_config.tie_word_embeddings)
  back = to_hf_state_dict(from_hf_state_dict(hf_config, sd))
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  # A model given instead of a config is filled in place.
  model = LlamaForCausalLM(hf_config, rngs=nnx.Rngs(0))
  assert from_hf_state_dict(model, sd) is model
  assert all(np.array_equal(v, sd[k]) for k, v in to_hf_state_dict(model).items())


def test_tied_lm_head_and_buffers_are_accepted(tiny_hf):
  hf_config, torch_model = tiny_hf("llama", tie_word_embeddings=True)
  sd = dict(torch_model.state_dict())  # torch lists the tied lm_head.weight too
  sd["model.rotary_emb.inv_freq"] = torch.ones(4)
  model = from_hf_state_dict(hf_config, sd)
  assert "lm_head.weight" not in to_hf_state_dict(model)
  sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    from_hf_state_dict(hf_config, sd)


def test_param_dtype_bfloat16(tiny_hf):
  hf_config, torch_model = tiny_hf("llama")
  model = from_hf_state_dict(hf_config, torch_model.state_dict(), dtype=jnp.bfloat16)
  assert model.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  logits = _forward(model, jnp.asarray(_ids(hf_config.vocab_size)))
  assert logits.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits, np.float32)).all()


@pytest.mark.parametrize("tied", [True, False])
def test_save_hf_loads_in_transformers(tied, tiny_hf, hf_logits, tmp_path):
  hf_config, torch_model = tiny_hf("llama", seed=3, tie_word_embeddings=tied,
                                   num_key_value_heads=1)
  model = from_hf_state_dict(hf_config, torch_model.state_dict())
  ids = _ids(hf_config.vocab_size)
  out = tmp_path / "ckpt"
  save_hf(model, hf_config, str(out))
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(out), output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  ref = hf_logits(torch_model, ids)
  got = hf_logits(reloaded.eval(), ids)
  assert np.abs(got - ref).max() <= TOL
  assert np.abs(np.asarray(_forward(model, jnp.asarray(ids))) - got).max() <= TOL


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", dict(qkv_bias=True, head_dim=16)),
    ("llama", dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                   rope_type="llama3", rope_scaling=(
                       ("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                       ("original_max_position_embeddings", 64.0)))),
])
def test_save_hf_derives_the_transformers_config(model_type, extra, hf_logits, tmp_path):
  config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       head_dim=extra.pop("head_dim", 8), model_type=model_type, **extra)
  model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
  save_hf(model, None, str(tmp_path / "ckpt"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt")).eval()
  assert reloaded.config.model_type == model_type
  ids = _ids(64)
  diff = np.abs(np.asarray(_forward(model, jnp.asarray(ids))) - hf_logits(reloaded, ids))
  assert diff.max() <= TOL


def test_save_hf_refuses_existing_dir_and_overwrites_atomically(tiny_hf, tmp_path):
  hf_config, torch_model = tiny_hf("llama")
  model = from_hf_state_dict(hf_config, torch_model.state_dict())
  out = tmp_path / "ckpt"
  out.mkdir()
  (out / "stale.txt").write_text("old")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    save_hf(model, hf_config, str(out))
  save_hf(model, hf_config, str(out), overwrite=True)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
  other = transformers.LlamaConfig(**{**hf_config.to_dict(), "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="hidden_act"):
    save_hf(model, other, str(tmp_path / "other"))


@pytest.mark.parametrize("shard", [False, True])
def test_load_hf_of_save_pretrained(shard, tiny_hf, hf_logits, tmp_path):
  hf_config, torch_model = tiny_hf("qwen2", seed=4, tie_word_embeddings=True)
  kw = {"max_shard_size": "20KB"} if shard else {}
  torch_model.save_pretrained(str(tmp_path), **kw)
  assert os.path.isfile(tmp_path / "model.safetensors.index.json") == shard
  model, cfg = load_hf(str(tmp_path))
  assert cfg.model_type == "qwen2" and model.config == ModelConfig.from_hf(hf_config)
  ids = _ids(hf_config.vocab_size)
  diff = np.abs(np.asarray(_forward(model, jnp.asarray(ids))) - hf_logits(torch_model, ids))
  assert diff.max() <= TOL


def test_load_hf_bfloat16_checkpoint(tiny_hf, tmp_path):
  _, torch_model = tiny_hf("llama")
  torch_model.to(torch.bfloat16).save_pretrained(str(tmp_path))
  model, _ = load_hf(str(tmp_path))
  want = torch_model.model.layers[0].mlp.up_proj.weight.detach().float().numpy().T
  got = np.asarray(model.model.layers[0].mlp.up_proj.kernel[...])
  assert got.dtype == np.float32 and np.array_equal(got, want)


# -------------------------------------------------------------------- errors


def test_missing_unexpected_and_misshapen_keys(tiny_hf):
  hf_config, torch_model = tiny_hf("llama")
  sd = _numpy_sd(torch_model, False)
  missing = dict(sd)
  del missing["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
    from_hf_state_dict(hf_config, missing)
  extra = dict(sd, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})
  with pytest.raises(ValueError,
                     match=r"unexpected keys \['model.layers.0.self_attn.q_proj.bias'\]"):
    from_hf_state_dict(hf_config, extra)
  bad = dict(sd, **{"model.norm.weight": np.ones(31, np.float32)})
  with pytest.raises(ValueError, match=r"model.norm.weight: got \(31,\), expected \(32,\)"):
    from_hf_state_dict(hf_config, bad)


def test_load_hf_bad_directories(tiny_hf, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf(str(tmp_path))
  hf_config, _ = tiny_hf("llama")
  hf_config.save_pretrained(str(tmp_path))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"no safetensors weights.*pytorch_model.bin"):
    load_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
    load_hf(str(tmp_path))


def test_unsupported_architectures_are_named():
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=4)
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
    ModelConfig.from_hf(transformers.GPT2Config())
  dynamic = transformers.LlamaConfig(**base, rope_parameters={
      "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
  with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
    ModelConfig.from_hf(dynamic)
  with pytest.raises(ValueError, match="unsupported hidden_act 'tanh'"):
    ModelConfig.from_hf(transformers.LlamaConfig(**base, hidden_act="tanh"))
  with pytest.raises(ValueError, match="sliding_window=4096"):
    ModelConfig.from_hf(transformers.MistralConfig(**base))
  sliding = transformers.Qwen2Config(**base, use_sliding_window=True, sliding_window=16,
                                     max_window_layers=0)
  with pytest.raises(ValueError, match="sliding_window=16"):
    ModelConfig.from_hf(sliding)
  # Full attention despite a window field: accepted.
  ModelConfig.from_hf(transformers.MistralConfig(**base, sliding_window=None))
  ModelConfig.from_hf(transformers.Qwen2Config(**base, use_sliding_window=False))


def test_load_gguf_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_gguf(str(tmp_path / "model.gguf"))


# ------------------------------------------------------ real pretrained model


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_gguf_path, record_property):
  directory, name = os.path.split(smollm2_gguf_path)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=name, dtype=torch.float32).eval()
  model, hf_config = load_gguf(smollm2_gguf_path)
  assert hf_config.model_type == "llama" and model.config.tie_word_embeddings
  ids = np.array([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28,
                   7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 10576, 2]], np.int32)
  with torch.no_grad():
    ref = ref_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    # fp64 logits of the same weights: how far each fp32 implementation is from exact.
    exact = ref_model.double()(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  got = np.asarray(_forward(model, jnp.asarray(ids)))
  diff = float(np.abs(got - ref).max())
  ours, theirs = float(np.abs(got - exact).max()), float(np.abs(ref - exact).max())
  for key, value in [("max_abs_diff", diff), ("logit_scale", float(np.abs(ref).max())),
                     ("jax_vs_fp64", ours), ("torch_vs_fp64", theirs)]:
    record_property(key, value)
  assert diff <= TOL, (f"SmolLM2 max abs logit diff {diff} (logits up to {np.abs(ref).max():.1f}; "
                       f"error vs fp64: jax {ours}, torch {theirs})")
  assert ours <= 2 * theirs, f"jax fp32 error {ours} vs torch fp32 error {theirs} (fp64 reference)"
  assert np.array_equal(got.argmax(-1), ref.argmax(-1))
