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
  p = w.astype(jnp.float32) * g.astype(jnp.float32)
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
  i = instant_importance(kind, w, g)
  ibar = beta1 * state.ibar + (1.0 - beta1) * i
  ubar = beta2 * state.ubar + (1.0 - beta2) * jnp.abs(i - ibar)
  return ImportanceState(ibar, ubar)


def importance_score(state: ImportanceState) -> jax.Array:
  """The localization score ``S = Ī ⊙ Ū``."""
  return state.ibar * state.ubar


def zeros_importance(shape, sharding=None) -> ImportanceState:
  z = lambda: jnp.zeros(shape, jnp.float32, device=sharding)
  return ImportanceState(z(), z())
