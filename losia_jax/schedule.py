"""Schedule arithmetic of LOSIA_SPEC.md sections 5 and 6 on traced step counters."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slot_owner(step: jax.Array, period: int, total: int) -> jax.Array:
  """``owner(s) = (s // T) % total``: the layer id whose profiling slot holds step ``s``."""
  return (step // period) % total


def ends_slot(step: jax.Array, period: int) -> jax.Array:
  """True in the last step of a slot, after which the profiling layer relocalizes."""
  return (step + 1) % period == 0


def rewarm_factor(step: jax.Array, last_relocalization: jax.Array, period: int) -> jax.Array:
  """``min(1, (s - r - 1) / T)`` after a relocalization at the end of step ``r``.

  ``last_relocalization < 0`` means "never relocalized" and gives 1. Exactly 0
  on the first step of a new subnet, rising linearly to 1 over ``T`` steps.
  """
  ramp = (step - last_relocalization - 1).astype(jnp.float32) / period
  return jnp.where(last_relocalization < 0, 1.0, jnp.clip(ramp, 0.0, 1.0))
