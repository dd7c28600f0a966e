"""Finding targets, layer ids, identities and block sizes; bad input names the culprit."""

import pytest
import torch

import losia_torch
from losia_common import LoSiAConfig
from losia_torch import make_plan
from tests.torch.torch_helpers import Toy


def test_plan_of_a_toy_model():
  model = Toy(layers=3, d=12, ff=20)
  cfg = LoSiAConfig(rank_factor=0.25)
  opt = losia_torch.LoSiAOptimizer(model, cfg)
  plan = opt.plan
  assert plan.num_layers == 3 and plan.total == 3 and not plan.output_is_target
  assert len(plan.targets) == 12
  t = opt.target("layers.2.mlp.down_proj.weight")
  assert (t.d_out, t.d_in, t.k_out, t.k_in) == (12, 20, 3, 5)
  assert (t.layer_id, t.role, t.identity) == (2, "mlp.down_proj", "layer2.mlp.down_proj")
  non = {n for n, _ in plan.non_targets}
  assert "layers.0.self_attn.o_proj.bias" in non and "lm_head.weight" in non
  assert plan.trainable_block_params == sum(t.k_out * t.k_in for t in plan.targets)
  assert "12 target matrices" in opt.summary()


@pytest.mark.parametrize("tied", [False, True])
def test_output_layer_row_mode(tied):
  model = Toy(layers=2, d=8, ff=16, vocab=40, tied=tied)
  cfg = LoSiAConfig(output_rank_factor=0.1)
  opt = losia_torch.LoSiAOptimizer(model, cfg)
  out = [t for t in opt.plan.targets if t.row_mode]
  assert len(out) == 1
  (t,) = out
  assert t.param is model.lm_head.weight
  assert t.name == ("embed_tokens.weight" if tied else "lm_head.weight")
  assert (t.layer_id, t.identity, t.role, t.k_out, t.k_in) == (0, "output", "output", 4, 8)
  assert opt.plan.total == 3
  assert [x.layer_id for x in opt.plan.targets if x.name.startswith("layers.1.")] == [2] * 4
  rows, cols = opt.subnet(t.name)
  assert rows.numel() == 4 and cols.tolist() == list(range(8))  # row mode: all columns


def test_output_layer_by_name_for_a_named_list():
  model = Toy(layers=1)
  opt = losia_torch.LoSiAOptimizer(list(model.named_parameters()),
                                   LoSiAConfig(output_rank_factor=0.5))
  assert [t.name for t in opt.plan.targets if t.row_mode] == ["lm_head.weight"]
  with pytest.raises(ValueError, match="output_module='nothing'"):
    losia_torch.LoSiAOptimizer(list(model.named_parameters()),
                               LoSiAConfig(output_rank_factor=0.5), output_module="nothing")


def test_no_target_names_the_patterns():
  model = Toy(layers=1)
  with pytest.raises(ValueError, match="target_modules=\\['k_proj'\\] match no parameter"):
    losia_torch.LoSiAOptimizer(model, LoSiAConfig(target_modules=("k_proj",)))


def test_non_2d_target_names_the_parameter():
  model = Toy(layers=2)
  with pytest.raises(ValueError, match="layers.0.norm.weight \\(12,\\)"):
    losia_torch.LoSiAOptimizer(model, LoSiAConfig(target_modules=("q_proj", "norm")))


def test_target_without_layer_index_names_it():
  model = Toy(layers=2)
  with pytest.raises(ValueError, match="lm_head.weight"):
    losia_torch.LoSiAOptimizer(model, LoSiAConfig(target_modules=("q_proj", "lm_head")))


def test_regex_targets_and_two_matrices_of_one_role():
  model = Toy(layers=2)
  opt = losia_torch.LoSiAOptimizer(model, LoSiAConfig(target_modules=(r"layers\.\d+\.mlp\..*",)))
  assert sorted(t.role for t in opt.plan.targets) == ["mlp.down_proj"] * 2 + ["mlp.up_proj"] * 2
  w = torch.nn.Parameter(torch.ones(3, 3))
  v = torch.nn.Parameter(torch.ones(3, 3))
  with pytest.raises(ValueError, match="same role"):
    make_plan([("enc.layers.0.q_proj.weight", w), ("dec.layers.0.q_proj.weight", v)],
              LoSiAConfig())


def test_bad_parameter_lists():
  with pytest.raises(ValueError, match="empty"):
    losia_torch.LoSiAOptimizer([], LoSiAConfig())
  with pytest.raises(TypeError, match="names"):
    losia_torch.LoSiAOptimizer(list(Toy(layers=1).parameters()), LoSiAConfig())
  w = torch.nn.Parameter(torch.ones(3, 3))
  with pytest.raises(ValueError, match="twice"):
    losia_torch.LoSiAOptimizer([("layers.0.q_proj.weight", w), ("layers.1.q_proj.weight", w)])
