"""Finding LoSiA targets in a params pytree: names, layer ids and axis mapping.

A :class:`LoSiAPlan` is computed from the *structure* of a params tree only
(paths, shapes, dtypes), never from values, so ``init`` works under
``jax.eval_shape``. The naming rules are the framework-neutral ones of
``losia_common.names``; both backends therefore find the same targets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import numpy as np

from losia_common import LoSiAConfig
from losia_common import names as _names
from losia_common import schedule as _schedule
from losia_common.subnet import block_size


class LoSiADimensionNumbers(NamedTuple):
  """Which axes of a (per-layer) 2-D weight are the output and input neurons.

  Flax ``nnx.Linear`` kernels are ``[d_in, d_out]``: ``LoSiADimensionNumbers(
  out_axis=1, in_axis=0)``. PyTorch-layout weights and embeddings are
  ``[d_out, d_in]``: ``LoSiADimensionNumbers(out_axis=0, in_axis=1)``. Axes
  are counted *without* the leading layer axis of stacked parameters.
  """

  out_axis: int
  in_axis: int


FLAX_KERNEL = LoSiADimensionNumbers(out_axis=1, in_axis=0)
OUT_IN = LoSiADimensionNumbers(out_axis=0, in_axis=1)

# Layout of a weight leaf when the user gives no dimension numbers. Explicit by
# leaf name; any other leaf name is an error rather than a guess.
DEFAULT_LAYOUTS = {"kernel": FLAX_KERNEL, "weight": OUT_IN, "embedding": OUT_IN}

DimensionNumbersArg = Union[
    None, LoSiADimensionNumbers,
    Callable[[_names.ParamName, tuple[int, ...]], LoSiADimensionNumbers]]


@dataclasses.dataclass(frozen=True)
class TargetSpec:
  """One target leaf (a matrix, or a stack of per-layer matrices).

  Attributes:
    key: dotted parameter path; the key of this target in the optimizer state.
    leaf_index: position among the flattened leaves of the params tree.
    name: the parsed parameter name.
    shape: shape of the whole leaf.
    stacked: the leaf has a leading layer axis of size ``n``.
    n: number of per-layer matrices in the leaf (1 when not stacked).
    transposed: the per-layer matrix is stored ``[d_in, d_out]``.
    d_out, d_in: neuron counts of one per-layer matrix.
    k_out, k_in: block sizes; ``k_in == d_in`` in row mode.
    row_mode: the output layer: trains ``k_out`` full rows (no column subset).
    layer_ids: schedule id of each per-layer matrix (``i + a``; 0 for output).
    identities: canonical identity of each per-layer matrix (seeds the subnet).
    role: the module path inside its layer; targets of one role share a
      profiling slot in async mode.
  """

  key: str
  leaf_index: int
  name: _names.ParamName
  shape: tuple[int, ...]
  stacked: bool
  n: int
  transposed: bool
  d_out: int
  d_in: int
  k_out: int
  k_in: int
  row_mode: bool
  layer_ids: tuple[int, ...]
  identities: tuple[str, ...]
  role: str

  @property
  def slice_shape(self) -> tuple[int, ...]:
    """Shape of one per-layer matrix in its stored layout."""
    return tuple(self.shape[1:]) if self.stacked else tuple(self.shape)

  @property
  def block_shape(self) -> tuple[int, int]:
    """Shape of one compact block, in the stored layout (like the weight)."""
    return (self.k_in, self.k_out) if self.transposed else (self.k_out, self.k_in)

  @property
  def block_params(self) -> int:
    return self.n * self.k_out * self.k_in


@dataclasses.dataclass(frozen=True)
class Bucket:
  """All per-layer matrices of one role (``self_attn.q_proj``, ..., ``output``).

  The optimizer state of a bucket is stacked over its ``size`` matrices, so the
  inner optimizer, rewarm and relocalization run once per role instead of once
  per matrix, whether the model stores its layers as separate leaves or as one
  stacked leaf.

  Attributes:
    role: the role; the key of the bucket in the optimizer state.
    members: the leaves holding the matrices, in layer order.
    offsets: position of each member's first matrix in the bucket.
    layer_ids: schedule id of each matrix, in bucket order.
    identities: canonical identity of each matrix (seeds the initial subnet).
  """

  role: str
  members: tuple[TargetSpec, ...]
  offsets: tuple[int, ...]
  layer_ids: tuple[int, ...]
  identities: tuple[str, ...]

  @property
  def size(self) -> int:
    return len(self.layer_ids)

  @property
  def first(self) -> TargetSpec:
    return self.members[0]

  def tables(self, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer id: owning member (1-based, 0 none), index in it, position in bucket."""
    member = np.zeros(total, np.int32)
    local = np.zeros(total, np.int32)
    pos = np.zeros(total, np.int32)
    for j, (m, off) in enumerate(zip(self.members, self.offsets)):
      for l, lid in enumerate(m.layer_ids):
        member[lid], local[lid], pos[lid] = j + 1, l, off + l
    return member, local, pos


@dataclasses.dataclass(frozen=True)
class LoSiAPlan:
  """Where LoSiA acts in a params tree.

  Attributes:
    treedef: structure of the params tree the plan was made for.
    keys: dotted path of every leaf, in flattening order.
    targets: the target leaves.
    non_targets: ``(key, leaf_index)`` of every other leaf.
    num_layers: L, the number of decoder layers (max layer index + 1).
    output_is_target: whether the output layer is a target (a = 1).
    total: number of profiling slots per round, ``L + a``.
  """

  treedef: Any
  keys: tuple[str, ...]
  targets: tuple[TargetSpec, ...]
  non_targets: tuple[tuple[str, int], ...]
  num_layers: int
  output_is_target: bool
  total: int

  @property
  def target_params(self) -> int:
    return sum(int(np.prod(t.shape)) for t in self.targets)

  @property
  def trainable_block_params(self) -> int:
    return sum(t.block_params for t in self.targets)

  @functools.cached_property
  def buckets(self) -> tuple[Bucket, ...]:
    """Targets grouped by role; members of a role must share shapes and layout."""
    by_role: dict[str, list[TargetSpec]] = {}
    for t in self.targets:
      by_role.setdefault(t.role, []).append(t)
    out = []
    for role, specs in by_role.items():
      specs.sort(key=lambda t: t.layer_ids[0])
      kinds = {(t.slice_shape, t.transposed, t.k_out, t.k_in, t.row_mode) for t in specs}
      if len(kinds) != 1:
        raise ValueError(
            f"targets of role {role!r} differ in shape or layout ({', '.join(t.key for t in specs)}); "
            "LoSiA stacks the state of one role across layers")
      ids = [i for t in specs for i in t.layer_ids]
      if len(set(ids)) != len(ids):
        raise ValueError(f"role {role!r} has two matrices in one layer: "
                         + ", ".join(t.key for t in specs))
      offsets = tuple(int(x) for x in np.cumsum([0] + [t.n for t in specs])[:-1])
      out.append(Bucket(role, tuple(specs), offsets, tuple(ids),
                        tuple(x for t in specs for x in t.identities)))
    return tuple(out)

  def summary(self) -> str:
    """A human-readable report of what LoSiA selected."""
    total = sum(int(np.prod(t.shape)) for t in self.targets)
    lines = [
        f"LoSiA: {sum(t.n for t in self.targets)} target matrices in {len(self.targets)} "
        f"leaves, {self.num_layers} decoder layers"
        + (", output layer in row mode" if self.output_is_target else ""),
        f"  target params {total:,}; trainable block params {self.trainable_block_params:,} "
        f"({self.trainable_block_params / max(total, 1):.2%})",
        f"  non-target leaves {len(self.non_targets)}",
    ]
    return "\n".join(lines)


def path_components(path: Sequence[Any]) -> tuple[str, ...]:
  """Turns a JAX key path into string components.

  ``GetAttrKey('value')`` entries are dropped: they are the payload of
  ``nnx.Variable`` leaves, so ``tx.init(nnx.state(model))`` and
  ``tx.update(nnx.as_pure(grads), ...)`` see the same names.
  """
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey):
      if k.name == "value":
        continue
      out.append(k.name)
    elif isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(str(k.key))
    else:
      out.append(str(k))
  return tuple(out)


def _dims_for(name: _names.ParamName, slice_shape: tuple[int, ...],
              dimension_numbers: DimensionNumbersArg, key: str) -> LoSiADimensionNumbers:
  if dimension_numbers is None:
    dims = DEFAULT_LAYOUTS.get(name.leaf)
    if dims is None:
      raise ValueError(
          f"cannot tell the layout of target {key!r} (leaf name {name.leaf!r}); pass "
          "dimension_numbers=LoSiADimensionNumbers(out_axis=..., in_axis=...)")
  elif isinstance(dimension_numbers, LoSiADimensionNumbers):
    dims = dimension_numbers
  else:
    dims = dimension_numbers(name, slice_shape)
  if sorted((dims.out_axis % 2, dims.in_axis % 2)) != [0, 1]:
    raise ValueError(f"dimension numbers {dims} of {key!r} must name axes 0 and 1 once each")
  return LoSiADimensionNumbers(dims.out_axis % 2, dims.in_axis % 2)


def make_plan(params: Any, config: LoSiAConfig, *, output_module: str = "lm_head",
              dimension_numbers: DimensionNumbersArg = None,
              stacked_layers: bool = False) -> LoSiAPlan:
  """Finds the targets of ``config`` in ``params`` (arrays or ``ShapeDtypeStruct``s).

  Raises:
    ValueError: naming the parameter paths, when no target matches, a target
      is not 2-D (3-D with ``stacked_layers``), a target's layer id cannot be
      found, or the output layer is asked for but not found.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys, names = [], []
  for path, _ in leaves_with_path:
    comps = path_components(path)
    names.append(_names.parse_name(comps) if comps else _names.parse_name(("<root>",)))
    keys.append(".".join(comps))
  if len(set(keys)) != len(keys):
    raise ValueError("parameter paths are not unique after dropping nnx 'value' keys")

  want_output = config.output_rank_factor > 0
  target_idx, output_idx = _names.find_targets(
      names, [tuple(x.shape) for _, x in leaves_with_path], config,
      output_module=output_module, stacked_layers=stacked_layers)

  layer_counts = []
  for i in target_idx:
    nm = names[i]
    if nm.layer_index is not None:
      layer_counts.append(nm.layer_index + 1)
    else:
      layer_counts.append(int(leaves_with_path[i][1].shape[0]))
  num_layers = max(layer_counts)
  total = _schedule.total_slots(num_layers, want_output)

  targets = []
  for i in sorted(target_idx + output_idx):
    nm, shape = names[i], tuple(leaves_with_path[i][1].shape)
    row_mode = i in output_idx
    stacked = (not row_mode) and nm.layer_index is None
    slice_shape = shape[1:] if stacked else shape
    dims = _dims_for(nm, slice_shape, dimension_numbers, keys[i])
    d_out, d_in = slice_shape[dims.out_axis], slice_shape[dims.in_axis]
    if row_mode:
      k_out, k_in = block_size(config.output_rank_factor, d_out), d_in
      ids, idents, role = (0,), (_names.OUTPUT_IDENTITY,), _names.OUTPUT_IDENTITY
    else:
      k_out = block_size(config.rank_factor, d_out)
      k_in = block_size(config.rank_factor, d_in)
      layer_idx = list(range(shape[0])) if stacked else [nm.layer_index]
      ids = tuple(_schedule.layer_id(li, want_output) for li in layer_idx)
      idents = tuple(_names.target_identity(li, nm.role) for li in layer_idx)
      role = nm.role
    targets.append(TargetSpec(
        key=keys[i], leaf_index=i, name=nm, shape=shape, stacked=stacked,
        n=shape[0] if stacked else 1, transposed=dims.out_axis == 1, d_out=d_out,
        d_in=d_in, k_out=k_out, k_in=k_in, row_mode=row_mode, layer_ids=ids,
        identities=idents, role=role))
  tset = set(target_idx + output_idx)
  non_targets = tuple((keys[i], i) for i in range(len(keys)) if i not in tset)
  return LoSiAPlan(treedef=treedef, keys=tuple(keys), targets=tuple(targets),
                   non_targets=non_targets, num_layers=num_layers,
                   output_is_target=want_output, total=total)
