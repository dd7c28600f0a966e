"""How much of a fine-tuning gradient can a LoSiA block hold, against a low-rank update?

The quality harness (``benchmarks/quality.py``) finds LoSiA at p = 1/8 trailing LoRA
r = 8 on the embedded SmolLM2-135M. This script measures one mechanism behind
that, on the real model and task, before any training: for every LoSiA target
matrix, the share of the gradient's energy ``||G||²`` that falls in

- the block LoSiA chooses (``losia_torch.select_subnet`` on the importance score
  ``Ī ⊙ Ū`` accumulated over ``--profile`` batches, exactly as the optimizer's
  profiling window does),
- the block of that size that the same greedy localization picks from ``G²`` itself
  (what a selection that knew the gradient it will train on would pick: near the best
  any importance rule can do with this localization),
- a random block of that size (the initial subnet; expectation p²),
- the best rank-r subspace (top-r singular values: an upper bound for a rank-r
  update, LoRA's form), at r = 8 and at the rank with the block's parameter count;
- and, for the blocks, the share of ``sum |G|`` (the L1 share): Adam's first steps
  move each trained entry by about the learning rate whatever its gradient, so their
  first-order decrease is ``lr * sum |g|`` over the entries they move.

``G`` is the mean gradient over ``--eval`` *other* batches (the gradient the block
will be trained on, not the one it was chosen from). For a gradient step restricted
to a subspace, the first-order decrease of the loss is proportional to the energy
it keeps, so the shares compare what one step of each form can do. Adam's update
is not the gradient, and LoRA's factors are learned, so these are bounds and
tendencies, not predictions of accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality_gradient_share.py [--model DIR]

Prints a table per role (q, k, v, o, gate, up, down) and overall; within a row the
matrices are weighted by their ``||G||²`` (the L1 columns too). Writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from losia_cli import args as A  # noqa: E402
from losia_cli import data as D  # noqa: E402
from losia_cli import tasks as T  # noqa: E402
from losia_cli.model_files import load_tokenizer  # noqa: E402
from losia_cli.torch_backend import load_model, masked_next_token_loss  # noqa: E402
from losia_common import LoSiAConfig, block_size  # noqa: E402
from losia_torch import select_subnet  # noqa: E402
from losia_torch.importance import ImportanceSlot  # noqa: E402

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batches(tokenizer, n: int, batch_size: int, seq_len: int, seed: int):
  """``n`` batches of the arithmetic task's training split, drawn in a seeded order."""
  train, _ = T.get_task("arithmetic").splits(seed)
  examples = [D.Example(p.prompt, p.response) for p in train]
  fmt = D.Formatter(tokenizer)
  _, enc, _ = D.encode_all(examples, fmt, seq_len)
  order = np.random.default_rng(seed).permutation(len(enc))
  out = []
  for i in range(n):
    idx = order[i * batch_size:(i + 1) * batch_size]
    out.append(D.make_batch([enc[j] for j in idx], seq_len, fmt.pad_id))
  return out


def gradients(model, batch) -> dict[str, torch.Tensor]:
  model.zero_grad(set_to_none=True)
  ids = torch.as_tensor(batch.input_ids, dtype=torch.long)
  logits = model(input_ids=ids, attention_mask=torch.as_tensor(batch.attention_mask)).logits
  loss = masked_next_token_loss(logits, ids, torch.as_tensor(batch.loss_mask))
  loss.backward()
  return {n: p.grad.detach().clone() for n, p in model.named_parameters()
          if n.rsplit(".", 2)[-2] in ROLES}


def shares(g: torch.Tensor, score: torch.Tensor, p: float, rng: np.random.Generator):
  d_out, d_in = g.shape
  k_out, k_in = block_size(p, d_out), block_size(p, d_in)
  e = g.double().square()
  total = float(e.sum())
  block = lambda r, c: float(e.index_select(0, r).index_select(1, c).sum()) / total
  rows, cols = select_subnet(score, k_out, k_in)
  orows, ocols = select_subnet(e.float(), k_out, k_in)
  rrows = torch.as_tensor(np.sort(rng.choice(d_out, k_out, replace=False)))
  rcols = torch.as_tensor(np.sort(rng.choice(d_in, k_in, replace=False)))
  sv2 = torch.linalg.svdvals(g.double()).square()
  matched = max(1, round(k_out * k_in / (d_out + d_in)))
  # Adam's first steps move every entry it trains by about lr (a sign step), so their
  # first-order decrease is lr * sum |g| over those entries: the L1 share.
  a = g.double().abs()
  l1 = lambda r, c: float(a.index_select(0, r).index_select(1, c).sum()) / float(a.sum())
  o1rows, o1cols = select_subnet(a.float(), k_out, k_in)
  return {"losia": block(rows, cols), "oracle_block": block(orows, ocols),
          "random": block(rrows, rcols), "rank8": float(sv2[:8].sum()) / total,
          "rank_matched": float(sv2[:matched].sum()) / total, "matched_rank": matched,
          "losia_l1": l1(rows, cols), "oracle_block_l1": l1(o1rows, o1cols),
          "random_l1": l1(rrows, rcols), "energy": total}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", help="model directory or .gguf (default: the embedded SmolLM2)")
  ap.add_argument("--profile", type=int, default=3,
                  help="batches in the importance window (the CLI's --period for 200 steps: 3)")
  ap.add_argument("--eval", type=int, default=4, help="other batches whose mean gradient is G")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=64)
  ap.add_argument("--rank-factors", default="0.125,0.25")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "gradient_share.json"))
  o = ap.parse_args(argv)
  t0 = time.time()
  src = A.resolve_model(o.model)
  model = load_model(src).float().train()
  for q in model.parameters():
    q.requires_grad_(True)
  tok = load_tokenizer(src)
  bs = batches(tok, o.profile + o.eval, o.batch_size, o.seq_len, o.seed)
  cfg = LoSiAConfig()
  params = dict(model.named_parameters())
  slots: dict[str, ImportanceSlot] = {}
  for b in bs[:o.profile]:
    for n, g in gradients(model, b).items():
      slot = slots.setdefault(n, ImportanceSlot.zeros(g.shape))
      slot.update(params[n].detach(), g, cfg.importance, cfg.importance_beta1,
                  cfg.importance_beta2)
  mean: dict[str, torch.Tensor] = {}
  for b in bs[o.profile:]:
    for n, g in gradients(model, b).items():
      mean[n] = mean.get(n, 0) + g / o.eval
  rng = np.random.default_rng(o.seed)
  factors = [float(x) for x in o.rank_factors.split(",")]
  rows = {p: {} for p in factors}
  for n in sorted(mean):
    role = n.rsplit(".", 2)[-2]
    for p in factors:
      rows[p].setdefault(role, []).append(shares(mean[n], slots[n].score(), p, rng))
  out = {"model": src.description, "profile_batches": o.profile, "eval_batches": o.eval,
         "batch": [o.batch_size, o.seq_len], "seed": o.seed, "factors": {}}
  keys = ("losia", "oracle_block", "random", "rank8", "rank_matched", "losia_l1",
          "oracle_block_l1", "random_l1")
  for p in factors:
    print(f"\nrank factor p = {p:g} (block = p^2 = {p * p:.2%} of each matrix); share of "
          f"||G||^2 (G: mean gradient of {o.eval} other batches of {o.batch_size} x {o.seq_len})")
    print(f"{'role':10} {'LoSiA block':>12} {'G² block':>11} {'random':>8} {'rank 8':>8} "
          f"{'rank @ block params':>20}   L1 share: {'LoSiA':>6} {'|G| bl':>6} {'random':>6}")
    table = {}
    for role in ROLES + ("all",):
      rs = [r for v in rows[p].values() for r in v] if role == "all" else rows[p][role]
      w = np.array([r["energy"] for r in rs])
      avg = {k: float(np.dot(w, [r[k] for r in rs]) / w.sum()) for k in keys}
      ranks = sorted({r["matched_rank"] for r in rs})
      avg["matched_rank"] = ranks
      table[role] = avg
      print(f"{role:10} {avg['losia']:12.2%} {avg['oracle_block']:11.2%} {avg['random']:8.2%} "
            f"{avg['rank8']:8.2%} {avg['rank_matched']:12.2%} (r={','.join(map(str, ranks))})"
            f"{'':>4}{avg['losia_l1']:16.2%} {avg['oracle_block_l1']:6.2%} "
            f"{avg['random_l1']:6.2%}")
    out["factors"][f"{p:g}"] = table
  with open(o.json, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  print(f"\nwrote {o.json} ({time.time() - t0:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
