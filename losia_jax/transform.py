"""LoSiA as an Optax gradient transformation.

Implements LOSIA_SPEC.md: every target matrix trains only its core block
``W[rows][:, cols]`` with a compact inner optimizer; one layer at a time (async)
or all layers together (sync) accumulate gradient importance, and at the end of
their profiling slot choose a new block, restart the inner optimizer and ramp
their learning rate back up (rewarm). Relocalization happens inside the jitted
update (``lax.switch``/``lax.cond`` on the step counter), never on the host.

One step (:meth:`LoSiAFunctions.step`) reads top to bottom:

1. read the gradients (:func:`~losia_jax.stages.read_gradients`): each target's
   block gradient, whether every value the step reads is finite, the clip factor;
2. update the blocks (:func:`~losia_jax.stages.update_blocks`): the inner
   optimizer, decoupled decay, rewarm and the learning rate;
3. profile (:mod:`losia_jax.profiling`): importance from the weights before the step;
4. write the deltas (:mod:`losia_jax.paths`), after profiling's reads: into updates,
   or into the params;
5. relocalize (:mod:`losia_jax.profiling`) at the end of a window.

``config.schedule`` picks the strategy of steps 3 and 5 (and of the checks in
step 1): :class:`~losia_jax.profiling.AsyncSchedule` or
:class:`~losia_jax.profiling.SyncSchedule`.

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

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from losia_common import LoSiAConfig
from losia_common.subnet import initial_indices
from losia_jax import blocks, misuse
from losia_jax.gradients import ProGradients  # noqa: F401  (re-exported)
from losia_jax.importance import zeros_importance
from losia_jax.inner import adam_settings
from losia_jax.paths import write_params, write_updates
from losia_jax.profiling import Schedule, schedule_for
from losia_jax.schedule import ends_slot
from losia_jax.stages import Options, read_gradients, update_blocks
from losia_jax.state import LoSiAState, LoSiATransformation, TargetState
from losia_jax.targets import DimensionNumbersArg, LoSiAPlan

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

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import losia_jax
    >>> params = {"layers": [{"q_proj": {"kernel": jnp.ones((16, 16))}}]}
    >>> cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> # the descent direction, followed by a learning rate (the optax way)
    >>> tx = optax.chain(losia_jax.scale_by_losia(cfg, optax.scale_by_lion()),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> int((updates["layers"][0]["q_proj"]["kernel"] != 0).sum())  # one 4 x 4 block
    16
    >>> # the learning rate applied by LoSiA, on the fused in-place path
    >>> tx = losia_jax.scale_by_losia(cfg, optax.scale_by_lion(), learning_rate=1e-2)
    >>> new_params, state = tx.apply_gradients(grads, tx.init(params), params)
    >>> round(float(new_params["layers"][0]["q_proj"]["kernel"].min()), 6)  # 1 - lr * sign
    0.99
  """
  options = _options(config, base_optimizer, learning_rate, weight_decay, output_module,
                     dimension_numbers, stacked_layers, inner_params, clip_norm, master_weights)
  functions = LoSiAFunctions(options, schedule_for(options.config, options.inner,
                                                   clipping=clip_norm is not None))
  return LoSiATransformation(functions.init, functions.update,
                             apply_gradients=functions.apply_gradients, plan=functions.plan,
                             config=options.config, inner=options.inner)


def _options(config, base_optimizer, learning_rate, weight_decay, output_module,
             dimension_numbers, stacked_layers, inner_params, clip_norm,
             master_weights) -> Options:
  """``scale_by_losia``'s arguments, checked, as :class:`~losia_jax.stages.Options`."""
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
  if not isinstance(output_module, str) or not output_module:
    raise ValueError(f"`output_module` must be a non-empty string; got {output_module!r}")
  return Options(
      config=config, inner=base_optimizer, learning_rate=learning_rate,
      weight_decay=weight_decay,
      # A Python zero skips the decay (and the gathers it needs) statically.
      has_decay=isinstance(weight_decay, jax.Array) or bool(weight_decay),
      clip_norm=clip_norm, master_weights=master_weights, inner_params=inner_params,
      output_module=output_module, dimension_numbers=dimension_numbers,
      stacked_layers=stacked_layers, adam=adam_settings(base_optimizer))


@dataclasses.dataclass(frozen=True, eq=False)
class LoSiAFunctions:
  """The functions of one LoSiA transformation, and what they share.

  :func:`scale_by_losia` builds one and returns its bound methods as a
  :class:`LoSiATransformation`. Because ``init`` and ``update`` are bound
  methods, a wrapper that keeps only those (``optax.chain``) still leads back
  here (``losia_jax.wrappers.find_losia``).

  Attributes:
    options: the static settings.
    schedule: the async or sync strategy of ``options.config.schedule``.
  """

  options: Options
  schedule: Schedule

  @property
  def inner(self) -> optax.GradientTransformation:
    return self.options.inner

  def plan(self, params: Params) -> LoSiAPlan:
    """The targets LoSiA finds in ``params`` (from the structure only)."""
    return self.options.plan(params)

  def init(self, params: Params) -> LoSiAState:
    misuse.check_not_followed_by_optimizer(params)  # reads its caller's frames: keep it here
    options, cfg = self.options, self.options.config
    plan = self.plan(params)
    targets, importance = {}, {}
    for b in plan.buckets:
      t = b.first
      rows = np.stack([initial_indices(cfg.seed, i, t.d_out, t.k_out, "rows")
                       for i in b.identities])
      cols = (np.tile(np.arange(t.d_in), (b.size, 1)) if t.row_mode else
              np.stack([initial_indices(cfg.seed, i, t.d_in, t.k_in, "cols")
                        for i in b.identities]))
      inner = jax.vmap(options.inner.init)(jnp.zeros((b.size,) + t.block_shape, jnp.float32))
      starts = tuple(jnp.asarray(o, jnp.int32) for o in b.offsets) if len(b.members) > 1 else ()
      ts = TargetState(jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32),
                       inner, jnp.full((b.size,), -1, jnp.int32), starts=starts)
      if options.master_weights:
        master = blocks.gather_bucket(jax.tree_util.tree_leaves(params), b, ts.rows, ts.cols,
                                    ts.starts)
        ts = ts._replace(master=master.astype(jnp.float32))
      targets[b.role] = ts
      importance[b.role] = zeros_importance(self.schedule.importance_shape(t, b))
    leaves = jax.tree_util.tree_leaves(params)
    if options.train_non_targets:
      non_target = options.inner.init({k: jnp.zeros(leaves[i].shape, jnp.float32)
                                       for k, i in plan.non_targets})
    else:
      non_target = optax.EmptyState()
    return LoSiAState(jnp.zeros([], jnp.int32), targets, importance, non_target,
                      jnp.zeros([], jnp.int32))

  def update(self, updates: Any, state: LoSiAState, params: Optional[Params] = None,
             **extra_args) -> tuple[Any, LoSiAState]:
    """The optax path: parameter-shaped updates, zero outside the blocks."""
    del extra_args
    return self.step(updates, state, params, fused=False)

  def apply_gradients(self, grads: Any, state: LoSiAState, params: Params
                      ) -> tuple[Params, LoSiAState]:
    """The fused path: the new params, each block written in place."""
    return self.step(grads, state, params, fused=True)

  def step(self, grads: Any, state: LoSiAState, params: Optional[Params], fused: bool
           ) -> tuple[Any, LoSiAState]:
    """One LoSiA step: ``(updates or params, state)``."""
    if params is None:
      raise ValueError("LoSiA needs `params` in update(): importance and weight decay "
                       "read the weights")
    options, schedule = self.options, self.schedule
    plan = self.plan(params)
    weights = jax.tree_util.tree_leaves(params)
    # 1. the gradients: block gradients, finiteness (False skips the step), clip factor
    reads = read_gradients(options, schedule, plan, grads, state, weights)
    # 2. the blocks' updates: inner optimizer, decay, rewarm, learning rate
    updates = update_blocks(options, reads, state, weights, fused)
    # 3. importance of the profiling layer(s), from the params as given: the weights
    #    before the step. `read` is `finite` as the conditionals that read them yield it.
    importance, read = schedule.profile(plan, state, reads.grads, reads.owner, reads.finite,
                                        reads.clip, weights)
    # 4. written with this step's indices, after those reads (losia_jax.paths): into the
    #    params in place, or into updates
    if fused:
      output = write_params(reads, state.targets, updates, params, options.master_weights, read)
    else:
      output = write_updates(reads, state.targets, updates, params, grads,
                             options.master_weights, read)
    # 5. relocalization at the end of a profiling window
    due = reads.finite & ends_slot(reads.count, options.config.period)
    targets = schedule.relocalize(plan, updates.targets, importance, reads.owner, due,
                                  reads.count)
    if options.master_weights:
      targets = _refresh_masters(plan, targets, updates, output, reads.count)
    applied = reads.finite.astype(jnp.int32)
    new_state = LoSiAState(reads.count + applied, targets, importance, updates.non_target_state,
                           state.notfinite_count + (1 - applied))
    return output.tree(plan, updates), new_state


def _refresh_masters(plan: LoSiAPlan, targets: dict[str, TargetState], updates,
                     output, count: jax.Array) -> dict[str, TargetState]:
  """Master copies after the step; a block that just moved starts from the parameter."""
  targets = dict(targets)
  for b in plan.buckets:
    ts = targets[b.role]
    moved = (ts.last_relocalization == count)[:, None, None]
    fresh = output.block_after(b, ts).astype(jnp.float32)
    targets[b.role] = ts._replace(master=jnp.where(moved, fresh, updates.masters[b.role]))
  return targets
