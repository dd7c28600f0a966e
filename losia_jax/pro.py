"""LoSiA-Pro for JAX: backward passes that compute only the core block's gradient.

LOSIA_SPEC.md section 8. A target ``y = x @ W`` (Flax kernel ``W [d_in,
d_out]``) is evaluated by :func:`pro_linear`, a ``jax.custom_vjp`` whose
forward saves only ``x[..., cols]`` and whose backward returns

- the exact input gradient ``dy @ Wᵀ``, and
- the gradient of the *compact block* ``W[cols][:, rows]``:
  ``x[..., cols]ᵀ · dy[..., rows]`` (``[k_in, k_out]``).

The differentiated quantities are the blocks themselves, so no full-size weight
gradient (nor a full-size residual activation) ever exists for a target.

The profiling layer. Importance needs the *full* gradient of the matrices of
the layer whose profiling slot holds the step, and which layer that is changes
every ``period`` steps while shapes must stay static. We neither compile a
variant per layer nor read the step counter on the host: every target's output
gets ``+ [layer == owner] * e_role`` where ``e_role`` is a zero "probe" of the
output's shape, one per role. The forward value is unchanged (it adds exact
zeros), and ``∂loss/∂e_role`` is exactly ``dy`` of the owner's matrix of that
role. The owner's input ``x`` is picked in the forward by a select chain (no
residual, one activation-sized buffer per distinct input: roles that read the
same activation, as q/k/v do, share one chain), and the full gradient is the
one extra matmul ``xᵀ · dy``, the matmul non-Pro LoSiA does for every target.

Use :func:`value_and_grad` in place of ``jax.value_and_grad``; it returns
:class:`~losia_jax.gradients.ProGradients`, which ``tx.apply_gradients`` and
``tx.update`` accept. The model must route its target projections through the
``linear`` hook it is given (``losia_jax.models.LlamaForCausalLM`` does).

Mixed precision: :func:`pro_linear` is the model's own projection
(:func:`losia_jax.linear.project`) with another matmul, so it computes in the
activation's dtype exactly as the plain hook does (bf16 compute on fp32 params:
the same bf16 products, the same loss bit for bit); block gradients come back in
the parameters' dtype.

Limits: ``schedule="async"`` only (sync profiles every layer at once); the
output layer (row mode) and non-targets keep ordinary full gradients; global
norm clipping chained before LoSiA sees the compact gradients (blocks,
profiling layer, dense leaves), not the full gradient non-Pro LoSiA clips.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from losia_jax import blocks
from losia_jax.compose import find_losia_state
# One hook definition for the models and Pro (re-exported here for loss functions).
from losia_jax.linear import Linear, default_linear, project  # noqa: F401
from losia_jax.profiling import owner_slot
from losia_jax.schedule import slot_owner
from losia_jax.gradients import ProGradients
from losia_jax.state import LoSiATransformation

# ``kernel`` and ``block`` arrive already in the compute dtype (``x.dtype``), cast
# by ``project`` exactly as the plain hook casts, so the forward is the plain
# product and the backward is the plain backward restricted to the block.
@functools.partial(jax.custom_vjp, nondiff_argnums=())
def _pro_matmul(x, kernel, block, rows, cols):
  del block, rows, cols
  return jnp.dot(x, kernel)


def _pro_fwd(x, kernel, block, rows, cols):
  # The only activation residual is x restricted to the block's input neurons.
  x_cols = blocks.take(x, cols, -1)
  return jnp.dot(x, kernel), (x_cols, kernel, rows, cols)


def _pro_bwd(res, dy):
  x_cols, kernel, rows, cols = res
  dx = jnp.dot(dy, kernel.T).astype(x_cols.dtype)
  dy_rows = blocks.take(dy, rows, -1)
  k_in, k_out = x_cols.shape[-1], dy_rows.shape[-1]
  dblock = x_cols.reshape(-1, k_in).T @ dy_rows.reshape(-1, k_out)
  zero_int = lambda a: jnp.zeros(a.shape, jax.dtypes.float0)
  # The kernel gets no gradient (a symbolic zero that XLA drops when unused).
  return dx, jnp.zeros_like(kernel), dblock.astype(kernel.dtype), zero_int(rows), zero_int(cols)


_pro_matmul.defvjp(_pro_fwd, _pro_bwd)


def pro_linear(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], block: jax.Array,
               rows: jax.Array, cols: jax.Array) -> jax.Array:
  """``x @ kernel + bias`` whose weight gradient is the compact block's only.

  Computes what :func:`~losia_jax.linear.default_linear` computes, in the
  compute dtype ``x.dtype`` (kernel, block and bias cast to it): with bf16
  activations on fp32 parameters the product is the same bf16 matmul, and the
  block's gradient is computed in bf16 and cast back to the block's dtype, as
  the plain gradient flows back through the kernel's cast.

  Args:
    x: ``[..., d_in]`` input.
    kernel: ``[d_in, d_out]`` weight (Flax layout); receives no gradient.
    bias: ``[d_out]`` or None; differentiated as usual.
    block: ``[k_in, k_out]``, the current value of ``kernel[cols][:, rows]``.
      Only its gradient matters: ``x[..., cols]ᵀ dy[..., rows]``.
    rows, cols: int32 sorted, unique output and input neuron indices of the block,
      in bounds (read without clamping).

  Returns:
    ``[..., d_out]``, bit-identical to ``default_linear(_, x, kernel, bias)``.
  """
  matmul = lambda x, k: _pro_matmul(x, k, block.astype(x.dtype), rows, cols)
  return project(x, kernel, bias, matmul)


class _Route:
  """Where one target matrix lives in the LoSiA state (static): its bucket and member."""

  def __init__(self, bucket, member: int):
    self.bucket, self.member = bucket, member
    self.role = bucket.role
    self.layer = bucket.members[member].layer_ids[0]


def _routes(plan) -> dict[str, _Route]:
  out = {}
  for b in plan.buckets:
    if b.first.row_mode:
      continue
    for j, t in enumerate(b.members):
      if t.stacked:
        raise ValueError("LoSiA-Pro needs one parameter per layer (not stacked_layers): "
                         f"{t.key} holds {t.n} layers")
      if not t.transposed:
        raise ValueError(f"LoSiA-Pro needs Flax-layout [in, out] kernels; {t.key} is [out, in]")
      out[b.identities[b.offsets[j]]] = _Route(b, j)
  return out


def _pick(picks: dict, layer: int, here: jax.Array, x: jax.Array,
          prev: Optional[jax.Array]) -> jax.Array:
  """``x`` if ``here`` (this layer profiles), else ``prev``: one link of a role's chain
  that carries the profiling layer's input to the backward.

  Roles that read the same input (``q``, ``k`` and ``v``; ``gate`` and ``up``)
  share one chain: a link is reused when layer, input and previous link are the
  same objects, so that a LLaMA layer has four activation-sized selects per
  step instead of seven. Roles of one layer profile together, so a shared
  link is exact.
  """
  if prev is None:  # one zero start per shape, shared by the roles that read it
    prev = picks.setdefault(("zeros", x.shape, x.dtype), (jnp.zeros(x.shape, x.dtype),))[0]
  key = (layer, id(x), id(prev))
  if key not in picks:  # (x, prev) are kept with the link so their ids stay theirs
    picks[key] = (jnp.where(here, jax.lax.stop_gradient(x), prev), x, prev)
  return picks[key][0]


def value_and_grad(loss_fn: Callable[..., Any], tx: LoSiATransformation, *,
                   has_aux: bool = False) -> Callable[..., tuple[Any, ProGradients]]:
  """Like ``jax.value_and_grad(loss_fn)`` for LoSiA-Pro, returning compact gradients.

  ``loss_fn(params, linear, *args)`` must compute the loss from ``params``
  and pass ``linear`` (a hook ``linear(identity, x, kernel, bias)``) to the
  model, which evaluates every target projection through it; ``identity`` is
  ``losia_common.names.target_identity(layer, role)`` (``layer3.self_attn.q_proj``).

  Returns a function ``(params, opt_state, *args) -> (value, ProGradients)``
  (``value`` is ``(loss, aux)`` with ``has_aux``) for
  ``tx.apply_gradients(grads, opt_state, params)``. It runs under ``jax.jit``:
  the profiling layer is chosen on device from the step counter.

  Example:
    >>> import jax, jax.numpy as jnp, losia_jax
    >>> from losia_jax import pro
    >>> params = {"layers": [{"q_proj": {"kernel": jnp.ones((8, 8))}}]}
    >>> tx = losia_jax.losia(1e-2, losia_jax.LoSiAConfig(rank_factor=0.5, period=2))
    >>> state = tx.init(params)
    >>> def loss_fn(params, linear, x):
    ...   k = params["layers"][0]["q_proj"]["kernel"]
    ...   return jnp.sum(linear("layer0.q_proj", x, k, None) ** 2)
    >>> loss, grads = pro.value_and_grad(loss_fn, tx)(params, state, jnp.ones((2, 8)))
    >>> grads.blocks["q_proj"].shape
    (1, 4, 4)
    >>> params, state = tx.apply_gradients(grads, state, params)
  """
  if not isinstance(tx, LoSiATransformation):
    raise TypeError("LoSiA-Pro needs a LoSiA transformation (losia_jax.losia/"
                    f"scale_by_losia/chain); got {type(tx).__name__}")

  def run(params, opt_state, *args):
    plan = tx.plan(params)
    st = find_losia_state(opt_state)
    if tx.config.schedule != "async":
      raise ValueError("LoSiA-Pro needs schedule='async' (in sync mode every target needs its "
                       f"full gradient during a profiling slot); got {tx.config.schedule!r}")
    owner = slot_owner(st.count, tx.config.period, plan.total)
    routes = _routes(plan)
    leaves = jax.tree_util.tree_leaves(params)
    keys = dict(plan.non_targets)
    dense_keys = [b.first.key for b in plan.buckets if b.first.row_mode]
    if tx.config.non_target == "train":
      dense_keys += [k for k, _ in plan.non_targets]
    key_index = {t.key: t.leaf_index for t in plan.targets}
    key_index.update(keys)

    # Per member (one layer's matrix, [1, *block_shape]), read at the runtime
    # offsets of TargetState.starts: every layer's kernels are then the same
    # and XLA compiles them once; the gradients are concatenated afterwards.
    blocks_in, mine = {}, {}
    for b in plan.buckets:
      if b.first.row_mode:
        continue
      ts = st.targets[b.role]
      span = lambda x, j, b=b, ts=ts: blocks.member_span(x, b, j, ts.starts)
      blocks_in[b.role] = [blocks.gather_block(leaves[t.leaf_index], t, span(ts.rows, j),
                                               span(ts.cols, j))
                           for j, t in enumerate(b.members)]
      slot = owner_slot(b, plan, owner)
      mine[b.role] = [(slot.member > 0) & (slot.position == ts.starts[j]) if ts.starts
                      else owner == t.layer_ids[0] for j, t in enumerate(b.members)]
    dense_in = {k: leaves[key_index[k]] for k in dense_keys}

    def forward(blocks_v, probes, dense_v, record):
      """The loss with the blocks, probes and dense leaves as the variables."""
      new_leaves = list(leaves)
      for k, v in dense_v.items():
        new_leaves[key_index[k]] = v
      p = jax.tree_util.tree_unflatten(plan.treedef, new_leaves)
      seen: dict[str, int] = {}
      xprof: dict[str, jax.Array] = {}
      picks: dict[tuple, tuple] = {}

      def linear(identity, x, kernel, bias):
        r = routes.get(identity)
        if r is None:
          return default_linear(identity, x, kernel, bias)
        seen[identity] = seen.get(identity, 0) + 1
        ts, j = st.targets[r.role], r.member
        span = lambda a: blocks.member_span(a, r.bucket, j, ts.starts)[0]
        y = pro_linear(x, kernel, bias, blocks_v[r.role][j][0], span(ts.rows), span(ts.cols))
        if record is not None:
          record[r.role] = (x.shape, x.dtype, y.shape, y.dtype)
        else:
          # exact zeros in the forward; d(loss)/d(probe) = dy of the profiling matrix
          here = mine[r.role][j]
          y = y + jnp.where(here, probes[r.role], 0).astype(y.dtype)
          xprof[r.role] = _pick(picks, r.layer, here, x, xprof.get(r.role))
        return y

      out = loss_fn(p, linear, *args)
      missing = sorted(set(routes) - set(seen))
      twice = sorted(k for k, n in seen.items() if n > 1)
      if missing or twice:
        raise ValueError(
            "LoSiA-Pro: the model must call the `linear` hook once per target and step; "
            + (f"never called for {missing[:6]}{' ...' if len(missing) > 6 else ''}"
               if missing else "")
            + (f" called more than once for {twice[:6]}" if twice else ""))
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, xprof)

    # Shapes of each role's input and output, from an abstract trace.
    shapes: dict[str, tuple] = {}
    jax.eval_shape(lambda: forward(blocks_in, {}, dense_in, shapes)[0])
    probes = {role: jnp.zeros(shapes[role][2], shapes[role][3]) for role in blocks_in}
    (loss, (aux, xprof)), (g_blocks, g_probes, g_dense) = jax.value_and_grad(
        lambda bv, pv, dv: forward(bv, pv, dv, None), argnums=(0, 1, 2), has_aux=True)(
            blocks_in, probes, dense_in)
    # In the output layer's slot (id 0, when it is a target) no decoder matrix
    # profiles: skip the full-gradient matmuls instead of multiplying zeros (with
    # few layers, e.g. one large layer, they would cost a full backward).
    decoder_slot = (owner != 0) if any(b.first.row_mode for b in plan.buckets) else None

    def full_gradient(x, dy):
      # the full [d_in, d_out] gradient of the profiling layer's matrix of this role
      return (x.reshape(-1, x.shape[-1]).astype(jnp.float32).T
              @ dy.reshape(-1, dy.shape[-1]).astype(jnp.float32))

    profile = {}
    for role, dy in g_probes.items():
      x = xprof[role]
      if decoder_slot is None:
        profile[role] = full_gradient(x, dy)
      else:
        zeros = lambda x, dy: jnp.zeros((x.shape[-1], dy.shape[-1]), jnp.float32)
        profile[role] = jax.lax.cond(decoder_slot, full_gradient, zeros, x, dy)
    g_blocks = {role: jnp.concatenate(parts) for role, parts in g_blocks.items()}
    grads = ProGradients(g_blocks, profile, g_dense)
    return ((loss, aux) if has_aux else loss), grads

  return run
