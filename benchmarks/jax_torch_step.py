"""The Flax LLaMA's forward and backward against transformers' on the same shapes, on CPU.

Where JAX's training step loses to torch's: one process, the same LLaMA config
(SmolLM2-135M by default: 30 layers, hidden 576, GQA 9/3, vocab 49152, tied),
the same batch (4 x 256 tokens), fp32, the loss and every parameter's gradient:

- ``jax``: ``losia_jax.models.LlamaForCausalLM`` as the CLI runs it, under
  ``jax.jit(jax.value_and_grad(...))``;
- ``jax, autodiff dot``: the same with each projection's product as plain
  ``jnp.dot`` (autodiff's own weight gradient), i.e. before
  ``losia_jax.linear.dense_matmul``;
- ``torch``: ``transformers.LlamaForCausalLM`` (SDPA attention), ``loss.backward()``.

Then the matrix products alone (each decoder projection's forward, input
gradient and weight gradient at the step's token count), XLA against torch, so
the part of the gap that is XLA's own GEMM can be told from the model's.
torch uses as many threads as the process has cores; XLA:CPU does too. Pin the
process for one-core figures:

    taskset -c 1 .venv/bin/python benchmarks/jax_torch_step.py [--layers 30] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from losia_jax.linear import project
from losia_jax.models import LlamaForCausalLM, functional, masked_nll


def llama_config(layers: int, vocab: int, tiny: bool) -> transformers.LlamaConfig:
  if tiny:
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                    tie_word_embeddings=True, max_position_embeddings=256,
                                    attn_implementation="sdpa")
  return transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=vocab,
                                  tie_word_embeddings=True, max_position_embeddings=8192,
                                  rope_theta=100000.0, rms_norm_eps=1e-5,
                                  attn_implementation="sdpa")


def median_seconds(fn, steps: int) -> float:
  jax.block_until_ready(fn())  # compile / warm up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def jax_step(cfg, ids: np.ndarray, plain_dot: bool):
  """A no-argument function running one jitted forward+backward, and the loss."""
  params, apply, _ = functional(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  linear = ((lambda identity, x, kernel, bias: project(x, kernel, bias, matmul=jnp.dot))
            if plain_dot else None)
  ids = jnp.asarray(ids)
  grad = jax.jit(jax.value_and_grad(lambda p: masked_nll(apply(p, ids, linear=linear), ids)))
  return lambda: grad(params)


def torch_step(cfg, ids: np.ndarray):
  model = transformers.LlamaForCausalLM(cfg)
  ids = torch.from_numpy(ids)

  def step():
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return None
  return step


def gemm_rows(cfg, tokens: int, steps: int) -> list[dict]:
  """Each decoder projection's three products, XLA and torch, alone."""
  h, i = cfg.hidden_size, cfg.intermediate_size
  kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
  rng = np.random.default_rng(0)
  rows = []
  for name, (d_in, d_out) in (("q, o", (h, h)), ("k, v", (h, kv)), ("gate, up", (h, i)),
                              ("down", (i, h))):
    x = rng.standard_normal((tokens, d_in), np.float32)
    w = rng.standard_normal((d_in, d_out), np.float32)
    dy = rng.standard_normal((tokens, d_out), np.float32)
    jx, jw, jdy = map(jnp.asarray, (x, w, dy))
    tx, tw, tdy = map(torch.from_numpy, (x, w, dy))
    for op, jf, ja, tf in (
        ("x @ W", jax.jit(lambda x, w: x @ w), (jx, jw), lambda: tx @ tw),
        ("dy @ W^T", jax.jit(lambda dy, w: dy @ w.T), (jdy, jw), lambda: tdy @ tw.T),
        ("x^T @ dy", jax.jit(lambda x, dy: x.T @ dy), (jx, jdy), lambda: tx.T @ tdy)):
      rows.append(dict(matrix=f"{name} {d_in}x{d_out}", op=op,
                       jax_s=median_seconds(lambda: jf(*ja), steps),
                       torch_s=median_seconds(tf, steps)))
  return rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--vocab", type=int, default=49152)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--steps", type=int, default=4, help="timed repetitions (median)")
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (the smoke test)")
  ap.add_argument("--json", default=None, help="also write the figures here")
  a = ap.parse_args(argv)
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  cfg = llama_config(a.layers, a.vocab, a.tiny)
  ids = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq))

  steps = {}
  for name, make in (("jax", lambda: jax_step(cfg, ids, plain_dot=False)),
                     ("jax, autodiff dot", lambda: jax_step(cfg, ids, plain_dot=True)),
                     ("torch", lambda: torch_step(cfg, ids))):
    steps[name] = median_seconds(make(), a.steps)
  gemms = gemm_rows(cfg, a.batch * a.seq, max(a.steps, 5))

  print(f"forward + backward, {a.layers} layers, hidden {cfg.hidden_size}, vocab {a.vocab}, "
        f"{a.batch} x {a.seq} tokens, fp32, {threads} core(s); jax {jax.__version__}, "
        f"torch {torch.__version__}; median of {a.steps}")
  for name, s in steps.items():
    print(f"  {name:20s} {s * 1e3:9.1f} ms   / torch {s / steps['torch']:.2f}")
  print(f"matrix products alone ({a.batch * a.seq} tokens)   jax ms   torch ms   jax / torch")
  for r in gemms:
    print(f"  {r['matrix']:18s} {r['op']:10s} {r['jax_s'] * 1e3:8.2f} {r['torch_s'] * 1e3:10.2f} "
          f"{r['jax_s'] / r['torch_s']:10.2f}")
  total = {k: sum(r[k] for r in gemms) for k in ("jax_s", "torch_s")}
  print(f"  {'all of them':29s} {total['jax_s'] * 1e3:8.2f} {total['torch_s'] * 1e3:10.2f} "
        f"{total['jax_s'] / total['torch_s']:10.2f}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(args=vars(a), threads=threads, steps_s=steps, gemms=gemms), f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
