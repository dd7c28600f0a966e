"""LoSiA for JAX/Optax: high-rank fine-tuning of a dynamically localized subnet.

Public API:
- :func:`losia`, :func:`scale_by_losia`, :func:`chain`: the Optax
  transformations (:class:`LoSiATransformation`, with a fused in-place
  ``apply_gradients`` path); :class:`LoSiAConfig` (shared with ``losia_torch``)
  and :class:`LoSiAConfigError`;
- :func:`apply_gradients`, :class:`MultiSteps`, :mod:`losia_jax.nnx`: the fused
  path through any transformation, gradient accumulation and Flax NNX;
- :class:`LoSiAState`, :class:`TargetState`, :func:`find_losia_state`: the state;
  :func:`state_nbytes`, :func:`state_shardings`: its memory and placement;
  :mod:`losia_jax.checkpoint`: Orbax save/restore, also onto another mesh;
- :func:`make_plan`, :class:`LoSiADimensionNumbers`: where LoSiA acts;
- :mod:`losia_jax.pro`: LoSiA-Pro (``pro.value_and_grad`` → compact
  :class:`ProGradients`; ``pro.pro_linear``, the ``custom_vjp`` projection).

The pure pieces of the method live in their own modules:
:mod:`losia_jax.importance` (``update_importance``, ``accumulate_importance``,
``importance_score``), :mod:`losia_jax.selection` (``select_subnet``,
``select_rows``), :mod:`losia_jax.schedule` (``slot_owner``, ``ends_slot``,
``rewarm_factor``) and :mod:`losia_jax.targets` (``LoSiAPlan``, ``FLAX_KERNEL``,
``OUT_IN``).
"""

from losia_common import LoSiAConfig, LoSiAConfigError
from losia_jax.sharding import state_shardings
from losia_jax.targets import LoSiADimensionNumbers, make_plan
from losia_jax.compose import chain, find_losia_state, state_nbytes
from losia_jax.gradients import ProGradients
from losia_jax.state import LoSiAState, LoSiATransformation, TargetState
from losia_jax.transform import scale_by_losia
from losia_jax.alias import losia
from losia_jax import pro
from losia_jax.wrappers import MultiSteps, apply_gradients
from losia_jax import nnx
from losia_jax import checkpoint

__all__ = [
    "LoSiAConfig",
    "LoSiAConfigError",
    "LoSiADimensionNumbers",
    "LoSiAState",
    "LoSiATransformation",
    "MultiSteps",
    "ProGradients",
    "TargetState",
    "apply_gradients",
    "chain",
    "checkpoint",
    "find_losia_state",
    "losia",
    "make_plan",
    "nnx",
    "pro",
    "scale_by_losia",
    "state_nbytes",
    "state_shardings",
]
