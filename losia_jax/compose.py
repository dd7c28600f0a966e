"""Composing LoSiA with other Optax transformations, and inspecting its state."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from losia_jax.alias import LoSiAStage
from losia_jax.inner import check_elementwise
from losia_jax.state import LoSiAState, LoSiATransformation
from losia_jax.transform import scale_by_losia


def chain(*transforms: optax.GradientTransformation) -> LoSiATransformation:
  """Composes LoSiA with optax transformations, keeping the fused path.

  What you write, and what you get:

  - ``chain(losia(config), optax.adamw(lr, weight_decay=wd))``: LoSiA with
    *your* optimizer as the compact inner optimizer. It runs on each target's
    ``[k_out, k_in]`` block (moments of the block's size, restarted with fresh
    bias correction at every relocalization), its learning-rate schedule
    follows the global step, its decoupled weight decay reads the block only,
    and the rewarm ramp scales its output. Non-targets (``non_target="train"``)
    get its full update. Any elementwise optimizer or ``optax.chain`` of
    elementwise pieces works (adam, adamw, lion, sgd with momentum, rmsprop);
    others are refused, naming the piece.
  - ``chain(pre..., losia(config), optimizer...)``: ``pre`` (e.g.
    ``optax.clip_by_global_norm(1.0)``) processes the full gradients first;
    several optimizer pieces after the stage are joined by ``optax.chain``.
  - ``chain(pre..., losia(lr, config, ...))``: the built-in AdamW, as before.

  The state is ``optax.chain``'s (a tuple: the ``pre`` states, then the LoSiA
  state), so the result also works with ``tx.update`` + ``optax.apply_updates``;
  ``apply_gradients`` runs ``pre`` and then LoSiA's in-place update.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import losia_jax
    >>> params = {"layers": [{"q_proj": {"kernel": jnp.ones((16, 16))}}]}
    >>> cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
    >>> tx = losia_jax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(cfg),
    ...                      optax.adamw(1e-2, weight_decay=0.01))
    >>> state = tx.init(params)
    >>> params, state = tx.apply_gradients(jax.tree.map(jnp.ones_like, params), state, params)
    >>> int((params["layers"][0]["q_proj"]["kernel"] != 1).sum())  # one 4 x 4 block moved
    16
  """
  where = [i for i, t in enumerate(transforms) if isinstance(t, (LoSiAStage, LoSiATransformation))]
  if len(where) != 1:
    raise ValueError(
        f"losia_jax.chain needs exactly one LoSiA element (losia_jax.losia(config) followed by "
        f"your optimizer, or losia_jax.losia(lr, config) last); got {len(where)} among "
        f"{len(transforms)} transformations")
  i = where[0]
  head, core, tail = tuple(transforms[:i]), transforms[i], tuple(transforms[i + 1:])
  if isinstance(core, LoSiAStage):
    if not tail:
      raise ValueError("losia_jax.chain(..., losia_jax.losia(config)) needs the optimizer that "
                       "trains the blocks after the stage, e.g. "
                       "losia_jax.chain(losia_jax.losia(config), optax.adamw(lr))")
    inner = tail[0] if len(tail) == 1 else optax.chain(*tail)
    check_elementwise(inner, "the optimizer after losia_jax.losia(config)")
    core = scale_by_losia(base_optimizer=inner, learning_rate=None, inner_params=True,
                          **core.options)
  elif tail:
    raise ValueError(
        f"losia_jax.chain: {len(tail)} transformation(s) follow a complete LoSiA optimizer "
        "(losia(lr, config) or scale_by_losia), which already contains its inner optimizer. "
        "To train the blocks with your own optimizer write "
        "losia_jax.chain(losia_jax.losia(config), optax.adamw(lr, ...)); to pre-process "
        "gradients put that transformation before LoSiA")
  plain = optax.chain(*head, core)

  def apply_gradients(grads, state, params):
    """``head``'s updates on the gradients, then LoSiA's fused step."""
    state = tuple(state)
    head_states = []
    for transformation, head_state in zip(head, state[:-1]):
      grads, head_state = transformation.update(grads, head_state, params)
      head_states.append(head_state)
    params, losia_state = core.apply_gradients(grads, state[-1], params)
    return params, tuple(head_states) + (losia_state,)

  return LoSiATransformation(plain.init, plain.update, apply_gradients=apply_gradients,
                             plan=core.plan, config=core.config, inner=core.inner)


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
