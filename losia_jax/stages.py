"""The first two stages of a LoSiA step: read the gradients, then update the blocks.

:func:`read_gradients` gathers each target's block gradient, decides whether
the step runs at all (every value it reads is finite) and computes the clip
factor: a :class:`StepReads`. :func:`update_blocks` runs the inner optimizer on
every block, adds decoupled weight decay, scales by rewarm and the learning
rate, and steps the non-targets: a :class:`BlockUpdates`. Nothing is written
yet; :mod:`losia_jax.paths` writes, :mod:`losia_jax.profiling` profiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from losia_common import LoSiAConfig
from losia_jax import blocks
from losia_jax.gradients import GradientView, gradient_view
from losia_jax.inner import AdamSettings, sync_schedule_counts
from losia_jax.profiling import Schedule
from losia_jax.schedule import rewarm_factor, slot_owner
from losia_jax.state import LoSiAState, TargetState
from losia_jax.steps import all_finite, clip_factor, sq_norm, sum_scalars, tree_where
from losia_jax.targets import DimensionNumbersArg, LoSiAPlan, make_plan


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
  """The static settings of one LoSiA transformation (validated by ``scale_by_losia``).

  Attributes:
    config: the :class:`LoSiAConfig`.
    inner: the inner optimizer, run on compact blocks (and full non-targets).
    learning_rate: float, array or optax schedule of the step; None: the output
      is the descent direction.
    weight_decay: decoupled weight decay (a number or, under
      ``optax.inject_hyperparams``, an array).
    has_decay: whether decay is applied at all (a Python zero skips it statically).
    clip_norm: clip by the norm of the values the step reads, or None.
    master_weights: fp32 copies of the trained blocks live in the state.
    inner_params: ``inner`` reads ``params`` (the block's weights) and its
      schedule counters follow the global step.
    output_module, dimension_numbers, stacked_layers: where LoSiA acts (:func:`make_plan`).
    adam: how ``inner`` is built from Adam (:func:`~losia_jax.inner.adam_settings`:
      ``optax.scale_by_adam``, ``adam``, ``adamw``); the non-targets then step
      without a conditional. None otherwise.
  """

  config: LoSiAConfig
  inner: optax.GradientTransformation
  learning_rate: Optional[optax.ScalarOrSchedule]
  weight_decay: Any
  has_decay: bool
  clip_norm: Optional[float]
  master_weights: bool
  inner_params: bool
  output_module: str
  dimension_numbers: DimensionNumbersArg
  stacked_layers: bool
  adam: Optional[AdamSettings] = None

  @property
  def train_non_targets(self) -> bool:
    return self.config.non_target == "train"

  def plan(self, params: Any) -> LoSiAPlan:
    return make_plan(params, self.config, output_module=self.output_module,
                     dimension_numbers=self.dimension_numbers,
                     stacked_layers=self.stacked_layers)

  def learning_rate_at(self, count: jax.Array) -> Optional[jax.Array]:
    if self.learning_rate is None:
      return None
    return self.learning_rate(count) if callable(self.learning_rate) else self.learning_rate


class StepReads(NamedTuple):
  """What a step reads before it changes anything.

  Attributes:
    plan: the targets (static).
    grads: the gradients behind one interface (dense tree or LoSiA-Pro's blocks).
    count: ``s``, the number of steps applied so far.
    owner: the layer id whose profiling slot holds step ``s``.
    learning_rate: ``lr(s)``, or None for the direction.
    finite: bool scalar: every gradient value the step reads is finite. False
      skips the step (zero updates, state unchanged but ``notfinite_count``).
    clip: the clip factor ``min(1, clip_norm / (norm + 1e-6))``; None without ``clip_norm``.
    grad_blocks: ``{role: fp32 [N, *block_shape]}`` each target's block gradient,
      clipped.
    old_blocks: ``{role: [N, *block_shape]}`` each block's weights before the step,
      where the step needs them (decay, master weights, inner params); absent
      otherwise.
  """

  plan: LoSiAPlan
  grads: GradientView
  count: jax.Array
  owner: jax.Array
  learning_rate: Optional[jax.Array]
  finite: jax.Array
  clip: Optional[jax.Array]
  grad_blocks: dict[str, jax.Array]
  old_blocks: dict[str, jax.Array]


class BlockUpdates(NamedTuple):
  """What the inner optimizer made of this step, not yet written anywhere.

  Attributes:
    deltas: ``{role: fp32 [N, *block_shape]}`` the change of every block:
      ``-lr(s) * rewarm(s) * (u + weight_decay * W)`` (without ``-lr`` for the
      direction); zero when the step is skipped.
    targets: ``{role: TargetState}`` with the advanced inner states (indices as
      before: relocalization comes later).
    masters: ``{role: fp32 [N, *block_shape]}`` the master copies after the step
      (``master_weights``); empty otherwise.
    non_target: ``{key: array}`` for trained non-targets: the update (optax path)
      or the new weight (fused path).
    non_target_state: the inner optimizer's state on the non-targets.
  """

  deltas: dict[str, jax.Array]
  targets: dict[str, TargetState]
  masters: dict[str, jax.Array]
  non_target: dict[str, jax.Array]
  non_target_state: optax.OptState


def read_gradients(options: Options, schedule: Schedule, plan: LoSiAPlan, grads: Any,
                   state: LoSiAState, weights: list) -> StepReads:
  """Stage 1: the block gradients, whether the step is finite, and the clip factor.

  ``weights`` are the params' leaves as the step receives them.
  """
  view = gradient_view(grads, plan, options.train_non_targets, schedule.is_async)
  count = state.count
  owner = slot_owner(count, options.config.period, plan.total)
  lr = options.learning_rate_at(count)
  need_old_blocks = options.has_decay or options.inner_params or options.master_weights

  grad_blocks, old_blocks = {}, {}
  for b in plan.buckets:
    ts = state.targets[b.role]
    grad_blocks[b.role] = view.block(b, ts.rows, ts.cols, ts.starts).astype(jnp.float32)
    if need_old_blocks:
      old_blocks[b.role] = blocks.gather_bucket(weights, b, ts.rows, ts.cols, ts.starts)
  profiling_finite, profiling_sq = schedule.inspect_profiling(plan, view, owner)
  non_targets = ([view.leaf(k, i) for k, i in plan.non_targets]
                 if options.train_non_targets else [])
  finite = all_finite([*grad_blocks.values(), *non_targets], flags=[profiling_finite])

  clip = None
  if options.clip_norm is not None:
    sq = schedule.read_sq_norm(jnp.zeros([], jnp.float32), plan, view, grad_blocks, owner,
                               profiling_sq)
    sq = sum_scalars([sq, *map(sq_norm, non_targets)])
    clip = clip_factor(jnp.sqrt(sq), options.clip_norm)
    grad_blocks = {r: g * clip for r, g in grad_blocks.items()}
  return StepReads(plan, view, count, owner, lr, finite, clip, grad_blocks, old_blocks)


def update_blocks(options: Options, reads: StepReads, state: LoSiAState, weights: list,
                  fused: bool) -> BlockUpdates:
  """Stage 2: inner optimizer, decoupled decay, rewarm and learning rate on every block,
  and the inner optimizer's step on trained non-targets."""
  cfg, count, lr = options.config, reads.count, reads.learning_rate
  deltas, targets, masters = {}, {}, {}
  for b in reads.plan.buckets:
    ts = state.targets[b.role]
    # the block's current value: its exact copy, or the parameter
    block = ts.master if options.master_weights else reads.old_blocks.get(b.role)
    g = cfg.scale * reads.grad_blocks[b.role]
    if options.inner_params:
      u, inner = jax.vmap(options.inner.update)(g, sync_schedule_counts(ts.inner, count),
                                                block.astype(jnp.float32))
    else:
      u, inner = jax.vmap(options.inner.update)(g, ts.inner)
    if options.has_decay:
      u = u + options.weight_decay * block.astype(jnp.float32)
    if cfg.rewarm:
      u = u * rewarm_factor(count, ts.last_relocalization, cfg.period)[:, None, None]
    delta = u if lr is None else -lr * u
    # Every scatter depends on `finite`, hence on the reads above: XLA then
    # reads the old weights before overwriting them in place, without copies.
    deltas[b.role] = jnp.where(reads.finite, delta, 0.0)
    targets[b.role] = ts._replace(inner=tree_where(reads.finite, inner, ts.inner))
    if options.master_weights:
      masters[b.role] = ts.master + deltas[b.role]

  non_target, non_target_state = {}, state.non_target
  if options.train_non_targets and reads.plan.non_targets:
    non_target, non_target_state = _update_non_targets(options, reads, state, weights, fused)
  return BlockUpdates(deltas, targets, masters, non_target, non_target_state)


def _update_non_targets(options: Options, reads: StepReads, state: LoSiAState, weights: list,
                        fused: bool) -> tuple[dict[str, jax.Array], optax.OptState]:
  """The inner optimizer's full update of every non-target (decay, no rewarm).

  A skipped (non-finite) step must leave the non-targets and their state as
  they were. For Adam (``optax.scale_by_adam``, ``adam``, ``adamw``) that is
  a select of the moments (:func:`_adam_non_targets`); any other inner optimizer runs in a
  conditional, since a select between its new and old state makes XLA keep
  (copy) the old embedding-sized moments. The conditional's price: on the
  optax path its output, the update, is a parameter-sized buffer that
  XLA:CPU allocates (and page-faults) anew on every step.
  """
  plan = reads.plan
  grads = {k: reads.grads.leaf(k, i) for k, i in plan.non_targets}
  non_target_weights = {k: weights[i] for k, i in plan.non_targets}
  if options.adam is not None:
    return _adam_non_targets(options, reads, grads, non_target_weights, state.non_target, fused)

  def step(grads, weights, inner_state, lr):
    u, new_state = _inner_update(options, reads, _clipped(reads, grads), inner_state, weights)
    return {k: _non_target_out(options, w, u[k], lr, fused) for k, w in weights.items()}, new_state

  def skip(grads, weights, inner_state, lr):
    if fused:
      return dict(weights), inner_state
    return {k: jnp.zeros_like(w) for k, w in weights.items()}, inner_state

  return jax.lax.cond(reads.finite, step, skip, grads, non_target_weights, state.non_target,
                      reads.learning_rate)


def _inner_args(options: Options, reads: StepReads, inner_state, weights: dict):
  """The state and params ``options.inner.update`` gets on the non-targets: the
  schedule counters at the global step and the fp32 weights when it reads params."""
  if options.inner_params:
    return sync_schedule_counts(inner_state, reads.count), _f32(weights)
  return inner_state, None


def _inner_update(options: Options, reads: StepReads, grads: dict, inner_state, weights: dict):
  """``options.inner.update`` on the non-targets (see :func:`_inner_args`)."""
  state, params = _inner_args(options, reads, inner_state, weights)
  return options.inner.update(grads, state, params)


def _adam_non_targets(options: Options, reads: StepReads, grads: dict, weights: dict,
                      inner_state, fused: bool) -> tuple[dict[str, jax.Array], optax.OptState]:
  """Adam (alone or followed by scalar-state pieces, as in ``optax.adamw``) on
  the non-targets, a skipped step by selects instead of a conditional.

  The state is optax's own (``inner.update``), kept by a select when the step
  is skipped. The direction is then computed from the moments *as kept*, with
  ``optax.scale_by_adam``'s arithmetic, and passed through the pieces after
  Adam with their old (scalar) state: exact, because that direction depends on
  the new moments only (and a skipped step discards it). Every read of the old
  moments then precedes their in-place write, so XLA passes over moments and
  weights in place as for ``optax.adam``, and on the optax path the update
  fuses into ``optax.apply_updates`` instead of being materialized.
  """
  a, finite = options.adam, reads.finite
  state, params = _inner_args(options, reads, inner_state, weights)
  _, new = options.inner.update(_clipped(reads, grads), state, params)
  kept = tree_where(finite, new, inner_state)
  moments = kept if a.tail is None else kept[0]
  mu_hat = optax.tree.bias_correction(moments.mu, a.b1, moments.count)
  nu_hat = optax.tree.bias_correction(moments.nu, a.b2, moments.count)
  u = {k: mu_hat[k] / (jnp.sqrt(nu_hat[k] + a.eps_root) + a.eps) for k in weights}
  if a.tail is not None:  # the pieces after Adam, with their state before this step
    u, _ = a.tail.update(u, tuple(state[1:]), params)
  out = {}
  for k, w in weights.items():
    v = _non_target_out(options, w, u[k], reads.learning_rate, fused)
    out[k] = jnp.where(finite, v, w if fused else jnp.zeros_like(v))
  return out, kept


def _f32(weights: dict) -> dict:
  return jax.tree.map(lambda w: w.astype(jnp.float32), weights)


def _clipped(reads: StepReads, grads: dict) -> dict:
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  if reads.clip is not None:
    grads = jax.tree.map(lambda g: g * reads.clip, grads)
  return grads


def _non_target_out(options: Options, w: jax.Array, u: jax.Array, lr, fused: bool) -> jax.Array:
  """Decay and learning rate on the inner direction ``u``: the new weight itself on
  the fused path (written in place), else the update."""
  v = u + options.weight_decay * w.astype(jnp.float32) if options.has_decay else u
  v = v if lr is None else -lr * v
  return (w + v.astype(w.dtype)).astype(w.dtype) if fused else v.astype(w.dtype)
