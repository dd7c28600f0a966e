"""Gradient-based importance of weights (LOSIA_SPEC.md section 3), in JAX."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ImportanceState(NamedTuple):
  """Importance statistics of one profiling slot, fp32, in the parameter's layout.

  Attributes:
    ibar: EMA of the instantaneous importance ``I``.
    ubar: EMA of the uncertainty ``|I - ibar|``.
  """

  ibar: jax.Array
  ubar: jax.Array


def instant_importance(kind: str, w: jax.Array, g: jax.Array) -> jax.Array:
  """``I`` from ``P = W ⊙ G``: ``param_mix`` |P - P²/2|, ``param_first`` |P|, ``param_second`` P²."""
  return _instant_from_product(kind, w.astype(jnp.float32) * g.astype(jnp.float32))


def _instant_from_product(kind: str, p: jax.Array) -> jax.Array:
  if kind == "param_mix":
    return jnp.abs(p - 0.5 * p * p)
  if kind == "param_first":
    return jnp.abs(p)
  if kind == "param_second":
    return p * p
  raise ValueError(f"importance must be 'param_mix', 'param_first' or 'param_second'; got {kind!r}")


def update_importance(state: ImportanceState, w: jax.Array, g: jax.Array, kind: str,
                      beta1: float, beta2: float) -> ImportanceState:
  """One profiling step: ``Ī ← β1 Ī + (1-β1) I``; ``Ū ← β2 Ū + (1-β2) |I - Ī|`` (new Ī)."""
  return accumulate_importance(state, w.astype(jnp.float32) * g.astype(jnp.float32), kind,
                               beta1, beta2)


def accumulate_importance(state: ImportanceState, p: jax.Array, kind: str, beta1: float,
                          beta2: float, active=None, fresh=None) -> ImportanceState:
  """:func:`update_importance` from the product ``p = W ⊙ G`` (fp32).

  ``fresh`` (bool scalar or None): the statistics count as zero before this step.
  ``active`` (bool scalar or None): where False the state comes back unchanged. The
  mask is elementwise, so a jitted step updates the buffers in place; passing them
  through a ``lax.cond`` instead makes XLA copy them.
  """
  old = state if fresh is None else jax.tree.map(lambda x: jnp.where(fresh, 0.0, x), state)
  keep = (lambda new, cur: new) if active is None else (
      lambda new, cur: jnp.where(active, new, cur))
  i = _instant_from_product(kind, p)
  ibar = keep(beta1 * old.ibar + (1.0 - beta1) * i, state.ibar)
  # Ū reads the *stored* Ī (the new one where active): recomputing the new Ī inside
  # Ū's update would make XLA keep a copy of the old buffer.
  ubar = keep(beta2 * old.ubar + (1.0 - beta2) * jnp.abs(i - ibar), state.ubar)
  return ImportanceState(ibar, ubar)


def importance_score(state: ImportanceState) -> jax.Array:
  """The localization score ``S = Ī ⊙ Ū``."""
  return state.ibar * state.ubar


def zeros_importance(shape, sharding=None) -> ImportanceState:
  z = lambda: jnp.zeros(shape, jnp.float32, device=sharding)
  return ImportanceState(z(), z())
