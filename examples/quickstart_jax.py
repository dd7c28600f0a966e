"""LoSiA in Flax NNX, end to end in a minute on a CPU.

A small residual MLP language model (decoder-style ``layers`` with ``q_proj``,
``up_proj`` and ``down_proj`` linears) learns to continue generated arithmetic
strings ("12+7=19;"). It is first pre-trained briefly with AdamW on addition,
then fine-tuned on subtraction with LoSiA and, for comparison, with full
AdamW. The script prints both loss curves, when each layer relocalized its
subnet, and the optimizer-state memory of both.

    python examples/quickstart_jax.py [--steps 120]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import losia_jax

VOCAB = "0123456789+-=;"
CTX = 8


def make_data(op: str, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  text = ""
  for _ in range(n):
    a, b = rng.integers(0, 50, 2)
    a, b = max(a, b), min(a, b)
    text += f"{a}{op}{b}={a + b if op == '+' else a - b};"
  ids = np.array([VOCAB.index(c) for c in text], np.int32)
  windows = np.lib.stride_tricks.sliding_window_view(ids, CTX + 1)
  return windows


class Block(nnx.Module):
  def __init__(self, d: int, rngs: nnx.Rngs):
    self.q_proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)
    self.norm = nnx.RMSNorm(d, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x)
    return x + self.down_proj(jax.nn.gelu(self.up_proj(self.q_proj(h))))


class TinyLM(nnx.Module):
  def __init__(self, d=128, layers=4, *, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(len(VOCAB), d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (CTX, d)))
    self.layers = nnx.List([Block(d, rngs) for _ in range(layers)])
    self.mix = nnx.Linear(CTX * d, d, rngs=rngs)

  def __call__(self, ids):
    x = self.embed_tokens(ids) + self.pos[...]
    x = self.mix(x.reshape(x.shape[0], -1))
    for blk in self.layers:
      x = blk(x)
    return self.embed_tokens.attend(x)  # tied output layer


def loss_fn(model, batch):
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, -1]).mean()


def train(model, tx, data, steps, batch=64, seed=0, fused=False):
  """Trains in place; returns the loss curve and the optimizer state."""
  graphdef, params = nnx.split(model, nnx.Param)
  state = tx.init(params)

  @jax.jit
  def step(params, state, b):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), b))(params)
    if fused:  # LoSiA's in-place path: no parameter-sized update is built
      params, state = tx.apply_gradients(grads, state, params)
    else:
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state, loss

  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    b = jnp.asarray(data[rng.integers(0, len(data), batch)])
    params, state, loss = step(params, state, b)
    losses.append(float(loss))
  nnx.update(model, params)
  return losses, state


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=120)
  ap.add_argument("--period", type=int, default=10)
  args = ap.parse_args()

  add, sub = make_data("+", 3000, 0), make_data("-", 3000, 1)
  base = TinyLM(rngs=nnx.Rngs(0))
  t0 = time.time()
  train(base, optax.adamw(3e-3), add, 300)
  print(f"pre-trained on addition in {time.time() - t0:.0f}s; "
        f"loss on subtraction: {float(loss_fn(base, jnp.asarray(sub[:512]))):.3f}")

  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=args.period, non_target="train",
                              target_modules=["q_proj", "up_proj", "down_proj"])
  tx = losia_jax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(
      optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, args.steps), cfg))
  losia_model = nnx.clone(base)
  params = nnx.state(losia_model, nnx.Param)
  print(tx.plan(params).summary())
  l_losia, st = train(losia_model, tx, sub, args.steps, fused=True)

  full_model = nnx.clone(base)
  l_full, st_full = train(full_model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, args.steps))), sub, args.steps)

  print(f"\n{'step':>5s} {'LoSiA loss':>11s} {'AdamW loss':>11s}")
  for i in range(0, args.steps, max(1, args.steps // 8)):
    print(f"{i:5d} {np.mean(l_losia[i:i + 5]):11.3f} {np.mean(l_full[i:i + 5]):11.3f}")
  ls = losia_jax.find_losia_state(st)
  print("\nlast relocalization step of each layer:",
        {role: ts.last_relocalization.tolist() for role, ts in ls.targets.items()})
  mb = lambda s: losia_jax.state_nbytes(s) / 2**20
  print(f"optimizer state: LoSiA {mb(st):.2f} MiB vs AdamW {mb(st_full):.2f} MiB "
        f"(non-target embeddings and norms trained by both)")


if __name__ == "__main__":
  main()
