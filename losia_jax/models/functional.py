"""The model as a pure function of a params dict, and the fine-tuning loss.

Optax transformations (LoSiA included) work on pytrees of arrays; Flax NNX
modules hold their weights in ``nnx.Param`` variables. :func:`functional`
splits a model once into a plain nested dict of weights (whose paths are the
HF-style names LoSiA's target finder reads, e.g.
``model.layers.3.self_attn.q_proj.kernel``) and an ``apply`` that runs the
model on any such dict, under ``jax.jit`` or ``jax.grad``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx


def functional(model: nnx.Module) -> tuple[dict, Callable[..., jax.Array], Callable[[dict], Any]]:
  """Returns ``(params, apply, bind)``.

  - ``params``: the weights as a nested dict of arrays (``nnx.to_pure_dict``);
  - ``apply(params, input_ids, attention_mask=None, *, linear=None)``: the
    model's logits with those weights (``linear``: the projection hook used by
    LoSiA-Pro and LoRA);
  - ``bind(params)``: a module holding those weights (for generation or export).
  """
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)

  def bind(params):
    st = jax.tree.map(lambda x: x, state)  # a fresh State; the template stays untouched
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(graphdef, st, rest)

  def apply(params, input_ids, attention_mask=None, *, linear=None):
    return bind(params)(input_ids, attention_mask, linear=linear)

  return nnx.to_pure_dict(state), apply, bind


def masked_nll(logits: jax.Array, input_ids: jax.Array,
               loss_mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean next-token negative log-likelihood.

  Position ``t`` predicts ``input_ids[:, t + 1]`` and counts when
  ``loss_mask[:, t]`` is 1 (all positions when None): the usual "train on the
  response only" loss, computed in fp32.
  """
  # Every position is scored against the next token (the last one against a
  # wrapped-around token, masked out) rather than slicing off the last logits:
  # the slice's gradient is a pad of the vocabulary-sized logits, which
  # XLA:CPU materializes (a copy of batch x seq x vocab floats per step).
  logits = logits.astype(jnp.float32)
  target = jnp.concatenate([input_ids[:, 1:], input_ids[:, :1]], axis=1)
  mask = (jnp.ones(target.shape, jnp.float32) if loss_mask is None
          else loss_mask.astype(jnp.float32))
  mask = mask.at[:, -1].set(0.0)
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - picked
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
