"""Greedy best-of-three subnet localization (LOSIA_SPEC.md section 4), in JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_indices(x: jax.Array, k: int) -> jax.Array:
  """Indices of the ``k`` largest entries of a 1-D array; ties go to the lower index.

  ``lax.top_k`` is stable (equal values keep index order), which gives the
  spec's tie rule; the result is in descending-value order, not sorted.
  """
  return jax.lax.top_k(x, k)[1]


def _block_sum(s: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  return s[rows[:, None], cols[None, :]].sum()


def select_subnet(score: jax.Array, k_out: int, k_in: int) -> tuple[jax.Array, jax.Array]:
  """Chooses the core subnet of one target from its importance score.

  Three greedy candidates are built: *independent* (top rows by row sum, top
  columns by column sum), *rows then columns* (columns re-ranked over the chosen
  rows) and *columns then rows*; the one with the largest block sum wins, the
  earlier one on an exact tie.

  Args:
    score: ``[d_out, d_in]`` non-negative scores (output neurons first).
    k_out: number of rows (output neurons) to keep, static.
    k_in: number of columns (input neurons) to keep, static.

  Returns:
    ``(rows, cols)``: int32 arrays of sizes ``k_out`` and ``k_in``, sorted
    ascending.

  Example:
    >>> import jax.numpy as jnp
    >>> from losia_jax.selection import select_subnet
    >>> s = jnp.array([[16, 9, 12, 4, 9, 34], [10, 30, 10, 1, 0, 28],
    ...                [7, 26, 7, 36, 4, 28], [27, 34, 11, 33, 25, 21],
    ...                [12, 25, 30, 33, 11, 21], [26, 3, 27, 16, 3, 36]], jnp.float32)
    >>> rows, cols = select_subnet(s, 2, 2)
    >>> rows.tolist(), cols.tolist()
    ([3, 4], [1, 3])
  """
  if score.ndim != 2:
    raise ValueError(f"score must be 2-D [d_out, d_in]; got shape {score.shape}")
  d_out, d_in = score.shape
  if not (1 <= k_out <= d_out and 1 <= k_in <= d_in):
    raise ValueError(
        f"need 1 <= k_out <= {d_out} and 1 <= k_in <= {d_in}; got k_out={k_out}, k_in={k_in}")
  s = score.astype(jnp.float32)
  r1 = top_k_indices(s.sum(axis=1), k_out)
  c1 = top_k_indices(s.sum(axis=0), k_in)
  c2 = top_k_indices(jnp.take(s, r1, axis=0).sum(axis=0), k_in)
  r3 = top_k_indices(jnp.take(s, c1, axis=1).sum(axis=1), k_out)
  sums = jnp.stack([_block_sum(s, r1, c1), _block_sum(s, r1, c2), _block_sum(s, r3, c1)])
  best = jnp.argmax(sums)  # first maximum: earlier candidate wins exact ties
  rows = jnp.where(best == 2, r3, r1)
  cols = jnp.where(best == 1, c2, c1)
  return jnp.sort(rows).astype(jnp.int32), jnp.sort(cols).astype(jnp.int32)


def select_rows(score: jax.Array, k_out: int) -> jax.Array:
  """Output-layer (row) mode: the ``k_out`` rows with the largest row sums, sorted."""
  rows = top_k_indices(score.astype(jnp.float32).sum(axis=1), k_out)
  return jnp.sort(rows).astype(jnp.int32)
