"""The two gradient forms LoSiA's update reads: a parameter-shaped tree, or
:class:`ProGradients` (LoSiA-Pro's compact blocks).

:func:`gradient_view` wraps either in one interface, :class:`DenseGradients` or
:class:`CompactGradients`:

- ``block(bucket, rows, cols)``: the gradient of every block of a role;
- ``layer(ops, bucket, member, local)``: the full gradient of one layer's
  matrix (for importance), read from ``ops``, the arrays that travel through
  the step's conditionals (a static method, so that it runs inside them);
- ``leaf(key, index)``: the full gradient of a non-target (or row-mode) leaf.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

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


class DenseGradients:
  """Reads of a parameter-shaped gradient tree; ``ops`` are its leaves."""

  # the profiling layer's gradients are read at its (traced) layer
  owner_independent = False

  def __init__(self, grads: Any, plan: LoSiAPlan):
    self.ops = jax.tree_util.tree_leaves(grads)
    if len(self.ops) != len(plan.keys):
      raise ValueError(f"grads have {len(self.ops)} leaves but params {len(plan.keys)}")

  def block(self, bucket: Bucket, rows: jax.Array, cols: jax.Array,
            starts: blocks.Starts = ()) -> jax.Array:
    return blocks.gather_bucket(self.ops, bucket, rows, cols, starts)

  @staticmethod
  def layer(ops, bucket: Bucket, member: int, local) -> jax.Array:
    t = bucket.members[member]
    return blocks.layer_slice(ops[t.leaf_index], t, local)

  def leaf(self, key: str, index: int):
    return self.ops[index]


class CompactGradients:
  """Reads of :class:`ProGradients`: compact blocks, the profiling layer's full
  gradients and the dense leaves; ``ops`` are ``(profile, dense)``."""

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

  def block(self, bucket: Bucket, rows: jax.Array, cols: jax.Array,
            starts: blocks.Starts = ()) -> jax.Array:
    if bucket.first.row_mode:  # the output layer keeps its full gradient
      dense = {t.leaf_index: self.grads.dense[t.key] for t in bucket.members}
      return blocks.gather_bucket(dense, bucket, rows, cols, starts)
    return self.grads.blocks[bucket.role]

  @staticmethod
  def layer(ops, bucket: Bucket, member: int, local) -> jax.Array:
    del local  # Pro gradients hold the profiling layer's matrix only
    profile, dense = ops
    t = bucket.members[member]
    if t.row_mode:
      return dense[t.key]
    return profile[bucket.role]

  def leaf(self, key: str, index: int):
    return self.grads.dense[key]

  # the profiling layer's gradients are the same arrays whichever layer it is
  owner_independent = True

  def owner_matrix(self, bucket: Bucket) -> jax.Array:
    """The full gradient of the profiling layer's matrix of ``bucket``'s role (zeros
    when that layer has none; the output layer's, in row mode)."""
    return self.layer(self.ops, bucket, 0, None)


GradientView = Union[DenseGradients, CompactGradients]


def gradient_view(grads: Any, plan: LoSiAPlan, train_non_targets: bool,
                  is_async: bool) -> GradientView:
  """``grads`` (a parameter-shaped tree or :class:`ProGradients`) behind one interface."""
  if isinstance(grads, ProGradients):
    if not is_async:
      raise ValueError("LoSiA-Pro gradients need schedule='async': in sync mode every "
                       "target needs its full gradient during a profiling slot")
    return CompactGradients(grads, plan, train_non_targets)
  return DenseGradients(grads, plan)
