"""LoSiA as an Optax gradient transformation.

Implements LOSIA_SPEC.md: every target matrix trains only its core block
``W[rows][:, cols]`` with a compact inner optimizer; one layer at a time (async)
or all layers together (sync) accumulate gradient importance, and at the end of
their profiling slot choose a new block, restart the inner optimizer and ramp
their learning rate back up (rewarm). Relocalization happens inside the jitted
update (``lax.switch``/``lax.cond`` on the step counter), never on the host.

Two ways to apply it:
- the optax way: ``updates, state = tx.update(grads, state, params)`` then
  ``optax.apply_updates`` (works with ``optax.chain``, ``optax.MultiSteps``,
  ``nnx.Optimizer``); updates are parameter-sized, zero outside the blocks;
- the fused way: ``params, state = tx.apply_gradients(grads, state, params)``
  scatters each compact update into the (donated) weights in place and never
  materialises a parameter-sized update or zero buffer.
Both give the same state and bit-identical target weights.

Reference: Wang, Qi, Xu, "LoSiA: Efficient High-Rank Fine-Tuning via Subnet
Localization and Optimization", arXiv:2507.04487 (EMNLP 2025).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from losia_common import LoSiAConfig
from losia_common.subnet import initial_indices
from losia_jax import blocks, misuse
from losia_jax.gradients import ProGradients, _DenseGrads, _ProGrads
from losia_jax.inner import sync_schedule_counts
from losia_jax.importance import (ImportanceState, accumulate_importance, importance_score,
                                  zeros_importance)
from losia_jax.schedule import ends_slot, rewarm_factor, slot_owner
from losia_jax.selection import select_rows, select_subnet
from losia_jax.state import LoSiAState, LoSiATransformation, TargetState, _make
from losia_jax.steps import all_finite, clip_factor, product, sq_norm, tree_where
from losia_jax.targets import Bucket, DimensionNumbersArg, LoSiAPlan, TargetSpec, make_plan

Params = Any


def scale_by_losia(
    config: Optional[LoSiAConfig] = None,
    base_optimizer: Optional[optax.GradientTransformation] = None,
    *,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
    weight_decay: float = 0.0,
    output_module: str = "lm_head",
    dimension_numbers: DimensionNumbersArg = None,
    stacked_layers: bool = False,
    inner_params: bool = False,
    clip_norm: Optional[float] = None,
    master_weights: bool = False,
) -> LoSiATransformation:
  """LoSiA around an inner optimizer that runs on compact ``[k_out, k_in]`` blocks.

  Per target and step (LOSIA_SPEC.md section 6): ``g = scale * G[rows][:, cols]``;
  the inner optimizer turns ``g`` into ``u``; ``u += weight_decay * W[rows][:,
  cols]``; the block moves by ``-lr(s) * rewarm(s) * u``. Non-targets get the
  inner optimizer's full update (plus decoupled decay, no rewarm) or nothing,
  by ``config.non_target``. At the end of a profiling window the block is
  re-selected from importance and the inner state of that matrix is reset.

  With ``learning_rate=None`` the output is the descent *direction*
  ``rewarm * (u + weight_decay * W)`` (like ``optax.scale_by_adam``), to be
  followed by ``optax.scale_by_learning_rate``; the fused ``apply_gradients``
  then adds that direction as is. Use :func:`losia` for the ready optimizer.

  Non-finite gradients: if any gradient value the step reads (the target
  blocks, the full gradients of the profiling layer, trained non-targets) is
  NaN or infinite, the step is skipped: zero updates, state unchanged except
  ``notfinite_count``; the step counter does not advance.

  Args:
    config: a :class:`LoSiAConfig` (defaults if None).
    base_optimizer: inner gradient transformation that needs no params, e.g.
      ``optax.scale_by_adam()`` (the default), ``optax.scale_by_lion()``. Its
      state is built on compact blocks and restarted at each relocalization.
    learning_rate: float or optax schedule of the step ``s``; multiplied per
      target by the rewarm factor. None: see above.
    weight_decay: decoupled weight decay, on the block only for targets.
    output_module: module name (or regex) of the output layer, used when
      ``config.output_rank_factor > 0``; for tied embeddings name the embedding.
    dimension_numbers: a :class:`LoSiADimensionNumbers` for all targets, a
      callable ``(ParamName, shape) -> LoSiADimensionNumbers``, or None to read
      the layout from the leaf name (``kernel``: ``[in, out]``; ``weight`` and
      ``embedding``: ``[out, in]``).
    stacked_layers: targets without a layer index in their path hold all layers
      along a leading axis (scan-over-layers models).
    clip_norm: clip by the global norm of the gradient values this step reads
      (the block of every target, the full gradients of the profiling
      targets, trained non-targets): gradients are scaled by ``min(1,
      clip_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does
      and as ``losia_torch.LoSiAOptimizer.clip_grad_norm_`` defines the norm.
      The norm is the same for dense and for LoSiA-Pro gradients, and in both
      backends; importance is accumulated from the clipped gradients, as in
      torch. (``optax.clip_by_global_norm`` in front of LoSiA clips by the
      norm of the tree it gets instead: the full gradient, or Pro's compact one.)
    master_weights: keep an fp32 copy of every trained block (p² of the
      parameters, in the state) and write its rounding into the parameters,
      so that updates smaller than the parameters' precision (bf16) add up
      instead of being rounded away. On a relocalization the new block's copy
      starts from the parameter's value. Non-targets keep no copy.
    inner_params: the inner optimizer is a complete optimizer (e.g.
      ``optax.adamw(lr)``): it gets the weights it updates as ``params`` (the
      block, in fp32, for targets), and its learning-rate schedule counters are
      set to the global step before every update. This is what
      :func:`losia_jax.chain` builds from ``chain(losia(config), optimizer)``.

  Returns:
    A :class:`LoSiATransformation`.
  """
  config = LoSiAConfig() if config is None else config
  if not isinstance(config, LoSiAConfig):
    raise TypeError(f"`config` must be a LoSiAConfig; got {type(config).__name__}")
  if base_optimizer is None:
    base_optimizer = optax.scale_by_adam()
  if not (hasattr(base_optimizer, "init") and hasattr(base_optimizer, "update")):
    raise TypeError("`base_optimizer` must be an optax GradientTransformation")
  # Arrays (also tracers) are accepted unchecked: optax.inject_hyperparams
  # passes every numeric hyper-parameter as one, at init and inside jit.
  if not isinstance(weight_decay, jax.Array):
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
        or not np.isfinite(weight_decay) or weight_decay < 0:
      raise ValueError(f"`weight_decay` must be a finite number >= 0; got {weight_decay!r}")
  if learning_rate is not None and not callable(learning_rate) \
      and not isinstance(learning_rate, jax.Array):
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) \
        or not np.isfinite(float(learning_rate)) or float(learning_rate) < 0:
      raise ValueError(
          f"`learning_rate` must be a number >= 0 or an optax schedule; got {learning_rate!r}")
  if clip_norm is not None and not isinstance(clip_norm, jax.Array):
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) \
        or not np.isfinite(clip_norm) or clip_norm <= 0:
      raise ValueError(f"`clip_norm` must be a finite number > 0 or None; got {clip_norm!r}")
  # A Python zero skips the decay (and the gathers it needs) statically.
  has_decay = isinstance(weight_decay, jax.Array) or bool(weight_decay)
  if not isinstance(output_module, str) or not output_module:
    raise ValueError(f"`output_module` must be a non-empty string; got {output_module!r}")
  base = base_optimizer
  cfg = config
  T = cfg.period
  train_non_targets = cfg.non_target == "train"
  is_async = cfg.schedule == "async"

  def plan_of(params) -> LoSiAPlan:
    return make_plan(params, cfg, output_module=output_module,
                     dimension_numbers=dimension_numbers, stacked_layers=stacked_layers)

  def fresh_inner(b: Bucket):
    return base.init(jnp.zeros(b.first.block_shape, jnp.float32))

  # --- init -------------------------------------------------------------------

  def init_fn(params: Params) -> LoSiAState:
    misuse.check_not_followed_by_optimizer(params)
    plan = plan_of(params)
    targets, importance = {}, {}
    for b in plan.buckets:
      t = b.first
      rows = np.stack([initial_indices(cfg.seed, i, t.d_out, t.k_out, "rows")
                       for i in b.identities])
      cols = (np.tile(np.arange(t.d_in), (b.size, 1)) if t.row_mode else
              np.stack([initial_indices(cfg.seed, i, t.d_in, t.k_in, "cols")
                        for i in b.identities]))
      inner = jax.vmap(base.init)(jnp.zeros((b.size,) + t.block_shape, jnp.float32))
      ts = TargetState(jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32),
                       inner, jnp.full((b.size,), -1, jnp.int32))
      if master_weights:
        ts = ts._replace(master=gather_all(jax.tree_util.tree_leaves(params), b, ts)
                         .astype(jnp.float32))
      targets[b.role] = ts
      slot_shape = t.slice_shape if is_async else (b.size,) + t.slice_shape
      importance[b.role] = zeros_importance(slot_shape)
    leaves = jax.tree_util.tree_leaves(params)
    if train_non_targets:
      non_target = base.init({k: jnp.zeros(leaves[i].shape, jnp.float32)
                              for k, i in plan.non_targets})
    else:
      non_target = optax.EmptyState()
    return LoSiAState(jnp.zeros([], jnp.int32), targets, importance, non_target,
                      jnp.zeros([], jnp.int32))

  # --- the step ---------------------------------------------------------------

  def lr_at(count):
    if learning_rate is None:
      return None
    return learning_rate(count) if callable(learning_rate) else learning_rate

  def span(x, b: Bucket, j: int):
    """The rows of a bucket-stacked array that belong to member ``j``."""
    return x[b.offsets[j]:b.offsets[j] + b.members[j].n]

  def gather_all(leaves, b: Bucket, ts: TargetState):
    """The blocks of every member of ``b`` (``[N, *block_shape]``) from ``leaves``."""
    parts = [blocks.gather_block(leaves[t.leaf_index], t, span(ts.rows, b, j),
                                 span(ts.cols, b, j)) for j, t in enumerate(b.members)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

  def owner_of(b: Bucket, plan: LoSiAPlan, owner):
    member, local, pos = (jnp.asarray(a) for a in b.tables(plan.total))
    return member[owner], local[owner], pos[owner]

  def at_layer(plan: LoSiAPlan, lid: int):
    """Static: ``(bucket, member index, index in member, position in bucket)`` of
    every target matrix of layer id ``lid``."""
    out = []
    for b in plan.buckets:
      for j, (t, off) in enumerate(zip(b.members, b.offsets)):
        if lid in t.layer_ids:
          l = t.layer_ids.index(lid)
          out.append((b, j, l, off + l))
    return out

  def direct(b: Bucket) -> bool:
    """A bucket read at the owner's position by dynamic indexing: one stacked leaf."""
    return len(b.members) == 1 and b.first.stacked

  def per_owner(plan: LoSiAPlan, owner, fn, zeros, *operands):
    """``{role: fn(b, j, l, *operands)}`` for the matrix of each role in layer ``owner``.

    Stacked leaves are read at the owner's index (``l`` traced), with no
    conditional; the owner may hold no matrix of such a role (``mine`` false),
    then the value is of some other layer and callers mask it. The other
    buckets go through one ``lax.switch`` over layer ids whose branches only
    apply ``fn`` to the owner's matrices (``zeros(b)`` where it holds none): the
    importance math, gathers and masks run once, outside. XLA conditionals are
    sync points on CPU and every branch is compiled, so branches stay tiny.
    """
    out = {}
    for b in plan.buckets:
      if direct(b):
        out[b.role] = fn(b, 0, owner_of(b, plan, owner)[1], *operands)
    switched = [b for b in plan.buckets if not direct(b)]
    if switched:
      none = lambda *ops: {b.role: zeros(b) for b in switched}

      def branch(lid, *ops):
        vals = none()
        for b, j, l, _ in at_layer(plan, lid):
          if not direct(b):
            vals[b.role] = fn(b, j, l, *ops)
        return vals

      fns = [none] + [functools.partial(branch, lid) for lid in range(plan.total)]
      out.update(jax.lax.switch(owner + 1, fns, *operands))
    return out

  def mine(plan: LoSiAPlan, b: Bucket, owner):
    return owner_of(b, plan, owner)[0] > 0

  def inspect_owner(plan: LoSiAPlan, gv, owner):
    """Async: whether the profiling layer's full gradients are finite, and their
    squared norm (for ``clip_norm``)."""
    zero = jnp.zeros([], jnp.float32)

    def check(b, j, l, g_ops):
      g = gv.layer(g_ops, b, j, l)
      return jnp.all(jnp.isfinite(g)), (sq_norm(g) if clip_norm is not None else zero)

    res = per_owner(plan, owner, check, lambda b: (jnp.array(True), zero), gv.ops)
    ok, sq = jnp.array(True), zero
    for b in plan.buckets:
      m = mine(plan, b, owner)
      ok = ok & (res[b.role][0] | ~m)
      sq = sq + jnp.where(m, res[b.role][1], 0.0)
    return ok, sq

  def profile(plan: LoSiAPlan, state: LoSiAState, w_src, w_leaf, gv, owner, finite, coef,
              fix_block=None):
    """Accumulates the importance of the profiling layer(s).

    ``w_src`` are the weight leaves the products ``W ⊙ G`` read, ``w_leaf(b, j)``
    the member weights (sync), with the weights as they were *before* this step's
    update; in the fused path ``w_src`` are the updated leaves and
    ``fix_block(b, prod, g)`` puts the product of the old block back (async).
    ``coef`` is the clip factor of the gradients (None: no clipping).
    """
    clipped = (lambda g: g) if coef is None else (lambda g: g.astype(jnp.float32) * coef)
    importance = dict(state.importance)
    # A window starts from empty statistics: at its first step the buffer's old
    # contents (the previous window's) count as zero, inside the update itself
    # rather than by a separate reset pass.
    fresh_window = (state.count % T) == 0
    b1, b2 = cfg.importance_beta1, cfg.importance_beta2
    upd = lambda slot, w, g: accumulate_importance(slot, product(w, g), cfg.importance, b1, b2,
                                                   fresh=fresh_window)
    if is_async:
      # Only the products W ⊙ G of the owner's matrices come out of the layer
      # switch; the buffers are updated outside it, elementwise and masked by
      # whether the owner holds a matrix of the role. XLA copies any buffer passed
      # through a conditional (in the branch and again into the donated output):
      # with one LLaMA-7B layer's buffers (1.6 GB) that was two copies per step.
      def prod(b, j, l, w_src, g_ops):
        t = b.members[j]
        return product(blocks.layer_slice(w_src[t.leaf_index], t, l),
                       clipped(gv.layer(g_ops, b, j, l)))

      zeros = lambda b: jnp.zeros(importance[b.role].ibar.shape, jnp.float32)
      prods = per_owner(plan, jnp.where(finite, owner, -1), prod, zeros, w_src, gv.ops)
      for b in plan.buckets:
        p = prods[b.role] if fix_block is None else fix_block(b, prods[b.role], clipped)
        importance[b.role] = accumulate_importance(
            importance[b.role], p, cfg.importance, b1, b2,
            active=finite & mine(plan, b, owner), fresh=fresh_window)
      return importance
    g_leaves = gv.ops

    def run(imp, g_leaves):  # sync: every target profiles, in one conditional
      imp = dict(imp)
      for b in plan.buckets:
        slot = imp[b.role]
        for j, t in enumerate(b.members):
          shape = (t.n,) + t.slice_shape
          new = upd(jax.tree.map(lambda x: span(x, b, j), slot), w_leaf(b, j).reshape(shape),
                    clipped(g_leaves[t.leaf_index]).reshape(shape))
          slot = jax.tree.map(lambda s, x, o=b.offsets[j]: s.at[o:o + x.shape[0]].set(x),
                              slot, new)
        imp[b.role] = slot
      return imp

    return jax.lax.cond((owner == 0) & finite, run, lambda imp, g: dict(imp), importance, g_leaves)

  def choose(t: TargetSpec, slot_score: jax.Array):
    """New (rows, cols) of one per-layer matrix from its score (stored layout)."""
    score = slot_score.T if t.transposed else slot_score
    if t.row_mode:
      return select_rows(score, t.k_out), jnp.arange(t.d_in, dtype=jnp.int32)
    return select_subnet(score, t.k_out, t.k_in)

  def relocalize(plan: LoSiAPlan, targets, importance, owner, do, step):
    """End of a profiling window: new blocks and fresh inner state.

    Only the selection runs in a ``lax.cond`` (one for all roles), and it
    returns just the new indices: passing the importance buffers or the inner
    states through a conditional makes XLA copy them on every step. The small
    writes happen outside, masked by ``do``. The buffers themselves are reset
    at the first step of the next window (see ``profile``).
    """
    if not is_async:
      def run_all(targets, importance):
        out = {}
        for b in plan.buckets:
          t, ts = b.first, targets[b.role]
          rows, cols = jax.vmap(lambda sc, t=t: choose(t, sc))(importance_score(importance[b.role]))
          fresh = jax.vmap(lambda _, b=b: fresh_inner(b))(jnp.arange(b.size))
          out[b.role] = TargetState(rows, cols.reshape(ts.cols.shape), fresh,
                                    jnp.full_like(ts.last_relocalization, step), ts.master)
        return out

      return jax.lax.cond(do & (owner == 0), run_all, lambda t, i: dict(t), targets, importance)

    def select(importance):
      return {b.role: choose(b.first, importance_score(importance[b.role])) for b in plan.buckets}

    def keep(importance):
      return {b.role: (targets[b.role].rows[0], targets[b.role].cols[0]) for b in plan.buckets}

    new_idx = jax.lax.cond(do, select, keep, importance)
    targets = dict(targets)
    for b in plan.buckets:
      ts = targets[b.role]
      m, _, p = owner_of(b, plan, owner)
      mine = do & (m > 0)  # the owner may hold no matrix of this role (e.g. the output layer)
      put = lambda x, v, p=p, mine=mine: x.at[p].set(jnp.where(mine, v, x[p]))
      rows, cols = new_idx[b.role]
      targets[b.role] = TargetState(put(ts.rows, rows), put(ts.cols, cols),
                                    jax.tree.map(put, ts.inner, fresh_inner(b)),
                                    put(ts.last_relocalization, step), ts.master)
    return targets

  def read_norm(plan: LoSiAPlan, gv, gblk, owner, owner_sq):
    """The global L2 norm of the gradient values the step reads (see ``clip_norm``).

    Async: every target's block except the profiling layer's, whose full
    gradients (``owner_sq``) count instead. Sync: the full gradients of every
    target in a profiling slot, the blocks otherwise. Plus trained non-targets.
    """
    sq = jnp.zeros([], jnp.float32)
    if is_async:
      for b in plan.buckets:
        per = jnp.sum(jnp.square(gblk[b.role]), axis=tuple(range(1, gblk[b.role].ndim)))
        m, _, p = owner_of(b, plan, owner)
        own = (jnp.arange(b.size) == p) & (m > 0)
        sq = sq + jnp.sum(jnp.where(own, 0.0, per))
      sq = sq + owner_sq
    else:
      blocks_sq = sum(jnp.sum(jnp.square(g)) for g in gblk.values())
      sq = sq + jax.lax.cond(owner == 0, lambda g: sum(sq_norm(g[t.leaf_index]) for t in plan.targets),
                             lambda g: blocks_sq, gv.ops)
    if train_non_targets:
      for k, i in plan.non_targets:
        sq = sq + sq_norm(gv.leaf(k, i))
    return jnp.sqrt(sq)

  def prepare(grads, state: LoSiAState, params, fused: bool):
    """The update of every block and non-target, and whether the step is finite."""
    if params is None:
      raise ValueError("LoSiA needs `params` in update(): importance and weight decay "
                       "read the weights")
    plan = plan_of(params)
    w_leaves = jax.tree_util.tree_leaves(params)
    if isinstance(grads, ProGradients):
      if not is_async:
        raise ValueError("LoSiA-Pro gradients need schedule='async': in sync mode every "
                         "target needs its full gradient during a profiling slot")
      gv = _ProGrads(grads, plan, train_non_targets)
    else:
      gv = _DenseGrads(grads, plan)
    s = state.count
    owner = slot_owner(s, T, plan.total)
    lr = lr_at(s)
    # Old blocks of every matrix are needed for weight decay, and in the fused path
    # to restore "weights before the step" for profiling after the scatter.
    need_all_w = has_decay or inner_params or master_weights or not is_async or fused

    gblk, wblk = {}, {}
    finite = jnp.array(True)
    for b in plan.buckets:
      ts = state.targets[b.role]
      gblk[b.role] = gv.block(b, lambda leaves, b, ts=ts: gather_all(leaves, b, ts)
                              ).astype(jnp.float32)
      finite = finite & jnp.all(jnp.isfinite(gblk[b.role]))
      if need_all_w and not (fused and is_async):
        wblk[b.role] = gather_all(w_leaves, b, ts)
    owner_sq = jnp.zeros([], jnp.float32)
    if is_async:
      ok, owner_sq = inspect_owner(plan, gv, owner)
      finite = finite & ok
    if not is_async:
      finite = finite & jax.lax.cond(
          owner == 0, lambda g: all_finite(g[t.leaf_index] for t in plan.targets),
          lambda g: jnp.array(True), gv.ops)
    if train_non_targets:
      finite = finite & all_finite(gv.leaf(k, i) for k, i in plan.non_targets)
    if fused and is_async:
      # Profiling reads the old blocks again after the in-place scatter. Gathered
      # in a conditional that also yields `finite`, on which every scatter
      # depends, they are read before the weights are written; gathered outside,
      # XLA copies every target weight. (Zeros when the step is skipped: unused.)
      def read(w):
        return {b.role: gather_all(w, b, state.targets[b.role]) for b in plan.buckets}, True

      def skip(w):
        return {b.role: jnp.zeros((b.size,) + b.first.block_shape, w[b.first.leaf_index].dtype)
                for b in plan.buckets}, False

      wblk, finite = jax.lax.cond(finite, read, skip,
                                  {t.leaf_index: w_leaves[t.leaf_index] for t in plan.targets})
    coef = None
    if clip_norm is not None:
      coef = clip_factor(read_norm(plan, gv, gblk, owner, owner_sq), clip_norm)
      gblk = {r: g * coef for r, g in gblk.items()}

    deltas, targets, masters = {}, {}, {}
    for b in plan.buckets:
      ts = state.targets[b.role]
      # the block's current value: its exact copy, or the parameter
      w_now = ts.master if master_weights else wblk.get(b.role)
      if inner_params:
        u, inner = jax.vmap(lambda g, st, w: base.update(g, st, w))(
            cfg.scale * gblk[b.role], sync_schedule_counts(ts.inner, s),
            w_now.astype(jnp.float32))
      else:
        u, inner = jax.vmap(lambda g, st: base.update(g, st))(cfg.scale * gblk[b.role], ts.inner)
      if has_decay:
        u = u + weight_decay * w_now.astype(jnp.float32)
      if cfg.rewarm:
        u = u * rewarm_factor(s, ts.last_relocalization, T)[:, None, None]
      step = u if lr is None else -lr * u
      # Every scatter depends on `finite`, hence on the reads above: XLA then
      # reads the old weights before overwriting them in place, without copies.
      deltas[b.role] = jnp.where(finite, step, 0.0)
      targets[b.role] = ts._replace(inner=tree_where(finite, inner, ts.inner))
      if master_weights:
        masters[b.role] = ts.master + deltas[b.role]

    nt_updates, non_target = {}, state.non_target
    if train_non_targets and plan.non_targets:
      nt_w = {k: w_leaves[i] for k, i in plan.non_targets}
      nt_g = {k: gv.leaf(k, i) for k, i in plan.non_targets}

      def nt_step(nt_g, nt_w, nt_state, lr):
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), nt_g)
        if coef is not None:
          g32 = jax.tree.map(lambda g: g * coef, g32)
        if inner_params:
          u, new_state = base.update(g32, sync_schedule_counts(nt_state, s),
                                     jax.tree.map(lambda w: w.astype(jnp.float32), nt_w))
        else:
          u, new_state = base.update(g32, nt_state)
        out = {}
        for k, w in nt_w.items():
          v = u[k] + weight_decay * w.astype(jnp.float32) if has_decay else u[k]
          v = v if lr is None else -lr * v
          # fused path: the new weight itself, written in place; else the update
          out[k] = (w + v.astype(w.dtype)).astype(w.dtype) if fused else v.astype(w.dtype)
        return out, new_state

      def nt_skip(nt_g, nt_w, nt_state, lr):
        if fused:
          return dict(nt_w), nt_state
        return {k: jnp.zeros_like(w) for k, w in nt_w.items()}, nt_state

      # A conditional rather than selects: a select between new and old Adam
      # moments makes XLA keep (copy) the old embedding-sized moments.
      nt_updates, non_target = jax.lax.cond(finite, nt_step, nt_skip, nt_g, nt_w,
                                            state.non_target, lr)
    return dict(plan=plan, state=state, gv=gv, s=s, owner=owner, finite=finite, coef=coef,
                wblk=wblk, gblk=gblk, deltas=deltas, masters=masters, targets=targets,
                nt_updates=nt_updates,
                non_target=non_target)

  def finish(c, w_src, w_leaf, new_blocks, fix_block=None) -> LoSiAState:
    """Profiling and relocalization, after the blocks were updated.

    ``new_blocks(b, ts)`` reads the blocks ``ts`` indexes from the updated
    weights (for the master copies of blocks that just moved); for ``w_src``,
    ``w_leaf`` and ``fix_block`` see ``profile``.
    """
    plan, state, s, owner, finite = c["plan"], c["state"], c["s"], c["owner"], c["finite"]
    importance = profile(plan, state, w_src, w_leaf, c["gv"], owner, finite, c["coef"],
                         fix_block)
    targets = relocalize(plan, c["targets"], importance, owner, finite & ends_slot(s, T), s)
    if master_weights:
      for b in plan.buckets:
        ts = targets[b.role]
        moved = (ts.last_relocalization == s)[:, None, None]
        fresh = new_blocks(b, ts).astype(jnp.float32)
        targets[b.role] = ts._replace(master=jnp.where(moved, fresh, c["masters"][b.role]))
    fin = finite.astype(jnp.int32)
    return LoSiAState(s + fin, targets, importance, c["non_target"],
                      state.notfinite_count + (1 - fin))

  def write(c, leaves, write_block, payload):
    """New leaves: each member's span of ``payload[role]`` written by ``write_block``."""
    out = list(leaves)
    for b in c["plan"].buckets:
      ts = c["state"].targets[b.role]  # this step used the indices from before relocalization
      for j, t in enumerate(b.members):
        out[t.leaf_index] = write_block(leaves[t.leaf_index], t, span(ts.rows, b, j),
                                        span(ts.cols, b, j), span(payload[b.role], b, j))
    return out

  def rounded_masters(c, leaves):
    """Master weights: the new blocks are the copies rounded to the parameter dtype."""
    return {b.role: c["masters"][b.role].astype(leaves[b.first.leaf_index].dtype)
            for b in c["plan"].buckets}

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    c = prepare(updates, state, params, fused=False)
    w_leaves = jax.tree_util.tree_leaves(params)
    if master_weights:  # the update that takes each block to its rounded copy
      payload = {r: m - c["wblk"][r] for r, m in rounded_masters(c, w_leaves).items()}
    else:
      payload = c["deltas"]
    out = write(c, w_leaves, blocks.scatter_block, payload)

    def new_blocks(b, ts):  # what optax.apply_updates will make of the blocks
      return gather_all(w_leaves, b, ts) + gather_all(out, b, ts)

    new_state = finish(c, w_leaves, lambda b, j: w_leaves[b.members[j].leaf_index], new_blocks)
    # updates take the structure of the gradients (of the params for Pro gradients)
    treedef = jax.tree_util.tree_structure(params if isinstance(updates, ProGradients)
                                           else updates)
    for k, i in c["plan"].non_targets:
      out[i] = c["nt_updates"].get(k, jnp.zeros_like(w_leaves[i]))
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  def apply_fn(grads, state, params):
    c = prepare(grads, state, params, fused=True)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if master_weights:
      out = write(c, leaves, blocks.set_block, rounded_masters(c, leaves))
    else:
      out = write(c, leaves, blocks.add_block, c["deltas"])
    for k, i in c["plan"].non_targets:
      if k in c["nt_updates"]:
        out[i] = c["nt_updates"][k]  # already the new weight

    # Profiling reads the *updated* weights with the old block values put back:
    # bit-exact "weights before the step", while reading them before the
    # in-place scatter would make XLA copy every target weight. The old block goes
    # into the product W ⊙ G (a fresh temporary), not into a copy of the weight.
    def fix_block(b, prod, clipped):
      t, ts = b.first, state.targets[b.role]
      p = owner_of(b, c["plan"], c["owner"])[2]
      r, k = ts.rows[p], ts.cols[p]
      if isinstance(c["gv"], _ProGrads) and not t.row_mode:  # Pro: the profile's own block
        g = blocks.get_layer_block(clipped(c["gv"].grads.profile[b.role]), t, r, k)
      else:  # the (clipped) gradient block this step gathered
        g = c["gblk"][b.role][p]
      old = product(c["wblk"][b.role][p], g)
      return blocks.set_layer_block(prod, t, r, k, old)

    def w_leaf(b, j):
      t, ts = b.members[j], state.targets[b.role]
      return blocks.set_block(out[t.leaf_index], t, span(ts.rows, b, j), span(ts.cols, b, j),
                              span(c["wblk"][b.role], b, j))

    new_state = finish(c, out, w_leaf, lambda b, ts: gather_all(out, b, ts), fix_block)
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return _make(init_fn, update_fn, apply_fn, plan_of, inner=base, config=cfg)
