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
  """True iff no entry of any array is NaN or infinite.

  ``sum(a - a)`` is 0 when every entry is finite and NaN otherwise (``inf - inf``
  is NaN): one plain reduction, which XLA:CPU runs in about half the time of
  ``all(isfinite(a))`` (that one materializes a boolean array and reduces it in
  windows). On an embedding-sized gradient the difference is a tenth of an
  AdamW step. (Not ``a * 0``: next to other users of the gradient XLA:CPU may
  materialize the zero as a parameter-sized broadcast.)
  """
  total = jnp.zeros([], jnp.float32)
  for a in arrays:
    total = total + jnp.sum(a - a, dtype=jnp.float32)
  return jnp.isfinite(total)
