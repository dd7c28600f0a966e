"""The two profiling schedules of LoSiA: which layers profile, and how they relocalize.

``config.schedule`` picks one strategy (LOSIA_SPEC.md section 5):

- :class:`AsyncSchedule`: one layer at a time. Step ``s`` belongs to the
  profiling slot of layer ``owner(s)``; only that layer's matrices read their
  full gradients and accumulate importance (in one matrix-sized buffer per
  role, reused by whichever layer profiles), and at the end of the slot only
  they choose a new block.
- :class:`SyncSchedule`: every layer at once, in the first ``period`` steps of
  each round (``owner == 0``); then every matrix chooses a new block together.

A strategy answers the four questions a step asks of its schedule, in the
order the step asks them (:mod:`losia_jax.transform`):

1. :meth:`~AsyncSchedule.inspect_profiling` — are the full gradients the
   profiling matrices read finite, and their squared norm (for ``clip_norm``);
2. :meth:`~AsyncSchedule.read_sq_norm` — the squared norm of every target
   gradient value the step reads;
3. :meth:`~AsyncSchedule.profile` — the importance buffers after this step, from
   the weights before it (the params as given), and ``finite`` again, as the
   conditionals that read the weights yield it (the writes wait for it:
   :mod:`losia_jax.paths`);
4. :meth:`~AsyncSchedule.relocalize` — new blocks and fresh inner states at
   the end of a window.

Everything runs inside the jitted step: which layer profiles is a traced
value, read through ``lax.switch``/``lax.cond`` or dynamic indexing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from losia_common import LoSiAConfig
from losia_jax import blocks
from losia_jax.gradients import GradientView
from losia_jax.importance import ImportanceState, accumulate_importance, importance_score
from losia_jax.selection import select_rows, select_subnet
from losia_jax.state import LoSiAState, TargetState
from losia_jax.steps import all_finite, product, sq_norm, sum_scalars
from losia_jax.targets import Bucket, LoSiAPlan, TargetSpec


class OwnerSlot(NamedTuple):
  """Where the matrix of one role in layer ``owner`` sits (traced, from static tables).

  Attributes:
    member: 1-based index of the bucket member holding it; 0 when that layer has
      no matrix of this role (e.g. the output layer's slot for a decoder role).
    local: its index inside that member (the layer axis of a stacked leaf).
    position: its index in the bucket's stacked state (``[N, ...]``).
  """

  member: jax.Array
  local: jax.Array
  position: jax.Array


def owner_slot(bucket: Bucket, plan: LoSiAPlan, owner: jax.Array) -> OwnerSlot:
  member, local, position = (jnp.asarray(a) for a in bucket.tables(plan.total))
  return OwnerSlot(member[owner], local[owner], position[owner])


def holds_matrix(bucket: Bucket, plan: LoSiAPlan, owner: jax.Array) -> jax.Array:
  """Whether layer ``owner`` has a matrix of ``bucket``'s role."""
  return owner_slot(bucket, plan, owner).member > 0


@dataclasses.dataclass(frozen=True, eq=False)
class _Schedule:
  """What both schedules share.

  Attributes:
    config: the LoSiA configuration (period, importance kind and betas).
    inner: the inner optimizer, whose state restarts on a new block.
    clipping: ``clip_norm`` is set, so the step needs gradient norms.
  """

  config: LoSiAConfig
  inner: optax.GradientTransformation
  clipping: bool

  def fresh_inner(self, bucket: Bucket) -> optax.OptState:
    """A fresh inner state for one block of ``bucket``."""
    return self.inner.init(jnp.zeros(bucket.first.block_shape, jnp.float32))

  @staticmethod
  def choose(spec: TargetSpec, slot_score: jax.Array) -> tuple[jax.Array, jax.Array]:
    """New ``(rows, cols)`` of one per-layer matrix from its score (stored layout)."""
    score = slot_score.T if spec.transposed else slot_score
    if spec.row_mode:
      return select_rows(score, spec.k_out), jnp.arange(spec.d_in, dtype=jnp.int32)
    return select_subnet(score, spec.k_out, spec.k_in)

  def accumulate(self, slot: ImportanceState, products: jax.Array, fresh_window: jax.Array,
                 active: Optional[jax.Array] = None) -> ImportanceState:
    cfg = self.config
    return accumulate_importance(slot, products, cfg.importance, cfg.importance_beta1,
                                 cfg.importance_beta2, active=active, fresh=fresh_window)


class AsyncSchedule(_Schedule):
  """One layer profiles at a time: the slot of step ``s`` is layer ``owner(s)``'s."""

  is_async = True

  @staticmethod
  def importance_shape(spec: TargetSpec, bucket: Bucket) -> tuple[int, ...]:
    del bucket
    return spec.slice_shape  # one matrix per role, reused by every layer

  def inspect_profiling(self, plan: LoSiAPlan, grads: GradientView, owner: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
    """Whether the profiling layer's full gradients are finite, and their squared norm.

    Each matrix gives one partial sum, ``sum(g - g)`` (0, or NaN when an entry
    is not finite: one reduction kernel, see :func:`~losia_jax.steps.all_finite`),
    and ``sq_norm(g)`` with clipping. LoSiA-Pro's gradients hold the owner's
    matrices themselves (:meth:`~losia_jax.gradients.CompactGradients.owner_matrix`),
    read without a conditional; dense ones are read at the owner's layer in one
    switch whose branches run just these reductions (every branch is compiled).
    """
    zero = jnp.zeros([], jnp.float32)

    def check(g):
      return jnp.sum(g - g, dtype=jnp.float32), (sq_norm(g) if self.clipping else zero)

    if grads.owner_independent:
      found = {b.role: check(grads.owner_matrix(b)) for b in plan.buckets}
    else:
      found, _ = _per_owner(plan, owner,
                            lambda b, member, local, ops: check(grads.layer(ops, b, member, local)),
                            lambda b: (zero, zero), grads.ops)
    partials, sq = [], []
    for b in plan.buckets:
      mine = holds_matrix(b, plan, owner)
      partials.append(jnp.where(mine, found[b.role][0], 0.0))
      sq.append(jnp.where(mine, found[b.role][1], 0.0))
    return jnp.isfinite(sum_scalars(partials)), sum_scalars(sq) if self.clipping else zero

  def read_sq_norm(self, sq: jax.Array, plan: LoSiAPlan, grads: GradientView,
                   grad_blocks: dict[str, jax.Array], owner: jax.Array,
                   owner_sq: jax.Array) -> jax.Array:
    """``sq`` plus every target's block, except the profiling layer's, whose full
    gradients (``owner_sq``) count instead."""
    del grads
    for b in plan.buckets:
      g = grad_blocks[b.role]
      per_matrix = jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
      slot = owner_slot(b, plan, owner)
      profiling = (jnp.arange(b.size) == slot.position) & (slot.member > 0)
      sq = sq + jnp.sum(jnp.where(profiling, 0.0, per_matrix))
    return sq + owner_sq

  def profile(self, plan: LoSiAPlan, state: LoSiAState, grads: GradientView, owner: jax.Array,
              finite: jax.Array, clip: Optional[jax.Array], weights: list
              ) -> tuple[dict[str, ImportanceState], jax.Array]:
    """The buffers after this step: the profiling layer's ``W ⊙ G`` (``weights`` before
    the step) accumulated; and ``finite``, as yielded by the conditionals that read
    the weights.

    Only the products of the owner's matrices come out of the layer switch; the
    buffers are updated outside it, elementwise and masked by whether the owner
    holds a matrix of the role. XLA copies any buffer passed through a
    conditional (in the branch and again into the donated output): with one
    LLaMA-7B layer's buffers (1.6 GB) that was two copies per step.
    """
    clipped = _clipper(clip)
    importance = dict(state.importance)
    fresh_window = _fresh_window(state, self.config)

    def products_of(bucket, member, local, weight_leaves, grad_ops):
      t = bucket.members[member]
      return product(blocks.layer_slice(weight_leaves[t.leaf_index], t, local),
                     clipped(grads.layer(grad_ops, bucket, member, local)))

    none = lambda bucket: jnp.zeros(importance[bucket.role].ibar.shape, jnp.float32)
    products, read = _per_owner(plan, jnp.where(finite, owner, -1), products_of, none,
                                weights, grads.ops)
    for b in plan.buckets:
      importance[b.role] = self.accumulate(importance[b.role], products[b.role], fresh_window,
                                           active=finite & holds_matrix(b, plan, owner))
    return importance, read

  def relocalize(self, plan: LoSiAPlan, targets: dict[str, TargetState],
                 importance: dict[str, ImportanceState], owner: jax.Array, due: jax.Array,
                 step: jax.Array) -> dict[str, TargetState]:
    """End of the owner's window (``due``): its matrices get new blocks and fresh inner state.

    Only the selection runs in a ``lax.cond`` (one for all roles), and it
    returns just the new indices: passing the importance buffers or the inner
    states through a conditional makes XLA copy them on every step. The small
    writes happen outside, masked by ``due``. The buffers themselves are reset
    at the first step of the next window (see :meth:`profile`).
    """
    def select(importance):
      return {b.role: self.choose(b.first, importance_score(importance[b.role]))
              for b in plan.buckets}

    def keep(importance):
      return {b.role: (targets[b.role].rows[0], targets[b.role].cols[0]) for b in plan.buckets}

    new_indices = jax.lax.cond(due, select, keep, importance)
    targets = dict(targets)
    for b in plan.buckets:
      ts = targets[b.role]
      slot = owner_slot(b, plan, owner)
      # the owner may hold no matrix of this role (e.g. the output layer)
      moves = due & (slot.member > 0)

      # a dynamic-update-slice, not a scatter: XLA's CPU backend compiles every
      # scatter into a kernel of its own (about 10 ms of compile time each)
      def at_owner(x, new, position=slot.position, moves=moves):
        old = jax.lax.dynamic_index_in_dim(x, position, keepdims=False,
                                           allow_negative_indices=False)
        return jax.lax.dynamic_update_index_in_dim(x, jnp.where(moves, new, old), position, 0,
                                                   allow_negative_indices=False)

      rows, cols = new_indices[b.role]
      targets[b.role] = ts._replace(
          rows=at_owner(ts.rows, rows), cols=at_owner(ts.cols, cols),
          inner=jax.tree.map(at_owner, ts.inner, self.fresh_inner(b)),
          last_relocalization=at_owner(ts.last_relocalization, step))
    return targets


class SyncSchedule(_Schedule):
  """Every layer profiles in the first slot of each round (``owner == 0``)."""

  is_async = False

  @staticmethod
  def importance_shape(spec: TargetSpec, bucket: Bucket) -> tuple[int, ...]:
    return (bucket.size,) + spec.slice_shape  # one buffer per matrix

  def inspect_profiling(self, plan: LoSiAPlan, grads: GradientView, owner: jax.Array
                        ) -> tuple[jax.Array, None]:
    """Whether every target's full gradient is finite, in the profiling slot (no norm:
    :meth:`read_sq_norm` takes it)."""
    def check(grad_ops):
      return all_finite(grad_ops[t.leaf_index] for t in plan.targets)

    ok = jax.lax.cond(owner == 0, check, lambda grad_ops: jnp.array(True), grads.ops)
    return ok, None

  def read_sq_norm(self, sq: jax.Array, plan: LoSiAPlan, grads: GradientView,
                   grad_blocks: dict[str, jax.Array], owner: jax.Array,
                   owner_sq: None) -> jax.Array:
    """``sq`` plus the full gradients of every target in the profiling slot, the blocks
    otherwise."""
    del owner_sq
    blocks_sq = sum(jnp.sum(jnp.square(g)) for g in grad_blocks.values())

    def full(grad_ops):
      return sum(sq_norm(grad_ops[t.leaf_index]) for t in plan.targets)

    return sq + jax.lax.cond(owner == 0, full, lambda grad_ops: blocks_sq, grads.ops)

  def profile(self, plan: LoSiAPlan, state: LoSiAState, grads: GradientView, owner: jax.Array,
              finite: jax.Array, clip: Optional[jax.Array], weights: list
              ) -> tuple[dict[str, ImportanceState], jax.Array]:
    """The buffers after this step: every target's ``W ⊙ G`` (``weights`` before the
    step), in one conditional; and
    ``finite``, with a data dependency on that conditional (it reads every weight)."""
    clipped = _clipper(clip)
    fresh_window = _fresh_window(state, self.config)

    def accumulate_all(importance, grad_ops):
      importance = dict(importance)
      for b in plan.buckets:
        slot, starts = importance[b.role], state.targets[b.role].starts
        for j, t in enumerate(b.members):
          shape = (t.n,) + t.slice_shape
          span = lambda x, j=j, b=b: blocks.member_span(x, b, j, starts)
          new = self.accumulate(jax.tree.map(span, slot), product(
              weights[t.leaf_index].reshape(shape),
              clipped(grad_ops[t.leaf_index]).reshape(shape)), fresh_window)
          slot = jax.tree.map(lambda buf, part, j=j, b=b: blocks.set_member_span(
              buf, b, j, part, starts), slot, new)
        importance[b.role] = slot
      return importance, True

    profiling = (owner == 0) & finite
    importance, profiled = jax.lax.cond(
        profiling, accumulate_all, lambda importance, grad_ops: (dict(importance), False),
        state.importance, grads.ops)
    # == finite (profiled is the predicate), but read from the conditional's output
    return importance, jnp.where(owner == 0, profiled, finite)

  def relocalize(self, plan: LoSiAPlan, targets: dict[str, TargetState],
                 importance: dict[str, ImportanceState], owner: jax.Array, due: jax.Array,
                 step: jax.Array) -> dict[str, TargetState]:
    """End of the round's profiling slot: every matrix gets a new block and fresh inner state."""
    def select_all(targets, importance):
      out = {}
      for b in plan.buckets:
        t, ts = b.first, targets[b.role]
        rows, cols = jax.vmap(functools.partial(self.choose, t))(
            importance_score(importance[b.role]))
        fresh = jax.vmap(lambda _, b=b: self.fresh_inner(b))(jnp.arange(b.size))
        out[b.role] = ts._replace(rows=rows, cols=cols.reshape(ts.cols.shape), inner=fresh,
                                  last_relocalization=jnp.full_like(ts.last_relocalization,
                                                                    step))
      return out

    return jax.lax.cond(due & (owner == 0), select_all,
                        lambda targets, importance: dict(targets), targets, importance)


Schedule = AsyncSchedule | SyncSchedule


def schedule_for(config: LoSiAConfig, inner: optax.GradientTransformation,
                 clipping: bool) -> Schedule:
  """The strategy of ``config.schedule``."""
  kind = AsyncSchedule if config.schedule == "async" else SyncSchedule
  return kind(config, inner, clipping)


# --- helpers -------------------------------------------------------------------


def _clipper(clip: Optional[jax.Array]) -> Callable[[jax.Array], jax.Array]:
  """Applies the clip factor to a gradient (identity without ``clip_norm``)."""
  if clip is None:
    return lambda g: g
  return lambda g: g.astype(jnp.float32) * clip


def _fresh_window(state: LoSiAState, config: LoSiAConfig) -> jax.Array:
  """A window starts from empty statistics: at its first step the buffer's old
  contents (the previous window's) count as zero, inside the update itself
  rather than by a separate reset pass."""
  return (state.count % config.period) == 0


def _at_layer(plan: LoSiAPlan, layer_id: int) -> list[tuple[Bucket, int, int]]:
  """Static: ``(bucket, member index, index in member)`` of every target matrix of a layer."""
  out = []
  for b in plan.buckets:
    for j, t in enumerate(b.members):
      if layer_id in t.layer_ids:
        out.append((b, j, t.layer_ids.index(layer_id)))
  return out


def _direct(bucket: Bucket) -> bool:
  """A bucket read at the owner's position by dynamic indexing: one stacked leaf."""
  return len(bucket.members) == 1 and bucket.first.stacked


def _per_owner(plan: LoSiAPlan, owner: jax.Array, value_of: Callable[..., Any],
               placeholder: Callable[[Bucket], Any], *operands
               ) -> tuple[dict[str, Any], jax.Array]:
  """``{role: value_of(bucket, member, local, *operands)}`` for the owner's matrix of each
  role, and ``owner >= 0`` as the conditionals that read ``operands`` yield it.

  Stacked leaves are read at the owner's index (``local`` traced), in one
  ``lax.cond`` on ``owner >= 0`` (no switch over layers); the owner may hold no
  matrix of such a role, then the value is of some other layer and callers
  mask it. The other buckets go through one ``lax.switch`` over layer ids
  whose branches only apply ``value_of`` to the owner's matrices
  (``placeholder(bucket)`` where it holds none): the importance math, gathers
  and masks run once, outside. XLA conditionals are sync points on CPU and
  every branch is compiled, so branches stay tiny. ``owner == -1`` takes the
  placeholders everywhere.

  The flag is what orders a later in-place write of the operands after these
  reads: XLA copies a buffer that is read and written in place unless the
  write depends on the read (the optax path, :mod:`losia_jax.paths`).
  """
  out, read = {}, owner >= 0
  direct = [b for b in plan.buckets if _direct(b)]
  if direct:
    def stacked(*operands):
      return {b.role: value_of(b, 0, owner_slot(b, plan, owner).local, *operands)
              for b in direct}, True

    values, read_direct = jax.lax.cond(
        read, stacked, lambda *operands: ({b.role: placeholder(b) for b in direct}, False),
        *operands)
    out.update(values)
    read = read_direct
  switched = [b for b in plan.buckets if not _direct(b)]
  if switched:
    def nobody(*operands):
      return {b.role: placeholder(b) for b in switched}, False

    def layer(layer_id, *operands):
      values, _ = nobody()
      for b, member, local in _at_layer(plan, layer_id):
        if not _direct(b):
          values[b.role] = value_of(b, member, local, *operands)
      return values, True

    branches = [nobody] + [functools.partial(layer, lid) for lid in range(plan.total)]
    values, read_switched = jax.lax.switch(owner + 1, branches, *operands)
    out.update(values)
    read = read & read_switched
  return out, read
