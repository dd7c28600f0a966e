"""metrics.jsonl, smoothing, the subnet history and the pictures."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from losia_cli import report as R


def records(n):
  return [{"step": s, "loss": 3.0 * math.exp(-s / 10) + 0.1 * math.sin(s), "lr": 1e-3 * s / n,
           "tokens": 100} for s in range(1, n + 1)]


def test_metrics_lines_are_flushed_one_per_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with R.MetricsWriter(path) as w:
    for r in records(3):
      w.write(r)
      # readable at once: a crash right after a step leaves that step's line
      assert R.read_metrics(path)[-1] == r
    w.write({"step": 4, "loss": float("nan"), "lr": np.float32(0.5), "tokens": np.int64(7)})
  lines = open(path).read().splitlines()
  assert len(lines) == 4
  assert all(isinstance(json.loads(l), dict) for l in lines)
  assert json.loads(lines[3]) == {"step": 4, "loss": None, "lr": 0.5, "tokens": 7}


def test_truncate_on_resume_and_torn_lines(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with R.MetricsWriter(path) as w:
    for r in records(10):
      w.write(r)
  with open(path, "a") as f:
    f.write('{"step": 11, "lo')  # a crash mid-line
  assert [r["step"] for r in R.read_metrics(path)] == list(range(1, 11))
  kept = R.truncate_metrics(path, 6)
  assert [r["step"] for r in kept] == list(range(1, 7))
  assert R.read_metrics(path) == kept
  assert len(open(path).read().splitlines()) == 6
  with R.MetricsWriter(path) as w:  # the resumed run appends after the kept lines
    w.write({"step": 7, "loss": 1.0})
  assert [r["step"] for r in R.read_metrics(path)] == list(range(1, 8))
  assert R.truncate_metrics(str(tmp_path / "absent.jsonl"), 3) == []


def test_smooth():
  assert R.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
  s = R.smooth([1.0, 0.0])
  assert s[0] == 1.0 and 0 < s[1] < 1
  assert R.smooth([1.0, float("nan"), 1.0])[1] == 1.0


def valid_png(path):
  import matplotlib.image
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
  # non-trivial content: many distinct colours, not a blank canvas
  colours = np.unique(img.reshape(-1, img.shape[-1]).round(2), axis=0)
  assert len(colours) > 20
  return img


def no_temporaries(directory):
  return [n for n in os.listdir(directory) if ".tmp" in n] == []


def test_loss_png(tmp_path):
  path = str(tmp_path / "loss.png")
  R.plot_loss(records(40), path, "test run")
  valid_png(path)
  assert no_temporaries(tmp_path)


def fake_history(steps=40, period=3):
  """Two layers × seven roles + output, relocalizing round-robin like async LoSiA."""
  roles = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
  t = R.SubnetTracker()
  rng = np.random.default_rng(0)
  current = {}
  for r in roles:
    for layer in range(2):
      current[f"layer{layer}.{r}"] = (np.sort(rng.choice(64, 8, replace=False)),
                                      np.sort(rng.choice(48, 6, replace=False)))
  current["output"] = (np.sort(rng.choice(100, 12, replace=False)), np.arange(16))
  t.observe(0, current)
  for s in range(1, steps + 1):
    if s % period == 0:
      slot = (s // period - 1) % 3  # 0: output, 1: layer0, 2: layer1
      for ident in list(current):
        if (slot == 0 and ident == "output") or ident.startswith(f"layer{slot - 1}."):
          rows, cols = current[ident]
          current[ident] = (np.sort(rng.choice(rows.max() + 1, len(rows), replace=False)),
                            cols if ident == "output" else
                            np.sort(rng.choice(48, len(cols), replace=False)))
    t.observe(s, dict(current))
  return t


def test_subnet_tracker_stores_changes_only():
  t = R.SubnetTracker()
  a = {"layer0.q": (np.array([1, 2]), np.array([3])), "layer1.q": (np.array([0, 5]),
                                                                  np.array([1]))}
  t.observe(0, a)
  for s in range(1, 5):
    assert t.observe(s, a) == 0
  b = dict(a, **{"layer0.q": (np.array([2, 7]), np.array([3]))})
  assert t.observe(5, b) == 1
  assert [s for s, *_ in t.segments["layer0.q"]] == [0, 5]
  assert len(t.segments["layer1.q"]) == 1
  assert t.changes == [(5, "layer0.q")]
  rows, cols = t.occupancy("layer0.q", total_steps=8)
  assert rows.tolist() == [0, 5, 8, 0, 0, 0, 0, 3] and cols.tolist() == [0, 0, 0, 8]
  assert t.observe(9, None) == 0


def test_subnet_tracker_roundtrip(tmp_path):
  t = fake_history()
  path = str(tmp_path / "subnets.npz")
  t.save(path)
  u = R.SubnetTracker.load(path)
  assert u.changes == t.changes
  assert set(u.segments) == set(t.segments)
  for ident, segs in t.segments.items():
    for (s1, r1, c1), (s2, r2, c2) in zip(segs, u.segments[ident]):
      assert s1 == s2 and np.array_equal(r1, r2) and np.array_equal(c1, c2)
  assert no_temporaries(tmp_path)


def test_subnets_png(tmp_path):
  t = fake_history()
  path = str(tmp_path / "subnets.png")
  assert R.plot_subnets(t, 40, path, "test")
  valid_png(path)
  assert no_temporaries(tmp_path)


def test_subnets_png_skipped_without_subnets(tmp_path):
  path = str(tmp_path / "subnets.png")
  assert not R.plot_subnets(R.SubnetTracker(), 10, path)
  assert not os.path.exists(path)
