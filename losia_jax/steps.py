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


def sum_scalars(scalars) -> jax.Array:
  """The fp32 sum of scalars, as one reduction over a vector that holds them.

  Not a chain of scalar adds (nor a plain reduction over their stack, which
  XLA's simplifier turns back into that chain): XLA's fusion copies such a
  cheap chain into every fusion that reads the result. The step's finiteness
  and clip factor are read by every update of the step, so the copies grow the
  program with leaves x consumers, quadratically in the number of layers (on
  30 SmolLM2 layers with trained non-targets: 137k optimized HLO instructions
  with the chain, 58.5k with one reduction, and 1.5x the compile time).

  The vector is one concatenate behind an optimization barrier, which keeps
  the simplifier from seeing through it. Writing the scalars into a zero
  vector one by one (``.at[i].set``) also survives the simplifier, but each
  write becomes a dynamic-update-slice kernel of its own: 70 of them on 30
  SmolLM2 layers, about 20 ms of XLA:CPU compile time each.
  """
  scalars = [jnp.reshape(x, (1,)).astype(jnp.float32) for x in scalars]
  if not scalars:
    return jnp.zeros([], jnp.float32)
  return jnp.sum(jax.lax.optimization_barrier(jnp.concatenate(scalars)))


def all_finite(arrays, flags=()) -> jax.Array:
  """True iff no entry of any array is NaN or infinite and every flag is True.

  ``sum(a - a)`` is 0 when every entry is finite and NaN otherwise (``inf - inf``
  is NaN): one plain reduction, which XLA:CPU runs in about half the time of
  ``all(isfinite(a))`` (that one materializes a boolean array and reduces it in
  windows). On an embedding-sized gradient the difference is a tenth of an
  AdamW step. (Not ``a * 0``: next to other users of the gradient XLA:CPU may
  materialize the zero as a parameter-sized broadcast.) The partial sums and
  the flags (as 0 or NaN) meet in one :func:`sum_scalars`.
  """
  partials = [jnp.sum(a - a, dtype=jnp.float32) for a in arrays]
  partials += [jnp.where(f, 0.0, jnp.nan).astype(jnp.float32) for f in flags]
  if not partials:
    return jnp.ones([], bool)
  return jnp.isfinite(sum_scalars(partials))
