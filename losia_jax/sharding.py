"""Shardings of the LoSiA optimizer state for given parameter shardings."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from losia_jax.importance import ImportanceState
from losia_jax.transform import LoSiAState, LoSiATransformation


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def _drop_leading(sh: NamedSharding) -> NamedSharding:
  spec = tuple(sh.spec)
  return NamedSharding(sh.mesh, PartitionSpec(*spec[1:]))


def _losia_state_shardings(tx: LoSiATransformation, abstract: LoSiAState, params: Any,
                           param_shardings: Any, mesh) -> LoSiAState:
  plan = tx.plan(params)
  sh_leaves = jax.tree_util.tree_leaves(
      param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  rep = _replicated(mesh)
  # Indices, counters and the compact inner states are small: replicate them so
  # every device gathers and scatters its shard of a block without talking.
  targets = {k: jax.tree.map(lambda _: rep, ts) for k, ts in abstract.targets.items()}
  importance = {}
  for b in plan.buckets:
    t = b.first
    sh = sh_leaves[t.leaf_index]
    layer_sh = _drop_leading(sh) if t.stacked else sh  # one layer's matrix
    if abstract.importance[b.role].ibar.ndim == len(t.slice_shape):  # async: one matrix
      slot_sh = layer_sh
    else:  # sync: [N, *slice]
      slot_sh = NamedSharding(mesh, PartitionSpec(None, *tuple(layer_sh.spec)))
    importance[b.role] = ImportanceState(slot_sh, slot_sh)
  nt_sh = {k: sh_leaves[i] for k, i in plan.non_targets}

  if isinstance(abstract.non_target, optax.EmptyState) or not plan.non_targets:
    non_target = jax.tree.map(lambda _: rep, abstract.non_target)
  else:
    # Param-shaped leaves of the inner state (Adam moments) follow the params.
    non_target = optax.tree_map_params(
        _inner_of(tx), lambda _, sh: sh, abstract.non_target, nt_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return LoSiAState(rep, targets, importance, non_target, rep)


def _inner_of(tx):
  return tx._inner  # set by scale_by_losia


def state_shardings(tx: LoSiATransformation, params: Any, param_shardings: Any) -> Any:
  """Shardings of ``tx.init(params)``'s state for params placed by ``param_shardings``.

  Importance buffers follow the sharding of the parameter they profile (for a
  stacked leaf, without its layer axis); the non-target inner state follows the
  non-target parameters; indices, counters and the compact block states are
  replicated. Works for the state of :func:`losia_jax.chain` too (the leading
  transformations' param-shaped leaves follow the params).

  Args:
    tx: a LoSiA transformation (or a :func:`losia_jax.chain`).
    params: the params tree (arrays or ``ShapeDtypeStruct``s).
    param_shardings: a tree like ``params`` of ``NamedSharding``s on one mesh.

  Returns:
    A tree like the state whose leaves are ``NamedSharding``s, for
    ``jax.jit(tx.init, out_shardings=...)`` and for the train step's shardings.
  """
  sh_leaves = jax.tree_util.tree_leaves(
      param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if not sh_leaves or not all(isinstance(s, NamedSharding) for s in sh_leaves):
    raise ValueError("param_shardings must be a tree of jax.sharding.NamedSharding")
  mesh = sh_leaves[0].mesh
  abstract = jax.eval_shape(tx.init, params)
  if tx.losia_index < 0:
    return _losia_state_shardings(tx, abstract, params, param_shardings, mesh)
  out = []
  for i, (sub, st) in enumerate(zip(tx._chained, abstract)):
    if i == tx.losia_index:
      out.append(_losia_state_shardings(sub, st, params, param_shardings, mesh))
    else:
      out.append(optax.tree_map_params(
          sub, lambda _, sh: sh, st, param_shardings,
          transform_non_params=lambda _: _replicated(mesh),
          is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
  return tuple(out)
