"""LoSiA under FSDP2 (``fully_shard``, gloo, 2 CPU processes) equals one process.

A tiny LlamaForCausalLM is sharded layer by layer; each rank trains on its half of
every batch. Checked against a single process on the combined batch: the same
indices of every target after every step (two relocalizations of every layer and
of the output layer), the same clip norms, the same weights within 1e-5. Also: a
distributed-checkpoint (DCP) save in the middle of a profiling window resumes bit
for bit (live importance buffers included); a NaN in one rank's gradient shard
skips the step on every rank; per-rank optimizer state is measured against AdamW
under FSDP2.

LoSiA-Pro under FSDP2 (with ``reshard_after_forward`` True and False): the compact
backward really runs (no weight gradient outside the profiling window), and the run
equals plain LoSiA under FSDP2 and the single process (indices every step, clip norms,
weights 1e-5); a DCP save mid-window resumes bit for bit; gradient accumulation with
the first micro-batch under ``set_requires_gradient_sync(False)`` gives the same run,
and a step after only an unsynced backward is refused.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

import losia_torch  # noqa: E402
from losia_common import LoSiAConfig  # noqa: E402
from losia_torch import fsdp as losia_fsdp  # noqa: E402

CFG = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.25)
LAYERS = 2
ROUND = (LAYERS + 1) * CFG.period  # every layer and the output layer profile once per round
STEPS = 2 * ROUND + 2  # two relocalizations of everything, and a bit more
HALF = 7  # the checkpoint is taken here: in the middle of a profiling window
assert HALF % CFG.period != 0


def _model(seed=0):
  torch.manual_seed(seed)
  # odd sizes (vocab 67, kv 16) so that shards are uneven and blocks straddle them
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=67, max_position_embeddings=16,
      tie_word_embeddings=False))


def _batches():
  g = torch.Generator().manual_seed(0)
  return [torch.randint(0, 67, (4, 9), generator=g) for _ in range(STEPS)]


def _snapshot(opt):
  return {t.name: (opt.subnet(t.name)[0].clone(), opt.subnet(t.name)[1].clone())
          for t in opt.plan.targets}


def _train(model, opt, batches):
  log = []
  for ids in batches:
    model(input_ids=ids, labels=ids).loss.backward()
    norm = opt.clip_grad_norm_(0.5)  # active: the norm is global across ranks
    opt.step()
    opt.zero_grad()
    log.append((float(norm), _snapshot(opt)))
  return log


def _sharded(seed=0, reshard_after_forward=True):
  from torch.distributed.fsdp import fully_shard
  model = _model(seed)
  for layer in model.model.layers:
    fully_shard(layer, reshard_after_forward=reshard_after_forward)
  fully_shard(model, reshard_after_forward=reshard_after_forward)
  return model


def _full(model):
  return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, init_file, out_dir):
  import torch.distributed.checkpoint as dcp
  from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
  torch.set_num_threads(1)
  dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                          world_size=world)
  try:
    per = 4 // world
    shards = [ids[rank * per:(rank + 1) * per] for ids in _batches()]
    # 1. straight run
    model = _sharded()
    opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, weight_decay=0.01,
                                          verbose=False)
    log = _train(model, opt, shards)
    straight = _full(model)
    losia_bytes = opt.state_nbytes()
    rows_local = {t.name: tuple(opt.state[t.param]["exp_avg"].shape) for t in opt.plan.targets}
    # 2. stopped mid-window, saved with DCP, loaded into a fresh (differently seeded)
    #    model and optimizer, continued
    model = _sharded()
    opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, weight_decay=0.01,
                                          verbose=False)
    _train(model, opt, shards[:HALF])
    saved_importance = {k: (v.ibar.clone(), v.ubar.clone()) for k, v in opt.importance.items()}
    ckpt = os.path.join(out_dir, "dcp")
    dcp.save({"model": get_model_state_dict(model), "optim": opt.state_dict()},
             checkpoint_id=ckpt)
    model = _sharded(seed=1)
    opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, weight_decay=0.01,
                                          verbose=False)
    state = {"model": get_model_state_dict(model), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    opt.load_state_dict(state["optim"])
    live = sorted(opt.importance)
    importance_back = sorted(saved_importance) == live and all(
        torch.equal(opt.importance[k].ibar, i) and torch.equal(opt.importance[k].ubar, u)
        for k, (i, u) in saved_importance.items())
    resumed_log = _train(model, opt, shards[HALF:])
    resumed = _full(model)
    # 3. a NaN in one rank's shard of a gradient: every rank skips the step
    model(input_ids=shards[0], labels=shards[0]).loss.backward()
    if rank == 1:
      model.model.layers[0].mlp.up_proj.weight.grad.to_local()[0, 0] = float("nan")
    before = (opt.losia_step, _full(model))
    opt.step()
    opt.zero_grad()
    skipped = (opt.num_skipped_steps == 1 and opt.losia_step == before[0]
               and all(torch.equal(w, before[1][n]) for n, w in _full(model).items()))
    # 4. AdamW under FSDP2 on the same model, after one step: its per-rank state
    model = _sharded()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=shards[0], labels=shards[0]).loss.backward()
    adamw.step()
    torch.save({"log": log, "straight": straight, "resumed": resumed,
                "resumed_log": resumed_log, "live": live,
                "importance_back": importance_back, "skipped": skipped,
                "losia_bytes": losia_bytes, "rows_local": rows_local,
                "adamw_bytes": losia_fsdp.optimizer_state_nbytes(adamw)},
               os.path.join(out_dir, f"rank{rank}.pt"))
  finally:
    dist.destroy_process_group()


def _spawn(world, tmp_path, timeout=300, worker=None, extra=()):
  ctx = mp.spawn(worker or _worker, args=(world, str(tmp_path / "init"), str(tmp_path)) + extra,
                 nprocs=world, join=False)
  deadline = time.time() + timeout
  while not ctx.join(timeout=2):
    if time.time() > deadline:
      for p in ctx.processes:
        p.kill()
      pytest.fail(f"FSDP workers did not finish in {timeout} s")
  return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _one_process():
  """The single-process run on the combined batches: ``(model, optimizer, log)``."""
  model = _model()
  opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, weight_decay=0.01, verbose=False)
  return model, opt, _train(model, opt, _batches())


def _assert_same_run(log, log0, log1):
  """Both ranks' logs equal each other, and ``log`` (clip norms 1e-5, indices exactly)."""
  assert len(log) == len(log0) == len(log1) == STEPS
  for s, ((norm, idx), (n0, i0), (n1, i1)) in enumerate(zip(log, log0, log1)):
    assert n0 == n1 and abs(n0 - norm) <= 1e-5 * norm, (s, n0, norm)
    for name, (rows, cols) in idx.items():
      for i in (i0, i1):  # the same indices on both ranks and in one process, every step
        assert torch.equal(i[name][0], rows) and torch.equal(i[name][1], cols), (s, name)


@pytest.mark.slow
def test_fsdp2_ranks_agree_match_one_process_and_resume_from_dcp(tmp_path):
  r0, r1 = _spawn(2, tmp_path)
  model, opt, log = _one_process()
  assert opt.losia_step == STEPS
  # two relocalizations of every target (the last at step >= ROUND)
  assert all(opt.state[t.param]["last_relocalization"] >= ROUND for t in opt.plan.targets)
  _assert_same_run(log, r0["log"], r1["log"])
  for n, p in model.named_parameters():
    assert torch.equal(r0["straight"][n], r1["straight"][n]), n
    torch.testing.assert_close(r0["straight"][n], p.detach(), rtol=1e-5, atol=1e-5, msg=n)
  # the compact moments live with their rows: the two ranks' rows add up to the block
  for t in opt.plan.targets:
    a, b = r0["rows_local"][t.name], r1["rows_local"][t.name]
    assert a[0] + b[0] == t.k_out and a[1] == b[1] == t.k_in, t.name
  # DCP resume mid-window: a live importance buffer came back, and the end is bit-exact
  assert r0["live"], "the checkpoint was meant to be taken inside a profiling window"
  assert r0["importance_back"] and r1["importance_back"]  # the live buffers, bit for bit
  for r in (r0, r1):
    for n, w in r["straight"].items():
      assert torch.equal(r["resumed"][n], w), n
    for (n_a, i_a), (n_b, i_b) in zip(r["log"][HALF:], r["resumed_log"]):
      assert n_a == n_b and all(torch.equal(i_a[k][0], i_b[k][0]) for k in i_a)
  assert r0["skipped"] and r1["skipped"]  # rank 1's NaN skipped the step on both ranks
  # per-rank optimizer state: LoSiA's compact moments (+ importance) vs AdamW's full ones
  print(f"\nper-rank optimizer state bytes under FSDP2 (2 ranks): LoSiA "
        f"{r0['losia_bytes']}/{r1['losia_bytes']}, AdamW {r0['adamw_bytes']}/"
        f"{r1['adamw_bytes']}; single-process LoSiA {opt.state_nbytes()}")
  assert r0["losia_bytes"] < r0["adamw_bytes"] and r1["losia_bytes"] < r1["adamw_bytes"]


# --- LoSiA-Pro under FSDP2 ------------------------------------------------------------

def _pro_train(model, opt, batches, micro=1):
  """:func:`_train` with LoSiA-Pro, checking after each backward that the compact
  backward ran: a non-profiling Pro target has no weight gradient (FSDP reduce-scatters
  none for it) and an averaged block gradient in its delta, the same on both ranks.
  With ``micro=2`` each rank's batch is two micro-batches, the first without FSDP's
  gradient sync."""
  log, compact_steps = [], 0
  blocks = {t.name: opt.pro_blocks[id(t.param)] for t in opt.plan.targets if not t.row_mode}
  for ids in batches:
    for k, part in enumerate(ids.chunk(micro)):
      model.set_requires_gradient_sync(k == micro - 1)
      (model(input_ids=part, labels=part).loss / micro).backward()
    model.set_requires_gradient_sync(True)
    compact = 0
    for t in opt.plan.targets:
      if t.name not in blocks:
        continue
      delta = blocks[t.name].delta
      if opt.profiles(t):
        assert t.param.grad is not None and delta.grad is None, t.name
      else:
        assert t.param.grad is None and delta.grad.shape == t.block_shape, t.name
        copies = [torch.empty_like(delta.grad) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, delta.grad)
        assert all(torch.equal(c, delta.grad) for c in copies), t.name  # replicated
        compact += 1
    compact_steps += compact > 0
    norm = opt.clip_grad_norm_(0.5)
    opt.step()
    opt.zero_grad()
    log.append((float(norm), _snapshot(opt)))
  assert compact_steps == len(batches)  # every step had Pro targets outside their window
  return log


def _pro_worker(rank, world, init_file, out_dir, reshard):
  import torch.distributed.checkpoint as dcp
  from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
  torch.set_num_threads(1)
  dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                          world_size=world)

  def build(seed=0, pro=True):
    model = _sharded(seed, reshard)
    opt = losia_torch.get_losia_optimizer(model, CFG, lr=1e-2, weight_decay=0.01, pro=pro,
                                          verbose=False)
    return model, opt

  try:
    per = 4 // world
    shards = [ids[rank * per:(rank + 1) * per] for ids in _batches()]
    out = {}
    # 1. Pro, straight; 2. plain LoSiA under FSDP2 on the same shards
    model, opt = build()
    n_pro = len(opt.pro_blocks)
    out["log"] = _pro_train(model, opt, shards)
    out["straight"] = _full(model)
    model, plain = build(pro=False)
    out["plain_log"] = _train(model, plain, shards)
    out["plain"] = _full(model)
    # 3. Pro stopped mid-window, saved with DCP, loaded into a fresh Pro model, continued
    model, opt = build()
    _pro_train(model, opt, shards[:HALF])
    ckpt = os.path.join(out_dir, "dcp")
    sd = opt.state_dict()
    out["same_layout"] = len(sd["state"]) == len(plain.state_dict()["state"])
    dcp.save({"model": get_model_state_dict(model), "optim": sd}, checkpoint_id=ckpt)
    model, opt = build(seed=1)
    state = {"model": get_model_state_dict(model), "optim": opt.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    opt.load_state_dict(state["optim"])
    out["live"] = sorted(opt.importance)
    out["resumed_log"] = _pro_train(model, opt, shards[HALF:])
    out["resumed"] = _full(model)
    if reshard:
      # 4. two micro-batches per step, the first without gradient sync
      model, opt = build()
      out["micro_log"] = _pro_train(model, opt, shards, micro=2)
      out["micro"] = _full(model)
      # 5. a step after an unsynced backward only: refused, nothing changed
      model.set_requires_gradient_sync(False)
      model(input_ids=shards[0], labels=shards[0]).loss.backward()
      before = _full(model)
      try:
        opt.step()
        out["unsynced"] = ""
      except RuntimeError as e:
        out["unsynced"] = str(e)
      out["unsynced_kept"] = all(torch.equal(w, before[n]) for n, w in _full(model).items())
    out["n_pro"] = n_pro
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
  finally:
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep-unsharded"])
def test_fsdp2_pro_equals_plain_and_one_process_and_resumes(tmp_path, reshard):
  r0, r1 = _spawn(2, tmp_path, worker=_pro_worker, extra=(reshard,))
  model, opt, log = _one_process()
  assert r0["n_pro"] == 7 * LAYERS  # every projection; the output layer stays in row mode
  _assert_same_run(log, r0["log"], r1["log"])  # Pro == one process
  _assert_same_run(log, r0["plain_log"], r1["plain_log"])  # == plain LoSiA under FSDP2
  for n, p in model.named_parameters():
    assert torch.equal(r0["straight"][n], r1["straight"][n]), n
    torch.testing.assert_close(r0["straight"][n], p.detach(), rtol=1e-5, atol=1e-5, msg=n)
    torch.testing.assert_close(r0["straight"][n], r0["plain"][n], rtol=1e-5, atol=1e-5, msg=n)
  assert r0["same_layout"]  # Pro's delta leaves are not in the checkpoint
  assert r0["live"], "the checkpoint was meant to be taken inside a profiling window"
  for r in (r0, r1):  # DCP resume mid-window: bit for bit
    for n, w in r["straight"].items():
      assert torch.equal(r["resumed"][n], w), n
    for (n_a, i_a), (n_b, i_b) in zip(r["log"][HALF:], r["resumed_log"]):
      assert n_a == n_b and all(torch.equal(i_a[k][0], i_b[k][0]) for k in i_a)
  if reshard:
    _assert_same_run(log, r0["micro_log"], r1["micro_log"])
    for n, p in model.named_parameters():
      torch.testing.assert_close(r0["micro"][n], p.detach(), rtol=1e-5, atol=1e-5, msg=n)
    assert "set_requires_gradient_sync(False)" in r0["unsynced"], r0["unsynced"]
    assert r0["unsynced_kept"] and r1["unsynced_kept"]
