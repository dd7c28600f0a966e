"""Hugging Face weight conversion and IO for :class:`LlamaForCausalLM`.

The NNX parameter paths mirror the HF module tree, so the HF key of a leaf is
its path with the leaf renamed (``kernel``/``embedding``/``scale`` become
``weight``) and kernels transposed from ``[in, out]`` to PyTorch's
``[out, in]``. Reading safetensors needs only numpy; ``load_gguf`` alone
imports torch, through transformers' GGUF loader.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from losia_jax.models.llama import SUPPORTED_MODEL_TYPES, LlamaForCausalLM, ModelConfig
from losia_jax.targets import path_components

# Leaf renames NNX -> HF; kernels are also transposed.
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Non-persistent buffers some checkpoints still carry; never weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def hf_key(components: Sequence[str]) -> str:
  """HF state-dict key of an NNX parameter path (``.value`` already dropped)."""
  *module, leaf = components
  if leaf not in _LEAF_TO_HF:
    raise ValueError(f"no HF name for parameter leaf {leaf!r} in {'.'.join(components)}")
  return ".".join([*module, _LEAF_TO_HF[leaf]])


def _param_leaves(model: LlamaForCausalLM) -> list[tuple[tuple[str, ...], Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
  return [(path_components(p), x) for p, x in flat]


def to_hf_state_dict(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
  """The HF state dict of ``model`` (numpy, parameter dtype, PyTorch layout).

  For tied embeddings there is no ``lm_head.weight``, as in the safetensors
  files ``save_pretrained`` writes.
  """
  out = {}
  for comps, x in _param_leaves(model):
    arr = np.asarray(jax.device_get(x))
    if comps[-1] == "kernel":
      arr = arr.T
    out[hf_key(comps)] = np.ascontiguousarray(arr)
  return out


def _to_numpy(x: Any) -> np.ndarray:
  """numpy view of a numpy array or a torch tensor (bf16 goes through fp32)."""
  if hasattr(x, "detach"):  # a torch tensor; torch is not imported here.
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def _ignored(key: str) -> bool:
  return key.endswith(_IGNORED_SUFFIXES)


def from_hf_state_dict(model_or_config: Any, state_dict: Mapping[str, Any], *,
                       dtype: Any = jnp.float32, param_dtype: Any = None,
                       rngs: nnx.Rngs | None = None) -> LlamaForCausalLM:
  """Loads HF weights (numpy arrays or torch tensors) into a model.

  Args:
    model_or_config: a :class:`LlamaForCausalLM` (filled in place and returned),
      or a :class:`ModelConfig` / ``transformers`` config to build one from
      (abstractly, so no random initialisation is computed).
    state_dict: HF keys to arrays; ``lm_head.weight`` of a tied model is
      accepted when it equals the embedding; ``rotary_emb.inv_freq`` buffers
      are ignored.
    dtype, param_dtype: compute and parameter dtype of a newly built model
      (``param_dtype`` defaults to ``dtype``); ignored when a model is given.

  Raises:
    ValueError: listing missing keys, unexpected keys or shape mismatches.
  """
  if isinstance(model_or_config, LlamaForCausalLM):
    model = model_or_config
  else:
    config = ModelConfig.from_hf(model_or_config)
    param_dtype = dtype if param_dtype is None else param_dtype
    # Built abstractly: only shapes and dtypes, the weights come from state_dict.
    model = nnx.eval_shape(
        lambda r: LlamaForCausalLM(config, rngs=r, dtype=dtype, param_dtype=param_dtype),
        rngs if rngs is not None else nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = [hf_key(path_components(p)) for p, _ in flat]
  given = {k: v for k, v in state_dict.items() if not _ignored(k)}
  tied = model.config.tie_word_embeddings
  if tied and "lm_head.weight" in given and "lm_head.weight" not in keys:
    head = _to_numpy(given.pop("lm_head.weight"))
    emb = given.get("model.embed_tokens.weight")
    if emb is not None and not np.array_equal(head, _to_numpy(emb)):
      raise ValueError("lm_head.weight differs from model.embed_tokens.weight although "
                       "tie_word_embeddings=True")
  missing = [k for k in keys if k not in given]
  unexpected = sorted(set(given) - set(keys))
  if missing or unexpected:
    raise ValueError(f"state dict does not match the model: missing keys {missing}, "
                     f"unexpected keys {unexpected}")
  leaves, bad = [], []
  for (path, ref), key in zip(flat, keys):
    arr = _to_numpy(given[key])
    transpose = path_components(path)[-1] == "kernel"
    want = tuple(reversed(ref.shape)) if transpose else tuple(ref.shape)
    if tuple(arr.shape) != want:
      bad.append(f"{key}: got {tuple(arr.shape)}, expected {want}")
      continue
    leaves.append(jnp.asarray(arr.T if transpose else arr, dtype=ref.dtype))
  if bad:
    raise ValueError("shape mismatch: " + "; ".join(bad))
  new_state = jax.tree_util.tree_unflatten(treedef, leaves)
  if model is model_or_config:
    nnx.update(model, new_state)
    return model
  return nnx.merge(graphdef, new_state)


def _read_safetensors(directory: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  single = os.path.join(directory, SAFETENSORS_FILE)
  index = os.path.join(directory, SAFETENSORS_INDEX)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise FileNotFoundError(f"{SAFETENSORS_INDEX} in {directory} names missing shards: {absent}")
  else:
    others = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".gguf")))
    raise FileNotFoundError(
        f"no safetensors weights in {directory} (expected {SAFETENSORS_FILE} or "
        f"{SAFETENSORS_INDEX})" + (f"; found {others}" if others else ""))
  out = {}
  for path in files:
    with safe_open(path, framework="np") as f:
      for key in f.keys():
        out[key] = f.get_tensor(key)
  return out


def load_hf(directory: str, *, dtype: Any = jnp.float32, param_dtype: Any = None,
            rngs: nnx.Rngs | None = None) -> tuple[LlamaForCausalLM, Any]:
  """Loads a local HF checkpoint directory (``config.json`` + safetensors).

  Returns:
    ``(model, hf_config)``; parameters in ``param_dtype`` (default ``dtype``).

  Raises:
    FileNotFoundError: the directory, ``config.json`` or the weights are missing.
    ValueError: unsupported ``model_type`` or architecture, or keys that do not
      match.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no config.json in checkpoint directory {directory!r}")
  with open(config_path, encoding="utf-8") as f:
    model_type = json.load(f).get("model_type")
  # Checked before AutoConfig, which would reject unknown types with a vaguer message.
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r} in {config_path}; supported: "
                     + ", ".join(SUPPORTED_MODEL_TYPES))
  import transformers  # pylint: disable=import-outside-toplevel
  hf_config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
  config = ModelConfig.from_hf(hf_config)
  weights = _read_safetensors(directory)
  model = from_hf_state_dict(config, weights, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return model, hf_config


def load_gguf(path: str, *, dtype: Any = jnp.float32,
              param_dtype: Any = None) -> tuple[LlamaForCausalLM, Any]:
  """Loads a GGUF file through transformers (dequantised to fp32 by its loader).

  Needs ``torch`` and ``gguf``; imported here only.

  Returns:
    ``(model, hf_config)``.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist")
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  directory, name = os.path.split(os.path.abspath(path))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=name, dtype=torch.float32)
  hf_config = hf_model.config
  model = from_hf_state_dict(hf_config, hf_model.state_dict(), dtype=dtype,
                             param_dtype=param_dtype)
  del hf_model
  return model, hf_config


def to_hf_config(config: ModelConfig) -> Any:
  """A ``transformers`` config (Llama, Qwen2 or Mistral) describing ``config``.

  Raises:
    ValueError: the bias layout has no HF equivalent for ``config.model_type``.
  """
  import transformers  # pylint: disable=import-outside-toplevel
  c = config
  kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
            tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
            rope_parameters={"rope_type": c.rope_type, "rope_theta": c.rope_theta,
                             **{k: (int(v) if k == "original_max_position_embeddings" else v)
                                for k, v in c.rope_scaling}})
  biases = (c.qkv_bias, c.o_bias, c.mlp_bias)
  if c.model_type == "llama" and c.qkv_bias == c.o_bias:
    hf = transformers.LlamaConfig(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias, **kw)
  elif c.model_type == "qwen2" and biases == (True, False, False):
    hf = transformers.Qwen2Config(**kw)
  elif c.model_type == "mistral" and biases == (False, False, False):
    hf = transformers.MistralConfig(sliding_window=None, **kw)
  else:
    raise ValueError(f"model_type {c.model_type!r} has no HF config with qkv_bias={c.qkv_bias}, "
                     f"o_bias={c.o_bias}, mlp_bias={c.mlp_bias}")
  if ModelConfig.from_hf(hf) != c:
    raise ValueError(f"cannot express {c} as a transformers config")
  return hf


def _usual_permissions(directory: str) -> None:
  """mkdtemp makes a 0700 directory: give the export the permissions of a normal one."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def save_hf(model: LlamaForCausalLM, hf_config: Any, directory: str, *,
            overwrite: bool = False) -> None:
  """Writes ``config.json`` and ``model.safetensors`` (fp32) loadable by transformers.

  The files are written into a temporary sibling directory which then replaces
  ``directory``, so a crash never leaves a half-written checkpoint there. The
  saved config's ``dtype`` is set to ``float32`` (the dtype of the saved weights).

  Args:
    hf_config: the ``transformers`` config to save (keeps token ids and other
      fields the model does not use); None derives one with :func:`to_hf_config`.

  Raises:
    FileExistsError: ``directory`` exists and ``overwrite`` is False.
    ValueError: ``hf_config`` does not describe ``model``.
  """
  if hf_config is None:
    hf_config = to_hf_config(model.config)
  want = ModelConfig.from_hf(hf_config)
  if want != model.config:
    diff = [f.name for f in want.__dataclass_fields__.values()
            if getattr(want, f.name) != getattr(model.config, f.name)]
    raise ValueError(f"hf_config does not describe the model; differing fields: {diff}")
  directory = os.path.abspath(directory)
  if os.path.lexists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    cfg = copy.deepcopy(hf_config)
    cfg.dtype = "float32"
    cfg.save_pretrained(tmp)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in to_hf_state_dict(model).items()}
    save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": "pt"})
    _usual_permissions(tmp)
    if os.path.lexists(directory):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rmdir(old)
      os.rename(directory, old)
      try:
        os.rename(tmp, directory)
      except BaseException:
        os.rename(old, directory)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
