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


@jax.custom_jvp
def dense_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel``, with a weight gradient that XLA:CPU computes as a plain GEMM.

  Autodiff's weight gradient ``x^T dy`` contracts over the tokens, the major
  axis of both operands. XLA:CPU then transposes ``dy`` and runs the product on
  its slower general dot (measured on SmolLM2 shapes: 23-25 ms for a 576 x 1536
  weight gradient against 15 ms for the forward product of the same size).
  Here the tangent map reads ``x^T`` materialized once (``[d_in, tokens]``, an
  optimization barrier keeps XLA from folding the transpose back), so the
  weight gradient is ``x^T @ dy``, the layout the fast kernel takes: a 4-layer
  SmolLM2-shaped forward and backward ran 14% faster on one core, gradients
  equal to 2e-8. Other backends get the plain product's tangent.
  """
  return jnp.dot(x, kernel)


@dense_matmul.defjvp
def _dense_matmul_jvp(primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  y = jnp.dot(x, kernel)
  dy = jnp.dot(dx, kernel)
  if jax.default_backend() == "cpu" and x.ndim >= 2:
    x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    dy = dy + jnp.dot(x_t.T, dkernel).reshape(y.shape)
  else:
    dy = dy + jnp.dot(x, dkernel)
  return y, dy


def project(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array],
            matmul: Matmul = dense_matmul) -> jax.Array:
  """``x @ kernel + bias`` computed in ``x.dtype``.

  Args:
    x: ``[..., d_in]`` activation; its dtype is the compute dtype.
    kernel: ``[d_in, d_out]`` (Flax layout), any float dtype; cast to ``x.dtype``.
    bias: ``[d_out]`` or None; cast to the product's dtype.
    matmul: ``matmul(x, kernel_in_compute_dtype)``; :func:`dense_matmul` (``x @
      kernel``) unless a caller (LoSiA-Pro) needs its own gradient for the product.
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
