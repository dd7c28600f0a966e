"""How parameters are named, matched to ``target_modules`` and given layer ids.

Both backends reduce a parameter's location to a tuple of string components
(``("model", "layers", "3", "self_attn", "q_proj", "weight")``), so one set of
rules decides the targets, the layer ids and the canonical identity that seeds
the initial subnet. That is what lets the JAX and torch backends pick the same
targets and the same initial indices for the same model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

# Leaf names that hold the weight matrix of a module; other leaves of a matched
# module (bias, ...) stay non-targets (LOSIA_SPEC.md section 7).
WEIGHT_LEAF_NAMES = ("weight", "kernel", "embedding")

# Module-path components that hold the decoder layers. For a stacked
# (scan-over-layers) parameter the role is what follows this component, so that
# it equals the role of the same parameter in an unstacked model.
LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block")

OUTPUT_IDENTITY = "output"


@dataclasses.dataclass(frozen=True)
class ParamName:
  """A parameter location, split into its parts.

  Attributes:
    components: all path components, the leaf name last.
    module_path: dotted path of the owning module (components without the leaf).
    leaf: the leaf name (``weight``, ``kernel``, ``bias``, ...).
    layer_index: the decoder layer index read from the path, or None.
    role: the module path inside its decoder layer (``self_attn.q_proj``).
  """

  components: tuple[str, ...]
  module_path: str
  leaf: str
  layer_index: int | None
  role: str

  @property
  def dotted(self) -> str:
    return ".".join(self.components)


def parse_name(components: Sequence[str]) -> ParamName:
  comps = tuple(str(c) for c in components)
  if not comps:
    raise ValueError("a parameter path must have at least one component")
  module = comps[:-1]
  layer_index = None
  role_parts: tuple[str, ...] = module
  for i, c in enumerate(module):
    if c.isdigit():
      layer_index = int(c)
      role_parts = module[i + 1:]
      break
  else:
    for i, c in enumerate(module):
      if c in LAYER_CONTAINERS:
        role_parts = module[i + 1:]
        break
  return ParamName(comps, ".".join(module), comps[-1], layer_index,
                   ".".join(role_parts))


def module_matches(module_path: str, patterns: Iterable[str]) -> bool:
  """True if a ``target_modules`` entry matches the dotted module path.

  An entry matches when it equals one component of the path (``"q_proj"``), or
  when it matches the whole dotted path as a regular expression
  (``r"model\\.layers\\.\\d+\\.mlp\\..*"``).
  """
  parts = module_path.split(".") if module_path else []
  for pat in patterns:
    if pat in parts or re.fullmatch(pat, module_path):
      return True
  return False


def is_target_leaf(name: ParamName, patterns: Iterable[str]) -> bool:
  return name.leaf in WEIGHT_LEAF_NAMES and module_matches(name.module_path, patterns)


def is_output_leaf(name: ParamName, output_module: str) -> bool:
  """The output-layer matrix: a weight leaf whose module matches ``output_module``."""
  return name.leaf in WEIGHT_LEAF_NAMES and module_matches(name.module_path, [output_module])


def target_identity(layer_index: int | None, role: str) -> str:
  """Canonical, framework-neutral identity of one target matrix of one layer."""
  if layer_index is None:
    return OUTPUT_IDENTITY
  return f"layer{layer_index}.{role}"
