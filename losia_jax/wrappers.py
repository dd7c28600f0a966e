"""LoSiA inside standard Optax wrappers: finding it, and keeping the fused path.

Optax wrappers (``optax.chain``, ``optax.MultiSteps``, ``optax.apply_if_finite``,
``optax.inject_hyperparams``, ...) hide the transformation they wrap in closures
or attributes, and expose only ``init``/``update``. Two things need LoSiA back:

- :func:`find_losia` reaches the LoSiA transformation inside any such wrapper,
  for what only LoSiA knows (its plan, its inner optimizer), e.g. the
  shardings of its state (:func:`losia_jax.state_shardings`);
- :func:`apply_gradients` is the fused step of any transformation: LoSiA's
  in-place ``apply_gradients`` where the transformation has one, also through
  ``optax.MultiSteps``; the plain ``update`` + ``optax.apply_updates`` otherwise.

:class:`MultiSteps` is ``optax.MultiSteps`` (same state, same ``update``) with a
fused ``apply_gradients``: the accumulation is MultiSteps' own, and every
``k``-th step LoSiA writes its compact update into the weights in place,
instead of returning a parameter-sized update that is zero on the other steps.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from losia_jax.state import LoSiATransformation
from losia_jax.targets import LoSiAPlan
from losia_jax.transform import LoSiAFunctions

Params = Any
ApplyFn = Callable[[Any, Any, Params], tuple[Params, Any]]


class LoSiACore(NamedTuple):
  """What a wrapper's state needs from the LoSiA transformation inside it.

  Attributes:
    plan: ``plan(params) -> LoSiAPlan``, the targets LoSiA acts on.
    inner: LoSiA's inner optimizer (the layout of its non-target state), or None.
  """

  plan: Callable[[Params], LoSiAPlan]
  inner: Optional[optax.GradientTransformation]


_MAX_DEPTH = 12  # wrappers nest a few levels; a bound keeps a stray closure cheap
_OPAQUE = (jax.Array, np.ndarray, np.generic, str, bytes, int, float, complex, bool, type,
           types.ModuleType, types.BuiltinFunctionType)


def find_losia(tx: Any) -> list[LoSiACore]:
  """The LoSiA transformations inside ``tx``, outermost first, each once.

  Looks through attributes (``optax.MultiSteps``), bound methods, closures
  (``optax.chain``, ``optax.apply_if_finite``, user wrappers),
  ``functools.partial`` and containers. A :class:`LoSiATransformation` is
  recognised by its type; where a wrapper kept only its ``init``/``update``
  (``optax.chain``), by those: they are bound methods of a
  :class:`~losia_jax.transform.LoSiAFunctions`. ``optax.inject_hyperparams``
  builds its transformation at every call, so it is built once here from the
  factory and the initial hyper-parameters (the plan does not depend on them).
  """
  found: list[LoSiACore] = []
  seen: set[int] = set()

  def add(core: LoSiACore):
    # `==`, not `is`: each access to a bound method (`functions.plan`) makes a new
    # one, equal to the others
    if all(core.plan != c.plan for c in found):
      found.append(core)

  def visit(obj, depth):
    if depth > _MAX_DEPTH or id(obj) in seen or isinstance(obj, _OPAQUE) or obj is None:
      return
    seen.add(id(obj))
    if isinstance(obj, LoSiATransformation):
      add(LoSiACore(obj.plan, obj.inner))
      return
    if isinstance(obj, LoSiAFunctions):
      add(LoSiACore(obj.plan, obj.inner))
      return
    if isinstance(obj, types.MethodType):
      visit(obj.__self__, depth + 1)
    elif isinstance(obj, functools.partial):
      for x in (obj.func, obj.args, obj.keywords):
        visit(x, depth + 1)
    elif isinstance(obj, types.FunctionType):
      injected = _injected_transformation(obj)
      if injected is not None:
        visit(injected, depth + 1)
      for value in _closure(obj).values():
        visit(value, depth + 1)
    elif isinstance(obj, (tuple, list)):
      for x in obj:
        visit(x, depth + 1)
    elif isinstance(obj, dict):
      for x in obj.values():
        visit(x, depth + 1)
    elif hasattr(obj, "__dict__"):
      for x in vars(obj).values():
        visit(x, depth + 1)

  visit(tx, 0)
  return found


def _closure(fn: types.FunctionType) -> dict[str, Any]:
  out = {}
  for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
    try:
      out[name] = cell.cell_contents
    except ValueError:  # a cell not yet filled
      pass
  return out


def _injected_transformation(fn: types.FunctionType) -> Any:
  """The transformation an ``optax.inject_hyperparams`` ``init``/``update`` builds."""
  if not fn.__qualname__.startswith(("inject_hyperparams.", "inject_stateful_hyperparams.")):
    return None
  cells = _closure(fn)
  factory = cells.get("inner_factory")
  if not callable(factory):
    return None
  hps = dict(cells.get("other_hps", {}))
  hps.update(cells.get("numeric_hps", {}))
  hps.update({k: s(0) for k, s in cells.get("sched_hps", {}).items()})
  try:
    return factory(**hps)
  except Exception:  # pylint: disable=broad-except
    return None  # not ours to diagnose: the wrapper's own init will raise


# --- the fused path through wrappers -----------------------------------------


def fused_path(tx: Any) -> Optional[ApplyFn]:
  """``tx``'s fused ``(grads, state, params) -> (params, state)``, or None if it has none.

  A transformation with ``apply_gradients`` (LoSiA, :func:`losia_jax.chain`,
  :class:`MultiSteps`) has one; so has a plain ``optax.MultiSteps`` around one.
  """
  apply = getattr(tx, "apply_gradients", None)
  if callable(apply):
    return apply
  if isinstance(tx, optax.MultiSteps):
    inner = fused_path(tx.inner_opt)
    if inner is not None:
      return functools.partial(_multi_steps_apply, tx, inner)
  return None


def apply_gradients(tx: Any, grads: Any, state: Any, params: Params) -> tuple[Params, Any]:
  """One step of any optax transformation: ``(params, state)`` after ``grads``.

  Takes the fused in-place path where ``tx`` has one (see :func:`fused_path`),
  else ``tx.update`` followed by ``optax.apply_updates``. The state is ``tx``'s
  own either way, so one checkpoint serves both.
  """
  fused = fused_path(tx)
  if fused is not None:
    return fused(grads, state, params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _is_false(x) -> bool:
  """``x`` is a concrete False (not a tracer): the default skip function's answer."""
  try:
    return not bool(x)
  except jax.errors.ConcretizationTypeError:
    return False


def _multi_steps_apply(ms: optax.MultiSteps, inner_apply: ApplyFn, grads: Any,
                       state: optax.MultiStepsState, params: Params
                       ) -> tuple[Params, optax.MultiStepsState]:
  """``optax.MultiSteps.update`` followed by ``apply_updates``, with the inner step fused.

  Mirrors optax 0.2.8's ``MultiSteps.update`` line for line (accumulation,
  counters, skip function), except that on the emitting mini-step the
  accumulated gradient goes to the inner optimizer's ``apply_gradients``, and
  on the others neither the inner step nor a zero update is computed.
  """
  k_steps = ms._every_k_schedule(state.gradient_step)  # pylint: disable=protected-access
  skip, skip_state = ms._should_skip_update_fn(  # pylint: disable=protected-access
      grads, state.gradient_step, params)
  if (skip.dtype, skip.shape) != (jnp.bool_, ()):
    raise ValueError("The `should_skip_update_fn` function should return a boolean scalar "
                     f"array, but it returned an array of dtype {skip.dtype} and shape "
                     f"{skip.shape}")

  def do_update(params, state):
    acc_grads = jax.tree.map(
        lambda g, acc: ms._acc_update(g, acc, n_acc=state.mini_step),  # pylint: disable=protected-access
        grads, state.acc_grads)
    emit = state.mini_step == (k_steps - 1)
    params, inner_state = jax.lax.cond(
        emit, lambda p, s: inner_apply(optax.tree.cast_like(acc_grads, grads), s, p),
        lambda p, s: (p, s), params, state.inner_opt_state)
    new_state = optax.MultiStepsState(
        mini_step=numerics.safe_increment(state.mini_step) % k_steps,
        gradient_step=emit * numerics.safe_increment(state.gradient_step)
        + (1 - emit) * state.gradient_step,
        inner_opt_state=inner_state,
        acc_grads=jax.tree.map(
            lambda ga: jnp.astype((1 - emit) * ga, ms._accumulator_dtype),  # pylint: disable=protected-access
            acc_grads),
        skip_state=skip_state)
    return params, new_state

  if _is_false(skip):  # no skip function: no conditional around the step
    return do_update(params, state)
  return jax.lax.cond(skip, lambda p, s: (p, s._replace(skip_state=skip_state)), do_update,
                      params, state)


class FusedTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation that also has a fused ``apply_gradients(grads, state, params)``."""

  apply_gradients: ApplyFn

  def __new__(cls, init, update, apply_gradients: ApplyFn):
    self = super().__new__(cls, init, update)
    # A NamedTuple subclass without __slots__ has a __dict__ for extra attributes.
    self.apply_gradients = apply_gradients
    return self


class MultiSteps(optax.MultiSteps):
  """``optax.MultiSteps`` around a LoSiA transformation, with a fused ``apply_gradients``.

  Same arguments, state (:class:`optax.MultiStepsState`), ``init``, ``update``
  and ``has_updated`` as ``optax.MultiSteps`` (it is a subclass), so optax
  tooling, ``nnx.Optimizer`` and checkpoints see a MultiSteps. In addition,
  ``params, state = ms.apply_gradients(grads, state, params)`` accumulates the
  gradients and, every ``k``-th mini-step, lets the wrapped transformation
  write its update into the (donated) params in place; it follows the same
  trajectory as ``update`` + ``optax.apply_updates``. The accumulator is
  parameter-sized, as in optax.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import losia_jax
    >>> params = {"layers": [{"q_proj": {"kernel": jnp.ones((16, 16))}}]}
    >>> cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
    >>> ms = losia_jax.MultiSteps(losia_jax.losia(1e-2, cfg), every_k_schedule=2)
    >>> state = ms.init(params)
    >>> grads = {"layers": [{"q_proj": {"kernel": jnp.ones((16, 16))}}]}
    >>> params, state = ms.apply_gradients(grads, state, params)  # accumulated only
    >>> int((params["layers"][0]["q_proj"]["kernel"] != 1).sum())
    0
    >>> params, state = ms.apply_gradients(grads, state, params)  # the step
    >>> int((params["layers"][0]["q_proj"]["kernel"] != 1).sum())
    16
  """

  def __init__(self, opt: optax.GradientTransformation, every_k_schedule, *args, **kwargs):
    super().__init__(opt, every_k_schedule, *args, **kwargs)
    self._inner_apply = fused_path(self.inner_opt)
    if self._inner_apply is None:
      raise ValueError(
          "losia_jax.MultiSteps needs a transformation with a fused apply_gradients (LoSiA, "
          f"losia_jax.chain(...)); {type(opt).__name__} has none: use optax.MultiSteps")

  def apply_gradients(self, grads: Any, state: optax.MultiStepsState, params: Params
                      ) -> tuple[Params, optax.MultiStepsState]:
    """Accumulates ``grads``; every ``k``-th mini-step, the fused step on their mean."""
    return _multi_steps_apply(self, self._inner_apply, grads, state, params)

  def gradient_transformation(self) -> FusedTransformation:
    """``(init, update)`` as an optax transformation, keeping ``apply_gradients``."""
    return FusedTransformation(self.init, self.update, self.apply_gradients)
