"""Composing LoSiA with other Optax transformations, and inspecting its state."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from losia_jax.transform import LoSiAState, LoSiATransformation, _make


def chain(*transforms: optax.GradientTransformation) -> LoSiATransformation:
  """``optax.chain`` whose last element is LoSiA, keeping the fused path.

  The state is exactly ``optax.chain``'s (a tuple), so the two are
  interchangeable; ``apply_gradients`` runs the leading transformations (e.g.
  ``optax.clip_by_global_norm``) and then LoSiA's in-place update.
  """
  if not transforms or not isinstance(transforms[-1], LoSiATransformation):
    raise ValueError("losia_jax.chain needs a LoSiA transformation as its last element")
  head, last = transforms[:-1], transforms[-1]
  plain = optax.chain(*transforms)

  def apply_fn(grads, state, params):
    state = tuple(state)
    new = []
    for tx, st in zip(head, state[:-1]):
      grads, st = tx.update(grads, st, params)
      new.append(st)
    params, st = last.apply_gradients(grads, state[-1], params)
    return params, tuple(new) + (st,)

  return _make(plain.init, plain.update, apply_fn, last.plan, len(transforms) - 1,
               chained=transforms, config=last.config)


def state_nbytes(state: Any) -> int:
  """Bytes held by an optimizer state (arrays or ``ShapeDtypeStruct``s)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(state)))


def find_losia_state(state: Any) -> LoSiAState:
  """The :class:`LoSiAState` inside a (possibly chained or wrapped) optimizer state."""
  found = []

  def visit(x):
    if isinstance(x, LoSiAState):
      found.append(x)
      return
    if isinstance(x, (tuple, list)):
      for y in x:
        visit(y)
    elif isinstance(x, dict):
      for y in x.values():
        visit(y)
    elif hasattr(x, "_fields"):
      for y in x:
        visit(y)

  visit(state)
  if len(found) != 1:
    raise ValueError(f"expected one LoSiAState in the optimizer state; found {len(found)}")
  return found[0]
