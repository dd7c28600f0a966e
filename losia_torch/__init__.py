"""LoSiA for PyTorch: high-rank fine-tuning of a dynamically localized subnet.

Public API:
- :class:`LoSiAOptimizer`: the optimizer (compact Adam per target block,
  importance profiling, relocalization, rewarm, non-target policy);
- :func:`get_losia_optimizer`: one-call setup for a (transformers) model, with a report;
- :func:`enable_pro`, :func:`disable_pro` (also optimizer methods): LoSiA-Pro, which
  swaps :class:`ProLayer` classes in for the target linear layers (their backward
  computes only the block gradient); :class:`LoSiAProLinear`, :func:`pro_linear`: the
  autograd function they call;
- :func:`enable_per_layer_step`, :func:`disable_per_layer_step` (also optimizer
  methods): the optional mode that updates each parameter inside backward;
- :class:`LoSiATrainer`: ``transformers.Trainer`` with LoSiA's optimizer and clipping
  (imports ``transformers`` on first use);
- :class:`LoSiAConfig`: the configuration shared with ``losia_jax``;
- :func:`select_subnet`, :func:`select_rows`, :func:`instant_importance`,
  :func:`update_importance`, :func:`rewarm_factor`: the pure pieces of the method;
- :func:`make_plan`, :class:`LoSiAPlan`, :class:`TargetSpec`: where LoSiA acts.

Layout (module: what it holds). ``optimizer``: the ``LoSiAOptimizer`` class (public
methods, the outline of a step, the small interface the other modules use);
``param_groups``: what it is built from; ``targets``: the plan; ``blocks``: per-target
state and the block of a tensor; ``gradients``: which gradient values a step reads,
the non-finite check, clipping; ``step``: a step's collect / apply / finish;
``update``: the Adam updates; ``relocalization``: importance and new blocks;
``checkpoint``: state dicts, following the parameters' device; ``pro``: LoSiA-Pro's
autograd function and layer classes; ``pro_reduce``: Pro's compact gradients averaged
across ranks (FSDP2, DDP); ``layerwise``: updates inside backward;
``fsdp``: the FSDP2 form of the step and of checkpoints; ``attach``:
``get_losia_optimizer``; ``trainer``: ``LoSiATrainer``; ``adam``, ``importance``,
``schedule``, ``selection``: the pure pieces. Imports go one way: no module imports
``optimizer`` but ``attach`` and ``trainer``.
"""

from losia_common import LoSiAConfig, LoSiAConfigError
from losia_torch.attach import get_losia_optimizer
from losia_torch.importance import (ImportanceSlot, importance_score, instant_importance,
                                    update_importance)
from losia_torch.layerwise import disable_per_layer_step, enable_per_layer_step
from losia_torch.gradients import NONFINITE_MESSAGE
from losia_torch.optimizer import LoSiAOptimizer
from losia_torch.pro import LoSiAProLinear, ProLayer, disable_pro, enable_pro, pro_linear
from losia_torch.schedule import ends_slot, rewarm_factor
from losia_torch.selection import select_rows, select_subnet, top_k_indices
from losia_torch.targets import LoSiAPlan, TargetSpec, make_plan

__all__ = [
    "ImportanceSlot",
    "LoSiAConfig",
    "LoSiAConfigError",
    "LoSiAOptimizer",
    "LoSiAPlan",
    "LoSiAProLinear",
    "LoSiATrainer",
    "NONFINITE_MESSAGE",
    "ProLayer",
    "TargetSpec",
    "disable_per_layer_step",
    "disable_pro",
    "enable_per_layer_step",
    "enable_pro",
    "ends_slot",
    "get_losia_optimizer",
    "importance_score",
    "instant_importance",
    "make_plan",
    "pro_linear",
    "rewarm_factor",
    "select_rows",
    "select_subnet",
    "top_k_indices",
    "update_importance",
]


def __getattr__(name):
  # LoSiATrainer needs transformers, which plain losia_torch does not import.
  if name == "LoSiATrainer":
    from losia_torch.trainer import LoSiATrainer
    return LoSiATrainer
  raise AttributeError(f"module 'losia_torch' has no attribute {name!r}")
