"""Saving and resuming a LoSiA training state with Orbax.

The LoSiA state is a plain pytree of arrays (indices, compact inner states,
importance buffers, counters), so it restores exactly against
``jax.eval_shape(tx.init, params)``: a run resumed in the middle of a
profiling window continues bit for bit. Orbax writes each step to a temporary
directory and renames it when complete, so a failed save never replaces the
previous checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def checkpoint_manager(directory: str | os.PathLike, max_to_keep: Optional[int] = 3
                       ) -> ocp.CheckpointManager:
  """An Orbax manager for ``(params, opt_state)`` checkpoints under ``directory``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         wait: bool = True) -> None:
  """Saves params and optimizer state as checkpoint ``step``."""
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             opt_state=ocp.args.StandardSave(opt_state)))
  if wait:
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, params_like: Any, tx: Any,
            step: Optional[int] = None) -> tuple[int, Any, Any]:
  """Restores ``(step, params, opt_state)``; latest step unless ``step`` is given.

  ``params_like`` (arrays or ``ShapeDtypeStruct``s, with shardings if any)
  fixes the structure and placement; the optimizer-state target is
  ``jax.eval_shape(tx.init, params_like)``, so nothing is initialised for real.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  abstract_params = _abstract(params_like)
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  out = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_state)))
  return step, out["params"], out["opt_state"]
