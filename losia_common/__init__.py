"""Framework-neutral parts of LoSiA shared by ``losia_jax`` and ``losia_torch``.

The configuration, the naming rules that decide targets and layer ids, the
seeded initial subnet, and plain reference versions of the schedule and the
localization. Nothing here imports JAX or torch.
"""

from losia_common.config import (
    DEFAULT_TARGET_MODULES,
    IMPORTANCE_KINDS,
    NON_TARGET_POLICIES,
    SCHEDULES,
    LoSiAConfig,
    LoSiAConfigError,
)
from losia_common.names import (
    ParamName,
    is_output_leaf,
    is_target_leaf,
    module_matches,
    parse_name,
    target_identity,
)
from losia_common.subnet import (
    block_size,
    initial_indices,
    reference_importance,
    reference_select,
)
from losia_common import schedule

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "IMPORTANCE_KINDS",
    "NON_TARGET_POLICIES",
    "SCHEDULES",
    "LoSiAConfig",
    "LoSiAConfigError",
    "ParamName",
    "block_size",
    "initial_indices",
    "is_output_leaf",
    "is_target_leaf",
    "module_matches",
    "parse_name",
    "reference_importance",
    "reference_select",
    "schedule",
    "target_identity",
]
