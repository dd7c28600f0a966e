"""Pinned trajectories: losia_jax's arithmetic does not change by accident.

A few short runs on the tiny LLaMA-shaped tree of ``tests.jax.helpers`` (async on
the fused path with a skipped non-finite step, sync on the optax path with an
active ``clip_norm``, ``chain`` with master weights on bf16 parameters, stacked
layers) are compared bit for bit against digests recorded
from an earlier version of the code: every parameter and every leaf of the
optimizer state (indices, compact moments, importance buffers, counters) after
each step. They were first recorded before ``scale_by_losia`` was restructured
into named stages and async/sync strategies; that refactor left them unchanged.
The two optax-path runs were re-recorded when Adam's non-target update moved
out of a conditional into ``optax.apply_updates``' fusion: every state leaf and
target weight stayed bit for bit, the non-target weights moved by 1 ulp (where
XLA contracts ``w - lr * u`` into an FMA), checked step by step against the
old code before re-recording. The three runs with ``clip_norm`` were re-recorded
when the step's squared norm became one reduction over the per-leaf partial sums
instead of a chain of scalar adds (which XLA copied into every reader's fusion):
the clip factor's summation order changed, every index stayed identical over
the 10 steps and every float leaf within 3.5e-7 of its largest magnitude. The
two with a stage-level ``clip_norm`` on the fused path were re-recorded when
those partial sums came to be gathered by a concatenate instead of one write
each (XLA reduces the vector in another order): indices identical again,
floats within 3.5e-7 of the largest magnitude, checked step by step.

The runs feed given gradients, so no model matmul enters them: a matmul's bits
depend on how many threads XLA's CPU backend splits it over (LoSiA-Pro, whose
gradients come from a model, was pinned here and differed between a one-thread
and a default run; Pro == plain LoSiA is tested to tolerance in test_pro.py).
Bitwise float results depend on XLA's CPU code generation, so the fixture also
pins a canary (a few optax AdamW steps and a matmul gradient, no LoSiA code).
Where the canary differs (another jax version or CPU), the test is skipped, not
failed: re-record with ``python -m tests.jax.test_pinned_trajectories --record``
on the old code, then check the new code against it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import losia_jax
from losia_jax.state import TargetState
from tests.jax.helpers import random_grads, tiny_params

FIXTURE = pathlib.Path(__file__).with_name("data") / "pinned_trajectories.json"
STEPS = 10  # period 2, 4 slots (3 layers + output): every slot relocalizes at least once
OUT = dict(output_module="embed_tokens")


def _cfg(**kw):
  return losia_jax.LoSiAConfig(**{**dict(rank_factor=0.34, period=2, output_rank_factor=0.2), **kw})


def _stack(p):
  return {**p, "model": {**p["model"], "layers": jax.tree.map(lambda *x: jnp.stack(x),
                                                               *p["model"]["layers"])}}


def _dense_grads(params, nan_step=None, stacked=False):
  rng = np.random.default_rng(1)
  out = []
  for k in range(STEPS):
    g = random_grads(params, rng)
    if k == nan_step:  # a target's block is read every step: the step is skipped
      down = g["model"]["layers"][1]["mlp"]["down_proj"]
      down["kernel"] = jnp.full_like(down["kernel"], jnp.nan)
    out.append(_stack(g) if stacked else g)
  return out


def _fused(tx):
  return lambda p, s, g: tx.apply_gradients(g, s, p)


def _plain(tx):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return step


def _runs():
  """name -> () -> (params, tx, step, inputs)."""
  def async_fused():
    tx = losia_jax.losia(0.03, _cfg(), weight_decay=0.01, **OUT)
    return tiny_params(), tx, _fused(tx), _dense_grads(tiny_params(), nan_step=5)

  def sync_optax_clip():
    tx = losia_jax.losia(0.03, _cfg(schedule="sync"), weight_decay=0.01, clip_norm=0.5, **OUT)
    return tiny_params(), tx, _plain(tx), _dense_grads(tiny_params())

  def chain_master_bf16_fused():
    tx = losia_jax.chain(optax.clip_by_global_norm(3.0),
                         losia_jax.losia(_cfg(), master_weights=True, clip_norm=0.5, **OUT),
                         optax.adamw(optax.cosine_decay_schedule(0.03, 20), weight_decay=0.01))
    params = tiny_params(dtype=jnp.bfloat16)
    return params, tx, _fused(tx), _dense_grads(params, nan_step=4)

  def stacked_async_optax():
    tx = losia_jax.losia(0.02, losia_jax.LoSiAConfig(rank_factor=0.34, period=2),
                         stacked_layers=True, weight_decay=0.01)
    return _stack(tiny_params()), tx, _plain(tx), _dense_grads(tiny_params(), stacked=True)

  def stacked_sync_fused():
    tx = losia_jax.losia(0.02, losia_jax.LoSiAConfig(rank_factor=0.34, period=2, schedule="sync"),
                         stacked_layers=True, clip_norm=0.5)
    return _stack(tiny_params()), tx, _fused(tx), _dense_grads(tiny_params(), stacked=True)

  return {f.__name__: f for f in (async_fused, sync_optax_clip, chain_master_bf16_fused,
                                  stacked_async_optax, stacked_sync_fused)}


def _digest(tree) -> str:
  # TargetState.starts (constant runtime offsets, added after the pins were
  # recorded) is left out, so the pins still cover exactly what they recorded.
  tree = jax.tree.map(lambda x: x._replace(starts=()) if isinstance(x, TargetState) else x,
                      tree, is_leaf=lambda x: isinstance(x, TargetState))
  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()[:16]


def trajectory(name: str) -> list[str]:
  """One digest of (params, optimizer state) after every step."""
  params, tx, step, inputs = _runs()[name]()
  state = tx.init(params)
  step = jax.jit(step)
  out = []
  for x in inputs:
    params, state = step(params, state, x)
    out.append(_digest((params, state)))
  return out


def canary() -> str:
  """XLA CPU arithmetic without LoSiA: AdamW steps and a matmul's gradient."""
  params = tiny_params()
  tx = optax.adamw(0.03, weight_decay=0.01)
  state = tx.init(params)
  rng = np.random.default_rng(0)

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(3):
    params, state = step(params, state, random_grads(params, rng))
  w = params["model"]["layers"][0]["mlp"]["down_proj"]["kernel"]
  x = jnp.asarray(rng.normal(size=(5, w.shape[0])), jnp.float32)
  g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)
  return _digest((params, state, g))


@pytest.fixture(scope="module")
def pinned():
  data = json.loads(FIXTURE.read_text())
  if data["canary"] != canary():
    pytest.skip("XLA CPU arithmetic differs from the recording machine (canary); re-record "
                "with `python -m tests.jax.test_pinned_trajectories --record` on the old code")
  return data["runs"]


@pytest.mark.parametrize("name", sorted(_runs()))
def test_trajectory_is_bitwise_unchanged(pinned, name):
  got = trajectory(name)
  want = pinned[name]
  first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
  assert first is None and len(got) == len(want), (
      f"{name}: params or optimizer state differ from the pinned trajectory from step {first}")


if __name__ == "__main__":
  if sys.argv[1:] != ["--record"]:
    sys.exit("usage: python -m tests.jax.test_pinned_trajectories --record")
  FIXTURE.parent.mkdir(exist_ok=True)
  FIXTURE.write_text(json.dumps({"jax": jax.__version__, "canary": canary(),
                                 "runs": {n: trajectory(n) for n in sorted(_runs())}}, indent=1)
                     + "\n")
  print(f"wrote {FIXTURE}")
