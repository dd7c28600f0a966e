"""losia_torch against the shared spec-literal oracle (tests/common/oracle.py) and,
when JAX is installed, against losia_jax on the same weights and gradients."""

import numpy as np
import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig
from tests.common.oracle import OracleLoSiA
from tests.parity_fixtures import nest
from tests.torch.torch_helpers import Toy, random_grads, set_grads

T = 2


def _oracle(model, opt, cfg, lr, wd):
  targets = {t.name: (None if t.row_mode else t.parsed.layer_index, t.role,
                      t.param.detach().numpy().copy()) for t in opt.plan.targets}
  nts = {n: p.detach().numpy().copy() for n, p in opt.plan.non_targets}
  return OracleLoSiA(cfg, targets, nts, lr, weight_decay=wd, b1=0.9, b2=0.999, eps=1e-8)


CASES = {
    "async": (dict(), 0.0, 0.05),
    "sync": (dict(schedule="sync"), 0.01, 0.05),
    "output_norewarm": (dict(output_rank_factor=0.25, rewarm=False), 0.0, 0.05),
    "tied_lr_schedule": (dict(output_rank_factor=0.5), 0.1, lambda s: 0.05 / (1 + s)),
    "freeze_param_second": (dict(non_target="freeze", importance="param_second", scale=0.5),
                            0.1, 0.05),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_shared_oracle(case):
  kw, wd, lr = CASES[case]
  cfg = LoSiAConfig(rank_factor=0.34, period=T, **kw)
  torch.manual_seed(0)
  model = Toy(layers=3, tied=case.startswith("tied"))
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=lr(0) if callable(lr) else lr, weight_decay=wd)
  if callable(lr):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr(s) / lr(0))
  oracle = _oracle(model, opt, cfg, lr, wd)
  rng = np.random.default_rng(1)
  for k in range(2 * T * oracle.total + 1):
    grads = random_grads(model, rng)
    set_grads(model, grads)
    oracle.step({n: grads[n] for n in oracle.targets},
                {n: grads[n] for n in oracle.non_targets})
    opt.step()
    if callable(lr):
      sched.step()
    for t in opt.plan.targets:
      ot = oracle.targets[t.name]
      rows, cols = opt.subnet(t.name)
      np.testing.assert_array_equal(rows.numpy(), ot.rows, err_msg=f"{t.name} step {k}")
      np.testing.assert_array_equal(cols.numpy(), ot.cols, err_msg=f"{t.name} step {k}")
      np.testing.assert_allclose(t.param.detach().numpy(), ot.w, rtol=2e-5, atol=1e-5,
                                 err_msg=f"{t.name} step {k}")
    for n, p in opt.plan.non_targets:
      np.testing.assert_allclose(p.detach().numpy(), oracle.non_targets[n], rtol=2e-5,
                                 atol=1e-5, err_msg=f"{n} step {k}")
  assert sum(e == "relocalize" for _, e, _ in oracle.log) >= 2 * len(oracle.targets)


@pytest.mark.slow
@pytest.mark.parametrize("clip", [None, 0.5], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("kw", [dict(), dict(schedule="sync", output_rank_factor=0.25)],
                         ids=["async", "sync_output"])
def test_parity_with_losia_jax(kw, clip):
  """Same indices and weights at every step; with a clip, both clip by the norm of the
  gradient values the step reads (torch ``opt.clip_grad_norm_``, JAX ``clip_norm``)."""
  jax = pytest.importorskip("jax")
  jnp = pytest.importorskip("jax.numpy")
  losia_jax = pytest.importorskip("losia_jax")
  cfg = LoSiAConfig(rank_factor=0.34, period=T, **kw)
  torch.manual_seed(0)
  model = Toy(layers=3)
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=0.02, weight_decay=0.01)
  params = nest({n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters()})
  tx = losia_jax.losia(0.02, cfg, weight_decay=0.01, output_module="lm_head", clip_norm=clip)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  from tests.jax.helpers import indices_of
  jplan = tx.plan(params)
  # initial subnets agree (both draw them from losia_common)
  jidx = indices_of(state, jplan)
  for t in opt.plan.targets:
    rows, cols = opt.subnet(t.name)
    np.testing.assert_array_equal(rows.numpy(), jidx[t.name][0], err_msg=f"initial rows {t.name}")
    np.testing.assert_array_equal(cols.numpy(), jidx[t.name][1], err_msg=f"initial cols {t.name}")
  rng = np.random.default_rng(3)
  clipped = 0
  for k in range(3 * T * opt.plan.total):
    grads = random_grads(model, rng)
    set_grads(model, grads)
    if clip is not None:
      clipped += int(opt.clip_grad_norm_(clip) > clip)
    opt.step()
    params, state = step(params, state,
                         nest({n: jnp.asarray(g, jnp.float32) for n, g in grads.items()}))
    flat = {".".join(str(getattr(x, "key", getattr(x, "idx", x))) for x in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for n, p in model.named_parameters():
      np.testing.assert_allclose(p.detach().numpy(), flat[n], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{n} step {k}")
    jidx = indices_of(state, jplan)  # identical indices at every step
    for t in opt.plan.targets:
      rows, cols = opt.subnet(t.name)
      np.testing.assert_array_equal(rows.numpy(), jidx[t.name][0], err_msg=f"rows {t.name} step {k}")
      np.testing.assert_array_equal(cols.numpy(), jidx[t.name][1], err_msg=f"cols {t.name} step {k}")
  assert clip is None or clipped == 3 * T * opt.plan.total  # the clip was active throughout
