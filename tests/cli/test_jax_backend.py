"""Tests of ``losia_cli.jax_backend``, and of the two CLI backends against each other.

A tiny LLaMA built from a config and saved with ``save_pretrained``; nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import torch
import transformers

from losia_cli import checkpoints as ck
from losia_cli import jax_optim
from losia_cli import main as main_mod
from losia_cli import report as R
from losia_cli.backend import ModelSource
from losia_cli.jax_backend import JaxBackend
from losia_jax.models import masked_nll
from tests.cli.test_torch_backend import (LOSIA, METHODS, make_batch, settings,
                                          tiny_config)
from tests.cli.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> ModelSource:
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(tiny_config()).eval()
  path = str(tmp_path_factory.mktemp("tiny_jax"))
  model.save_pretrained(path)
  return ModelSource("hf", path, "tiny")


def leaves(backend: JaxBackend):
  return [np.asarray(x) for x in jax.tree.leaves(backend._trainable_tree())]


def straight_and_resumed(source, s, directory):
  """8 steps straight, and 4 steps saved, restored into a fresh backend and run to 8:
  ``(losses of the straight run, the run saved at 4, the resumed run, its losses 5-8)``."""
  straight = JaxBackend(source, s)
  first = [straight.train_step(make_batch(k % 2))["loss"] for k in range(8)]
  part = JaxBackend(source, s)
  for k in range(4):
    part.train_step(make_batch(k % 2))
  part.save_checkpoint(directory)
  resumed = JaxBackend(source, s)
  resumed.restore_checkpoint(directory)
  assert resumed.step == 4
  second = [resumed.train_step(make_batch(k % 2))["loss"] for k in range(4, 8)]
  return straight, first, part, resumed, second


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_resumes_exactly(source, tmp_path, method):
  straight, first, _, resumed, second = straight_and_resumed(source, settings(method),
                                                             str(tmp_path / "ck"))
  assert first[-1] < first[0] - 0.1, first
  assert second == first[4:]
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  if method.startswith("losia"):
    sa, sb = straight.subnets(), resumed.subnets()
    assert sa.keys() == sb.keys()
    for k in sa:
      np.testing.assert_array_equal(sa[k][0], sb[k][0])


def test_restore_refuses_another_method(source, tmp_path):
  b = JaxBackend(source, settings("losia"))
  b.save_checkpoint(str(tmp_path / "ck"))
  with pytest.raises(ValueError, match="method 'losia'"):
    JaxBackend(source, settings("full")).restore_checkpoint(str(tmp_path / "ck"))


@pytest.mark.parametrize("clip", [0.0, 0.1], ids=["unclipped", "clipped"])
def test_pro_follows_losia_through_two_rounds(source, clip):
  """LoSiA-Pro == LoSiA on the real model: losses, subnets and weights, also with an
  active clip (both clip by the norm of the gradient values LoSiA reads)."""
  s_plain = settings("losia", max_grad_norm=clip)
  s_pro = settings("losia-pro", max_grad_norm=clip)
  a, b = JaxBackend(source, s_plain), JaxBackend(source, s_pro)
  period, slots = LOSIA.period, 3  # two layers and the output layer
  for k in range(2 * period * slots + 1):
    la, lb = a.train_step(make_batch(k))["loss"], b.train_step(make_batch(k))["loss"]
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    sa, sb = a.subnets(), b.subnets()
    for key in sa:
      np.testing.assert_array_equal(sa[key][0], sb[key][0])
      np.testing.assert_array_equal(sa[key][1], sb[key][1])
  moved = [k for k in sa if (sa[k][0] != JaxBackend(source, s_plain).subnets()[k][0]).any()]
  assert len(moved) >= 10, moved
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["losia-pro", "lora"])
def test_export_reloads_in_transformers_with_the_same_logits(source, tmp_path, method):
  b = JaxBackend(source, settings(method))
  for k in range(5):
    b.train_step(make_batch(k))
  b.export_hf(str(tmp_path / "model"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
  ids = make_batch(99).input_ids
  ours = np.asarray(b._merge(b._export_params())(jnp.asarray(ids)))
  with torch.no_grad():
    theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  assert np.abs(ours - np.asarray(JaxBackend(source, settings(method))._merge(
      JaxBackend(source, settings(method))._export_params())(jnp.asarray(ids)))).max() > 1e-4


@pytest.mark.parametrize("clip", [0.0, 0.1], ids=["unclipped", "clipped"])
def test_backends_agree_step_by_step(source, clip):
  """The JAX and torch backends run the same LoSiA trajectory from the same checkpoint,
  also with an active clip (one rule: the norm of the gradient values LoSiA reads)."""
  from losia_cli.torch_backend import TorchBackend
  s = settings("losia", max_grad_norm=clip)
  j, t = JaxBackend(source, s), TorchBackend(source, s, device="cpu")
  for k in range(2 * LOSIA.period * 3):
    lj, lt = j.train_step(make_batch(k)), t.train_step(make_batch(k))
    np.testing.assert_allclose(lj["loss"], lt["loss"], rtol=2e-5)
    if clip:
      assert lt["grad_norm"] > clip  # the clip is active
    assert lj["lr"] == pytest.approx(lt["lr"], rel=1e-6)
    sj, st = j.subnets(), t.subnets()
    assert sj.keys() == st.keys()
    for key in sj:
      np.testing.assert_array_equal(sj[key][0], st[key][0])
      np.testing.assert_array_equal(sj[key][1], st[key][1])


def test_generate_matches_a_manual_greedy_loop(source):
  b = JaxBackend(source, settings("full"))
  model = b._merge(b.params)
  width = 16  # one jitted full forward over right-padded ids: causal, so padding is inert
  forward = jax.jit(lambda ids: model(ids))
  prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16]]
  got = b.generate(prompts, 5, None)
  for p, g in zip(prompts, got):
    ids = list(p)
    for _ in range(5):
      padded = jnp.asarray([ids + [0] * (width - len(ids))])
      ids.append(int(jnp.argmax(forward(padded)[0, len(ids) - 1])))
    assert g == ids[len(p):]


def test_bad_targets_are_refused(source):
  bad = dataclasses.replace(LOSIA, target_modules=("nope",))
  for method in ("losia", "lora"):
    with pytest.raises(ValueError, match="target_modules"):
      JaxBackend(source, settings(method, losia=bad))


def test_masked_nll_by_hand():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  ids = rng.integers(0, 7, (2, 5))
  mask = np.array([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]], np.float32)
  want, n = 0.0, 0
  for b in range(2):
    for t in range(4):
      if mask[b, t]:
        z = logits[b, t].astype(np.float64)
        want += np.log(np.exp(z).sum()) - z[ids[b, t + 1]]
        n += 1
  got = float(masked_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask)))
  assert got == pytest.approx(want / n, rel=1e-6)


# --- GaLore (method galore: losia_cli.jax_optim) -------------------------------------------

GALORE_ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def galore_settings(**kw):
  # losia=None: what the driver passes to every method but LoSiA's
  return settings("galore", losia=None, **kw)


def by_name(tree) -> dict[str, np.ndarray]:
  return {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_galore_projects_the_targets_only_and_trains_every_weight(source):
  b = JaxBackend(source, galore_settings())
  start = by_name(b.params)
  st = jax_optim.find_state(b.opt_state)
  assert len(st.projector) == 2 * len(GALORE_ROLES)
  moments = by_name(st.base_optimizer_state.mu)
  assert moments.keys() == start.keys()
  for name, p in start.items():
    if any(name.endswith(f"{role}.kernel") for role in GALORE_ROLES):
      d_in, d_out = p.shape
      r = min(16, d_in, d_out)
      # std: the smaller side is projected, Adam keeps the larger (input side on a tie)
      want = (r, d_out) if d_in <= d_out else (d_in, r)
      assert moments[name].shape == want, (name, p.shape, moments[name].shape)
    else:  # embedding (tied output) and norms: plain Adam on the full gradient
      assert moments[name].shape == p.shape, name
  assert b.trainable_params() == sum(x.size for x in start.values())
  text = b.describe()
  for words in ("method: galore", "rank 16", "every 200 steps", "scale 2", "14 projected",
                "projectors", "low-rank Adam moments", "full Adam moments"):
    assert words in text, text
  losses = [b.train_step(make_batch(k % 2))["loss"] for k in range(8)]
  assert losses[-1] < losses[0] - 0.1, losses
  for name, x in by_name(b.params).items():
    assert np.abs(x - start[name]).max() > 0, name  # targets and non-targets alike


def test_galore_resumes_exactly_across_a_projector_refresh(source, tmp_path):
  s = galore_settings(galore_update_gap=3)  # SVD at steps 0, 3, 6: the resume at 4 is between
  straight, first, _, resumed, second = straight_and_resumed(source, s, str(tmp_path / "ck"))
  assert second == first[4:]  # steps 5 and 6 use the projector restored from step 3's SVD
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(straight.opt_state), jax.tree.leaves(resumed.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_galore_skips_a_non_finite_step_before_its_first_svd(source):
  b = JaxBackend(source, galore_settings())
  good = np.asarray(b.params["model"]["norm"]["scale"])
  b.params["model"]["norm"]["scale"] = jnp.asarray(good).at[0].set(jnp.nan)
  before = by_name(b.params)
  out = b.train_step(make_batch(0))
  assert out["skipped"] == 1.0 and not np.isfinite(out["loss"])
  for name, x in by_name(b.params).items():  # nothing moved (NaN stays NaN)
    np.testing.assert_array_equal(np.nan_to_num(x, nan=7.0), np.nan_to_num(before[name], nan=7.0))
  st = jax_optim.find_state(b.opt_state)
  assert int(st.count) == 0 and not any(np.asarray(p).any() for p in st.projector)
  b.params["model"]["norm"]["scale"] = jnp.asarray(good)
  assert "skipped" not in b.train_step(make_batch(0))  # the SVD runs on this finite step
  st = jax_optim.find_state(b.opt_state)
  assert int(st.count) == 1 and all(np.isfinite(np.asarray(p)).all() for p in st.projector)
  assert b.step == 2


def test_galore_accumulates_like_one_batch(source):
  """2 micro-batches == one batch through a projector refresh. At rank 4: on the tiny
  model rank 16 is half of some matrices, where the 16th and 17th singular values can
  nearly tie, and a truncated SVD then turns the summed gradients' rounding into another
  subspace (1e-5 after one step): GaLore's own sensitivity, not the accumulation's."""
  kw = dict(galore_rank=4, galore_update_gap=2)
  a, b = JaxBackend(source, galore_settings(**kw)), JaxBackend(source, galore_settings(
      grad_accum=2, **kw))
  for k in range(4):
    la, lb = a.train_step(make_batch(k))["loss"], b.train_step(make_batch(k))["loss"]
    np.testing.assert_allclose(lb, la, rtol=1e-5)
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_allclose(y, x, atol=1e-5)


def _galore_tree(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()}


def _galore_updates(tx, params, steps):
  state, out = tx.init(params), []
  for k in range(steps):
    g = _galore_tree({n: x.shape for n, x in params.items()}, seed=100 + k)
    u, state = jax.jit(tx.update)(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out


def test_galore_reverse_std_is_optax_contrib_galore_and_std_agrees_on_square():
  """The module's GaLore is optax.contrib's: with optax's side rule (reverse_std) on any
  shapes, and with std on square matrices (where the two rules coincide), through
  several projector refreshes, with weight decay and the scale."""
  DN = optax.contrib.GaLoreDimensionNumbers
  shapes = {"square": (6, 6), "tall": (8, 3), "wide": (3, 8), "bias": (5,), "table": (7, 4)}
  dims = {"square": DN(), "tall": DN(), "wide": DN(), "bias": None, "table": None}
  kw = dict(rank=2, update_proj_gap=2, scale=2.0, weight_decay=0.1)
  for proj_type, keep in (("reverse_std", shapes), ("std", {"square": (6, 6), "bias": (5,)})):
    params = _galore_tree(keep)
    d = {k: dims[k] for k in keep}
    ours = _galore_updates(jax_optim.galore(1e-2, weight_dimension_numbers=d,
                                            proj_type=proj_type, **kw), params, 5)
    theirs = _galore_updates(optax.contrib.galore(1e-2, weight_dimension_numbers=d, **kw),
                             params, 5)
    for a, b in zip(ours, theirs):
      for k in keep:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6, atol=1e-8,
                                   err_msg=f"{proj_type} {k}")


def test_galore_std_side_is_galore_torchs():
  """First update of each shape against galore-torch's std projector, written out on the
  torch layout [d_out, d_in]: rows >= cols -> right (Vh), else left (U); Adam's first
  step m/sqrt(v) on the projection, back-projected, times scale, times -lr."""
  lr, scale, rank, eps = 1e-2, 2.0, 2, 1e-8
  for d_in, d_out in ((6, 6), (8, 3), (3, 8)):
    kernel = jnp.zeros((d_in, d_out), jnp.float32)  # Flax layout
    g = np.random.default_rng(d_in * 10 + d_out).normal(size=(d_in, d_out)).astype(np.float32)
    tx = jax_optim.galore(lr, rank=rank, update_proj_gap=200, scale=scale,
                          weight_dimension_numbers={"k": optax.contrib.GaLoreDimensionNumbers()})
    u, _ = tx.update({"k": jnp.asarray(g)}, tx.init({"k": kernel}), {"k": kernel})
    gt = g.T.astype(np.float64)  # torch weight layout [d_out, d_in]
    U, _, Vh = np.linalg.svd(gt, full_matrices=False)
    if gt.shape[0] >= gt.shape[1]:
      p = Vh[:rank]
      low = gt @ p.T
      back = (low / (np.abs(low) + eps)) @ p
    else:
      p = U[:, :rank]
      low = p.T @ gt
      back = p @ (low / (np.abs(low) + eps))
    np.testing.assert_allclose(np.asarray(u["k"]), -lr * scale * back.T, rtol=1e-4, atol=1e-7,
                               err_msg=f"{d_in}x{d_out}")


def test_lora_and_galore_build_without_a_losia_config(source):
  """The driver gives non-LoSiA methods no LoSiA config: their targets are its defaults."""
  for method in ("lora", "galore"):
    b = JaxBackend(source, settings(method, losia=None))
    assert b.train_step(make_batch(0))["loss"] > 0


@pytest.fixture(scope="module")
def tiny_cli_model(tmp_path_factory):
  return make_tiny_model(str(tmp_path_factory.mktemp("tiny_cli") / "model"))


def test_galore_through_the_cli_resumes_exactly(tiny_cli_model, tmp_path, capsys):
  data = tmp_path / "sums.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n"
                          for a in range(6) for b in range(5)))

  def argv(out, *extra):
    return ["--backend", "jax", "--method", "galore", "--model", tiny_cli_model, "--data",
            str(data), "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--save-every",
            "2", "--warmup-steps", "1", "--eval-size", "0", "--no-plots", "--quiet",
            "--galore-update-gap", "3", "--output-dir", out, *extra]

  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  assert main_mod.main(argv(straight)) == 0
  out = capsys.readouterr().out
  assert "GaLore: rank 16 (std side), projections refreshed by SVD every 3 steps, scale 2" in out
  with open(os.path.join(straight, "summary.json")) as f:
    summary = json.load(f)
  assert summary["config"]["galore_update_gap"] == 3
  assert summary["config"]["galore_rank"] == 16
  assert [st for st, _ in ck.list_checkpoints(straight)] == [2, 4]
  ck2 = ck.list_checkpoints(straight)[0][1]
  assert main_mod.main(["--resume-from", ck2, "--output-dir", resumed, "--quiet"]) == 0
  read = lambda d: [r["loss"] for r in R.read_metrics(os.path.join(d, "metrics.jsonl"))]
  assert read(resumed) == read(straight) and len(read(straight)) == 4
  wa, wb = (safetensors.numpy.load_file(os.path.join(d, "model", "model.safetensors"))
            for d in (straight, resumed))
  for k in wa:
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
  # another GaLore setting is another run
  capsys.readouterr()
  assert main_mod.main(["--resume-from", ck2, "--output-dir", str(tmp_path / "other"),
                        "--galore-rank", "4"]) == 2
  assert "galore_rank" in capsys.readouterr().err


def test_torch_backend_refuses_galore_before_any_work(tiny_cli_model, tmp_path, capsys):
  out = tmp_path / "o"
  assert main_mod.main(["--backend", "torch", "--method", "galore", "--model", tiny_cli_model,
                        "--output-dir", str(out)]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "add --backend jax" in err, err
  assert not out.exists()
