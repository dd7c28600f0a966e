"""The torch LoSiA optimizer against hand-checked values and a plain reference."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig, LoSiAConfigError
from losia_common.subnet import initial_indices
from tests.torch.torch_helpers import Toy, random_grads, set_grads, toy_ref_targets, weights_np
from tests.torch.torch_reference import ReferenceLoSiA


# --- a hand-checked trajectory ---------------------------------------------------------


def _two_layer_problem():
  w0 = torch.nn.Parameter(torch.ones(4, 4))
  w1 = torch.nn.Parameter(torch.ones(4, 4))
  named = [("layers.0.proj.weight", w0), ("layers.1.proj.weight", w1)]
  c0 = torch.full((4, 4), 0.01)
  c0[[1, 1, 3, 3], [0, 2, 0, 2]] = 0.1  # the important block of layer 0: rows {1,3} cols {0,2}
  c1 = torch.full((4, 4), 0.01)
  c1[[0, 0, 2, 2], [1, 3, 1, 3]] = 0.1  # layer 1: rows {0,2} cols {1,3}
  return named, w0, w1, c0, c1


def test_hand_checked_trajectory_through_relocalizations():
  named, w0, w1, c0, c1 = _two_layer_problem()
  cfg = LoSiAConfig(rank_factor=0.5, period=2, target_modules=("proj",))
  lr = 0.1
  opt = losia_torch.LoSiAOptimizer(named, cfg, lr=lr)
  assert opt.plan.total == 2 and [t.layer_id for t in opt.plan.targets] == [0, 1]
  init = {}
  for i, name in enumerate(["layers.0.proj.weight", "layers.1.proj.weight"]):
    rows, cols = opt.subnet(name)
    r = initial_indices(0, f"layer{i}.proj", 4, 2, "rows")
    c = initial_indices(0, f"layer{i}.proj", 4, 2, "cols")
    assert rows.tolist() == r.tolist() and cols.tolist() == c.tolist()
    assert rows.dtype == torch.int64
    init[i] = (r.tolist(), c.tolist())

  # Written out by hand from the spec (T = 2, two layers, async):
  profiling = [0, 0, 1, 1, 0, 0]            # owner(s) = (s // 2) % 2
  assert [[t.layer_id for t in opt.plan.targets if opt.profiles(t, s)] for s in range(6)] == \
      [[x] for x in profiling]
  rewarm = {0: [1, 1, 0, 0.5, 1, 1],        # layer 0 relocalizes at the end of s = 1 and 5
            1: [1, 1, 1, 1, 0, 0.5]}        # layer 1 at the end of s = 3
  adam_t = {0: [1, 2, 1, 2, 3, 4], 1: [1, 2, 3, 4, 1, 2]}  # restarts after relocalizing
  block = {0: [init[0]] * 2 + [([1, 3], [0, 2])] * 4,
           1: [init[1]] * 4 + [([0, 2], [1, 3])] * 2}
  expected = {0: torch.ones(4, 4, dtype=torch.float64), 1: torch.ones(4, 4, dtype=torch.float64)}
  cs = {0: c0.double(), 1: c1.double()}
  for s in range(6):
    w0.grad, w1.grad = c0.clone(), c1.clone()
    before = {0: w0.detach().clone(), 1: w1.detach().clone()}
    opt.step()
    assert opt.losia_step == s + 1
    for i, w in ((0, w0), (1, w1)):
      rows, cols = block[i][s]
      # Constant gradient g: m_t = g (1 - b1^t), v_t = g^2 (1 - b2^t); the bias
      # corrections are 1 - b^t in fp32 (as optax computes them), t the target's own count.
      t = adam_t[i][s]
      bc1 = float(np.float32(1) - np.float32(0.9) ** np.float32(t))
      bc2 = float(np.float32(1) - np.float32(0.999) ** np.float32(t))
      for r in rows:
        for c in cols:
          g = cs[i][r, c]
          u = (g * (1 - 0.9 ** t) / bc1) / (g * np.sqrt((1 - 0.999 ** t) / bc2) + 1e-8)
          expected[i][r, c] -= lr * rewarm[i][s] * u
      torch.testing.assert_close(w.detach().double(), expected[i], rtol=0, atol=3e-7)
      if rewarm[i][s] == 0:
        assert torch.equal(w.detach(), before[i]), "rewarm must be exactly 0 after relocalizing"
    if s == 0:
      # Ibar, Ubar of layer 0 after one profiling step (W was all ones): analytic.
      slot = opt.importance["proj"]
      i0 = torch.abs(c0 - 0.5 * c0 * c0)
      torch.testing.assert_close(slot.ibar, 0.15 * i0)
      torch.testing.assert_close(slot.ubar, 0.15 * torch.abs(i0 - 0.15 * i0))
    # Exactly one role slot exists while a layer profiles; none after it relocalized.
    assert list(opt.importance) == ([] if s % 2 == 1 else ["proj"])
    for i in (0, 1):
      name = f"layers.{i}.proj.weight"
      st = opt.state[opt.target(name).param]
      nxt = block[i][s + 1] if s + 1 < 6 else None
      relocalized = (i == 0 and s in (1, 5)) or (i == 1 and s == 3)
      if relocalized:
        assert st["step"] == 0 and st["last_relocalization"] == s
        assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
      if nxt is not None:
        assert opt.subnet(name)[0].tolist() == nxt[0]
        assert opt.subnet(name)[1].tolist() == nxt[1]
  # Fresh Adam state after the relocalization at the end of s = 1: at s = 2 layer 0
  # had its first step (t = 1) with rewarm 0; at s = 3 its second.
  st0 = opt.state[w0]
  assert st0["last_relocalization"] == 5 and st0["step"] == 0
  st1 = opt.state[w1]
  assert st1["last_relocalization"] == 3 and st1["step"] == 2
  g = c1[[0, 0, 2, 2], [1, 3, 1, 3]].reshape(2, 2)
  torch.testing.assert_close(st1["exp_avg"], (1 - 0.9 ** 2) * g)


def test_profiling_schedule_sync_and_async():
  named, w0, w1, c0, c1 = _two_layer_problem()
  for schedule, expect in (("async", [[0], [0], [1], [1], [0]]),
                           ("sync", [[0, 1], [0, 1], [], [], [0, 1]])):
    cfg = LoSiAConfig(rank_factor=0.5, period=2, target_modules=("proj",), schedule=schedule)
    opt = losia_torch.LoSiAOptimizer(named, cfg, lr=0.0)
    for s in range(5):
      assert [t.layer_id for t in opt.plan.targets if opt.profiles(t)] == expect[s]
      w0.grad, w1.grad = c0.clone(), c1.clone()
      opt.step()
      if schedule == "sync" and s == 0:
        assert sorted(opt.importance) == ["layers.0.proj.weight", "layers.1.proj.weight"]


def test_only_the_block_changes_each_step():
  torch.manual_seed(0)
  model = Toy(layers=2)
  cfg = LoSiAConfig(rank_factor=0.25, period=2, non_target="freeze", output_rank_factor=0.25)
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2, weight_decay=0.1)
  rng = np.random.default_rng(0)
  for _ in range(10):
    set_grads(model, random_grads(model, rng))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = {t.name: (opt.state[t.param]["rows"].clone(), opt.state[t.param]["cols"].clone(),
                       t.row_mode) for t in opt.plan.targets}
    opt.step()
    for n, p in model.named_parameters():
      changed = (p.detach() != before[n])
      if n not in blocks:
        assert not changed.any(), f"frozen non-target {n} changed"
        continue
      rows, cols, row_mode = blocks[n]
      mask = torch.zeros_like(changed)
      if row_mode:
        mask[rows] = True
      else:
        mask[rows[:, None], cols[None, :]] = True
      assert not (changed & ~mask).any(), f"{n} changed outside its block"


# --- equivalence with the plain reference --------------------------------------------

CASES = {
    "async": dict(),
    "sync": dict(schedule="sync"),
    "output_rows": dict(output_rank_factor=0.25),
    "param_first_scale": dict(importance="param_first", scale=2.0),
    "param_second_norewarm": dict(importance="param_second", rewarm=False),
    "freeze_betas": dict(non_target="freeze", importance_beta1=0.5, importance_beta2=0.7),
    "sync_output_seed": dict(schedule="sync", output_rank_factor=0.5, seed=7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_plain_reference(case):
  torch.manual_seed(1)
  tied = case == "sync_output_seed"
  model = Toy(layers=3, d=12, ff=20, vocab=16, tied=tied)
  cfg = LoSiAConfig(rank_factor=0.34, period=2, **CASES[case])
  wd = 0.05 if case in ("async", "output_rows") else 0.0
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
                                   weight_decay=wd)
  targets, total = toy_ref_targets(model, cfg)
  assert sorted(t.name for t in opt.plan.targets) == sorted(targets)
  assert opt.plan.total == total
  ref = ReferenceLoSiA(weights_np(model), targets, cfg, total, lr=1e-2, b1=0.8, b2=0.95,
                       eps=1e-6, wd=wd)
  rng = np.random.default_rng(2)
  steps = 2 * cfg.period * total + 3  # every layer relocalizes at least twice
  for _ in range(steps):
    grads = random_grads(model, rng)
    set_grads(model, grads)
    opt.step()
    ref.step(grads)
    for n, p in model.named_parameters():
      np.testing.assert_allclose(p.detach().double().numpy(), ref.W[n], rtol=2e-5, atol=2e-6,
                                 err_msg=f"{case}: {n} at step {ref.s}")
    for n in targets:
      rows, cols = opt.subnet(n)
      assert rows.tolist() == ref.rows[n].tolist(), (case, n, ref.s)
      assert cols.tolist() == ref.cols[n].tolist(), (case, n, ref.s)
  n_reloc = sum(len(h["relocalized"]) for h in ref.history)
  assert n_reloc >= 2 * len(targets)


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_large_non_target_path_matches_reference(monkeypatch, chunk):
  # Large non-targets (the embedding) take a chunked in-place Adam path; force it here.
  import losia_torch.adam
  import losia_torch.update
  monkeypatch.setattr(losia_torch.update, "BIG", 16)
  monkeypatch.setattr(losia_torch.adam, "_CHUNK", chunk)
  torch.manual_seed(8)
  model = Toy(layers=2)
  cfg = LoSiAConfig(rank_factor=0.34, period=2)
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2, weight_decay=0.1)
  targets, total = toy_ref_targets(model, cfg)
  ref = ReferenceLoSiA(weights_np(model), targets, cfg, total, lr=1e-2, wd=0.1)
  rng = np.random.default_rng(4)
  for _ in range(6):
    grads = random_grads(model, rng)
    set_grads(model, grads)
    opt.step()
    ref.step(grads)
  for n, p in model.named_parameters():
    np.testing.assert_allclose(p.detach().double().numpy(), ref.W[n], rtol=2e-5, atol=2e-6,
                               err_msg=n)


def test_lr_scheduler_and_clipping_in_an_ordinary_loop():
  torch.manual_seed(3)
  model = Toy(layers=2)
  cfg = LoSiAConfig(rank_factor=0.34, period=2)
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=2e-2)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
  targets, total = toy_ref_targets(model, cfg)
  ref = ReferenceLoSiA(weights_np(model), targets, cfg, total, lr=2e-2)
  ids = torch.randint(0, 16, (4, 6))
  losses = []
  for s in range(13):
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    grads = {n: p.grad.double().numpy().copy() for n, p in model.named_parameters()}
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-2 / (1 + s))
    ref.step(grads, lr=opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
    opt.zero_grad()
    losses.append(loss.item())
    for n, p in model.named_parameters():
      np.testing.assert_allclose(p.detach().double().numpy(), ref.W[n], rtol=2e-5, atol=2e-6)
  assert losses[-1] < losses[0]


def test_gradient_accumulation_equals_the_combined_batch():
  torch.manual_seed(4)
  a, b = Toy(layers=2), Toy(layers=2)
  b.load_state_dict(a.state_dict())
  cfg = LoSiAConfig(rank_factor=0.34, period=2)
  oa = losia_torch.LoSiAOptimizer(a, cfg, lr=1e-2)
  ob = losia_torch.LoSiAOptimizer(b, cfg, lr=1e-2)
  for s in range(10):
    ids = torch.randint(0, 16, (4, 6), generator=torch.Generator().manual_seed(s))
    a.loss(ids[:, :-1], ids[:, 1:], reduction="sum").backward()
    for half in (ids[:2], ids[2:]):  # two micro-batches
      b.loss(half[:, :-1], half[:, 1:], reduction="sum").backward()
    oa.step(); ob.step(); oa.zero_grad(); ob.zero_grad()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
      torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
  for t in oa.plan.targets:
    assert torch.equal(oa.state[t.param]["rows"], ob.state[ob.target(t.name).param]["rows"])


def test_step_without_gradients_is_a_no_op():
  model = Toy(layers=1)
  opt = losia_torch.LoSiAOptimizer(model, LoSiAConfig(period=1))
  before = {n: p.detach().clone() for n, p in model.named_parameters()}
  opt.step()
  assert opt.losia_step == 0 and opt.num_skipped_steps == 0
  assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_closure_and_param_group_lr():
  torch.manual_seed(5)
  model = Toy(layers=1)
  named = list(model.named_parameters())
  groups = [{"params": [x for x in named if "layers" in x[0]], "lr": 1e-2},
            {"params": [x for x in named if "layers" not in x[0]], "lr": 0.0}]
  opt = losia_torch.LoSiAOptimizer(groups, LoSiAConfig(period=3))
  ids = torch.randint(0, 16, (2, 5))
  before = {n: p.detach().clone() for n, p in named}

  def closure():
    opt.zero_grad()
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss

  loss = opt.step(closure)
  assert loss is not None and opt.losia_step == 1
  for n, p in named:
    if "layers" not in n:
      assert torch.equal(p, before[n]), n  # lr 0 group
  assert not torch.equal(model.layers[0].self_attn.q_proj.weight, before["layers.0.self_attn.q_proj.weight"])


# --- non-finite gradients ------------------------------------------------------------


def _snapshot(opt, model):
  params = {n: p.detach().clone() for n, p in model.named_parameters()}
  state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
           for p, st in opt.state.items()}
  imp = {k: (s.ibar.clone(), s.ubar.clone()) for k, s in opt.importance.items()}
  return params, state, imp


def _assert_same(snap, opt, model):
  params, state, imp = snap
  for n, p in model.named_parameters():
    assert torch.equal(p, params[n]), n
  for p, st in opt.state.items():
    for k, v in st.items():
      old = state[id(p)][k]
      assert torch.equal(v, old) if isinstance(v, torch.Tensor) else v == old
  assert sorted(imp) == sorted(opt.importance)
  for k, (i, u) in imp.items():
    assert torch.equal(opt.importance[k].ibar, i) and torch.equal(opt.importance[k].ubar, u)


@pytest.mark.parametrize("where", ["target_block", "profiling_outside_block", "non_target_inf"])
def test_nonfinite_gradient_skips_the_step(where, caplog):
  torch.manual_seed(6)
  model = Toy(layers=2)
  cfg = LoSiAConfig(rank_factor=0.34, period=2)
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2)
  targets, total = toy_ref_targets(model, cfg)
  ref = ReferenceLoSiA(weights_np(model), targets, cfg, total, lr=1e-2)
  rng = np.random.default_rng(0)
  for _ in range(3):  # some state first
    g = random_grads(model, rng)
    set_grads(model, g); opt.step(); ref.step(g)
  assert opt.losia_step == 3  # layer 1 (id 1) profiles at s = 3
  g = random_grads(model, rng)
  if where == "target_block":
    name = "layers.0.mlp.up_proj.weight"
    rows, cols = opt.subnet(name)
    g[name][rows[1].item(), cols[0].item()] = np.nan
  elif where == "profiling_outside_block":
    name = "layers.1.self_attn.q_proj.weight"
    rows, cols = opt.subnet(name)
    r = [i for i in range(12) if i not in rows.tolist()][0]
    g[name][r, 0] = np.nan
  else:
    g["final_norm.weight"][3] = np.inf
  snap = _snapshot(opt, model)
  set_grads(model, g)
  with caplog.at_level(logging.WARNING, logger="losia_torch"):
    opt.step()
  ref.step(g)
  assert ref.skipped == 1
  assert opt.num_skipped_steps == 1 and opt.notfinite_count == 1 and opt.losia_step == 3
  assert "NaN or infinite" in caplog.text
  _assert_same(snap, opt, model)
  # A finite step afterwards continues exactly like the reference.
  g = random_grads(model, rng)
  set_grads(model, g); opt.step(); ref.step(g)
  for n, p in model.named_parameters():
    np.testing.assert_allclose(p.detach().double().numpy(), ref.W[n], rtol=2e-5, atol=2e-6)


def test_nonfinite_outside_what_the_step_reads_is_not_skipped():
  torch.manual_seed(7)
  model = Toy(layers=2)
  opt = losia_torch.LoSiAOptimizer(model, LoSiAConfig(rank_factor=0.34, period=2,
                                                      non_target="freeze"), lr=1e-2)
  rng = np.random.default_rng(1)
  g = random_grads(model, rng)
  name = "layers.1.mlp.up_proj.weight"  # layer 1 does not profile at s = 0
  rows, _ = opt.subnet(name)
  r = [i for i in range(20) if i not in rows.tolist()][0]
  g[name][r, :] = np.nan
  g["final_norm.bias"][:] = np.nan  # frozen non-target: not read
  set_grads(model, g)
  opt.step()
  assert opt.num_skipped_steps == 0 and opt.losia_step == 1
  assert all(torch.isfinite(p).all() for p in model.parameters())


# --- bad input ------------------------------------------------------------------------


def test_bad_hyperparameters_name_the_field():
  model = Toy(layers=1)
  for kw, field in ((dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"),
                    (dict(eps=float("nan")), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
                    (dict(output_module=""), "output_module")):
    with pytest.raises(ValueError, match=field):
      losia_torch.LoSiAOptimizer(model, LoSiAConfig(), **kw)
  with pytest.raises(TypeError, match="LoSiAConfig"):
    losia_torch.LoSiAOptimizer(model, {"rank_factor": 0.1})
  with pytest.raises(LoSiAConfigError, match="rank_factor"):
    losia_torch.LoSiAConfig(rank_factor=1.5)
  with pytest.raises(LoSiAConfigError, match="period"):
    losia_torch.LoSiAConfig(period=0)


def test_config_is_reexported():
  assert losia_torch.LoSiAConfig is LoSiAConfig


def test_clip_grad_norm_scales_what_the_step_reads_to_the_max_norm():
  """An active clip really scales: afterwards the norm LoSiA reads is max_norm, every
  gradient entry shrank by the same factor, and the step equals an unclipped step on
  gradients pre-scaled by max_norm / (norm + 1e-6) (torch's clip factor)."""
  torch.manual_seed(5)
  model, twin = Toy(layers=2), Toy(layers=2)
  twin.load_state_dict(model.state_dict())
  cfg = LoSiAConfig(rank_factor=0.34, period=2)
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=1e-2)
  ref = losia_torch.LoSiAOptimizer(twin, cfg, lr=1e-2)
  rng = np.random.default_rng(6)
  for _ in range(5):
    grads = random_grads(model, rng)
    set_grads(model, grads)
    norm = float(opt.grad_norm())
    assert norm > 0.5
    assert float(opt.clip_grad_norm_(0.5)) == pytest.approx(norm)
    assert float(opt.grad_norm()) == pytest.approx(0.5, rel=1e-5)
    factor = 0.5 / (norm + 1e-6)
    set_grads(twin, {n: g * factor for n, g in grads.items()})
    opt.step()
    ref.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
      torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)
