"""Pinned trajectories: the torch backend's arithmetic does not change by accident.

A few runs on a tiny ``LlamaForCausalLM`` (plain LoSiA, an active clip with gradient
accumulation, LoSiA-Pro clipped, Pro in sync mode with accumulation, per-layer
stepping, ``get_losia_optimizer(pro=True)`` with frozen non-targets) are compared
bit for bit against digests recorded from an earlier version of the code: the loss,
every weight and every target's indices after each step, and the optimizer state
(moments, importance) at the end. The digests were first recorded before
``losia_torch`` was split into modules and Pro became a layer class; that refactor
had to leave them unchanged.

Bitwise float results depend on torch's CPU kernels, so the fixture also pins a
canary (the logits and gradients of the untrained model on one batch). Where the
canary differs (another torch version or CPU), the test is skipped, not failed:
re-record with ``python -m tests.torch.test_torch_pinned_trajectories --record``
on the old code, then check the new code against it.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig

transformers = pytest.importorskip("transformers")

FIXTURE = pathlib.Path(__file__).with_name("data") / "pinned_trajectories.json"
STEPS = 13  # period 2, 3 slots (2 layers + output): every slot relocalizes twice

RUNS = {
    # name: (LoSiAConfig kwargs, mode, accumulate, max_norm or None)
    "plain": (dict(), "plain", 1, None),
    "plain_clip_accumulate": (dict(), "plain", 2, 0.05),
    "pro_clip": (dict(), "pro", 1, 0.05),
    "pro_sync_accumulate": (dict(schedule="sync"), "pro", 2, None),
    "layerwise": (dict(), "layerwise", 1, None),
    "attach_pro_freeze": (dict(non_target="freeze"), "attach_pro", 1, 0.05),
}


def _llama():
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))


def _digest(tensors) -> str:
  h = hashlib.sha256()
  for t in tensors:
    h.update(t.detach().contiguous().cpu().numpy().tobytes())
  return h.hexdigest()[:20]


def _batch(g):
  return torch.randint(0, 64, (2, 10), generator=g)


def canary() -> str:
  model = _llama()
  ids = _batch(torch.Generator().manual_seed(1))
  out = model(input_ids=ids, labels=ids)
  out.loss.backward()
  return _digest([out.logits, out.loss] + [p.grad for p in model.parameters()])


def run(name: str) -> dict:
  cfg_kw, mode, accumulate, max_norm = RUNS[name]
  cfg = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.1, **cfg_kw)
  model = _llama()
  if mode == "attach_pro":
    opt = losia_torch.get_losia_optimizer(model, cfg, lr=1e-2, weight_decay=0.01, pro=True,
                                          verbose=False)
  else:
    opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2, weight_decay=0.01)
  if mode == "pro":
    opt.enable_pro(model)
  if mode == "layerwise":
    opt.enable_per_layer_step()
  g = torch.Generator().manual_seed(1)
  steps = []
  for _ in range(STEPS):
    for _ in range(accumulate):
      ids = _batch(g)
      loss = model(input_ids=ids, labels=ids).loss
      (loss / accumulate).backward()
    if max_norm is not None:
      opt.clip_grad_norm_(max_norm)
    opt.step()
    opt.zero_grad()
    idx = [x for t in opt.plan.targets for x in opt.subnet(t.name)]
    steps.append([float(loss.detach()).hex(), _digest(model.parameters()), _digest(idx)])
  sd = opt.state_dict()
  state = [v for k in sorted(sd["state"]) for _, v in sorted(sd["state"][k].items())
           if isinstance(v, torch.Tensor)]
  imp = [v for _, s in sorted(sd["losia"]["importance"].items()) for _, v in sorted(s.items())]
  return {"steps": steps, "losia_step": opt.losia_step,
          "indices": {t.name: [x.tolist() for x in opt.subnet(t.name)] for t in opt.plan.targets},
          "state": _digest(state), "importance": _digest(imp)}


def _fixture() -> dict:
  return json.loads(FIXTURE.read_text())


def test_canary_matches_or_the_pins_do_not_apply():
  fx = _fixture()
  assert set(fx["runs"]) == set(RUNS)
  if canary() != fx["canary"]:
    pytest.skip(f"recorded with torch {fx['torch']} where the untrained model's arithmetic "
                f"differs from here (torch {torch.__version__}); the pins do not apply")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_trajectory_is_bitwise_the_pinned_one(name):
  fx = _fixture()
  if canary() != fx["canary"]:
    pytest.skip(f"canary differs from the one recorded with torch {fx['torch']}")
  got, want = run(name), fx["runs"][name]
  assert got["losia_step"] == want["losia_step"] == STEPS
  for s, (a, b) in enumerate(zip(got["steps"], want["steps"])):
    assert a == b, f"{name}: step {s} differs ([loss, weights, indices]: got {a}, pinned {b})"
  assert got["indices"] == want["indices"]
  assert got["state"] == want["state"], f"{name}: optimizer moments differ"
  assert got["importance"] == want["importance"], f"{name}: importance buffers differ"


if __name__ == "__main__":
  if sys.argv[1:] != ["--record"]:
    sys.exit("usage: python -m tests.torch.test_torch_pinned_trajectories --record")
  FIXTURE.parent.mkdir(exist_ok=True)
  data = {"torch": torch.__version__, "canary": canary(),
          "runs": {n: run(n) for n in sorted(RUNS)}}
  runs = ",\n".join(f"  {json.dumps(n)}: {json.dumps(r, sort_keys=True)}"
                   for n, r in data.pop("runs").items())
  head = json.dumps(data, sort_keys=True)[:-1]  # one run per line: readable diffs
  FIXTURE.write_text(f'{head}, "runs": {{\n{runs}\n}}}}\n')
  print(f"wrote {FIXTURE}")
