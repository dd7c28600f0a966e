"""The projection hook: one definition of ``x @ kernel + bias`` for the models and LoSiA-Pro.

A model that LoSiA-Pro (or LoRA) can change evaluates every target projection as
``linear(identity, x, kernel, bias)``. What that computes is defined once, by
:func:`project`: the product **in the dtype of the activation** ``x`` (the
model's compute dtype), the kernel and bias cast to it. With bf16 compute on
fp32 parameters the projection is a bf16 matmul, and its weight gradient flows
back through the cast into the fp32 parameter.

:func:`default_linear` is the plain hook (``losia_jax.models`` uses it for its
own projections); :func:`losia_jax.pro.pro_linear` is the same :func:`project`
with the matmul replaced by one whose backward computes only the core block's
gradient. Sharing the casts is what keeps a Pro forward bit-identical to the
plain one under mixed precision.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Linear = Callable[[str, jax.Array, jax.Array, Optional[jax.Array]], jax.Array]
"""``linear(identity, x, kernel, bias) -> y``: the hook a model routes its projections through."""

Matmul = Callable[[jax.Array, jax.Array], jax.Array]


def project(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array],
            matmul: Matmul = jnp.dot) -> jax.Array:
  """``x @ kernel + bias`` computed in ``x.dtype``.

  Args:
    x: ``[..., d_in]`` activation; its dtype is the compute dtype.
    kernel: ``[d_in, d_out]`` (Flax layout), any float dtype; cast to ``x.dtype``.
    bias: ``[d_out]`` or None; cast to the product's dtype.
    matmul: ``matmul(x, kernel_in_compute_dtype)``; ``jnp.dot`` unless a caller
      (LoSiA-Pro) needs its own gradient for the product.
  """
  y = matmul(x, kernel.astype(x.dtype))
  return y if bias is None else y + bias.astype(y.dtype)


def default_linear(identity: str, x: jax.Array, kernel: jax.Array,
                   bias: Optional[jax.Array]) -> jax.Array:
  """The plain hook: :func:`project` (``identity`` is unused).

  A hook that delegates to it gives results bit-identical to the un-hooked model.
  """
  del identity
  return project(x, kernel, bias)
