"""Tests of ``losia_cli.jax_backend``, and of the two CLI backends against each other.

A tiny LLaMA built from a config and saved with ``save_pretrained``; nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from losia_cli.backend import ModelSource
from losia_cli.jax_backend import JaxBackend
from losia_jax.models import masked_nll
from tests.cli.test_torch_backend import (LOSIA, METHODS, make_batch, settings,
                                          tiny_config)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> ModelSource:
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(tiny_config()).eval()
  path = str(tmp_path_factory.mktemp("tiny_jax"))
  model.save_pretrained(path)
  return ModelSource("hf", path, "tiny")


def leaves(backend: JaxBackend):
  return [np.asarray(x) for x in jax.tree.leaves(backend._trainable_tree())]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_resumes_exactly(source, tmp_path, method):
  s = settings(method)
  straight = JaxBackend(source, s)
  first = [straight.train_step(make_batch(k % 2))["loss"] for k in range(8)]
  assert first[-1] < first[0] - 0.1, first

  part = JaxBackend(source, s)
  for k in range(4):
    part.train_step(make_batch(k % 2))
  part.save_checkpoint(str(tmp_path / "ck"))
  resumed = JaxBackend(source, s)
  resumed.restore_checkpoint(str(tmp_path / "ck"))
  assert resumed.step == 4
  second = [resumed.train_step(make_batch(k % 2))["loss"] for k in range(4, 8)]
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
