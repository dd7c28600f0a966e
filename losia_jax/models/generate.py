"""Batched greedy decoding with a static-size KV cache.

Prompts are left-padded into one batch, so every sequence's next token sits in
the same cache slot; rotary positions come from the padding mask, which makes
a padded prompt decode exactly like the same prompt alone. The prefill and the
whole decode loop (a ``lax.while_loop`` that stops when every sequence has hit
EOS) run in one jitted function.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from losia_jax.models.llama import LlamaForCausalLM, default_positions


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy(graphdef, state, ids, mask, max_new_tokens, eos, pad_id):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = ids.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  key_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), mask.dtype)], axis=1)
  logits, cache = model.decode(ids, cache, cache_index=0, key_mask=key_mask,
                               positions=default_positions(mask, batch, prompt_len))
  tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
  done = tok == eos
  lengths = jnp.sum(mask.astype(jnp.int32), axis=1)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, out, done = carry
    # ``tok`` is new token i - 1: cache slot prompt_len + i - 1, position length + i - 1.
    logits, cache = model.decode(tok[:, None], cache, cache_index=prompt_len + i - 1,
                                 key_mask=key_mask, positions=(lengths + i - 1)[:, None])
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    out = out.at[:, i].set(nxt)
    return i + 1, nxt, cache, out, done | (nxt == eos)

  carry = (jnp.asarray(1, jnp.int32), tok, cache, out, done)
  return jax.lax.while_loop(cond, body, carry)[3]


def greedy_generate(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, eos_token_id: int | None = None,
                    pad_id: int = 0) -> list[list[int]]:
  """Greedy continuation of each prompt.

  Args:
    model: the model (its weights are read, not changed).
    prompts: token ids, one non-empty list per sequence (lengths may differ).
    max_new_tokens: the most tokens generated per sequence.
    eos_token_id: stop a sequence at this token; None never stops early.
    pad_id: the id used for left padding (masked out, so any valid id works).

  Returns:
    The new tokens of each sequence, up to but excluding its first EOS.
  """
  if max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("greedy_generate needs at least one prompt, and no empty prompt")
  vocab = model.config.vocab_size
  bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab} |
               ({pad_id} if not 0 <= pad_id < vocab else set()))
  if bad:
    raise ValueError(f"token ids out of range [0, {vocab}): {bad[:10]}")
  if max_new_tokens == 0:
    return [[] for _ in prompts]
  prompt_len = max(len(p) for p in prompts)
  ids = np.full((len(prompts), prompt_len), pad_id, np.int32)
  mask = np.zeros((len(prompts), prompt_len), np.int32)
  for row, p in enumerate(prompts):
    ids[row, prompt_len - len(p):] = p
    mask[row, prompt_len - len(p):] = 1
  graphdef, state = nnx.split(model)
  eos = -1 if eos_token_id is None else int(eos_token_id)
  out = np.asarray(_greedy(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                           int(max_new_tokens), jnp.int32(eos), jnp.int32(pad_id)))
  result = []
  for row in out.tolist():
    result.append(row[:row.index(eos)] if eos in row else row)
  return result
