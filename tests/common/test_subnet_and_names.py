"""Framework-neutral pieces: names, sizes, seeded initial subnet, reference selection."""

import numpy as np

from losia_common import names, schedule
from losia_common.subnet import block_size, initial_indices, reference_select

SPEC_S = np.array([[16, 9, 12, 4, 9, 34], [10, 30, 10, 1, 0, 28], [7, 26, 7, 36, 4, 28],
                   [27, 34, 11, 33, 25, 21], [12, 25, 30, 33, 11, 21], [26, 3, 27, 16, 3, 36]])


def test_spec_example():
  rows, cols = reference_select(SPEC_S, 2, 2)
  assert rows.tolist() == [3, 4] and cols.tolist() == [1, 3]


def test_ties_go_to_lower_index_and_earlier_candidate():
  rows, cols = reference_select(np.ones((5, 4)), 2, 3)
  assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1, 2]


def test_block_size():
  assert block_size(0.125, 576) == 72 and block_size(0.125, 4) == 1 and block_size(1.0, 7) == 7


def test_initial_indices_deterministic_sorted_distinct():
  a = initial_indices(0, "layer3.self_attn.q_proj", 100, 12, "rows")
  assert (a == initial_indices(0, "layer3.self_attn.q_proj", 100, 12, "rows")).all()
  assert (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 100
  assert not (a == initial_indices(1, "layer3.self_attn.q_proj", 100, 12, "rows")).all()
  assert not (a == initial_indices(0, "layer4.self_attn.q_proj", 100, 12, "rows")).all()
  assert not (a == initial_indices(0, "layer3.self_attn.q_proj", 100, 12, "cols")).all()
  # a pinned value: drift here would break cross-backend and cross-version parity
  assert initial_indices(0, "layer0.self_attn.q_proj", 16, 4, "rows").tolist() == [2, 4, 9, 14]
  assert initial_indices(7, "output", 100, 5, "rows").tolist() == [29, 57, 61, 77, 95]


def test_parse_names_torch_flax_and_stacked():
  t = names.parse_name("model.layers.3.self_attn.q_proj.weight".split("."))
  f = names.parse_name(("model", "layers", "3", "self_attn", "q_proj", "kernel"))
  s = names.parse_name(("model", "layers", "self_attn", "q_proj", "kernel"))
  assert t.layer_index == f.layer_index == 3 and s.layer_index is None
  assert t.role == f.role == s.role == "self_attn.q_proj"
  assert names.is_target_leaf(t, ["q_proj"]) and not names.is_target_leaf(t, ["k_proj"])
  assert names.is_target_leaf(t, [r"model\.layers\.\d+\.self_attn\..*"])
  bias = names.parse_name("model.layers.3.self_attn.q_proj.bias".split("."))
  assert not names.is_target_leaf(bias, ["q_proj"])


def test_schedule_arithmetic():
  # L = 3, a = 1 -> total 4, T = 2: slots [0,1]->id0, [2,3]->id1, ...
  assert [schedule.owner(s, 2, 4) for s in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
  assert schedule.relocalizes(1, 3, 2, 4, "async") and not schedule.relocalizes(1, 2, 2, 4, "async")
  assert schedule.profiles(2, 0, 2, 4, "sync") and not schedule.profiles(2, 4, 2, 4, "sync")
  assert schedule.rewarm(5, None, 4) == 1.0
  assert [schedule.rewarm(s, 3, 4) for s in range(4, 10)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
