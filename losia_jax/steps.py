"""Small array helpers of one LoSiA step (masked selects, products, norms)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tree_where(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def product(w: jax.Array, g: jax.Array) -> jax.Array:
  """``W ⊙ G`` in fp32, the ``P`` of the importance (LOSIA_SPEC.md section 3)."""
  return w.astype(jnp.float32) * g.astype(jnp.float32)


def sq_norm(g: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(g.astype(jnp.float32)))


def clip_factor(norm: jax.Array, max_norm) -> jax.Array:
  """``min(1, max_norm / (norm + 1e-6))``: torch's ``clip_grad_norm_`` factor."""
  return jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(jnp.float32)


def all_finite(arrays) -> jax.Array:
  ok = jnp.array(True)
  for a in arrays:
    ok = ok & jnp.all(jnp.isfinite(a))
  return ok
