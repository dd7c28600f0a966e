"""What XLA compiles for a LoSiA step: one kernel per kind of layer, not one per layer.

XLA's CPU backend compiles every distinct kernel on its own (about 10 ms each)
and compiles identical kernels once. A kernel that reads one layer's part of the
layer-stacked LoSiA state at a constant offset is distinct for every layer: with
30 layers that was most of LoSiA's compile time (``TargetState.starts``). These
tests count the distinct fused computations of the optimized HLO, which is
deterministic, instead of timing the compiler.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import losia_jax
from losia_jax import pro

D, V = 24, 40


def distinct_kernels(hlo_text: str) -> int:
  """The number of different fused computations, names and metadata ignored."""
  bodies = set()
  for block in hlo_text.split("\n\n"):
    head, _, body = block.strip().partition("\n")
    if re.match(r"%?(fused|wrapped)", head):
      body = re.sub(r", metadata=\{[^}]*\}", "", body)
      bodies.add(re.sub(r"%[\w.\-]+|param_\d+\.\d+", "%", body))
  return len(bodies)


def params_of(layers: int):
  rng = np.random.default_rng(0)
  w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
  layer = lambda: {"self_attn": {"q_proj": {"kernel": w(D, D)}, "o_proj": {"kernel": w(D, D)}},
                   "mlp": {"down_proj": {"kernel": w(2 * D, D)}}}
  return {"model": {"embed_tokens": {"embedding": w(V, D)},
                    "layers": [layer() for _ in range(layers)]}}


def loss_of(layers: int):
  def loss(params, linear, ids):
    m = params["model"]
    h = m["embed_tokens"]["embedding"][ids]
    for i, lp in enumerate(m["layers"]):
      a = lp["self_attn"]
      h = h + jnp.tanh(linear(f"layer{i}.self_attn.q_proj", h, a["q_proj"]["kernel"], None))
      h = h + linear(f"layer{i}.self_attn.o_proj", h, a["o_proj"]["kernel"], None)
      u = jnp.concatenate([h, jnp.tanh(h)], -1)
      h = h + linear(f"layer{i}.mlp.down_proj", u, lp["mlp"]["down_proj"]["kernel"], None)
    logits = h[:, :-1] @ m["embed_tokens"]["embedding"].T
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
  return loss


def compiled_kernels(layers: int, schedule: str, path: str) -> int:
  return distinct_kernels(compiled_step(layers, schedule, path))


def compiled_step(layers: int, schedule: str, path: str) -> str:
  """The optimized HLO text of a jitted train step."""
  step, args = train_step(layers, schedule, path)
  return jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().as_text()


def train_step(layers: int, schedule: str, path: str):
  """A train step (``fused``, ``optax`` or ``pro``) and its ``(params, state, ids)``."""
  params = params_of(layers)
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2, schedule=schedule,
                              output_rank_factor=0.25)
  tx = losia_jax.losia(1e-2, cfg, output_module="embed_tokens", weight_decay=0.01,
                       clip_norm=1.0)
  state = tx.init(params)
  ids = jnp.zeros((2, 6), jnp.int32)
  loss = loss_of(layers)
  if path == "fused":
    def step(p, s, ids):
      g = jax.grad(lambda q: loss(q, pro.default_linear, ids))(p)
      return tx.apply_gradients(g, s, p)
  elif path == "optax":
    def step(p, s, ids):
      g = jax.grad(lambda q: loss(q, pro.default_linear, ids))(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
  else:  # LoSiA-Pro
    vg = pro.value_and_grad(loss, tx)

    def step(p, s, ids):
      _, g = vg(p, s, ids)
      return tx.apply_gradients(g, s, p)
  return step, (params, state, ids)


@pytest.mark.parametrize("path", ["fused", "optax", "pro"])
def test_block_indices_are_not_wrapped_around(path):
  """Block indices are never negative, and the gathers and scatters say so
  (``wrap_negative_indices=False``): otherwise JAX adds a compare, an add and a
  select per index array and use, six per matrix here and about 2,700 optimized
  HLO instructions on 30 SmolLM2 layers. The step's ``lt`` comparisons must not
  grow with the layers (they did: 95, 107 at 2 and 4 layers on the fused path)."""
  def comparisons(layers):
    step, args = train_step(layers, "async", path)
    return len(re.findall(r"= lt ", str(jax.make_jaxpr(step)(*args))))
  assert comparisons(2) == comparisons(4)


@pytest.mark.parametrize("schedule,path", [("async", "fused"), ("async", "optax"),
                                           ("async", "pro"), ("sync", "fused")])
def test_the_train_step_compiles_no_kernel_per_layer(schedule, path):
  """Doubling the layers adds no kernel per layer: each layer's gathers, updates,
  scatters and Pro's block matmuls are the same kernels (read at runtime offsets).
  A couple may differ (the slot arithmetic's constants, XLA fusing the first
  layers' small reads together); with constant offsets, going from 3 to 6 layers
  added 12 (async fused and optax), 33 (Pro) and 25 (sync)."""
  few, many = (compiled_kernels(n, schedule, path) for n in (3, 6))
  assert many - few <= 2, (few, many)


def switches_over_layers(hlo_text: str, layers: int) -> int:
  """Conditionals with a branch per layer (or more): ``lax.switch`` over the owner."""
  return sum(len(m.group(1).split(",")) > layers
             for m in re.finditer(r"conditional\(.*branch_computations=\{([^}]*)\}", hlo_text))


@pytest.mark.parametrize("path,switches", [("fused", 2), ("pro", 1)])
def test_only_the_weights_are_read_through_a_switch_over_layers(path, switches):
  """Every branch of a switch over layers is compiled, so it stays tiny and rare. A
  dense gradient needs two: the profiling layer's gradients are read (finite? and
  their norm, for clipping) before the step writes, and its weights with them for
  importance after. LoSiA-Pro's gradients already hold the profiling layer's
  matrices, so only the weights are switched (it had two, like the dense path)."""
  assert switches_over_layers(compiled_step(4, "async", path), 4) == switches


def test_runtime_offsets_are_the_bucket_offsets():
  """``TargetState.starts`` holds each leaf's offset in its role's stacked state, and a
  single-leaf role (a stacked leaf, the output layer) has none."""
  params = params_of(4)
  tx = losia_jax.losia(1e-2, losia_jax.LoSiAConfig(output_rank_factor=0.25),
                       output_module="embed_tokens")
  state = losia_jax.find_losia_state(tx.init(params))
  plan = tx.plan(params)
  for b in plan.buckets:
    starts = state.targets[b.role].starts
    assert [int(x) for x in starts] == (list(b.offsets) if len(b.members) > 1 else []), b.role



def step_with_norms(layers: int, clip_norm) -> str:
  """The optimized HLO of the toy model's train step, with a trained norm (a
  non-target) per layer."""
  params = params_of(layers)
  for lp in params["model"]["layers"]:
    lp["norm"] = {"scale": jnp.ones((D,), jnp.float32)}
  base = loss_of(layers)

  def loss(p, linear, ids):
    scale = sum(lp["norm"]["scale"] for lp in p["model"]["layers"])
    q = jax.tree.map(lambda x: x, p)
    q["model"]["embed_tokens"]["embedding"] = p["model"]["embed_tokens"]["embedding"] * scale
    return base(q, linear, ids)

  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.25,
                              non_target="train")
  tx = losia_jax.losia(1e-2, cfg, output_module="embed_tokens", clip_norm=clip_norm)
  state, ids = tx.init(params), jnp.zeros((2, 6), jnp.int32)

  def step(p, s, ids):
    g = jax.grad(lambda q: loss(q, pro.default_linear, ids))(p)
    return tx.apply_gradients(g, s, p)
  return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, ids).compile().as_text()


def scalar_adds_with_norms(layers: int, clip_norm) -> int:
  """Scalar fp32 adds in :func:`step_with_norms`."""
  return len(re.findall(r"= f32\[\] add\(", step_with_norms(layers, clip_norm)))


@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_the_step_grows_linearly_with_the_number_of_layers(clip_norm):
  """Whether the step is finite (and the clip factor) reduces over every leaf the
  step reads, and every update reads it. Summed as a chain of scalar adds, XLA
  copied the chain into each reader's fusion: the program grew with leaves x
  readers, quadratically in the layers (on SmolLM2-135M with trained
  non-targets, 137k optimized HLO instructions against 58.5k after the fix, and
  1.5x the compile time). Counted here as scalar adds at 2, 4 and 6
  layers: each two layers must add as many as the two before (without clipping
  the chain gave 276, 466, 704; one reduction gives 53, 59, 65)."""
  a, b, c = (scalar_adds_with_norms(n, clip_norm) for n in (2, 4, 6))
  assert (c - b) - (b - a) <= 2, (a, b, c)


def test_the_partial_sums_are_gathered_without_a_write_per_leaf():
  """The partial sums of the step's finiteness and norm are gathered into one
  vector by a concatenate. Written into a zero vector one by one, each write
  was a dynamic-update-slice at its own offset, so a distinct kernel: 70 on
  30 SmolLM2 layers, about 1.3 s of XLA:CPU compile time. Here the count of
  dynamic-update-slices must not grow with the layers (it did: 32, 36, 40
  at 2, 4 and 6 layers)."""
  counts = [len(re.findall(r"dynamic-update-slice\(", step_with_norms(n, 1.0)))
            for n in (2, 4, 6)]
  assert counts[0] == counts[1] == counts[2], counts
