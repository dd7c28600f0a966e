"""A LLaMA-family causal LM in Flax NNX whose parameter paths mirror Hugging Face.

The module tree is ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``model.layers.{i}.mlp.{gate,up,down}_proj``, the two per-layer RMSNorms,
``model.norm`` and (untied only) ``lm_head``, so ``nnx.state(model, nnx.Param)``
has the paths the LoSiA target finder and the HF converter expect. Kernels are
stored in the Flax layout ``[in, out]``; embeddings ``[vocab, hidden]``.

Every decoder-layer projection goes through one function,
``linear(identity, x, kernel, bias)``; passing another ``linear`` to the forward
lets LoSiA-Pro or LoRA change the projections without a second model class.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from losia_common.names import target_identity
from losia_jax.linear import Linear, default_linear, dense_matmul

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# HF ``ACT2FN`` names we reproduce exactly; ``gelu`` there is the erf form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

# Rope parameters each type needs beyond theta (HF names).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

LinearFn = Linear  # linear(identity, x, kernel, bias); defined once in losia_jax.linear

PROJECTION_ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture of a LLaMA-family model (hashable, so usable as a static).

  Field names follow the Hugging Face configs. ``qkv_bias``/``o_bias`` encode
  the per-family bias rules (LLaMA ``attention_bias``; Qwen2 q/k/v only).
  ``rope_scaling`` holds the extra rope parameters of ``rope_type`` as sorted
  ``(name, value)`` pairs.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_scaling: tuple[tuple[str, float], ...] = ()
  max_position_embeddings: int = 2048
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02
  model_type: str = "llama"

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: "
                       + ", ".join(ACTIVATIONS))
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"unsupported rope_type {self.rope_type!r} (rope_parameters); supported: "
                       + ", ".join(SUPPORTED_ROPE_TYPES))
    missing = set(_ROPE_KEYS[self.rope_type]) - {k for k, _ in self.rope_scaling}
    if missing:
      raise ValueError(f"rope_type {self.rope_type!r} needs rope_parameters {sorted(missing)}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

  @classmethod
  def from_hf(cls, hf_config: Any) -> ModelConfig:
    """Reads a ``transformers`` LLaMA, Qwen2 or Mistral config.

    Raises:
      ValueError: naming the field, for an unsupported ``model_type``, sliding
        window attention, rope type, partial rotary factor or ``hidden_act``.
    """
    if isinstance(hf_config, ModelConfig):
      return hf_config
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                       + ", ".join(SUPPORTED_MODEL_TYPES))
    max_pos = int(getattr(hf_config, "max_position_embeddings", 2048))
    _check_no_sliding_window(hf_config, max_pos)
    theta, rope_type, extra = _rope_from_hf(hf_config)
    heads = int(hf_config.num_attention_heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if model_type == "qwen2":
      qkv_bias, o_bias, mlp_bias = True, False, False
    elif model_type == "mistral":
      qkv_bias = o_bias = mlp_bias = False
    else:
      qkv_bias = o_bias = bool(getattr(hf_config, "attention_bias", False))
      mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    return cls(
        vocab_size=int(hf_config.vocab_size), hidden_size=int(hf_config.hidden_size),
        intermediate_size=int(hf_config.intermediate_size),
        num_hidden_layers=int(hf_config.num_hidden_layers), num_attention_heads=heads,
        num_key_value_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim), rms_norm_eps=float(hf_config.rms_norm_eps), rope_theta=theta,
        rope_type=rope_type, rope_scaling=extra, max_position_embeddings=max_pos,
        hidden_act=str(hf_config.hidden_act),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
        initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
        model_type=model_type)

  def rope_inv_freq(self) -> np.ndarray:
    """Inverse rotary frequencies ``[head_dim // 2]``, computed as transformers does (fp32)."""
    dim = self.head_dim
    # fp32 exponent, correctly rounded power, fp32 reciprocal: bit-equal to torch's.
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    inv = np.float32(1.0) / (np.float64(self.rope_theta) ** exponent).astype(np.float32)
    p = dict(self.rope_scaling)
    if self.rope_type == "linear":
      inv = inv / np.float32(p["factor"])
    elif self.rope_type == "llama3":
      factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
      old = p["original_max_position_embeddings"]
      low_wavelen, high_wavelen = old / lo, old / hi
      wavelen = np.float32(2 * math.pi) / inv
      scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv)
      smooth = (old / wavelen - lo) / (hi - lo)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      inv = np.where(medium, smoothed, scaled)
    return np.asarray(inv, np.float32)


def _check_no_sliding_window(hf_config: Any, max_pos: int) -> None:
  layer_types = getattr(hf_config, "layer_types", None)
  if layer_types is not None and "sliding_attention" not in layer_types:
    return
  window = getattr(hf_config, "sliding_window", None)
  if window is not None and int(window) < max_pos:
    raise ValueError(
        f"sliding_window={window} < max_position_embeddings={max_pos} is not supported "
        f"(model_type {getattr(hf_config, 'model_type', None)!r}); only full attention is")


def _rope_from_hf(hf_config: Any) -> tuple[float, str, tuple[tuple[str, float], ...]]:
  """(theta, rope_type, extra params) from ``rope_parameters`` (5.x) or ``rope_scaling`` (4.x)."""
  params = getattr(hf_config, "rope_parameters", None)
  if params is None:
    params = getattr(hf_config, "rope_scaling", None)
  params = dict(params or {})
  if any(isinstance(v, dict) for v in params.values()):
    raise ValueError("per-layer-type rope_parameters are not supported: "
                     f"{sorted(params)}")
  theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default")) or "default"
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ValueError(f"unsupported rope_type {rope_type!r} (rope_parameters); supported: "
                     + ", ".join(SUPPORTED_ROPE_TYPES))
  partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
  if partial is not None and float(partial) != 1.0:
    raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
  extra = []
  for key in _ROPE_KEYS[rope_type]:
    if key == "original_max_position_embeddings" and key not in params:
      # transformers falls back to max_position_embeddings the same way.
      extra.append((key, float(hf_config.max_position_embeddings)))
    elif key in params:
      extra.append((key, float(params[key])))
  return theta, rope_type, tuple(sorted(extra))


class KVCache(NamedTuple):
  """Static-size key/value cache: one ``[B, T, kv_heads, head_dim]`` array per layer."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]


class Proj(nnx.Module):
  """A dense projection with a Flax-layout kernel ``[in, out]`` and an optional bias."""

  def __init__(self, d_in: int, d_out: int, *, use_bias: bool, init_std: float,
               rngs: nnx.Rngs, param_dtype: Any):
    self.kernel = nnx.Param(
        nnx.initializers.normal(init_std)(rngs.params(), (d_in, d_out), param_dtype))
    self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if use_bias else None

  def __call__(self, identity: str, x: jax.Array, linear: LinearFn) -> jax.Array:
    bias = None if self.bias is None else self.bias[...]
    return linear(identity, x, self.kernel[...], bias)


class RMSNorm(nnx.Module):
  """RMSNorm normalised in fp32, then scaled in the compute dtype (as transformers)."""

  def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    return self.scale[...].astype(self.dtype) * y


class Embed(nnx.Module):
  """Token embedding ``[vocab, hidden]``."""

  def __init__(self, vocab: int, dim: int, *, init_std: float, rngs: nnx.Rngs,
               dtype: Any, param_dtype: Any):
    self.embedding = nnx.Param(
        nnx.initializers.normal(init_std)(rngs.params(), (vocab, dim), param_dtype))
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """fp32 ``cos, sin`` of shape ``[B, S, head_dim]`` for integer ``positions [B, S]``."""
  inv = jnp.asarray(config.rope_inv_freq())
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [B, S, heads, D]`` with the half-split convention of transformers."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """Grouped-query attention: ``q [B,S,H,D]``, ``k, v [B,T,KV,D]``, ``mask [B,S,T]`` (True = keep).

  Query head ``h`` reads key/value head ``h // (H // KV)``, as ``repeat_kv`` in
  transformers, without materialising the repeated keys. Masked scores are set
  (not added) to the float32 minimum, so fully masked rows (left padding) stay finite.
  """
  b, s, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, s, kv, h // kv, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k) * scale
  scores = scores.astype(jnp.float32)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, h * d)


class Attention(nnx.Module):
  """Self-attention with rotary embeddings and grouped-query heads."""

  def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, param_dtype: Any):
    c, std = config, config.initializer_range
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mk = functools.partial(Proj, init_std=std, rngs=rngs, param_dtype=param_dtype)
    self.q_proj = mk(c.hidden_size, q_out, use_bias=c.qkv_bias)
    self.k_proj = mk(c.hidden_size, kv_out, use_bias=c.qkv_bias)
    self.v_proj = mk(c.hidden_size, kv_out, use_bias=c.qkv_bias)
    self.o_proj = mk(q_out, c.hidden_size, use_bias=c.o_bias)
    self.layer_idx = layer_idx
    self.num_heads, self.num_kv_heads, self.head_dim = (
        c.num_attention_heads, c.num_key_value_heads, c.head_dim)

  def __call__(self, x, cos, sin, mask, linear, kv=None, cache_index=None):
    """Attention output ``[B, S, hidden]`` and the updated ``(k, v)`` cache (or None).

    ``mask [B, S, T]`` says which keys each query sees; with a cache ``kv`` the
    keys are the ``T`` cache slots, otherwise the ``S`` input positions.
    """
    b, s, _ = x.shape
    ident = lambda role: target_identity(self.layer_idx, f"self_attn.{role}")
    q = self.q_proj(ident("q_proj"), x, linear).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k_proj(ident("k_proj"), x, linear).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(ident("v_proj"), x, linear).reshape(b, s, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv is not None:
      # Write this chunk at slots [cache_index, cache_index + s) and attend over all slots.
      k_cache, v_cache = kv
      start = (0, cache_index, 0, 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      kv = (k_cache, v_cache)
      k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    out = attend(q, k, v, mask, self.head_dim ** -0.5)
    return self.o_proj(ident("o_proj"), out, linear), kv


class MLP(nnx.Module):
  """Gated MLP: ``down(act(gate(x)) * up(x))``."""

  def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, param_dtype: Any):
    c = config
    mk = functools.partial(Proj, use_bias=c.mlp_bias, init_std=c.initializer_range, rngs=rngs,
                           param_dtype=param_dtype)
    self.gate_proj = mk(c.hidden_size, c.intermediate_size)
    self.up_proj = mk(c.hidden_size, c.intermediate_size)
    self.down_proj = mk(c.intermediate_size, c.hidden_size)
    self.layer_idx = layer_idx
    self.hidden_act = c.hidden_act

  def __call__(self, x, linear):
    """``[B, S, hidden] -> [B, S, hidden]``."""
    ident = lambda role: target_identity(self.layer_idx, f"mlp.{role}")
    act = ACTIVATIONS[self.hidden_act]
    gate = act(self.gate_proj(ident("gate_proj"), x, linear))
    h = gate * self.up_proj(ident("up_proj"), x, linear)
    return self.down_proj(ident("down_proj"), h, linear)


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block: attention then MLP, each with a residual."""

  def __init__(self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any):
    self.self_attn = Attention(config, layer_idx, rngs=rngs, param_dtype=param_dtype)
    self.mlp = MLP(config, layer_idx, rngs=rngs, param_dtype=param_dtype)
    norm = functools.partial(RMSNorm, config.hidden_size, config.rms_norm_eps, dtype=dtype,
                             param_dtype=param_dtype)
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()

  def __call__(self, x, cos, sin, mask, linear, kv=None, cache_index=None):
    """The block's output and its updated cache entry (see :meth:`Attention.__call__`)."""
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, linear, kv, cache_index)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x), linear)
    return x, kv


class LlamaModel(nnx.Module):
  """Embedding, decoder layers and final norm (the HF ``model.`` prefix)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.embed_tokens = Embed(config.vocab_size, config.hidden_size,
                              init_std=config.initializer_range, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
    self.layers = nnx.List([
        DecoderLayer(config, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype,
                        param_dtype=param_dtype)


class LlamaForCausalLM(nnx.Module):
  """LLaMA-family causal LM (LLaMA, Qwen2, Mistral without sliding window).

  Args:
    config: a :class:`ModelConfig` or a ``transformers`` config.
    rngs: initialisation randomness (normal with ``initializer_range``).
    dtype: compute dtype of activations.
    param_dtype: dtype the parameters are created in.
  """

  def __init__(self, config: Any, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32):
    config = ModelConfig.from_hf(config)
    self.config = config
    self.dtype = dtype
    self.model = LlamaModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Proj(config.hidden_size, config.vocab_size, use_bias=False,
                          init_std=config.initializer_range, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None,
               linear: LinearFn | None = None) -> jax.Array:
    """Logits ``[B, S, vocab]`` for ``input_ids [B, S]``.

    Args:
      attention_mask: ``[B, S]``, 1 for real tokens; padded keys are masked out
        (attention is always causal).
      positions: rotary positions ``[B, S]``; default ``cumsum(mask) - 1``
        clipped at 0 (left padding works), or ``arange(S)`` without a mask.
      linear: replaces ``x @ kernel + bias`` in every decoder-layer projection;
        called as ``linear(identity, x, kernel, bias)`` (see :func:`default_linear`).
    """
    b, s = input_ids.shape
    causal = jnp.tril(jnp.ones((s, s), jnp.bool_))[None]
    if attention_mask is None:
      mask = jnp.broadcast_to(causal, (b, s, s))
    else:
      mask = causal & attention_mask.astype(jnp.bool_)[:, None, :]
    if positions is None:
      positions = default_positions(attention_mask, b, s)
    h, _ = self._run_layers(input_ids, positions, mask, linear, None, None)
    return self.logits_from_hidden(h)

  def decode(self, input_ids: jax.Array, cache: KVCache, *, cache_index: jax.Array,
             key_mask: jax.Array, positions: jax.Array,
             linear: LinearFn | None = None) -> tuple[jax.Array, KVCache]:
    """Runs ``input_ids [B, S]`` against a static-size cache (prefill or one step).

    The new keys/values are written at slots ``[cache_index, cache_index + S)``;
    query ``j`` attends to slot ``t`` when ``t <= cache_index + j`` and
    ``key_mask[b, t]`` (``[B, T]``, False for padding slots).

    Returns:
      ``(logits [B, S, vocab], updated cache)``.
    """
    s, t = input_ids.shape[1], cache.keys[0].shape[1]
    slots = jnp.arange(t)[None, :]
    causal = slots <= (cache_index + jnp.arange(s))[:, None]
    mask = causal[None] & key_mask.astype(jnp.bool_)[:, None, :]
    h, cache = self._run_layers(input_ids, positions, mask, linear, cache, cache_index)
    return self.logits_from_hidden(h), cache

  def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """A zero cache of ``max_length`` slots (in the compute dtype by default)."""
    c = self.config
    shape = (batch_size, max_length, c.num_key_value_heads, c.head_dim)
    dtype = dtype or self.dtype
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers))
    return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(c.num_hidden_layers)))

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """Final norm, then the LM head (never through the ``linear`` hook)."""
    h = self.model.norm(h)
    if self.lm_head is None:
      # dense_matmul: the tied embedding's gradient as a plain GEMM on XLA:CPU
      return dense_matmul(h, self.model.embed_tokens.embedding[...].astype(h.dtype).T)
    return default_linear("lm_head", h, self.lm_head.kernel[...], None)

  def _run_layers(self, input_ids, positions, mask, linear, cache, cache_index):
    linear = default_linear if linear is None else linear
    cos, sin = rope_cos_sin(self.config, positions)
    h = self.model.embed_tokens(input_ids)
    new_k, new_v = [], []
    for i, layer in enumerate(self.model.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      h, kv = layer(h, cos, sin, mask, linear, kv, cache_index)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    return h, (None if cache is None else KVCache(tuple(new_k), tuple(new_v)))


def default_positions(attention_mask: jax.Array | None, batch: int, seq: int) -> jax.Array:
  """``cumsum(mask) - 1`` clipped at 0, or ``arange(seq)`` without a mask."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def projection_identities(config: ModelConfig) -> list[str]:
  """The ``linear`` hook identities of a model, in call order (7 per layer)."""
  return [target_identity(i, role) for i in range(config.num_hidden_layers)
          for role in PROJECTION_ROLES]
