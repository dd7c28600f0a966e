"""The NNX LLaMA-family model: parity with transformers, naming, the linear hook,
sharding and KV-cache greedy decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import losia_jax
from losia_jax.models import (
  LlamaForCausalLM,
  ModelConfig,
  default_linear,
  from_hf_state_dict,
  greedy_generate,
  projection_identities,
)
from losia_jax.targets import path_components

TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}

# (model_type, config overrides) of the transformers parity cases.
PARITY_CASES = {
    "mha_untied": ("llama", dict(num_key_value_heads=4)),
    "gqa2_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mqa1_attention_bias_mlp_bias": ("llama", dict(num_key_value_heads=1, attention_bias=True,
                                                   mlp_bias=True)),
    "qwen2_qkv_bias_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "llama3_rope": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "linear_rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                   "rope_theta": 500.0})),
    "head_dim_16": ("llama", dict(head_dim=16)),
    "mistral_head_dim_16": ("mistral", dict(head_dim=16, num_key_value_heads=1)),
    "gelu_tanh": ("llama", dict(hidden_act="gelu_pytorch_tanh")),
}

SEQ = 24
LENGTHS = (SEQ, 17, 5)  # right padding in the last two rows


def _batch(vocab, lengths=LENGTHS, seq=SEQ, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (len(lengths), seq)).astype(np.int32)
  mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


def _tiny_model(tied=False, layers=2, seed=0, **kw):
  base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              tie_word_embeddings=tied)
  base.update(kw)
  return LlamaForCausalLM(ModelConfig(**base), rngs=nnx.Rngs(seed))


@nnx.jit
def _forward(model, ids, mask):
  return model(ids, mask)


@nnx.jit
def _forward_with_and_without_mask(model, ids, mask):
  return model(ids, mask), model(ids)


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers(case, tiny_hf, hf_logits, record_property):
  kind, overrides = PARITY_CASES[case]
  hf_config, torch_model = tiny_hf(kind, seed=1, **overrides)
  model = from_hf_state_dict(hf_config, torch_model.state_dict())
  ids, mask = _batch(hf_config.vocab_size)
  ref = hf_logits(torch_model, ids, mask)
  got, unmasked = _forward_with_and_without_mask(model, jnp.asarray(ids), jnp.asarray(mask))
  real = mask.astype(bool)
  diff = float(np.abs(np.asarray(got) - ref)[real].max())
  record_property("max_abs_diff", diff)
  assert diff <= TOL, f"{case}: max abs diff {diff}"
  # Without attention_mask the full-length first row is the same.
  assert np.abs(np.asarray(unmasked)[0] - ref[0]).max() <= TOL


def test_left_padding_matches_right_padding():
  """Default positions (cumsum of the mask) make padding on either side invisible."""
  model = _tiny_model()
  prompt = np.random.default_rng(3).integers(1, 96, 7).astype(np.int32)
  pad = np.zeros(5, np.int32)
  ids = np.stack([np.concatenate([pad, prompt]), np.concatenate([prompt, pad])])
  mask = np.stack([np.arange(12) >= 5, np.arange(12) < 7]).astype(np.int32)
  got = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(got[0, 5:], got[1, :7], atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_param_paths_and_losia_targets(tied):
  model = _tiny_model(tied=tied, qkv_bias=True)
  params = nnx.state(model, nnx.Param)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  keys = {".".join(path_components(p)): x.shape for p, x in flat}
  assert keys["model.embed_tokens.embedding"] == (96, 32)
  assert keys["model.layers.1.self_attn.k_proj.kernel"] == (32, 16)
  assert keys["model.layers.0.self_attn.q_proj.bias"] == (32,)
  assert "model.layers.0.self_attn.o_proj.bias" not in keys
  assert keys["model.layers.0.mlp.down_proj.kernel"] == (48, 32)
  assert keys["model.layers.0.input_layernorm.scale"] == (32,)
  assert keys["model.layers.0.post_attention_layernorm.scale"] == (32,)
  assert keys["model.norm.scale"] == (32,)
  assert ("lm_head.kernel" in keys) == (not tied)
  if not tied:
    assert keys["lm_head.kernel"] == (32, 96)
  # Nothing but parameters lives in the model (no RNG state, no buffers).
  assert len(jax.tree_util.tree_leaves(nnx.state(model))) == len(flat)

  plan = losia_jax.make_plan(params, losia_jax.LoSiAConfig())
  roles = [r.split(".") for r in losia_jax.LoSiAConfig().target_modules]
  assert len(plan.targets) == 7 * 2 and len(roles) == 7
  assert sorted(i for t in plan.targets for i in t.identities) == sorted(
      projection_identities(model.config))
  assert all(t.key.endswith(".kernel") and t.transposed for t in plan.targets)

  out_module = "embed_tokens" if tied else "lm_head"
  plan = losia_jax.make_plan(params, losia_jax.LoSiAConfig(output_rank_factor=0.25),
                             output_module=out_module)
  (out,) = [t for t in plan.targets if t.row_mode]
  assert out.key == ("model.embed_tokens.embedding" if tied else "lm_head.kernel")
  assert (out.d_out, out.d_in) == (96, 32)


def test_default_hook_is_bit_exact_and_sees_every_projection():
  model = _tiny_model(qkv_bias=True, o_bias=False)
  ids, mask = _batch(96, lengths=(9, 6), seq=9, seed=2)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  run = nnx.jit(lambda m, i, k, linear=None: m(i, k, linear=linear), static_argnames="linear")
  plain = np.asarray(run(model, ids, mask))
  hooked = np.asarray(run(model, ids, mask, linear=default_linear))
  wrapped = np.asarray(run(model, ids, mask,
                           linear=lambda n, x, k, b: default_linear(n, x, k, b)))
  assert np.array_equal(plain, hooked) and np.array_equal(plain, wrapped)

  seen = []

  def record(identity, x, kernel, bias):
    seen.append((identity, kernel.shape, bias is None))
    assert x.shape[-1] == kernel.shape[0]
    return default_linear(identity, x, kernel, bias)

  # Tracing is enough to see the calls; eval_shape skips compiling.
  nnx.eval_shape(lambda m: m(ids, mask, linear=record), model)
  assert [s[0] for s in seen] == projection_identities(model.config)
  assert len({s[0] for s in seen}) == 7 * 2
  shapes = {s[0]: s[1] for s in seen}
  assert shapes["layer1.self_attn.k_proj"] == (32, 16)
  assert shapes["layer0.mlp.down_proj"] == (48, 32)
  has_bias = {s[0]: not s[2] for s in seen}
  assert has_bias["layer0.self_attn.q_proj"] and not has_bias["layer0.self_attn.o_proj"]
  assert not has_bias["layer0.mlp.up_proj"]


def test_hook_delta_equals_changed_kernel():
  """A LoRA-like hook adding ``delta`` to one kernel = the model with that kernel changed."""
  model = _tiny_model()
  ids = jnp.asarray(_batch(96, lengths=(8,), seq=8)[0])
  delta = 0.05 * jax.random.normal(jax.random.key(0), (48, 32))
  target = "layer1.mlp.down_proj"

  def lora(identity, x, kernel, bias):
    y = default_linear(identity, x, kernel, bias)
    return y + x @ delta if identity == target else y

  run = nnx.jit(lambda m, i, linear=None: m(i, linear=linear), static_argnames="linear")
  hooked = np.asarray(run(model, ids, linear=lora))
  kernel = model.model.layers[1].mlp.down_proj.kernel
  kernel[...] = kernel[...] + delta
  np.testing.assert_allclose(hooked, np.asarray(run(model, ids)), atol=1e-5)


def test_grads_follow_param_paths():
  model = _tiny_model(tied=True)
  ids = jnp.asarray(_batch(96, lengths=(8, 8), seq=8)[0])

  def loss(m):
    logits = m(ids[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

  grads = nnx.jit(nnx.grad(loss))(model)
  flat_g = jax.tree_util.tree_flatten_with_path(grads)[0]
  flat_p = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  assert [path_components(p) for p, _ in flat_g] == [path_components(p) for p, _ in flat_p]
  assert all(np.isfinite(np.asarray(g)).all() for _, g in flat_g)


def _shard_spec(comps):
  leaf = comps[-1]
  if leaf == "kernel":
    return P(None, "model")
  if leaf == "embedding":
    return P("model", None)
  return P()


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_jit_forward_equals_unsharded(tied):
  assert jax.device_count() >= 8, "tests/conftest.py asks XLA for 8 host devices"
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  model = _tiny_model(tied=tied, qkv_bias=True)
  ids, mask = _batch(96, lengths=(12, 9, 12, 3), seq=12, seed=4)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
  ref = np.asarray(fwd(state, jnp.asarray(ids), jnp.asarray(mask)))

  shardings = jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, _shard_spec(path_components(p))), state)
  sharded = jax.device_put(state, shardings)
  q = sharded["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
  assert q.sharding.spec == P(None, "model") and len(q.addressable_shards) == 8
  data = NamedSharding(mesh, P("data", None))
  out = fwd(sharded, jax.device_put(ids, data), jax.device_put(mask, data))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


# ---------------------------------------------------------------- generation


@nnx.jit
def _full_forward(model, ids):
  return model(ids)


def _naive_greedy(model, prompt, n, eos=None, width=16):
  """Argmax of a full forward recomputed at every step, without a cache.

  The sequence sits right-padded in a fixed ``width`` buffer (one compile);
  causal attention keeps the trailing padding from reaching real positions.
  """
  seq = list(prompt)
  out = []
  for _ in range(n):
    buf = np.zeros((1, width), np.int32)
    buf[0, :len(seq)] = seq
    nxt = int(np.argmax(np.asarray(_full_forward(model, jnp.asarray(buf)))[0, len(seq) - 1]))
    if nxt == eos:
      break
    out.append(nxt)
    seq.append(nxt)
  return out


@pytest.mark.parametrize("tied", [True, False])
def test_greedy_generate_matches_uncached_greedy(tied):
  model = _tiny_model(tied=tied, qkv_bias=True, num_key_value_heads=1, seed=5)
  rng = np.random.default_rng(6)
  prompts = [rng.integers(1, 96, n).tolist() for n in (1, 4, 7)]
  got = greedy_generate(model, prompts, max_new_tokens=6, eos_token_id=None)
  assert got == [_naive_greedy(model, p, 6) for p in prompts]


def test_greedy_generate_stops_at_eos():
  model = _tiny_model(seed=7)
  rng = np.random.default_rng(8)
  prompts = [rng.integers(1, 96, n).tolist() for n in (5, 2, 6)]
  free = greedy_generate(model, prompts, max_new_tokens=8, eos_token_id=None)
  eos = free[0][3]
  stopped = greedy_generate(model, prompts, max_new_tokens=8, eos_token_id=eos)
  for row, full in zip(stopped, free):
    assert row == (full[:full.index(eos)] if eos in full else full)
  assert len(stopped[0]) <= 3
  assert stopped == [_naive_greedy(model, p, 8, eos) for p in prompts]
  assert greedy_generate(model, prompts, 0, eos) == [[], [], []]
  with pytest.raises(ValueError, match="empty prompt"):
    greedy_generate(model, [[1], []], 2, None)
  with pytest.raises(ValueError, match="out of range"):
    greedy_generate(model, [[1, 96]], 2, None)


@pytest.mark.parametrize("kind,overrides", [
    ("llama", dict(tie_word_embeddings=True)),
    ("qwen2", dict(num_key_value_heads=1)),
])
def test_greedy_generate_matches_transformers(kind, overrides, tiny_hf):
  torch = pytest.importorskip("torch")
  hf_config, torch_model = tiny_hf(kind, seed=9, **overrides)
  model = from_hf_state_dict(hf_config, torch_model.state_dict())
  rng = np.random.default_rng(10)
  eos = 3
  for n in (1, 6):
    prompt = rng.integers(4, hf_config.vocab_size, n).tolist()
    with torch.no_grad():
      ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)[0, n:].tolist()
    if eos in ref:
      ref = ref[:ref.index(eos)]
    assert greedy_generate(model, [prompt], 10, eos_token_id=eos) == [ref]
