"""The state of a LoSiA transformation, and the transformation's type."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import optax

from losia_common import LoSiAConfig
from losia_jax.importance import ImportanceState
from losia_jax.targets import LoSiAPlan

Params = Any


class TargetState(NamedTuple):
  """State of one role's ``N`` target matrices (one per layer), stacked in layer order.

  Attributes:
    rows: int32 ``[N, k_out]``, sorted output-neuron indices of each block.
    cols: int32 ``[N, k_in]``, sorted input-neuron indices (all ``d_in`` columns in row mode).
    inner: the inner optimizer's state on compact ``[N, *block_shape]`` arrays
      (block in the weight's stored layout), vmapped over ``N`` so each matrix
      restarts on its own.
    last_relocalization: int32 ``[N]``, the step that ended the last profiling
      window of each matrix, ``-1`` before the first (drives rewarm).
    master: fp32 ``[N, *block_shape]``, the exact value of each block when the
      transformation keeps master weights (``master_weights=True``, for bf16
      parameters); the parameter holds its rounding. None otherwise.
    starts: int32 scalars, one per leaf of the role when it has several (a model
      with one leaf per layer): where that leaf's matrices start in the arrays
      above (``Bucket.offsets``); empty otherwise. They never change. They are
      state, not Python ints, because XLA compiles every distinct kernel on its
      own: reading each layer's part at a runtime offset makes the gathers,
      updates and scatters of all layers one kernel that XLA compiles once
      (with constant offsets, one per layer: most of LoSiA's compile time).
  """

  rows: jax.Array
  cols: jax.Array
  inner: optax.OptState
  last_relocalization: jax.Array
  master: Optional[jax.Array] = None
  starts: tuple[jax.Array, ...] = ()


class LoSiAState(NamedTuple):
  """State of :func:`scale_by_losia`. Shapes never change, across relocalizations too.

  Attributes:
    count: int32, the number of applied (finite) steps, ``s`` of the spec.
    targets: ``{role: TargetState}`` (roles: ``self_attn.q_proj``, ..., ``output``).
    importance: fp32 profiling buffers, ``{role: ImportanceState}``. Async: one
      matrix per role, reused by whichever layer profiles, so the memory is one
      layer's worth. Sync: ``[N, ...]`` per role, every target at once. A
      window's statistics start from zero at its first step (``count % period
      == 0``); between windows the buffers still hold the last window's.
    non_target: the inner optimizer's state on the non-target parameters
      (``{path: array}``), or ``optax.EmptyState()`` when they are frozen.
    notfinite_count: int32, steps skipped because a gradient value the step
      reads was NaN or infinite.
  """

  count: jax.Array
  targets: dict[str, TargetState]
  importance: dict[str, ImportanceState]
  non_target: optax.OptState
  notfinite_count: jax.Array


class LoSiATransformation(optax.GradientTransformationExtraArgs):
  """An Optax transformation with LoSiA's fused path.

  Made by :func:`losia_jax.scale_by_losia`, :func:`losia_jax.losia` and
  :func:`losia_jax.chain`. The tuple holds ``(init, update)`` only, as every
  optax transformation does (``optax.chain`` unpacks its elements into those
  two); the rest are attributes, all given to the constructor.

  Attributes:
    init: ``init(params) -> state``.
    update: ``update(grads, state, params) -> (updates, state)``.
    apply_gradients: ``apply_gradients(grads, state, params) -> (params, state)``,
      the fused path: each compact update is written into the (donated) params
      in place.
    plan: ``plan(params) -> LoSiAPlan``, the targets LoSiA acts on.
    config: the :class:`LoSiAConfig`.
    inner: LoSiA's inner optimizer (its state on non-targets is laid out like
      the params; :func:`losia_jax.state_shardings` reads it).
  """

  apply_gradients: Callable[..., tuple[Params, Any]]
  plan: Callable[[Params], LoSiAPlan]
  config: LoSiAConfig
  inner: optax.GradientTransformation

  def __new__(cls, init, update, *, apply_gradients, plan, config, inner):
    self = super().__new__(cls, init, update)
    # A NamedTuple subclass without __slots__ keeps other attributes in a __dict__.
    self.apply_gradients = apply_gradients
    self.plan = plan
    self.config = config
    self.inner = inner
    return self

  def __getnewargs_ex__(self):  # copy and pickle go through the constructor
    return tuple(self), dict(apply_gradients=self.apply_gradients, plan=self.plan,
                             config=self.config, inner=self.inner)
