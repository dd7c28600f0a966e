"""Finding LoSiA targets among named torch parameters: names, layer ids, block sizes.

The naming rules are the framework-neutral ones of ``losia_common.names``, so
``losia_torch`` and ``losia_jax`` pick the same targets, layer ids and initial
subnets for the same model. LOSIA_SPEC.md section 1 speaks of every target as
``[d_out, d_in]``: a torch ``nn.Linear.weight`` is stored that way, transformers'
GPT-2 ``Conv1D.weight`` is stored ``[d_in, d_out]`` (``TargetSpec.transposed``).
The layout comes from the module that owns the weight (:func:`layouts_of`); a
target owned by anything else is an error, not a guess.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch

from losia_common import LoSiAConfig
from losia_common import names as _names
from losia_common import schedule as _schedule
from losia_common.subnet import block_size


@dataclasses.dataclass(eq=False)
class TargetSpec:
  """One target matrix.

  Attributes:
    name: dotted parameter name (as in ``named_parameters()``).
    param: the parameter itself.
    parsed: the parsed name (``losia_common.names.ParamName``).
    d_out, d_in: neuron counts (``weight.shape``).
    k_out, k_in: block sizes; ``k_in == d_in`` in row mode.
    row_mode: the output layer: ``k_out`` full rows are trained.
    layer_id: schedule id (decoder layer ``i`` -> ``i + a``; output layer 0).
    identity: canonical identity that seeds the initial subnet.
    role: module path inside its layer (``self_attn.q_proj``; ``output``);
      in async mode the targets of one role share one profiling buffer.
    transposed: the weight is stored ``[d_in, d_out]`` (transformers ``Conv1D``);
      ``rows``/``cols`` still index output/input neurons.
  """

  name: str
  param: torch.Tensor
  parsed: _names.ParamName
  d_out: int
  d_in: int
  k_out: int
  k_in: int
  row_mode: bool
  layer_id: int
  identity: str
  role: str
  transposed: bool = False

  @property
  def block_shape(self) -> tuple[int, int]:
    return (self.k_out, self.k_in)

  @property
  def block_params(self) -> int:
    return self.k_out * self.k_in


@dataclasses.dataclass(eq=False)
class LoSiAPlan:
  """Where LoSiA acts.

  Attributes:
    targets: the target matrices, in parameter order.
    non_targets: ``(name, param)`` of every other parameter.
    num_layers: L, the number of decoder layers (max layer index + 1).
    output_is_target: whether the output layer is a target (a = 1).
    total: number of profiling slots per round, ``L + a``.
  """

  targets: list[TargetSpec]
  non_targets: list[tuple[str, torch.Tensor]]
  num_layers: int
  output_is_target: bool
  total: int

  @property
  def target_params(self) -> int:
    return sum(t.d_out * t.d_in for t in self.targets)

  @property
  def trainable_block_params(self) -> int:
    return sum(t.block_params for t in self.targets)

  @property
  def non_target_params(self) -> int:
    return sum(p.numel() for _, p in self.non_targets)

  def summary(self, non_target: str = "train") -> str:
    """A human-readable report of what LoSiA selected."""
    total = self.target_params
    blk = self.trainable_block_params
    lines = [
        f"LoSiA: {len(self.targets)} target matrices, {self.num_layers} decoder layers"
        + (", output layer in row mode" if self.output_is_target else ""),
        f"  target params {total:,}; trainable block params {blk:,} ({blk / max(total, 1):.2%})",
        f"  non-target params {self.non_target_params:,} in {len(self.non_targets)} tensors "
        f"({non_target})",
    ]
    return "\n".join(lines)


def split_name(name: str) -> tuple[str, ...]:
  return tuple(name.split(".")) if name else ("<root>",)


def named_parameters_of(obj: Any) -> tuple[list[tuple[str, torch.Tensor]], Optional[torch.Tensor]]:
  """``(named params, output-layer weight or None)`` of a module or a named list.

  A module gives ``named_parameters()`` (tied weights appear once) and, when it
  has ``get_output_embeddings()`` (transformers models), that module's weight:
  for tied embeddings the embedding parameter. A ``DistributedDataParallel``
  wrapper is looked through, so names match the single-process model.
  """
  if isinstance(obj, torch.nn.Module):
    inner = obj
    while isinstance(inner, torch.nn.parallel.DistributedDataParallel):
      inner = inner.module
    out = None
    get = getattr(inner, "get_output_embeddings", None)
    if callable(get):
      try:
        mod = get()
      except (NotImplementedError, AttributeError):
        mod = None
      w = getattr(mod, "weight", None)
      if isinstance(w, torch.Tensor):
        out = w
    return list(inner.named_parameters()), out
  items = list(obj)
  if not items:
    raise ValueError("LoSiA got an empty parameter list")
  for it in items:
    if not (isinstance(it, (tuple, list)) and len(it) == 2 and isinstance(it[0], str)
            and isinstance(it[1], torch.Tensor)):
      raise TypeError(
          "LoSiA needs parameter names to find its targets: pass a model or "
          "`model.named_parameters()` ((name, tensor) pairs); got an element of type "
          f"{type(it).__name__}. With transformers.Trainer use losia_torch.LoSiATrainer "
          "(Trainer's optimizer_cls_and_kwargs passes unnamed tensors, and Trainer's own "
          "clipping would not see the gradient values LoSiA reads)")
  return [(n, p) for n, p in items], None


OUT_IN, IN_OUT = "[d_out, d_in]", "[d_in, d_out]"


def is_conv1d(mod: torch.nn.Module) -> bool:
  """transformers' GPT-2 ``Conv1D``: ``weight [nx, nf] = [d_in, d_out]``, ``y = x W + b``."""
  w = getattr(mod, "weight", None)
  return (type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
          and tuple(w.shape) == (getattr(mod, "nx", None), getattr(mod, "nf", None)))


def layouts_of(model: torch.nn.Module) -> dict[int, tuple[str, str]]:
  """``id(weight) -> (layout, owner type name)`` for the 2-D weights of ``model``.

  ``nn.Linear`` and ``nn.Embedding`` (as the output layer: ``[vocab, hidden]``)
  are ``[d_out, d_in]``; transformers' ``Conv1D`` is ``[d_in, d_out]``; any
  other owner gets layout None (a target there is refused by :func:`make_plan`).
  """
  inner = model
  while isinstance(inner, torch.nn.parallel.DistributedDataParallel):
    inner = inner.module
  out: dict[int, tuple[str, str]] = {}
  for _, mod in inner.named_modules():
    w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
    if w is None or w.dim() != 2:
      continue
    if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
      lay = OUT_IN
    elif is_conv1d(mod):
      lay = IN_OUT
    else:
      lay = None
    prev = out.get(id(w))
    if prev is None or prev[0] is None:  # tied weights: any known owner decides
      out[id(w)] = (lay, type(mod).__name__)
  return out


def make_plan(named: Sequence[tuple[str, torch.Tensor]], config: LoSiAConfig, *,
              output_param: Optional[torch.Tensor] = None,
              output_module: str = "lm_head",
              layouts: Optional[dict[int, tuple[str, str]]] = None) -> LoSiAPlan:
  """Finds the targets of ``config`` among ``named`` parameters.

  Args:
    named: ``(name, parameter)`` pairs.
    config: the LoSiA configuration.
    output_param: the output-layer weight (for a transformers model the weight
      of ``get_output_embeddings()``; the embedding when tied). If None and
      ``config.output_rank_factor > 0``, the one weight whose module matches
      ``output_module`` is used.
    output_module: module name or regex of the output layer (see above).

    layouts: :func:`layouts_of` the model; None reads every target as
      ``[d_out, d_in]`` (the ``nn.Linear`` layout).

  Raises:
    ValueError: naming the parameters or patterns, when no target matches, a
      target's owner has no known layout, a
      target is not 2-D, a target has no layer index, the output layer is asked
      for but not found, or two targets of one role sit in one layer.
  """
  names = [n for n, _ in named]
  if len(set(names)) != len(names):
    raise ValueError("parameter names are not unique")
  ids = [id(p) for _, p in named]
  if len(set(ids)) != len(ids):
    raise ValueError("a parameter appears twice in the parameter list")
  parsed = [_names.parse_name(split_name(n)) for n in names]
  want_output = config.output_rank_factor > 0

  output_index = None
  if want_output and output_param is not None:
    found = [i for i, (_, p) in enumerate(named) if p is output_param]
    if not found:
      raise ValueError(
          f"output_rank_factor={config.output_rank_factor}: the model's output-layer weight "
          "(get_output_embeddings().weight) is not among the optimizer's parameters")
    output_index = found[0]
  def transposed(p):
    return layouts is not None and layouts.get(id(p), (OUT_IN, ""))[0] == IN_OUT

  # find_targets sees [d_out, d_in] shapes (it checks ranks and reports shapes).
  shapes = [tuple(p.shape)[::-1] if p.dim() == 2 and transposed(p) else tuple(p.shape)
            for _, p in named]
  target_idx, output_idx = _names.find_targets(
      parsed, shapes, config, output_module=output_module, output_index=output_index)
  if layouts is not None:
    unknown = [f"{names[i]} (owned by {layouts[id(named[i][1])][1]})"
               for i in target_idx + output_idx
               if layouts.get(id(named[i][1]), (OUT_IN, ""))[0] is None]
    if unknown:
      raise ValueError(
          "LoSiA cannot know which axis of these targets holds the output neurons (their "
          "modules are neither nn.Linear, nn.Embedding nor transformers Conv1D): "
          + ", ".join(unknown) + ". Narrow target_modules, or pass (name, tensor) pairs to "
          "read them as [d_out, d_in]")
    bad_out = [names[i] for i in output_idx if transposed(named[i][1])]
    if bad_out:
      raise ValueError(f"the output layer {bad_out[0]} is a Conv1D ([d_in, d_out]); LoSiA's "
                       "row mode needs an nn.Linear or nn.Embedding output layer")
  for i in target_idx + output_idx:
    if not named[i][1].is_floating_point():
      raise ValueError(f"LoSiA target {names[i]} must be a floating-point tensor; "
                       f"got {named[i][1].dtype}")

  num_layers = max(parsed[i].layer_index for i in target_idx) + 1
  total = _schedule.total_slots(num_layers, want_output)
  targets = []
  seen: dict[tuple[str, int], str] = {}
  for i in sorted(target_idx + output_idx):
    nm, p = parsed[i], named[i][1]
    d_out, d_in = (int(x) for x in shapes[i])
    if i in output_idx:
      spec = TargetSpec(names[i], p, nm, d_out, d_in, block_size(config.output_rank_factor, d_out),
                        d_in, True, 0, _names.OUTPUT_IDENTITY, _names.OUTPUT_IDENTITY)
    else:
      spec = TargetSpec(names[i], p, nm, d_out, d_in, block_size(config.rank_factor, d_out),
                        block_size(config.rank_factor, d_in), False,
                        _schedule.layer_id(nm.layer_index, want_output),
                        _names.target_identity(nm.layer_index, nm.role), nm.role,
                        transposed(p))
    key = (spec.role, spec.layer_id)
    if key in seen:
      raise ValueError(f"targets {seen[key]} and {spec.name} have the same role {spec.role!r} "
                       "in the same layer; LoSiA needs one matrix per role and layer")
    seen[key] = spec.name
    targets.append(spec)
  tset = set(target_idx + output_idx)
  non_targets = [named[i] for i in range(len(named)) if i not in tset]
  return LoSiAPlan(targets, non_targets, num_layers, want_output, total)
