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


def find_targets(names: Sequence[ParamName], shapes: Sequence[tuple[int, ...]], config, *,
                 output_module: str = "lm_head", output_index: int | None = None,
                 stacked_layers: bool = False) -> tuple[list[int], list[int]]:
  """Positions of the target and output-layer parameters, by the shared rules.

  Both backends call this, so they select the same parameters and reject bad
  input with the same messages.

  Args:
    names: parsed names of all parameters, in order.
    shapes: their shapes.
    config: the ``LoSiAConfig``.
    output_module: module name or regex of the output layer, used when
      ``config.output_rank_factor > 0`` and ``output_index`` is None.
    output_index: position of the output-layer weight when the caller knows it
      (e.g. torch's ``get_output_embeddings()``).
    stacked_layers: targets without a layer index hold all layers along a
      leading axis (scan-over-layers); they must then be 3-D.

  Returns:
    ``(target_positions, output_positions)``; the latter has one element when
    the output layer is a target, none otherwise.

  Raises:
    ValueError: naming the parameters, when no target matches, a target is not
      2-D, a target has no layer index, or the output layer is not found.
  """
  dotted = [n.dotted for n in names]
  want_output = config.output_rank_factor > 0
  output_idx: list[int] = []
  if want_output:
    if output_index is not None:
      output_idx = [output_index]
    else:
      output_idx = [i for i, nm in enumerate(names) if is_output_leaf(nm, output_module)]
      if len(output_idx) != 1:
        found = [dotted[i] for i in output_idx]
        raise ValueError(
            f"output_rank_factor={config.output_rank_factor} needs exactly one output-layer "
            f"weight matching output_module={output_module!r}; found {found or 'none'}. "
            "For tied embeddings pass output_module='embed_tokens' (or the embedding's name).")
  target_idx = [i for i, nm in enumerate(names)
                if i not in output_idx and is_target_leaf(nm, config.target_modules)]
  if not target_idx:
    sample = ", ".join(dotted[:8]) + (", ..." if len(dotted) > 8 else "")
    raise ValueError(
        f"target_modules={list(config.target_modules)} match no parameter (targets are the "
        f"{', '.join(WEIGHT_LEAF_NAMES[:-1])} or {WEIGHT_LEAF_NAMES[-1]} leaves of matched "
        f"modules); parameter paths are: {sample}")
  bad_rank = []
  for i in target_idx + output_idx:
    stacked = stacked_layers and i not in output_idx and names[i].layer_index is None
    if len(shapes[i]) != (3 if stacked else 2):
      bad_rank.append(f"{dotted[i]} {tuple(shapes[i])}")
  if bad_rank:
    hint = (" (with stacked_layers=True, targets without a layer index in their path must be "
            "[layers, ., .])" if stacked_layers else
            " (JAX: for scan-over-layers parameters pass stacked_layers=True)")
    raise ValueError("LoSiA targets must be 2-D matrices; these are not: "
                     + "; ".join(bad_rank) + hint)
  no_layer = [dotted[i] for i in target_idx
              if names[i].layer_index is None and not stacked_layers]
  if no_layer:
    raise ValueError(
        "cannot find the decoder layer index of targets " + ", ".join(no_layer)
        + ": their path has no numeric component (e.g. 'layers.3....'); narrow "
        "target_modules (JAX: or pass stacked_layers=True for parameters that hold all "
        "layers along a leading axis)")
  return target_idx, output_idx
