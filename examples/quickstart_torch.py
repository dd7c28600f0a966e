"""LoSiA quickstart (PyTorch): fine-tune a tiny LLaMA built from a config.

Prints the targets LoSiA selected, the loss, every relocalization, and the
optimizer-state memory against AdamW's. Nothing is downloaded.

    .venv/bin/python examples/quickstart_torch.py [--steps 120] [--pro]
"""

from __future__ import annotations

import argparse

import torch
import transformers

import losia_torch


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=120)
  ap.add_argument("--pro", action="store_true", help="LoSiA-Pro: compact backward")
  args = ap.parse_args()

  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True))

  config = losia_torch.LoSiAConfig(rank_factor=0.25, period=10, output_rank_factor=0.125)
  opt = losia_torch.get_losia_optimizer(model, config, lr=3e-3, weight_decay=0.01, pro=args.pro)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))

  # A learnable toy task: each sequence counts up from a random start, mod 128.
  g = torch.Generator().manual_seed(0)

  def batch(n=8, length=24):
    start = torch.randint(0, 128, (n, 1), generator=g)
    return (start + torch.arange(length)) % 128

  last = {t.name: opt.subnet(t.name)[0].clone() for t in opt.plan.targets}
  for step in range(args.steps):
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # LoSiA's clipping rule: the norm of the gradient values the step reads, the same with
    # and without Pro (not torch.nn.utils.clip_grad_norm_(model.parameters()), which counts
    # gradient entries LoSiA never reads and misses Pro's compact gradients).
    opt.clip_grad_norm_(1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    moved, changed = [], 0
    for t in opt.plan.targets:
      rows = opt.subnet(t.name)[0]
      if opt.state[t.param]["last_relocalization"] == step:
        moved.append(t)
        changed += len(set(rows.tolist()) - set(last[t.name].tolist()))
      last[t.name] = rows.clone()
    if step % 10 == 0 or step == args.steps - 1:
      print(f"step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
    if moved:
      layer = "output layer" if moved[0].row_mode else f"layer {moved[0].parsed.layer_index}"
      print(f"           end of step {step}: {layer} relocalized {len(moved)} matrices, "
            f"{changed} new rows")

  losia_bytes = opt.state_nbytes()
  adamw_bytes = 2 * 4 * sum(p.numel() for p in model.parameters())
  print(f"\noptimizer state: LoSiA {losia_bytes / 1024:.1f} KiB vs AdamW {adamw_bytes / 1024:.1f} "
        f"KiB (fp32 moments); skipped steps: {opt.num_skipped_steps}")


if __name__ == "__main__":
  main()
