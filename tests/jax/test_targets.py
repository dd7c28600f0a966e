"""Finding targets: names, layer ids, layouts, stacked layers, clear errors."""

import jax
import jax.numpy as jnp
import pytest

import losia_jax
from losia_jax.targets import FLAX_KERNEL
from tests.jax.helpers import tiny_params


def test_plan_of_llama_shaped_tree():
  p = tiny_params(layers=3)
  plan = losia_jax.make_plan(p, losia_jax.LoSiAConfig(rank_factor=0.25))
  keys = {t.key for t in plan.targets}
  assert "model.layers.0.self_attn.q_proj.kernel" in keys and len(keys) == 9
  assert plan.num_layers == 3 and plan.total == 3 and not plan.output_is_target
  q = next(t for t in plan.targets if t.key.endswith("0.self_attn.q_proj.kernel"))
  assert q.transposed and (q.d_out, q.d_in, q.k_out, q.k_in) == (12, 12, 3, 3)
  k = next(t for t in plan.targets if t.key.endswith("0.self_attn.k_proj.kernel"))
  assert (k.d_out, k.d_in, k.k_out, k.k_in) == (6, 12, 1, 3)
  d = next(t for t in plan.targets if t.key.endswith("2.mlp.down_proj.kernel"))
  assert (d.d_out, d.d_in) == (12, 16) and d.layer_ids == (2,)
  assert {b.role for b in plan.buckets} == {"self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"}
  assert "target params" in plan.summary()


def test_output_layer_ids_and_row_mode():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, output_rank_factor=0.5)
  plan = losia_jax.make_plan(tiny_params(), cfg, output_module="embed_tokens")
  out = next(t for t in plan.targets if t.row_mode)
  assert out.layer_ids == (0,) and out.k_out == 10 and out.k_in == 12 and not out.transposed
  assert plan.total == 4 and {t.layer_ids[0] for t in plan.targets if not t.row_mode} == {1, 2, 3}


def test_stacked_layers():
  p = tiny_params(layers=3)
  layers = p["model"].pop("layers")
  p["model"]["layers"] = jax.tree.map(lambda *x: jnp.stack(x), *layers)
  with pytest.raises(ValueError, match="stacked_layers=True"):
    losia_jax.make_plan(p, losia_jax.LoSiAConfig())
  plan = losia_jax.make_plan(p, losia_jax.LoSiAConfig(), stacked_layers=True)
  q = next(t for t in plan.targets if t.role == "self_attn.q_proj")
  assert q.stacked and q.n == 3 and q.layer_ids == (0, 1, 2)
  assert q.identities[1] == "layer1.self_attn.q_proj"


def test_errors_name_the_paths():
  p = tiny_params()
  with pytest.raises(ValueError, match=r"match no parameter.*model\.embed_tokens"):
    losia_jax.make_plan(p, losia_jax.LoSiAConfig(target_modules=["w_qkv"]))
  with pytest.raises(ValueError, match=r"must be 2-D.*layers\.0\.norm\.weight \(4,\)"):
    bad = {"model": {"layers": [{"norm": {"weight": jnp.ones(4)}, "q_proj": {"weight": jnp.ones((4, 4))}}]}}
    losia_jax.make_plan(bad, losia_jax.LoSiAConfig(target_modules=["q_proj", "norm"]))
  with pytest.raises(ValueError, match=r"layer index of targets proj\.weight"):
    losia_jax.make_plan({"proj": {"weight": jnp.ones((4, 4))}}, losia_jax.LoSiAConfig(target_modules=["proj"]))
  with pytest.raises(ValueError, match="output_module='lm_head'"):
    losia_jax.make_plan(p, losia_jax.LoSiAConfig(output_rank_factor=0.1))
  with pytest.raises(ValueError, match="weight, kernel or embedding leaves.*layers.0.q_proj.w"):
    losia_jax.make_plan({"layers": [{"q_proj": {"w": jnp.ones((4, 4))}}]},
                        losia_jax.LoSiAConfig(target_modules=[r".*q_proj"]))


def test_explicit_dimension_numbers():
  p = {"layers": [{"q_proj": {"w": jnp.ones((4, 8))}}]}
  # "w" is not a known weight leaf name: a regex on the module path plus dims
  cfg = losia_jax.LoSiAConfig(target_modules=["q_proj"])
  plan = losia_jax.make_plan({"layers": [{"q_proj": {"weight": jnp.ones((4, 8))}}]}, cfg,
                             dimension_numbers=FLAX_KERNEL)
  t = plan.targets[0]
  assert t.transposed and (t.d_out, t.d_in) == (8, 4)
  del p
