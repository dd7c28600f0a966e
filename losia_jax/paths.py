"""The two ways a LoSiA step writes its block deltas, after profiling has read the weights.

- :func:`write_updates` (``tx.update``): parameter-shaped updates, zero outside
  the blocks, for ``optax.apply_updates``. Each update is a scatter-*add* of
  the block into zeros, so that in one jit with ``optax.apply_updates`` XLA
  folds ``p + scatter_add(0, block)`` into ``scatter_add(p, block)``: an
  in-place write of the (donated) params, like the fused path's.
- :func:`write_params` (``tx.apply_gradients``): each compact update is
  scattered into the (donated) params in place; no parameter-sized update or
  zero buffer exists.

Profiling reads the params as the step receives them (the weights before the
step), so every write must come after those reads: XLA copies a buffer that is
read and written in place unless the write depends on the read (measured: two
copies of every target weight per step). Both writers take ``read``, the step's
``finite`` as the profiling conditionals that read the weights yield it
(:func:`losia_jax.profiling._per_owner`), and pass every block through
``where(read, ...)``: a no-op on the values that puts those reads before the
write. Both paths give the same state and bit-identical target weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from losia_jax import blocks
from losia_jax.gradients import ProGradients
from losia_jax.stages import BlockUpdates, StepReads
from losia_jax.state import TargetState
from losia_jax.targets import Bucket, LoSiAPlan


def _rounded_masters(plan: LoSiAPlan, updates: BlockUpdates, weights: list) -> dict:
  """Master weights: the new blocks are the copies rounded to the parameter dtype."""
  return {b.role: updates.masters[b.role].astype(weights[b.first.leaf_index].dtype)
          for b in plan.buckets}


def _after_reads(read: jax.Array, payload: dict[str, jax.Array],
                 unread: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """``payload``, made to depend on ``read`` (True whenever the step is finite).

  ``unread`` is what the payload already is when the step is skipped (``read``
  False): zeros for a delta, the old block for a block that is set."""
  return {r: jnp.where(read, p, unread[r]) for r, p in payload.items()}


def _written(plan: LoSiAPlan, targets: dict[str, TargetState], weights: list,
             payload: dict[str, jax.Array], write: blocks.BlockWriter) -> list:
  """New leaves: every bucket's ``payload`` written with the step's (old) indices."""
  out = list(weights)
  for b in plan.buckets:
    ts = targets[b.role]  # this step used the indices from before relocalization
    blocks.write_bucket(out, b, ts.rows, ts.cols, payload[b.role], write, ts.starts)
  return out


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
    return (blocks.gather_bucket(self.weights, bucket, ts.rows, ts.cols, ts.starts)
            + blocks.gather_bucket(self.updates, bucket, ts.rows, ts.cols, ts.starts))

  def tree(self, plan: LoSiAPlan, updates: BlockUpdates) -> Any:
    """The updates tree, with the non-targets' updates (zero when frozen)."""
    out = list(self.updates)
    for k, i in plan.non_targets:
      out[i] = updates.non_target.get(k, jnp.zeros_like(self.weights[i]))
    return jax.tree_util.tree_unflatten(self.treedef, out)


def write_updates(reads: StepReads, targets: dict[str, TargetState], updates: BlockUpdates,
                  params: Any, grads: Any, master_weights: bool, read: jax.Array
                  ) -> UpdatesOutput:
  """The optax path: the block deltas as parameter-shaped updates, after ``read``."""
  weights = jax.tree_util.tree_leaves(params)
  if master_weights:  # the update that takes each block to its rounded copy
    rounded = _rounded_masters(reads.plan, updates, weights)
    payload = {r: m - reads.old_blocks[r] for r, m in rounded.items()}
  else:
    payload = updates.deltas
  payload = _after_reads(read, payload, jax.tree.map(jnp.zeros_like, payload))
  out = _written(reads.plan, targets, weights, payload, blocks.scatter_block)
  # updates take the structure of the gradients (of the params for Pro gradients)
  treedef = jax.tree_util.tree_structure(params if isinstance(grads, ProGradients) else grads)
  return UpdatesOutput(weights, out, treedef)


class ParamsOutput:
  """The fused path's output: the params, written in place.

  Attributes:
    params: the new leaves (blocks and trained non-targets written).
  """

  def __init__(self, params: list, treedef: Any):
    self.params, self.treedef = params, treedef

  def block_after(self, bucket: Bucket, ts: TargetState) -> jax.Array:
    return blocks.gather_bucket(self.params, bucket, ts.rows, ts.cols, ts.starts)

  def tree(self, plan: LoSiAPlan, updates: BlockUpdates) -> Any:
    """The params tree."""
    del plan, updates  # all written by write_params
    return jax.tree_util.tree_unflatten(self.treedef, self.params)


def write_params(reads: StepReads, targets: dict[str, TargetState], updates: BlockUpdates,
                 params: Any, master_weights: bool, read: jax.Array) -> ParamsOutput:
  """The fused path: the block deltas added into the params (or the rounded master copies
  set), in place when the params are donated, after ``read``."""
  weights, treedef = jax.tree_util.tree_flatten(params)
  if master_weights:  # a skipped step sets each block to its copy: the old block
    rounded = _rounded_masters(reads.plan, updates, weights)
    out = _written(reads.plan, targets, weights,
                   _after_reads(read, rounded, reads.old_blocks), blocks.set_block)
  else:
    deltas = _after_reads(read, updates.deltas, jax.tree.map(jnp.zeros_like, updates.deltas))
    out = _written(reads.plan, targets, weights, deltas, blocks.add_block)
  for k, i in reads.plan.non_targets:
    if k in updates.non_target:
      out[i] = updates.non_target[k]  # already the new weight
  return ParamsOutput(out, treedef)
