"""A Flax NNX optimizer that takes LoSiA's fused in-place path.

``flax.nnx.Optimizer.update`` calls ``tx.update`` and ``optax.apply_updates``:
for LoSiA that builds a parameter-sized update, zero outside the blocks, and
adds it to every weight. :class:`Optimizer` is the same optimizer (a subclass,
same attributes and state) whose ``update`` calls the transformation's fused
``apply_gradients`` instead, which writes each compact block update into the
weights in place.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from losia_jax.wrappers import fused_path


class Optimizer(nnx.Optimizer):
  """``flax.nnx.Optimizer`` on LoSiA's fused path.

  ``Optimizer(model, tx, wrt=nnx.Param)`` works for any optax transformation.
  When ``tx`` has a fused path (a LoSiA transformation, :func:`losia_jax.chain`,
  :class:`losia_jax.MultiSteps` or ``optax.MultiSteps`` around either),
  ``update(model, grads)`` takes it; otherwise (e.g. a plain ``optax.chain``
  around LoSiA, or extra keyword arguments for ``tx.update``) it is
  ``nnx.Optimizer.update``. The state (``step``, ``opt_state``) is laid out as
  in ``nnx.Optimizer``, so checkpoints and nnx tooling are unchanged, and both
  paths follow the same trajectory (bit-identical target weights).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import losia_jax
    >>> from losia_jax import nnx as losia_nnx
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
    ...   def __call__(self, x):
    ...     for layer in self.layers:
    ...       x = layer(x)
    ...     return x
    >>> model = Model(nnx.Rngs(0))
    >>> cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2,
    ...                             target_modules=("layers",))
    >>> opt = losia_nnx.Optimizer(model, losia_jax.losia(1e-2, cfg), wrt=nnx.Param)
    >>> grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 8))) ** 2))(model)
    >>> opt.update(model, grads)
    >>> int(opt.step[...])
    1
  """

  def update(self, model, grads, /, **kwargs) -> Any:
    """Updates the model's parameters and the optimizer state from ``grads``.

    Returns:
      None on the fused path (it never forms the update tree); on the standard
      path, the updates, as ``nnx.Optimizer.update`` does.
    """
    fused = fused_path(self.tx)
    if fused is None or kwargs:  # the fused path takes no extra arguments
      return super().update(model, grads, **kwargs)
    params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
    grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
    new_params, new_opt_state = fused(grad_arrays, nnx.as_pure(self.opt_state), params)
    nnx.update(model, new_params)
    nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
    self.step[...] += 1
    return None

