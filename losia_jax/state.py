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
  """

  rows: jax.Array
  cols: jax.Array
  inner: optax.OptState
  last_relocalization: jax.Array
  master: Optional[jax.Array] = None


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

  Besides ``init``/``update`` it carries ``apply_gradients(grads, state,
  params) -> (params, state)``, the in-place path, and ``plan(params)``, which
  reports the targets LoSiA found. Instances are made by :func:`scale_by_losia`,
  :func:`losia` and :func:`chain`.
  """

  apply_gradients: Callable[..., tuple[Params, Any]]
  plan: Callable[[Params], LoSiAPlan]
  losia_index: int  # position of the LoSiA state in a chain's state tuple (-1: itself)
  config: LoSiAConfig


def _make(init, update, apply_gradients, plan, losia_index=-1, inner=None,
          chained=(), config=None) -> LoSiATransformation:
  tx = LoSiATransformation(init, update)
  tx.apply_gradients = apply_gradients
  tx.plan = plan
  tx.config = config
  tx.losia_index = losia_index
  tx._inner = inner  # the inner optimizer (for state shardings)
  tx._chained = tuple(chained)  # the transformations of a chain
  return tx
