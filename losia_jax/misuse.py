"""Refusing ``optax.chain(<LoSiA>, <optimizer>)`` before the first step.

Written with optax's own ``chain``, an optimizer placed *after* a LoSiA
transformation receives LoSiA's parameter-sized output as if it were a
gradient: it keeps full-size moments (the memory LoSiA saves), never resets
them when a block moves, applies Adam a second time and moves every entry of
every matrix. It runs without error and trains badly (a 32x32 least-squares
probe went from loss 0.33 to 6.5 where LoSiA alone reaches 0.08).

optax gives a transformation no way to see its neighbours, so LoSiA's ``init``
looks at the frames that called it: an ``optax.chain`` / ``optax.named_chain``
init running over its elements. If an element after the one being initialised
keeps state shaped like a parameter, ``init`` raises with the spelling to use
instead. Stateless or scalar-state followers (``optax.scale_by_learning_rate``
after ``scale_by_losia``, which is the documented use) are fine.
"""

from __future__ import annotations

import sys

import jax

from optax.transforms import _combining

_CHAIN_FILE = _combining.__file__

MESSAGE = (
    "optax.chain(<LoSiA>, {follower}) gives {follower} LoSiA's parameter-sized output as its "
    "gradient: its state is full-size (a leaf of shape {shape}), it is never reset when a block "
    "moves, Adam runs twice and every entry of every matrix moves. To train the blocks with "
    "your own optimizer write losia_jax.chain(losia_jax.losia(config), optax.adamw(lr, ...)); "
    "for the built-in AdamW use losia_jax.losia(learning_rate, config, weight_decay=...) as the "
    "last element, with gradient pre-processing such as optax.clip_by_global_norm before it")


def _followers(max_depth: int = 40):
  """The ``init`` functions after the element now being initialised, for every
  optax chain on the call stack (innermost first)."""
  frame, below, out = sys._getframe(2), None, []
  for _ in range(max_depth):
    if frame is None:
      break
    code = frame.f_code
    if code.co_filename == _CHAIN_FILE and code.co_name == "init_fn":
      f_locals = frame.f_locals
      if "init_fns" in f_locals and below is not None and "fn" in below.f_locals:
        fns, current = list(f_locals["init_fns"]), below.f_locals["fn"]  # optax.chain
      elif "transforms" in f_locals and "tx" in f_locals:  # optax.named_chain
        fns = [t.init for _, t in f_locals["transforms"]]
        current = f_locals["tx"].init
      else:
        fns, current = [], None
      idx = next((i for i, f in enumerate(fns) if f is current), None)
      if idx is not None:
        out.extend(fns[idx + 1:])
    below, frame = frame, frame.f_back
  return out


def check_not_followed_by_optimizer(params) -> None:
  """Raises ``ValueError`` if an optax chain runs a param-shaped-state transformation
  after the LoSiA transformation whose ``init`` is calling this."""
  followers = _followers()
  if not followers:
    return
  shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(params)
            if hasattr(x, "shape") and len(x.shape) >= 1 and int(_size(x.shape)) > 1}
  for init in followers:
    try:
      state = jax.eval_shape(init, params)
    except Exception:  # pylint: disable=broad-except
      continue  # not ours to diagnose; optax's own init will raise
    hit = next((tuple(x.shape) for x in jax.tree_util.tree_leaves(state)
                if tuple(getattr(x, "shape", ())) in shapes), None)
    if hit is not None:
      name = getattr(init, "__qualname__", "").split(".<locals>")[0]
      follower = f"{name}(...)" if name and name not in ("chain", "init_fn") else "an optimizer"
      raise ValueError(MESSAGE.format(follower=follower, shape=hit))


def _size(shape):
  n = 1
  for d in shape:
    n *= d
  return n
