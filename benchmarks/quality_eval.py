"""Evaluation for the quality harness (``benchmarks/quality.py``): one model, every score.

Run as a subprocess of the harness, so that each evaluation starts from a clean
process (memory, threads)::

    python benchmarks/quality_eval.py MODEL --task arithmetic --out eval.json

``MODEL`` is a transformers directory (a run's exported ``model/``), a ``.gguf``
file, or ``embedded`` (the embedded SmolLM2-135M-Instruct, for the scores
before training). It writes one JSON object:

- ``val`` / ``test``: accuracy on the task's validation and test splits. Both
  come from the task's held-out pool (no problem shared with any training
  seed) at a fixed seed, the first ``n_val`` for validation, the next
  ``n_test`` for test, so they are disjoint and the same for every run;
- ``other``: the same test accuracy on the *other* embedded task (continual
  learning: task A after training on B);
- ``capitals``: recall on the capitals knowledge probe (``losia_cli.geo_tasks``);
- ``ppl``: perplexity on a fixed general text that ships with Python
  (the ``pydoc_data`` topics), in chunks of ``ppl_len`` tokens.

Prompts go through the same chat formatting as training (``losia_cli.data.Formatter``)
and are answered greedily.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

EVAL_SEED = 1_000_003  # the held-out pool's draw for validation/test (not a training seed)


def heldout_splits(task: str, n_val: int, n_test: int):
  """``(val, test)`` of ``task``: disjoint, from its held-out pool, fixed for all runs."""
  from losia_cli import tasks
  _, heldout = tasks.get_task(task).splits(EVAL_SEED, train_size=0, eval_size=n_val + n_test)
  return heldout[:n_val], heldout[n_val:]


def fixed_text() -> str:
  """The general text of the perplexity score: Python's pydoc topics, sorted by topic name."""
  from pydoc_data import topics
  return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


def _load(model: str):
  from losia_cli import args as A
  from losia_cli.main import load_tokenizer
  from losia_cli.torch_backend import load_model
  source = A.resolve_model(None if model == "embedded" else model)
  return load_model(source).eval(), load_tokenizer(source)


def generate(model, formatter, prompts: list[str], max_new_tokens: int, chunk: int = 32):
  """Greedy answers to ``prompts`` (left padding; stops at EOS)."""
  import torch
  import transformers
  eos = formatter.eos_id
  pad = eos if eos is not None else 0
  cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                      eos_token_id=eos, pad_token_id=pad,
                                      bos_token_id=model.config.bos_token_id)
  out = []
  for i in range(0, len(prompts), chunk):
    ids = [list(formatter.prompt_ids(p)) for p in prompts[i:i + chunk]]
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), pad, dtype=torch.int64)
    attn = torch.zeros((len(ids), width), dtype=torch.int64)
    for j, x in enumerate(ids):
      inp[j, width - len(x):] = torch.as_tensor(x)
      attn[j, width - len(x):] = 1
    with torch.no_grad():
      seqs = model.generate(input_ids=inp, attention_mask=attn, generation_config=cfg)
    for row in seqs[:, width:].tolist():
      if eos is not None and eos in row:
        row = row[:row.index(eos)]
      out.append(formatter.decode(row))
  return out


def accuracy(model, formatter, items, scorer, max_new_tokens: int) -> dict:
  if not items:
    return {"score": None, "correct": 0, "n": 0, "examples": []}
  preds = generate(model, formatter, [p.prompt for p in items], max_new_tokens)
  ok = [scorer.correct(pr, p.response) for pr, p in zip(preds, items)]
  return {"score": sum(ok) / len(ok), "correct": int(sum(ok)), "n": len(ok),
          "examples": [{"prompt": p.prompt, "target": p.response, "prediction": pr}
                       for p, pr in list(zip(items, preds))[:3]]}


def perplexity(model, tokenizer, n_chunks: int, length: int) -> dict:
  """exp(mean next-token NLL) over the first ``n_chunks × length`` tokens of :func:`fixed_text`."""
  import torch
  import torch.nn.functional as F
  ids = tokenizer(fixed_text(), add_special_tokens=False)["input_ids"][:n_chunks * length]
  n_chunks = len(ids) // length
  if n_chunks == 0:
    return {"ppl": None, "tokens": 0}
  x = torch.as_tensor(ids[:n_chunks * length], dtype=torch.int64).view(n_chunks, length)
  total = 0.0
  for i in range(0, n_chunks, 8):
    with torch.no_grad():
      logits = model(input_ids=x[i:i + 8], use_cache=False).logits[:, :-1].float()
    total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   x[i:i + 8, 1:].reshape(-1), reduction="sum"))
  n = n_chunks * (length - 1)
  return {"ppl": math.exp(total / n), "nll": total / n, "tokens": n}


def evaluate(model_path: str, task: str, n_val: int, n_test: int, n_capitals: int,
             ppl_chunks: int, ppl_len: int, other_task: str | None = None) -> dict:
  """Every score of one model (see the module docstring)."""
  import torch
  from losia_cli import data, geo_tasks, tasks
  t0 = time.time()
  torch.manual_seed(0)
  model, tokenizer = _load(model_path)
  fmt = data.Formatter(tokenizer)
  spec = tasks.get_task(task)
  val, test = heldout_splits(task, n_val, n_test)
  res = {"val": accuracy(model, fmt, val, spec.scorer, spec.max_new_tokens),
         "test": accuracy(model, fmt, test, spec.scorer, spec.max_new_tokens)}
  if other_task:
    ospec = tasks.get_task(other_task)
    _, otest = heldout_splits(other_task, n_val, n_test)
    res["other"] = {"task": other_task,
                    **accuracy(model, fmt, otest, ospec.scorer, ospec.max_new_tokens)}
  res["capitals"] = accuracy(model, fmt, geo_tasks.capitals(n_capitals), tasks.CONTAINS,
                             geo_tasks.CAPITALS_MAX_NEW_TOKENS)
  res["ppl"] = perplexity(model, tokenizer, ppl_chunks, ppl_len)
  res["seconds"] = time.time() - t0
  return res


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("model")
  p.add_argument("--task", required=True)
  p.add_argument("--other-task")
  p.add_argument("--n-val", type=int, default=64)
  p.add_argument("--n-test", type=int, default=128)
  p.add_argument("--n-capitals", type=int, default=40)
  p.add_argument("--ppl-chunks", type=int, default=8)
  p.add_argument("--ppl-len", type=int, default=128)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  res = evaluate(a.model, a.task, a.n_val, a.n_test, a.n_capitals, a.ppl_chunks, a.ppl_len,
                 a.other_task)
  tmp = a.out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(res, f, indent=1)
  os.replace(tmp, a.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
