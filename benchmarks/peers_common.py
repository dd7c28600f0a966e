"""What the JAX and torch halves of ``peers.py`` share: the settings and the batch.

Imports neither JAX nor torch, so each backend's process loads only its own framework.
"""

from __future__ import annotations

import numpy as np

from losia_cli.backend import Batch, TrainSettings
from losia_common import LoSiAConfig


def settings_for(spec: dict, job: dict) -> TrainSettings:
  """The backend settings of one method row (``spec`` from ``peers.method_specs``)."""
  cfg = LoSiAConfig(rank_factor=0.125, output_rank_factor=spec.get("output_rank_factor", 0.0),
                    period=job["period"], non_target=spec.get("non_target", "freeze"))
  return TrainSettings(
      method=spec["method"], losia=cfg, lr=1e-4, lr_schedule="constant", warmup_steps=0,
      total_steps=10_000, weight_decay=0.0, max_grad_norm=0.0,
      lora_rank=int(spec.get("lora_rank") or 8), lora_alpha=16.0, seed=0,
      seq_len=job["seq"], batch_size=job["batch"])


def make_batch(job: dict) -> Batch:
  """A fixed random batch, every position a real and predicted token (same in both backends)."""
  rng = np.random.default_rng(0)
  b, s = job["batch"], job["seq"]
  return Batch(rng.integers(0, job["vocab"], (b, s), dtype=np.int32),
               np.ones((b, s), np.int32), np.ones((b, s), np.float32))
