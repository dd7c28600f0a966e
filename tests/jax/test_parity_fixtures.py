"""losia_jax replays the shared cross-framework fixtures (shared/parity/).

The same files are replayed by tests/torch/test_torch_parity_fixtures.py, so
both backends are held to one recorded trajectory of the spec-literal oracle:
identical subnet indices at every step (initial ones included) and weights
within rtol 1e-5 / atol 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losia_jax
from tests.jax.helpers import indices_of
from tests.parity_fixtures import CASES, Fixture, nest


def _flat(params) -> dict:
  return {".".join(str(getattr(x, "key", getattr(x, "idx", x))) for x in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _check_indices(fx, idx, k, what):
  for n in fx.targets:
    np.testing.assert_array_equal(idx[n][0], fx.rows(n, k), err_msg=f"{what} rows {n} ({fx.case})")
    np.testing.assert_array_equal(idx[n][1], fx.cols(n, k), err_msg=f"{what} cols {n} ({fx.case})")


@pytest.mark.parametrize("case", CASES)
def test_jax_replays_parity_fixture(case):
  fx = Fixture(case)
  cfg = losia_jax.LoSiAConfig.from_json(fx.config_json)
  m = fx.meta
  params = nest({n: jnp.asarray(fx.weights(n, 0)) for n in fx.names})
  # tied embedding/lm_head: the embedding is the output layer (weight leaves are [d_out, d_in])
  tx = losia_jax.losia(m["lr"], cfg, b1=m["b1"], b2=m["b2"], eps=m["eps"],
                       weight_decay=m["weight_decay"], output_module="embed_tokens")
  state = tx.init(params)
  plan = tx.plan(params)
  assert sorted(t.key for t in plan.targets) == sorted(fx.targets)
  assert sorted(k for k, _ in plan.non_targets) == sorted(set(fx.names) - set(fx.targets))
  _check_indices(fx, indices_of(state, plan), 0, "initial")
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  for k in range(fx.steps):
    grads = nest({n: jnp.asarray(fx.grad(n, k)) for n in fx.names})
    params, state = step(params, state, grads)
    _check_indices(fx, indices_of(state, plan), k + 1, f"step {k}")
    flat = _flat(params)
    for n in fx.names:
      np.testing.assert_allclose(flat[n], fx.weights(n, k + 1), rtol=1e-5, atol=1e-6,
                                 err_msg=f"{n} after step {k} ({case})")
  assert int(losia_jax.find_losia_state(state).count) == fx.steps
