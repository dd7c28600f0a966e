"""The two gradient forms LoSiA's update reads: a parameter-shaped tree, or
:class:`ProGradients` (LoSiA-Pro's compact blocks). ``_DenseGrads`` and
``_ProGrads`` give the transform one interface over both; their ``ops`` are
what travels through its conditionals."""

from __future__ import annotations

from typing import NamedTuple

import jax

from losia_jax import blocks
from losia_jax.targets import Bucket, LoSiAPlan


class ProGradients(NamedTuple):
  """Gradients in LoSiA-Pro form: compact blocks instead of full target gradients.

  Made by :func:`losia_jax.pro.value_and_grad`; ``apply_gradients`` and
  ``update`` accept it in place of a parameter-shaped gradient tree.

  Attributes:
    blocks: ``{role: [N, *block_shape]}`` gradient of every core block of the
      role's (non-row-mode) targets, in bucket order and stored layout.
    profile: ``{role: slice_shape}`` full gradient of the matrix of that role
      in the layer whose profiling slot holds this step (async schedule);
      zeros when that layer has no matrix of the role.
    dense: ``{key: gradient}`` full gradients of the output layer (row mode)
      and, with ``non_target="train"``, of every non-target leaf; keys are the
      plan's dotted parameter paths.
  """

  blocks: dict[str, jax.Array]
  profile: dict[str, jax.Array]
  dense: dict[str, jax.Array]


class _DenseGrads:
  """Reads of a parameter-shaped gradient tree. ``ops`` travel through conditionals."""

  def __init__(self, grads, plan: LoSiAPlan):
    self.ops = jax.tree_util.tree_leaves(grads)
    if len(self.ops) != len(plan.keys):
      raise ValueError(f"grads have {len(self.ops)} leaves but params {len(plan.keys)}")

  def block(self, b: Bucket, gather):
    return gather(self.ops, b)

  @staticmethod
  def layer(ops, b: Bucket, j: int, l: int):
    t = b.members[j]
    return blocks.layer_slice(ops[t.leaf_index], t, l)

  def leaf(self, key: str, index: int):
    return self.ops[index]


class _ProGrads:
  """Reads of :class:`ProGradients`: compact blocks, the profiling layer's full
  gradients and the dense leaves."""

  def __init__(self, grads: ProGradients, plan: LoSiAPlan, train_non_targets: bool):
    want_blocks = {b.role for b in plan.buckets if not b.first.row_mode}
    want_dense = {b.first.key for b in plan.buckets if b.first.row_mode}
    if train_non_targets:
      want_dense |= {k for k, _ in plan.non_targets}
    for field, got, want in (("blocks", set(grads.blocks), want_blocks),
                             ("profile", set(grads.profile), want_blocks),
                             ("dense", set(grads.dense), want_dense)):
      if got != want:
        raise ValueError(f"ProGradients.{field} has keys {sorted(got)}; this plan needs "
                         f"{sorted(want)}")
    self.grads = grads
    self.ops = (grads.profile, grads.dense)

  def block(self, b: Bucket, gather):
    if b.first.row_mode:  # the output layer keeps its full gradient
      return gather({t.leaf_index: self.grads.dense[t.key] for t in b.members}, b)
    return self.grads.blocks[b.role]

  @staticmethod
  def layer(ops, b: Bucket, j: int, l: int):
    profile, dense = ops
    t = b.members[j]
    if t.row_mode:
      return dense[t.key]
    return profile[b.role]

  def leaf(self, key: str, index: int):
    return self.grads.dense[key]
