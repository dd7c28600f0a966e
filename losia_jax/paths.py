"""The two ways a LoSiA step leaves the transformation.

- :func:`write_updates` (``tx.update``): parameter-shaped updates, zero outside
  the blocks, for ``optax.apply_updates``. The params are not written, so they
  are themselves the weights before the step (:class:`GivenWeights`), and
  profiling reads them before the updates are made. Each update is a
  scatter-*add* of the block into zeros, so that in one jit with
  ``optax.apply_updates`` XLA folds ``p + scatter_add(0, block)`` into
  ``scatter_add(p, block)``: an in-place write of the (donated) params, as on
  the fused path. The updates wait for profiling (a data dependency on its
  conditionals), so XLA sees every read of the old weights before that write
  and copies none.
- :func:`write_params` (``tx.apply_gradients``): each compact update is
  scattered into the (donated) params in place; no parameter-sized update or
  zero buffer exists. Profiling then reads the *updated* weights with the old
  block values put back, which is bit-exact "weights before the step", where
  reading them before the in-place scatter would make XLA copy every target
  weight.

Profiling reads a :class:`~losia_jax.profiling.WeightsBefore`: :class:`GivenWeights`
on the optax path, the fused path's output object (which also knows the new value
of any block, for master weights). Both paths give the same state and
bit-identical target weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from losia_jax import blocks
from losia_jax.gradients import CompactGradients, ProGradients
from losia_jax.profiling import owner_slot
from losia_jax.stages import BlockUpdates, StepReads
from losia_jax.state import TargetState
from losia_jax.steps import product
from losia_jax.targets import Bucket, LoSiAPlan


def _rounded_masters(plan: LoSiAPlan, updates: BlockUpdates, weights: list) -> dict:
  """Master weights: the new blocks are the copies rounded to the parameter dtype."""
  return {b.role: updates.masters[b.role].astype(weights[b.first.leaf_index].dtype)
          for b in plan.buckets}


def _written(plan: LoSiAPlan, targets: dict[str, TargetState], weights: list,
             payload: dict[str, jax.Array], write: blocks.BlockWriter) -> list:
  """New leaves: every bucket's ``payload`` written with the step's (old) indices."""
  out = list(weights)
  for b in plan.buckets:
    ts = targets[b.role]  # this step used the indices from before relocalization
    blocks.write_bucket(out, b, ts.rows, ts.cols, payload[b.role], write)
  return out


class GivenWeights:
  """The optax path's :class:`~losia_jax.profiling.WeightsBefore`: the params' leaves as
  given, unchanged.

  Attributes:
    weights: the params' leaves.
  """

  def __init__(self, weights: list):
    self.weights = weights

  @property
  def leaves(self) -> list:
    return self.weights

  def member(self, bucket: Bucket, member: int) -> jax.Array:
    return self.weights[bucket.members[member].leaf_index]

  def restore_old_block(self, bucket, products, clipped):
    del bucket, clipped
    return products  # products were read from the weights before the step


class UpdatesOutput:
  """The optax path's output: ``updates`` (parameter-shaped) for ``optax.apply_updates``.

  Attributes:
    weights: the params' leaves, unchanged: the weights before the step.
    updates: the update leaves (targets: the block deltas scattered into zeros).
  """

  def __init__(self, weights: list, updates: list, treedef: Any):
    self.weights, self.updates, self.treedef = weights, updates, treedef

  def block_after(self, bucket: Bucket, ts: TargetState) -> jax.Array:
    """What ``optax.apply_updates`` will make of the blocks ``ts`` indexes."""
    return (blocks.gather_bucket(self.weights, bucket, ts.rows, ts.cols)
            + blocks.gather_bucket(self.updates, bucket, ts.rows, ts.cols))

  def tree(self, plan: LoSiAPlan, updates: BlockUpdates) -> Any:
    """The updates tree, with the non-targets' updates (zero when frozen)."""
    out = list(self.updates)
    for k, i in plan.non_targets:
      out[i] = updates.non_target.get(k, jnp.zeros_like(self.weights[i]))
    return jax.tree_util.tree_unflatten(self.treedef, out)


def write_updates(reads: StepReads, targets: dict[str, TargetState], updates: BlockUpdates,
                  params: Any, grads: Any, master_weights: bool, read: jax.Array
                  ) -> UpdatesOutput:
  """The optax path: the block deltas as parameter-shaped updates.

  ``read`` is ``reads.finite`` as the profiling conditionals that read the weights
  yield it. Every update goes through ``where(read, ...)``, a no-op that makes
  it, hence the in-place ``scatter_add(p, block)`` that XLA makes of
  ``optax.apply_updates`` in the same jit, depend on those reads. Without that
  order XLA copies every target weight (twice) to keep them safe.
  """
  weights = jax.tree_util.tree_leaves(params)
  if master_weights:  # the update that takes each block to its rounded copy
    rounded = _rounded_masters(reads.plan, updates, weights)
    payload = {r: m - reads.old_blocks[r] for r, m in rounded.items()}
  else:
    payload = updates.deltas
  payload = {r: jnp.where(read, d, jnp.zeros_like(d)) for r, d in payload.items()}
  out = _written(reads.plan, targets, weights, payload, blocks.scatter_block)
  # updates take the structure of the gradients (of the params for Pro gradients)
  treedef = jax.tree_util.tree_structure(params if isinstance(grads, ProGradients) else grads)
  return UpdatesOutput(weights, out, treedef)


class ParamsOutput:
  """The fused path's output: the params, written in place.

  Attributes:
    params: the new leaves (blocks and trained non-targets written).
    reads, targets: what the step read, and the indices it wrote with.
  """

  def __init__(self, params: list, treedef: Any, reads: StepReads,
               targets: dict[str, TargetState]):
    self.params, self.treedef, self.reads, self.targets = params, treedef, reads, targets

  # --- WeightsBefore: the updated weights with the old blocks put back
  @property
  def leaves(self) -> list:
    return self.params

  def member(self, bucket: Bucket, member: int) -> jax.Array:
    t, ts = bucket.members[member], self.targets[bucket.role]
    span = lambda x: blocks.member_span(x, bucket, member)
    return blocks.set_block(self.params[t.leaf_index], t, span(ts.rows), span(ts.cols),
                            span(self.reads.old_blocks[bucket.role]))

  def restore_old_block(self, bucket: Bucket, products: jax.Array, clipped) -> jax.Array:
    """``products`` of the updated profiling matrix with its block's entries recomputed
    from the old block. The old block goes into the product ``W ⊙ G`` (a fresh
    temporary), not into a copy of the weight."""
    t, ts, reads = bucket.first, self.targets[bucket.role], self.reads
    position = owner_slot(bucket, reads.plan, reads.owner).position
    rows, cols = ts.rows[position], ts.cols[position]
    if isinstance(reads.grads, CompactGradients) and not t.row_mode:
      # Pro: the block of the profiling layer's own full gradient
      g = blocks.get_layer_block(clipped(reads.grads.grads.profile[bucket.role]), t, rows, cols)
    else:  # the (clipped) gradient block this step gathered
      g = reads.grad_blocks[bucket.role][position]
    old = product(reads.old_blocks[bucket.role][position], g)
    return blocks.set_layer_block(products, t, rows, cols, old)

  def block_after(self, bucket: Bucket, ts: TargetState) -> jax.Array:
    return blocks.gather_bucket(self.params, bucket, ts.rows, ts.cols)

  def tree(self, plan: LoSiAPlan, updates: BlockUpdates) -> Any:
    """The params tree."""
    del plan, updates  # all written by write_params
    return jax.tree_util.tree_unflatten(self.treedef, self.params)


def write_params(reads: StepReads, targets: dict[str, TargetState], updates: BlockUpdates,
                 params: Any, master_weights: bool) -> ParamsOutput:
  """The fused path: the block deltas added into the params (or the rounded master copies
  set), in place when the params are donated."""
  weights, treedef = jax.tree_util.tree_flatten(params)
  if master_weights:
    out = _written(reads.plan, targets, weights, _rounded_masters(reads.plan, updates, weights),
                   blocks.set_block)
  else:
    out = _written(reads.plan, targets, weights, updates.deltas, blocks.add_block)
  for k, i in reads.plan.non_targets:
    if k in updates.non_target:
      out[i] = updates.non_target[k]  # already the new weight
  return ParamsOutput(out, treedef, reads, targets)
