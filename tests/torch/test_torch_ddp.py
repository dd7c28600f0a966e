"""LoSiA under DistributedDataParallel (gloo, 2 CPU processes) equals one process.

LoSiA-Pro too (``opt.enable_pro(ddp)``, with ``find_unused_parameters`` True, two
micro-batches per step the first under ``no_sync()``, and False): the compact block
gradients are averaged over the ranks as DDP averages the others, so the run equals
plain LoSiA in one process; ``enable_pro`` of the inner module (DDP could not be found
to follow) is refused naming what to pass instead.
"""

import contextlib
import dataclasses
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losia_torch
from losia_common import LoSiAConfig
from tests.torch.torch_helpers import Toy

CFG = LoSiAConfig(rank_factor=0.34, period=2, output_rank_factor=0.25)
FREEZE = dataclasses.replace(CFG, non_target="freeze")
STEPS = 2 * CFG.period * 4 + 2


def _batches():
  g = torch.Generator().manual_seed(0)
  return [torch.randint(0, 16, (4, 7), generator=g) for _ in range(STEPS)]


def _train(model, opt, batches, micro=1):
  """With ``micro=2`` each batch is two micro-batches, the first under DDP's ``no_sync()``."""
  compact = 0
  for ids in batches:
    for k, part in enumerate(ids.chunk(micro)):
      with model.no_sync() if k < micro - 1 else contextlib.nullcontext():
        (_loss(model, part) / micro).backward()
    for block in opt.pro_blocks.values():  # Pro: compact gradients, the same on both ranks
      if block.delta.grad is not None:
        copies = [torch.empty_like(block.delta.grad) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, block.delta.grad)
        assert all(torch.equal(c, block.delta.grad) for c in copies)
        compact += 1
    opt.clip_grad_norm_(1.0)  # LoSiA's rule: the norm of the gradient values it reads
    opt.step()
    opt.zero_grad()
  return compact


def _loss(model, ids):
  # through model(...) so that DDP's forward runs (and its gradient hooks fire)
  logits = model(ids[:, :-1])
  return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))


def _worker(rank, world, init_file, out_dir, freeze=False, pro=None):
  torch.set_num_threads(1)
  dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                          world_size=world)
  try:
    torch.manual_seed(0)
    model = Toy(layers=3)
    if freeze:  # freezing non-targets: the optimizer first, then the DDP wrapper
      try:
        losia_torch.get_losia_optimizer(
            torch.nn.parallel.DistributedDataParallel(Toy(layers=3)), FREEZE, verbose=False)
        wrong_order = ""
      except ValueError as e:
        wrong_order = str(e)
      inner = Toy(layers=3)  # the order docs once showed: wrap, then build on ddp.module
      wrapped = torch.nn.parallel.DistributedDataParallel(inner)
      try:
        losia_torch.get_losia_optimizer(wrapped.module, FREEZE, verbose=False)
        wrong_order += "\nddp.module: not refused"
      except ValueError as e:
        wrong_order += "\nddp.module: " + str(e)
      opt = losia_torch.get_losia_optimizer(model, FREEZE, lr=1e-2, weight_decay=0.01,
                                            verbose=False)
      ddp = torch.nn.parallel.DistributedDataParallel(model)
    else:
      wrong_order = ""
      ddp = torch.nn.parallel.DistributedDataParallel(
          model, find_unused_parameters=pro == "find-unused")
      opt = losia_torch.LoSiAOptimizer(ddp, CFG, lr=1e-2, weight_decay=0.01)
    pro_inner = ""
    if pro:
      try:  # the inner module: DDP's averaging cannot be followed from it
        opt.enable_pro(model)
      except NotImplementedError as e:
        pro_inner = str(e)
      opt.enable_pro(ddp)
    shards = [ids[rank * 2:(rank + 1) * 2] for ids in _batches()]
    compact = _train(ddp, opt, shards, micro=2 if pro == "find-unused" else 1)
    try:  # per-layer stepping would apply each rank's un-averaged gradient: refused
      opt.enable_per_layer_step()
      refused = ""
    except (RuntimeError, ValueError) as e:
      refused = str(e)
    torch.save({"refused": refused, "wrong_order": wrong_order, "pro_inner": pro_inner,
                "compact": compact,
                "params": {n: p.detach() for n, p in model.named_parameters()},
                "indices": {t.name: (opt.subnet(t.name)[0], opt.subnet(t.name)[1])
                            for t in opt.plan.targets},
                "step": opt.losia_step}, os.path.join(out_dir, f"rank{rank}.pt"))
  finally:
    dist.destroy_process_group()


def _spawn(world, tmp_path, freeze, pro, timeout=300, teardown=30):
  """Runs the workers; returns once every rank wrote its results and exited.

  A rank whose results are written but which hangs in gloo's teardown
  (``destroy_process_group`` waiting on a peer that already exited, seen once
  in a clean-clone run) is killed after ``teardown`` seconds: the test reads
  only the written results. A rank without results by ``timeout`` fails it.
  """
  ctx = mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), freeze, pro),
                 nprocs=world, join=False)
  done = lambda: all((tmp_path / f"rank{r}.pt").exists() for r in range(world))
  deadline, written = time.time() + timeout, None
  while not ctx.join(timeout=2):
    if written is None and done():
      written = time.time()
    if (written is not None and time.time() > written + teardown) or time.time() > deadline:
      for p in ctx.processes:
        if p.is_alive():
          p.kill()
      if written is None:
        pytest.fail(f"DDP workers did not finish in {timeout} s")
      return


@pytest.mark.slow
@pytest.mark.parametrize("freeze,pro", [(False, None), (True, None), (False, "find-unused"),
                                        (False, "all-used")],
                         ids=["train", "freeze", "pro-find-unused-no-sync", "pro-all-used"])
def test_ddp_ranks_agree_and_match_a_single_process(tmp_path, freeze, pro):
  _spawn(2, tmp_path, freeze, pro)
  r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
  r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
  torch.manual_seed(0)
  model = Toy(layers=3)
  opt = losia_torch.get_losia_optimizer(model, FREEZE if freeze else CFG, lr=1e-2,
                                        weight_decay=0.01, verbose=False)
  _train(model, opt, _batches())
  if freeze:
    assert "then wrap the model in DistributedDataParallel" in r0["wrong_order"]
    ddp_module = r0["wrong_order"].split("\nddp.module: ")[1]
    assert "already wrapped" in ddp_module, ddp_module
  assert r0["step"] == r1["step"] == opt.losia_step == STEPS
  if pro:
    assert "per-layer stepping does not work with LoSiA-Pro" in r0["refused"]
    assert "pass the DistributedDataParallel module" in r0["pro_inner"], r0["pro_inner"]
    # 12 Pro targets, each outside its layer's profiling window in 3 of every 4 periods
    assert r0["compact"] >= 12 * STEPS // 2, r0["compact"]
  else:
    assert "does not work with data parallelism" in r0["refused"]
    assert r0["compact"] == 0
  for name, (rows, cols) in r0["indices"].items():
    assert torch.equal(rows, r1["indices"][name][0]) and torch.equal(cols, r1["indices"][name][1])
    assert rows.tolist() == opt.subnet(name)[0].tolist(), name
    assert cols.tolist() == opt.subnet(name)[1].tolist(), name
  assert any(opt.state[t.param]["last_relocalization"] >= 0 for t in opt.plan.targets)
  for n, p in model.named_parameters():
    assert torch.equal(r0["params"][n], r1["params"][n]), n
    torch.testing.assert_close(r0["params"][n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
