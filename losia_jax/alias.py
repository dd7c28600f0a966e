"""The ready LoSiA optimizers: ``losia(lr, config)`` (built-in AdamW) and the
LoSiA stage ``losia(config)`` that :func:`losia_jax.chain` joins to a user's optax
optimizer."""

from __future__ import annotations

from typing import Any, Optional

import optax

from losia_common import LoSiAConfig
from losia_jax.targets import DimensionNumbersArg
from losia_jax.transform import scale_by_losia

_STAGE_MESSAGE = (
    "losia_jax.losia(config) is a LoSiA stage without an optimizer: it only works as "
    "losia_jax.chain(losia_jax.losia(config), optax.adamw(lr, ...)) (your optimizer then runs "
    "on the compact blocks). With optax.chain, or alone, write "
    "losia_jax.losia(learning_rate, config, ...) for LoSiA with its built-in AdamW")


class _Refuse:
  """The ``init``/``update`` of a stage: they refuse, and hold the stage's options."""

  def __init__(self, options: dict[str, Any]):
    self.options = options

  def __call__(self, *args, **kwargs):
    raise ValueError(_STAGE_MESSAGE)


class LoSiAStage(optax.GradientTransformationExtraArgs):
  """``losia_jax.losia(config)``: where LoSiA goes in a :func:`losia_jax.chain`.

  Not an optimizer on its own (its ``init`` raises, naming the spelling to
  use): :func:`losia_jax.chain` replaces it and the optimizer that follows it
  by :func:`scale_by_losia` running that optimizer on the compact blocks.
  """

  @property
  def options(self) -> dict[str, Any]:
    """``config``, ``output_module``, ``dimension_numbers``, ``stacked_layers``, ``clip_norm``,
    ``master_weights``."""
    return self.init.options


def _stage(config, output_module, dimension_numbers, stacked_layers, clip_norm,
           master_weights) -> LoSiAStage:
  refuse = _Refuse(dict(config=config, output_module=output_module,
                        dimension_numbers=dimension_numbers, stacked_layers=stacked_layers,
                        clip_norm=clip_norm, master_weights=master_weights))
  return LoSiAStage(refuse, refuse)


def losia(
    learning_rate: Optional[optax.ScalarOrSchedule] | LoSiAConfig = None,
    config: Optional[LoSiAConfig] = None,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    output_module: str = "lm_head",
    dimension_numbers: DimensionNumbersArg = None,
    stacked_layers: bool = False,
    clip_norm: Optional[float] = None,
    master_weights: bool = False,
):
  """LoSiA with AdamW on each target's core block; or, given only a config, a LoSiA stage.

  ``losia(learning_rate, config, ...)`` is the ready optimizer: the Adam moments
  live on the compact blocks (p² of AdamW's state) and restart, step count
  included, whenever a block is re-selected; ``learning_rate`` (a float or an
  optax schedule) is multiplied per target by the rewarm ramp; ``weight_decay``
  is decoupled and touches only the block of a target.

  ``losia(config)`` (no learning rate) is a LoSiA *stage* for
  :func:`losia_jax.chain`: ``chain(losia(config), optax.adamw(lr, ...))`` runs
  that optimizer on the blocks (see :func:`losia_jax.chain`).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import losia_jax
    >>> params = {"layers": [{"q_proj": {"kernel": jnp.ones((16, 16))}}]}
    >>> cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(1e-2, cfg))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> int((optax.apply_updates(params, updates)["layers"][0]["q_proj"]["kernel"] != 1).sum())
    16

  Args:
    learning_rate: float or optax schedule of the step; or a :class:`LoSiAConfig`
      (or None) for a stage.
    config: a :class:`LoSiAConfig`.
    b1, b2, eps, eps_root: Adam hyper-parameters (``optax.scale_by_adam``).
    weight_decay: decoupled weight decay (block only for targets).
    clip_norm: clip by the norm of the gradient values the step reads, the
      rule ``losia_torch`` uses (see :func:`scale_by_losia`); None: no clip.
    master_weights: keep an fp32 copy of the trained blocks (for bf16
      parameters; see :func:`scale_by_losia`).
    output_module, dimension_numbers, stacked_layers: see :func:`scale_by_losia`.

  References:
    Wang, Qi, Xu, `LoSiA: Efficient High-Rank Fine-Tuning via Subnet
    Localization and Optimization <https://arxiv.org/abs/2507.04487>`_, 2025.
  """
  if isinstance(learning_rate, LoSiAConfig) or learning_rate is None:
    if isinstance(learning_rate, LoSiAConfig):
      if config is not None:
        raise TypeError("losia(config) takes one LoSiAConfig; got two")
      config = learning_rate
    given = {k: v for k, v, d in (("b1", b1, 0.9), ("b2", b2, 0.999), ("eps", eps, 1e-8),
                                  ("eps_root", eps_root, 0.0),
                                  ("weight_decay", weight_decay, 0.0)) if v != d}
    if given:
      raise TypeError(
          f"losia(config) is a LoSiA stage; {', '.join(given)} belong to the optimizer after "
          "it: losia_jax.chain(losia_jax.losia(config), optax.adamw(lr, "
          f"{', '.join(f'{k}={v!r}' for k, v in given.items())}))")
    return _stage(LoSiAConfig() if config is None else config, output_module,
                  dimension_numbers, stacked_layers, clip_norm, master_weights)
  return scale_by_losia(
      config, optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
      learning_rate=learning_rate, weight_decay=weight_decay, output_module=output_module,
      dimension_numbers=dimension_numbers, stacked_layers=stacked_layers, clip_norm=clip_norm,
      master_weights=master_weights)
