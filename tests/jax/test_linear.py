"""losia_jax.linear.dense_matmul: the same product and gradients as ``x @ kernel``,
forward mode included, with the weight gradient in the layout XLA:CPU's fast kernel takes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from losia_jax.linear import dense_matmul, project

B, S, D_IN, D_OUT = 4, 24, 40, 72


def _inputs(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, S, D_IN)), dtype)
  w = jnp.asarray(rng.standard_normal((D_IN, D_OUT)), dtype)
  c = jnp.asarray(rng.standard_normal((B, S, D_OUT)), dtype)
  return x, w, c


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_value_and_both_gradients_equal_the_plain_product(dtype, tol):
  x, w, c = _inputs(dtype)
  loss = lambda f: (lambda x, w: jnp.sum((f(x, w) * c).astype(jnp.float32)))
  (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(loss(f), argnums=(0, 1)))(x, w)
                        for f in (jnp.dot, dense_matmul))
  np.testing.assert_allclose(v1, v2, rtol=tol)
  for a, b in zip(g1, g2):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)


def test_forward_mode_and_project_default():
  x, w, _ = _inputs()
  dx, dw = jnp.ones_like(x), jnp.full_like(w, 0.5)
  y1, t1 = jax.jvp(jnp.dot, (x, w), (dx, dw))
  y2, t2 = jax.jvp(dense_matmul, (x, w), (dx, dw))
  np.testing.assert_allclose(y1, y2, rtol=1e-6)
  np.testing.assert_allclose(t1, t2, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(project(x, w, None), dense_matmul(x, w))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout rule is CPU-only")
def test_weight_gradient_reads_x_transposed_and_never_transposes_dy():
  """The compiled weight gradient holds x^T ([d_in, tokens]) and no [d_out, tokens]
  array: autodiff's own rule transposes dy (a copy per projection on XLA:CPU)."""
  x, w, c = _inputs()
  tokens = B * S

  def hlo(f):
    grad = jax.grad(lambda w, x, c: jnp.sum(f(x, w) * c))  # arguments: nothing folds
    return jax.jit(grad).lower(w, x, c).compile().as_text()

  dy_t, x_t = f"f32[{D_OUT},{tokens}]", f"f32[{D_IN},{tokens}]"
  plain, dense = hlo(jnp.dot), hlo(dense_matmul)
  assert dy_t in plain  # the check would see the transposed dy of the plain rule
  assert dy_t not in dense and x_t in dense
