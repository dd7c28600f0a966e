"""A user's optax optimizer as LoSiA's compact inner optimizer.

``losia_jax.chain(losia_jax.losia(config), optax.adamw(lr, ...))`` runs the
user's optimizer on each target's compact ``[k_out, k_in]`` block instead of on
full-size gradients. That is only the same optimizer if it acts elementwise:
its state must be per-entry (moments) or scalar (counts), and the update of a
part of a block must not depend on the rest of the block. Adam, AdamW, Lion,
SGD with momentum, RMSProp and chains of such pieces qualify; global-norm
clipping, trust ratios (LAMB, LARS), factored moments (Adafactor) or
matrix-wise optimizers (Muon, Shampoo) would silently change meaning on a
block, so :func:`check_elementwise` refuses them, naming the piece.

Two more things make the block optimizer follow the user's intent:
- its learning-rate schedule reads the *global* step: the inner state restarts
  at every relocalization (fresh moments, fresh bias correction), but
  :func:`sync_schedule_counts` sets the schedule counters to LoSiA's step count
  before every update, so a cosine decay does not restart per block;
- an optimizer that reads ``params`` (decoupled weight decay) gets the block's
  weights, so decay touches the block only (``scale_by_losia(inner_params=True)``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from losia_jax.state import LoSiATransformation

# The schedule counters of optax's state types: `ScaleByScheduleState` (a
# learning-rate schedule in `optax.adamw(schedule)`) and the counters of
# `optax.inject_hyperparams`. Adam's own count is *not* one of them: it drives
# bias correction and restarts with the block, as LOSIA_SPEC section 6 asks.
_SCHEDULE_STATES = tuple(
    t for t in (getattr(optax, "ScaleByScheduleState", None),
                getattr(optax, "InjectHyperparamsState", None),
                getattr(optax, "InjectStatefulHyperparamsState", None)) if t is not None)

_PROBE_SHAPE = (4, 6)  # not square, so a factored or per-row/column state shows


def sync_schedule_counts(state, count):
  """``state`` with every schedule counter set to ``count`` (broadcast to its shape)."""

  def fix(x):
    if isinstance(x, _SCHEDULE_STATES):
      c = x.count
      return x._replace(count=jnp.broadcast_to(jnp.asarray(count, c.dtype), c.shape))
    return x

  return jax.tree.map(fix, state, is_leaf=lambda x: isinstance(x, _SCHEDULE_STATES))


class AdamSettings(NamedTuple):
  """An inner optimizer that is Adam followed by scalar-state pieces.

  Attributes:
    b1, b2, eps, eps_root: the hyper-parameters of its ``optax.scale_by_adam``
      (numbers or arrays).
    tail: what follows Adam when the optimizer is an ``optax.chain`` (e.g.
      ``optax.adamw``'s ``add_decayed_weights`` and ``scale_by_learning_rate``),
      as one transformation whose state is the chain's state after Adam's;
      None for a bare ``optax.scale_by_adam``.
  """

  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  tail: Optional[optax.GradientTransformation] = None


def adam_settings(tx: optax.GradientTransformation) -> Optional[AdamSettings]:
  """How ``tx`` is built from Adam, or None.

  Recognised: a plain ``optax.scale_by_adam`` (no Nesterov, moments in the
  gradients' dtype), and an ``optax.chain`` that starts with one and goes on
  with pieces whose state holds scalars only (``optax.adam``, ``optax.adamw``,
  a schedule, decoupled decay). The direction of such an optimizer is a
  function of Adam's *new* moments, the gradient-free pieces after it and
  their old scalar state, which lets the non-target step skip a non-finite
  step by selecting the moments rather than in a conditional
  (``losia_jax.stages``). Anything else returns None and takes the general path.
  """
  head = _bare_adam(tx)
  if head is not None:
    return head
  inits = _closure(tx.init).get("init_fns")
  updates = _closure(tx.update).get("update_fns")
  if not (getattr(tx.update, "__qualname__", "").startswith("chain.")
          and isinstance(inits, tuple) and isinstance(updates, tuple)
          and len(inits) == len(updates) >= 2):
    return None
  head = _bare_adam(_unwrapped(optax.GradientTransformationExtraArgs(inits[0], updates[0])))
  if head is None:
    return None
  tail = optax.chain(*(optax.GradientTransformationExtraArgs(i, u)
                       for i, u in zip(inits[1:], updates[1:])))
  try:
    state = jax.eval_shape(tail.init, jax.ShapeDtypeStruct(_PROBE_SHAPE, jnp.float32))
  except Exception:  # pylint: disable=broad-except
    return None
  if any(jnp.shape(x) != () for x in jax.tree_util.tree_leaves(state)):
    return None  # momentum or another parameter-sized state after Adam
  return head._replace(tail=tail)


def _bare_adam(tx) -> Optional[AdamSettings]:
  fn = getattr(tx, "update", None)
  if getattr(fn, "__qualname__", "") != "scale_by_adam.<locals>.update_fn":
    return None
  c = _closure(fn)
  if c.get("nesterov", True) is not False or c.get("mu_dtype", 0) is not None:
    return None
  try:
    return AdamSettings(c["b1"], c["b2"], c["eps"], c["eps_root"])
  except KeyError:
    return None


def _unwrapped(tx):
  """``tx`` without the ``with_extra_args_support`` wrapper ``optax.chain`` adds."""
  fn = tx.update
  while getattr(fn, "__qualname__", "").startswith("with_extra_args_support."):
    tx = _closure(fn)["tx"]
    fn = tx.update
  return tx


def _closure(fn) -> dict:
  cells = getattr(fn, "__closure__", None) or ()
  return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def chain_pieces(tx: optax.GradientTransformation) -> list:
  """The transformations of an ``optax.chain`` (recursively flattened).

  optax keeps them only in the closures of the chain's ``init_fn`` and
  ``update_fn``; anything that is not recognisably a chain is one piece.
  """
  inits = _closure(tx.init).get("init_fns")
  updates = _closure(tx.update).get("update_fns")
  if (getattr(tx.update, "__qualname__", "").startswith("chain.")
      and isinstance(inits, tuple) and isinstance(updates, tuple) and len(inits) == len(updates)):
    return [p for i, u in zip(inits, updates)
            for p in chain_pieces(optax.GradientTransformationExtraArgs(i, u))]
  return [tx]


def _name(tx) -> str:
  """The optax factory that made ``tx`` (e.g. ``clip_by_global_norm``)."""
  fn = _unwrapped(tx).update  # optax.chain wraps plain transformations
  qual = getattr(fn, "__qualname__", type(fn).__name__)
  return qual.split(".<locals>")[0]


def _probe(tx, shape, g, w, steps=3):
  state = tx.init(jnp.zeros(shape, jnp.float32))
  outs = []
  for k in range(steps):
    u, state = tx.update(g[k], state, w)
    outs.append(np.asarray(u))
  return state, outs


def check_elementwise(tx: optax.GradientTransformation, what: str = "the optimizer") -> None:
  """Raises ``ValueError`` unless ``tx`` acts entry by entry (see the module doc).

  The test runs ``tx`` eagerly on a small block and on its left half alone, with
  large gradients (so a norm-based clip engages): an elementwise optimizer gives
  the left half of the block's update in both cases, and keeps only scalar or
  block-shaped state.
  """
  if isinstance(tx, LoSiATransformation):
    raise ValueError(f"{what} is itself a LoSiA transformation; put one LoSiA stage in the "
                     "chain, followed by a plain optax optimizer such as optax.adamw(lr)")
  culprit = _fault(tx)
  if culprit is None:
    return
  pieces = chain_pieces(tx)
  bad = [(p, _fault(p)) for p in pieces] if len(pieces) > 1 else [(tx, culprit)]
  bad = [(p, f) for p, f in bad if f is not None] or [(tx, culprit)]
  detail = "; ".join(f"{_name(p)} {f}" for p, f in bad)
  raise ValueError(
      f"{what} is not supported as LoSiA's inner optimizer: {detail}. LoSiA runs it on each "
      "compact [k_out, k_in] block, so it must act elementwise. Supported: optax.adam, adamw, "
      "lion, sgd (with momentum), rmsprop, and optax.chain of elementwise pieces "
      "(scale_by_adam, add_decayed_weights, scale_by_learning_rate, trace, ...). A global-norm "
      "clip goes *before* the LoSiA stage: losia_jax.chain(optax.clip_by_global_norm(1.0), "
      "losia_jax.losia(config), optax.adamw(lr))")


def _fault(tx) -> str | None:
  """Why ``tx`` is not elementwise, or None."""
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(3,) + _PROBE_SHAPE) * 1e3, jnp.float32)
  w = jnp.asarray(rng.normal(size=_PROBE_SHAPE), jnp.float32)
  half = _PROBE_SHAPE[1] // 2
  culprit = None
  try:
    state, full = _probe(tx, _PROBE_SHAPE, g, w)
    bad_leaf = [jnp.shape(x) for x in jax.tree_util.tree_leaves(state)
                if jnp.shape(x) not in ((), _PROBE_SHAPE)]
    _, part = _probe(tx, (_PROBE_SHAPE[0], half), g[..., :half], w[:, :half])
    same = all(np.allclose(a[:, :half], b, rtol=1e-5, atol=1e-6) for a, b in zip(full, part))
    if bad_leaf:
      culprit = f"keeps state of shape {bad_leaf[0]} for a {_PROBE_SHAPE} block"
    elif not same:
      culprit = "updates an entry depending on the other entries of the block"
  except Exception as e:  # pylint: disable=broad-except
    culprit = f"could not run on a compact block ({type(e).__name__}: {e})"
  return culprit
