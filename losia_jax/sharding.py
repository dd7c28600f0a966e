"""Shardings of the LoSiA optimizer state for given parameter shardings."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from losia_jax.importance import ImportanceState
from losia_jax.state import LoSiAState
from losia_jax.wrappers import LoSiACore, find_losia


def _replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def _drop_leading(sh: NamedSharding) -> NamedSharding:
  spec = tuple(sh.spec)
  return NamedSharding(sh.mesh, PartitionSpec(*spec[1:]))


def _losia_state_shardings(core: LoSiACore, abstract: LoSiAState, params: Any,
                           param_shardings: Any, mesh) -> LoSiAState:
  plan = core.plan(params)
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
    nt_abstract = {k: jax.ShapeDtypeStruct(jax.tree_util.tree_leaves(params)[i].shape,
                                           jax.numpy.float32) for k, i in plan.non_targets}
    if core.inner is not None:
      non_target = optax.tree_map_params(
          core.inner, lambda _, sh: sh, abstract.non_target, nt_sh,
          transform_non_params=lambda _: rep,
          is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    else:
      non_target = _follow_params(abstract.non_target, nt_abstract, nt_sh, rep)
  return LoSiAState(rep, targets, importance, non_target, rep)



def _same_layout(node: Any, like: Any) -> bool:
  """``node`` is a tree like ``like`` (same structure, same leaf shapes)."""
  if jax.tree_util.tree_structure(node) != jax.tree_util.tree_structure(like):
    return False
  return all(getattr(a, "shape", None) == getattr(b, "shape", None)
             for a, b in zip(jax.tree_util.tree_leaves(node), jax.tree_util.tree_leaves(like)))


def _follow_params(state: Any, params: Any, param_shardings: Any, rep: NamedSharding,
                   losia: Any = None) -> Any:
  """Shardings for ``state``: param-shaped subtrees follow ``param_shardings``,
  :class:`LoSiAState`s are given by ``losia(state)``, every other leaf is ``rep``.

  What ``optax.tree_map_params`` does, but by matching the state against the
  params rather than by re-running ``init`` on placeholders, which LoSiA (it
  plans from the shapes) and the wrappers around it cannot do.
  """

  def visit(node):
    if isinstance(node, LoSiAState) and losia is not None:
      return losia(node)
    if _same_layout(node, params):  # e.g. Adam moments, MultiSteps' acc_grads
      return param_shardings
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node)):
      return rep  # counters, hyper-parameters and other unmatched leaves
    # one level down: the node's children become the leaves of `treedef`
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    return jax.tree_util.tree_unflatten(treedef, [visit(c) for c in children])

  return visit(state)


def state_shardings(tx: Any, params: Any, param_shardings: Any) -> Any:
  """Shardings of ``tx.init(params)``'s state for params placed by ``param_shardings``.

  ``tx`` is a LoSiA transformation or any optax wrapper or chain around one:
  :func:`losia_jax.chain`, ``optax.chain(optax.clip_by_global_norm(1.0),
  losia)``, ``optax.MultiSteps(losia, k)``, ``optax.apply_if_finite(losia, n)``,
  ``optax.inject_hyperparams(losia_jax.losia)(...)``. In the LoSiA state,
  importance buffers follow the sharding of the parameter they profile (for a
  stacked leaf, without its layer axis), the non-target inner state follows
  the non-target parameters, and indices, counters and the compact block states
  are replicated. Elsewhere in the state, param-shaped subtrees (the moments of
  a chained transformation, MultiSteps' accumulated gradients) follow the
  params and everything else is replicated.

  Args:
    tx: the optimizer (an optax transformation, or ``optax.MultiSteps``).
    params: the params tree (arrays or ``ShapeDtypeStruct``s).
    param_shardings: a tree like ``params`` of ``NamedSharding``s on one mesh.

  Returns:
    A tree like the state whose leaves are ``NamedSharding``s, for
    ``jax.jit(tx.init, out_shardings=...)`` and for the train step's shardings.

  Raises:
    ValueError: ``param_shardings`` is not a tree of ``NamedSharding``s, or the
      state holds a LoSiA state but ``tx`` holds no (or more than one) LoSiA
      transformation that could be found.
  """
  sh_leaves = jax.tree_util.tree_leaves(
      param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if not sh_leaves or not all(isinstance(s, NamedSharding) for s in sh_leaves):
    raise ValueError("param_shardings must be a tree of jax.sharding.NamedSharding")
  mesh = sh_leaves[0].mesh
  rep = _replicated(mesh)
  abstract = jax.eval_shape(tx.init, params)
  is_state = lambda x: isinstance(x, LoSiAState)
  if not any(is_state(x) for x in jax.tree_util.tree_leaves(abstract, is_leaf=is_state)):
    return _follow_params(abstract, params, param_shardings, rep)
  cores = find_losia(tx)
  if len(cores) != 1:
    raise ValueError(
        f"state_shardings: the state holds a LoSiAState, but {len(cores)} LoSiA "
        f"transformations were found inside {type(tx).__name__} (looked through attributes, "
        "closures and bound methods); expected exactly one")
  losia = lambda st: _losia_state_shardings(cores[0], st, params, param_shardings, mesh)
  return _follow_params(abstract, params, param_shardings, rep, losia)
