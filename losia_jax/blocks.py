"""Reading and writing a target's core block without touching the rest of it.

Indices are sorted and unique, which we tell XLA: it then emits a plain
gather, and a scatter-add into a donated weight that runs in place, instead of
materialising a parameter-sized update.

Per leaf (:func:`gather_block`, :func:`add_block`, ...) and per bucket (all
matrices of one role, stacked in layer order as the state holds them:
:func:`gather_bucket`, :func:`write_bucket`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from losia_jax.targets import Bucket, TargetSpec

# The indices are never negative: skipping JAX's wrap-around saves a compare and a
# select per index array, which add up to thousands of instructions in a step.
_FLAGS = dict(indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds",
              wrap_negative_indices=False)


def take(a: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
  """``jnp.take(a, idx, axis)`` for sorted, unique, in-bounds ``idx`` (told to XLA)."""
  return a.at[(slice(None),) * (axis % a.ndim) + (idx,)].get(**_FLAGS)


def _matrix_index(spec: TargetSpec, r: jax.Array, c: jax.Array) -> tuple:
  """Advanced index of one layer's block in its (2-D) matrix."""
  if spec.row_mode:
    return (slice(None), r) if spec.transposed else (r,)
  return (c[:, None], r[None, :]) if spec.transposed else (r[:, None], c[None, :])


def block_index(spec: TargetSpec, rows: jax.Array, cols: jax.Array) -> tuple:
  """Advanced index of the block in the stored leaf.

  ``rows`` is ``[n, k_out]`` and ``cols`` ``[n, k_in]`` (all columns in row mode).
  """
  if spec.stacked and not spec.row_mode:
    li = jnp.arange(spec.n, dtype=jnp.int32)[:, None, None]
    if spec.transposed:
      return (li, cols[:, :, None], rows[:, None, :])
    return (li, rows[:, :, None], cols[:, None, :])
  return _matrix_index(spec, rows[0], cols[0])


def _take_block(m: jax.Array, spec: TargetSpec, r: jax.Array, c: jax.Array) -> jax.Array:
  # Two 1-D takes (whole rows, then columns) lower to much faster XLA CPU
  # gathers than one gather over the broadcast 2-D index (measured ~4x).
  if spec.row_mode:
    return take(m, r, 1 if spec.transposed else 0)
  if spec.transposed:  # [d_in, d_out]
    return take(take(m, c, 0), r, 1)
  return take(take(m, r, 0), c, 1)


def gather_block(x: jax.Array, spec: TargetSpec, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """The block of ``x`` (a weight or its gradient) as ``[n, *spec.block_shape]``."""
  if spec.stacked:  # one gather over all layers (a vmapped take lowers much slower)
    return x.at[block_index(spec, rows, cols)].get(**_FLAGS)
  return _take_block(x, spec, rows[0], cols[0])[None]


def _native(delta: jax.Array, spec: TargetSpec) -> jax.Array:
  return delta if spec.stacked else delta[0]


def add_block(x: jax.Array, spec: TargetSpec, rows: jax.Array, cols: jax.Array,
              delta: jax.Array) -> jax.Array:
  """``x`` with ``delta`` (``[n, *block_shape]``) added to its block; in place when donated."""
  return x.at[block_index(spec, rows, cols)].add(
      _native(delta, spec).astype(x.dtype), **_FLAGS)


def scatter_block(like: jax.Array, spec: TargetSpec, rows: jax.Array, cols: jax.Array,
                  delta: jax.Array) -> jax.Array:
  """A full-shape zero array holding ``delta`` in the block (the optax-compatible update)."""
  return jnp.zeros(like.shape, like.dtype).at[block_index(spec, rows, cols)].add(
      _native(delta, spec).astype(like.dtype), **_FLAGS)


def layer_slice(x: jax.Array, spec: TargetSpec, local: jax.Array) -> jax.Array:
  """The per-layer matrix ``local`` of a stacked leaf (the leaf itself otherwise)."""
  if not spec.stacked:
    return x
  return jax.lax.dynamic_index_in_dim(x, local, axis=0, keepdims=False,
                                     allow_negative_indices=False)


def set_block(x: jax.Array, spec: TargetSpec, rows: jax.Array, cols: jax.Array,
              block: jax.Array) -> jax.Array:
  """A copy of the leaf ``x`` whose block is ``block`` (``[n, *block_shape]``)."""
  return x.at[block_index(spec, rows, cols)].set(_native(block, spec).astype(x.dtype), **_FLAGS)


# --- buckets: all matrices of one role -----------------------------------------

BlockWriter = Callable[[jax.Array, TargetSpec, jax.Array, jax.Array, jax.Array], jax.Array]
"""``(leaf, spec, rows, cols, block) -> new leaf``: :func:`add_block`, :func:`set_block`
or :func:`scatter_block`."""


Starts = Sequence[jax.Array]
"""``TargetState.starts``: each member's offset in the bucket, as runtime int32 scalars
(empty: use the static ``bucket.offsets``)."""


def member_span(x: jax.Array, bucket: Bucket, member: int, starts: Starts = ()) -> jax.Array:
  """The rows of a bucket-stacked array (``[N, ...]``) that belong to ``bucket.members[member]``.

  At the runtime offset ``starts[member]`` when given: a constant offset would
  make the kernel that reads the span differ from layer to layer, and XLA
  compiles each distinct kernel separately (see ``TargetState.starts``).
  """
  n = bucket.members[member].n
  if len(bucket.members) == 1:
    return x
  if starts:
    return jax.lax.dynamic_slice_in_dim(x, starts[member], n, allow_negative_indices=False)
  start = bucket.offsets[member]
  return x[start:start + n]


def set_member_span(x: jax.Array, bucket: Bucket, member: int, part: jax.Array,
                    starts: Starts = ()) -> jax.Array:
  """``x`` with the member's span (see :func:`member_span`) replaced by ``part``."""
  if len(bucket.members) == 1:
    return part
  start = starts[member] if starts else bucket.offsets[member]
  return jax.lax.dynamic_update_slice_in_dim(x, part.astype(x.dtype), start, 0,
                                             allow_negative_indices=False)


def gather_bucket(leaves: Sequence[jax.Array], bucket: Bucket, rows: jax.Array,
                  cols: jax.Array, starts: Starts = ()) -> jax.Array:
  """The blocks of every matrix of ``bucket`` (``[N, *block_shape]``) from ``leaves``.

  ``leaves`` is indexed by leaf index (a list of all leaves, or a dict holding
  the bucket's); ``rows``/``cols`` are the bucket's ``[N, k]`` indices and
  ``starts`` its ``TargetState.starts``.
  """
  parts = [gather_block(leaves[t.leaf_index], t, member_span(rows, bucket, j, starts),
                        member_span(cols, bucket, j, starts))
           for j, t in enumerate(bucket.members)]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def write_bucket(leaves: list, bucket: Bucket, rows: jax.Array, cols: jax.Array,
                 blocks: jax.Array, write: BlockWriter, starts: Starts = ()) -> None:
  """Writes ``blocks`` (``[N, *block_shape]``) into the bucket's leaves of ``leaves`` (a list,
  replaced in place) with ``write``, each member its span."""
  span = lambda x, j: member_span(x, bucket, j, starts)
  for j, t in enumerate(bucket.members):
    leaves[t.leaf_index] = write(leaves[t.leaf_index], t, span(rows, j), span(cols, j),
                                 span(blocks, j))
