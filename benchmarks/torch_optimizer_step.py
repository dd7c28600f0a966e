"""losia_torch against torch.optim.AdamW on SmolLM2-135M-shaped params, side by side.

Two measurements, each the median of N runs, in one process:

1. the optimizer step (everything after backward) on fake gradients:
   AdamW (torch's default implementation for the device) vs LoSiAOptimizer with
   ``non_target="train"`` (the default: the 28M-entry tied embedding gets full
   Adam) and ``"freeze"``. Steps that end a profiling window (relocalization) are
   timed apart and folded into an amortized figure for the default T = 100;
2. the backward pass of the model: plain vs LoSiA-Pro (compact block gradients
   for the non-profiling targets).

    .venv/bin/python benchmarks/torch_optimizer_step.py [--steps 7] [--layers 30] [--seq 128]
        [--threads 1] [--dtype bfloat16] [--device cuda]

Needs ``transformers`` (the ``torch`` extra). Random init, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import losia_torch
from losia_common import LoSiAConfig

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               tie_word_embeddings=True)


def smollm2(layers: int, dtype: torch.dtype, device: str):
  import transformers
  cfg = transformers.LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers})
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def sync(device):
  if device.startswith("cuda"):
    torch.cuda.synchronize()


def fake_grads(model, seed=0):
  g = torch.Generator(device="cpu").manual_seed(seed)
  for p in model.parameters():
    p.grad = (1e-3 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype)


def time_opt(opt, n, device, classify=None):
  """Runs 2 warm-up steps then ``n`` timed ones; returns {class: [seconds]}."""
  for _ in range(2):
    opt.step()
  sync(device)
  out: dict[str, list[float]] = {}
  while sum(len(v) for v in out.values()) < n:
    key = classify() if classify else "step"
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    out.setdefault(key, []).append(time.perf_counter() - t0)
  return out


def time_losia(model, cfg, n, device, period_for_amortizing=100):
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-5)
  # time regular steps and relocalizing steps apart (period 4 so both occur often)
  classify = lambda: "reloc" if (opt.losia_step + 1) % cfg.period == 0 else "step"
  res = time_opt(opt, 4 * n, device, classify)
  reg = statistics.median(res["step"])
  rel = statistics.median(res.get("reloc", res["step"]))
  T = period_for_amortizing
  return reg, rel, (reg * (T - 1) + rel) / T, opt


def time_backward(model, ids, n, device):
  times = []
  for i in range(n + 1):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    sync(device)
    t0 = time.perf_counter()
    loss.backward()
    sync(device)
    if i:  # first one is warm-up
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=7, help="timed repetitions (median)")
  ap.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"])
  ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (backward)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  ap.add_argument("--threads", type=int, default=None,
                  help="torch CPU threads (1 gives stabler numbers on a shared machine)")
  args = ap.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  dtype = getattr(torch, args.dtype)
  dev = args.device
  model = smollm2(args.layers, dtype, dev)
  nparams = sum(p.numel() for p in model.parameters())
  print(f"SmolLM2-135M-shaped: {args.layers} layers, {nparams / 1e6:.1f}M params, {args.dtype}, "
        f"{dev} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); median of {args.steps}")

  # 1. optimizer step
  fake_grads(model)
  adamw = torch.optim.AdamW(model.parameters(), lr=1e-5)
  t_adamw = statistics.median(time_opt(adamw, args.steps, dev)["step"])
  del adamw
  rows = [("AdamW (torch default)", t_adamw, None, None)]
  cfg = LoSiAConfig(period=4)
  for policy in ("train", "freeze"):
    reg, rel, amort, opt = time_losia(model, cfg.replace(non_target=policy), args.steps, dev)
    if policy == "train":
      print("  " + opt.summary().replace("\n", "\n  "))
    rows.append((f"LoSiA non_target={policy}", amort, reg, rel))
    del opt
  print("\noptimizer step (after backward)      ms   ratio to AdamW   [regular / relocalizing]")
  for name, t, reg, rel in rows:
    extra = "" if reg is None else f"   [{reg * 1e3:.1f} / {rel * 1e3:.1f} ms, amortized T=100]"
    print(f"  {name:<32} {t * 1e3:8.2f}   {t / t_adamw:6.3f}{extra}")

  # 2. backward: plain vs Pro
  model.zero_grad(set_to_none=True)
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(0, SMOLLM2["vocab_size"], (args.batch, args.seq), generator=g).to(dev)
  opt = losia_torch.LoSiAOptimizer(model, LoSiAConfig(), lr=1e-5)
  t_plain = time_backward(model, ids, args.steps, dev)
  opt.enable_pro(model)
  t_pro = time_backward(model, ids, args.steps, dev)
  opt.disable_pro()
  print(f"\nbackward, batch {args.batch} x {args.seq} tokens       ms   ratio to plain")
  print(f"  {'plain (full weight gradients)':<32} {t_plain * 1e3:8.2f}   {1.0:6.3f}")
  print(f"  {'LoSiA-Pro (block gradients)':<32} {t_pro * 1e3:8.2f}   {t_pro / t_plain:6.3f}")
  print("\nsummary ratios: LoSiA step / AdamW step = "
        + ", ".join(f"{r[0].split()[-1]}: {r[1] / t_adamw:.3f}" for r in rows[1:])
        + f"; Pro backward / plain backward = {t_pro / t_plain:.3f}")


if __name__ == "__main__":
  main()
