"""LoSiA for JAX/Optax: high-rank fine-tuning of a dynamically localized subnet.

Public API:
- :func:`losia`, :func:`scale_by_losia`, :func:`chain`: the Optax transformations
  (with a fused in-place ``apply_gradients`` path);
- :class:`LoSiAConfig`: the configuration shared with ``losia_torch``;
- :func:`select_subnet`, :func:`select_rows`, :func:`update_importance`,
  :func:`accumulate_importance`, :func:`instant_importance`, :func:`slot_owner`, :func:`rewarm_factor`: the
  pure pieces of the method;
- :func:`make_plan`, :class:`LoSiADimensionNumbers`: where LoSiA acts;
- :func:`state_nbytes`, :func:`state_shardings`: memory and placement of the state;
- :mod:`losia_jax.pro`: LoSiA-Pro (``pro.value_and_grad`` → compact
  :class:`ProGradients`; ``pro.pro_linear``, the ``custom_vjp`` projection).
"""

from losia_common import LoSiAConfig, LoSiAConfigError
from losia_jax.importance import (ImportanceState, accumulate_importance, importance_score,
                                  instant_importance, update_importance)
from losia_jax.schedule import ends_slot, rewarm_factor, slot_owner
from losia_jax.selection import select_rows, select_subnet
from losia_jax.sharding import state_shardings
from losia_jax.targets import (FLAX_KERNEL, OUT_IN, LoSiADimensionNumbers, LoSiAPlan,
                               TargetSpec, make_plan)
from losia_jax.compose import chain, find_losia_state, state_nbytes
from losia_jax.transform import (LoSiAState, LoSiATransformation, ProGradients, TargetState,
                                 scale_by_losia)
from losia_jax.alias import LoSiAStage, losia
from losia_jax import pro
from losia_jax.wrappers import MultiSteps, apply_gradients
from losia_jax import nnx

__all__ = [
    "FLAX_KERNEL",
    "OUT_IN",
    "ProGradients",
    "ImportanceState",
    "LoSiAConfig",
    "LoSiAConfigError",
    "LoSiADimensionNumbers",
    "LoSiAPlan",
    "LoSiAStage",
    "LoSiAState",
    "LoSiATransformation",
    "MultiSteps",
    "TargetSpec",
    "TargetState",
    "accumulate_importance",
    "apply_gradients",
    "chain",
    "ends_slot",
    "find_losia_state",
    "importance_score",
    "instant_importance",
    "losia",
    "make_plan",
    "nnx",
    "pro",
    "rewarm_factor",
    "scale_by_losia",
    "select_rows",
    "select_subnet",
    "slot_owner",
    "state_nbytes",
    "state_shardings",
    "update_importance",
]
