"""Saving and resuming a LoSiA training state with Orbax, on the same or another mesh.

The LoSiA state is a plain pytree of arrays (indices, compact inner states,
importance buffers, counters), so it restores exactly against
``jax.eval_shape(tx.init, params)``: a run resumed in the middle of a
profiling window continues bit for bit. Orbax writes each step to a temporary
directory and renames it when complete, so a failed save never replaces the
previous checkpoint.

Restoring onto another device count (saved on 8 devices, resumed on 4 or 1)
needs a target sharding for *every* array: Orbax otherwise places an array as
it was saved, and fails with "Topology mismatch detected" when those devices
are gone. :func:`restore` therefore builds the target of the optimizer state
too, from the parameter shardings (:func:`losia_jax.state_shardings`) or from
the checkpoint's own partition specs laid over a new mesh.

Across processes (``jax.distributed``), every process calls :func:`save` and
:func:`restore` with the same global arrays or targets; Orbax has each one write
and read the shards of its own devices in one shared directory. Such a checkpoint
restores in a single process too (``tests/jax/test_multiprocess.py``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from losia_jax.sharding import state_shardings
from losia_jax.state import LoSiAState

_ITEMS = ("params", "opt_state")


def checkpoint_manager(directory: str | os.PathLike, max_to_keep: Optional[int] = 3
                       ) -> ocp.CheckpointManager:
  """An Orbax manager for ``(params, opt_state)`` checkpoints under ``directory``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  # Registering the items up front lets a fresh manager (a new process) read a
  # checkpoint's metadata, which restore(mesh=...) takes the saved layout from.
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for item in _ITEMS:
    registry.add(item, ocp.args.StandardSave)
    registry.add(item, ocp.args.StandardRestore)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               handler_registry=registry)


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         wait: bool = True) -> None:
  """Saves params and optimizer state as checkpoint ``step``."""
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             opt_state=ocp.args.StandardSave(opt_state)))
  if wait:
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, params_like: Any, tx: Any,
            step: Optional[int] = None, *, shardings: Any = None, mesh: Optional[Mesh] = None,
            opt_state_shardings: Any = None) -> tuple[int, Any, Any]:
  """Restores ``(step, params, opt_state)``; latest step unless ``step`` is given.

  ``params_like`` (arrays or ``ShapeDtypeStruct``s) fixes the structure, shapes
  and dtypes; the optimizer-state target is ``jax.eval_shape(tx.init, ...)``,
  so nothing is initialised for real. Where the arrays go, first that applies:

  - ``shardings``: a tree like ``params_like`` of shardings for the params (on
    any mesh, e.g. 4 devices for a checkpoint written on 8);
  - ``mesh``: every array keeps the ``PartitionSpec`` it was saved with, laid
    over ``mesh`` (which needs the saved axis names; an array saved without
    one is replicated). Needs a manager from :func:`checkpoint_manager`;
  - otherwise the shardings ``params_like`` carries (placed arrays, or
    ``ShapeDtypeStruct``s with a sharding).

  The optimizer state follows the params by :func:`losia_jax.state_shardings`
  (importance buffers like their weights, small leaves replicated), unless
  ``opt_state_shardings`` gives its tree of shardings or ``mesh`` is used
  (saved specs then). Params placed on one device put the state there too.
  Without any target sharding (``ShapeDtypeStruct``s without one), Orbax
  places arrays as saved, which works on the same devices only.

  Raises:
    FileNotFoundError: no checkpoint in the manager's directory.
    ValueError: both ``shardings`` and ``mesh``; ``mesh`` lacks a saved axis name
      or the manager cannot read the checkpoint's metadata.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  if shardings is not None and mesh is not None:
    raise ValueError("restore: give `shardings` or `mesh`, not both")

  if mesh is not None:
    param_sh = _saved_layout(manager, step, "params", params_like, mesh)
  elif shardings is not None:
    param_sh = _like(params_like, shardings, "shardings")
  else:
    param_sh = jax.tree.map(lambda x: getattr(x, "sharding", None), params_like)
  abstract_params = _abstract(params_like, param_sh)

  abstract_state = jax.eval_shape(tx.init, _abstract(params_like, None))
  if opt_state_shardings is not None:
    state_sh = _like(abstract_state, opt_state_shardings, "opt_state_shardings")
  elif mesh is not None:
    state_sh = _saved_layout(manager, step, "opt_state", abstract_state, mesh)
  else:
    state_sh = _following_params(tx, abstract_params, param_sh, abstract_state)
  abstract_state = _abstract(abstract_state, state_sh)

  out = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_state)))
  return step, out["params"], out["opt_state"]


def _is_sharding(x: Any) -> bool:
  return isinstance(x, Sharding)


def _leaves(tree: Any) -> list:
  """Leaves of a tree of shardings, with None kept (jax.tree drops it)."""
  return jax.tree.leaves(tree, is_leaf=lambda x: x is None or _is_sharding(x))


def _aligned(tree: Any, sharding_tree: Any) -> list:
  """One entry of ``sharding_tree`` per array of ``tree``, matched by key path.

  A sharding tree may hold None where ``tree`` has an array (no sharding) and
  where it has an empty subtree (``TargetState.master=None``), or one sharding
  for a whole subtree without arrays (``optax.EmptyState``): matching by path,
  with a sharding standing for every array below it, handles all three.
  """
  by_path = dict(jax.tree_util.tree_flatten_with_path(
      sharding_tree, is_leaf=lambda x: x is None or _is_sharding(x))[0])
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for k in range(len(path), -1, -1):  # the array's own path, else its nearest ancestor
      if path[:k] in by_path:
        out.append(by_path[path[:k]])
        break
    else:
      out.append(_MISSING)
  return out


_MISSING = object()  # an array the sharding tree says nothing about (rejected by _like)


def _like(tree: Any, sharding_tree: Any, name: str) -> Any:
  """``sharding_tree`` checked to have one sharding per leaf of ``tree``."""
  n = len(jax.tree.leaves(tree))
  sh = _aligned(tree, sharding_tree)
  if len(sh) != n or not all(_is_sharding(s) for s in sh):
    raise ValueError(f"restore: `{name}` must be a tree like the target with one "
                     f"jax.sharding.Sharding per array ({n} arrays); got {len(sh)} leaves")
  return jax.tree.unflatten(jax.tree.structure(tree), sh)


def _abstract(tree: Any, sharding_tree: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``sharding_tree``'s shardings (or none)."""
  leaves, treedef = jax.tree.flatten(tree)
  sh = [None] * len(leaves) if sharding_tree is None else _aligned(tree, sharding_tree)
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                      for x, s in zip(leaves, sh)])


def _following_params(tx: Any, abstract_params: Any, param_sh: Any, abstract_state: Any) -> Any:
  """Shardings of the optimizer state for params placed by ``param_sh`` (None: as saved)."""
  sh = _leaves(param_sh)
  if sh and all(isinstance(s, NamedSharding) for s in sh):
    if _holds_losia_state(abstract_state):  # LoSiA, alone or chained
      return state_shardings(tx, abstract_params, param_sh)
    # any other optax transformation: param-shaped leaves follow the params
    rep = NamedSharding(sh[0].mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_sh,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  if sh and all(s is not None and s == sh[0] for s in sh):
    # all params on one device (or one sharding): the whole state goes there too
    return jax.tree.map(lambda _: sh[0], abstract_state)
  return None


def _holds_losia_state(state: Any) -> bool:
  is_losia = lambda x: isinstance(x, LoSiAState)
  return any(is_losia(x) for x in jax.tree.leaves(state, is_leaf=is_losia))


def _saved_layout(manager: ocp.CheckpointManager, step: int, item: str, like: Any,
                  mesh: Mesh) -> Any:
  """Each array's saved PartitionSpec over ``mesh``, as a tree like ``like``."""
  metadata = manager.metadata(step).item_metadata
  tree_md = None if metadata is None else metadata.get(item)
  if tree_md is None:
    raise ValueError(f"restore(mesh=...): cannot read the metadata of {item!r} in checkpoint "
                     f"{step}; use a manager from losia_jax.checkpoint.checkpoint_manager, or "
                     "pass `shardings`")
  saved = ocp.tree.to_flat_dict(tree_md.tree)

  def leaf(path, _):
    md = saved.get(ocp.tree.str_keypath(path))
    spec = getattr(getattr(md, "sharding", None), "partition_spec", None)
    if spec is None:  # saved unsharded (one device): replicate
      return NamedSharding(mesh, PartitionSpec())
    # entries: None, an axis name, or several (a list once read back from JSON)
    spec = [tuple(e) if isinstance(e, list) else e for e in spec]
    names = {a for entry in spec if entry is not None
             for a in ((entry,) if isinstance(entry, str) else entry)}
    if not names <= set(mesh.axis_names):
      raise ValueError(f"restore(mesh=...): {'.'.join(ocp.tree.str_keypath(path))} was saved "
                       f"with PartitionSpec{tuple(spec)}; the mesh has axes {mesh.axis_names}")
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map_with_path(leaf, like)
