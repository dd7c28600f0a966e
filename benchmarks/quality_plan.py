"""What the quality harness runs: the methods, their learning-rate grids, the ablations,
the presets, and one run's identity (``Run``, whose ``key`` names it in the results file).

Kept apart from ``quality.py`` (which executes the plan) so that the plan reads top to
bottom: a method is a CLI method, its flags and a rate grid; a preset picks tasks,
methods, steps, seeds and split sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

# Grids are ascending; a grid whose edge wins on validation grows (Harness.grid).
MAX_EXTENSIONS = 2
LORA_LRS = (5e-4, 1e-3, 2e-3)
LOSIA_LRS = (2e-4, 5e-4, 1e-3)
# label -> (CLI method, extra flags, learning-rate grid). LoRA's alpha is 2r throughout
# (the usual documented setting); "lora-matched" gets its rank from LoSiA's trainable count.
METHODS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "full": ("full", (), (2e-5, 5e-5, 1e-4)),
    "lora-r8": ("lora", ("--lora-rank", "8", "--lora-alpha", "16"), LORA_LRS),
    "lora-r16": ("lora", ("--lora-rank", "16", "--lora-alpha", "32"), LORA_LRS),
    "lora-matched": ("lora", (), LORA_LRS),
    "dora-r8": ("lora", ("--lora-variant", "dora", "--lora-rank", "8", "--lora-alpha", "16"),
                LORA_LRS),
    "pissa-r8": ("lora", ("--lora-variant", "pissa", "--lora-rank", "8", "--lora-alpha", "16"),
                 (2e-4, 5e-4, 1e-3)),
    "losia": ("losia", (), LOSIA_LRS),
    "losia-pro": ("losia-pro", (), LOSIA_LRS),
    # LoSiA with a 4x larger block (p = 1/4, a sixteenth of each matrix instead of a
    # sixty-fourth) and its own rate sweep: on 576-wide layers p = 1/8 is a 72 x 72 block,
    # and the quick preset's p ablation found block size and rate interact (p = 1/4 collapsed
    # at p = 1/8's rate and was LoSiA's best run at half of it), so it is swept, not ablated.
    "losia-p0.25": ("losia", ("--rank-factor", "0.25"), LOSIA_LRS),
    # GaLore (the paper's baseline) with LLaMA-Factory's defaults: rank 16, SVD refresh every
    # 200 steps (so once, at step 0, in a 100-step run), scale 2.0, std side. The grid
    # brackets LLaMA-Factory's documented GaLore fine-tuning rate at scale 2.0, 1e-4 (the
    # CLI's default), by 2x each way. At equal rates the targets' update is about
    # scale * sqrt(r / min(d_in, d_out)) = 1/3 (k, v: 0.6) of full AdamW's (Frobenius
    # norm, SmolLM2 shapes), while the embedding and norms get full AdamW's: 5e-5 gives those
    # full's default rate, 2e-4 gives the targets about full's mid-grid step.
    "galore-r16": ("galore", ("--galore-rank", "16"), (5e-5, 1e-4, 2e-4)),
}
# label -> the backend it runs on when not the harness's --backend: GaLore is the JAX
# backend's only (optax; the registry's galore-torch needs bitsandbytes). Everything else of
# the run is the same (steps, batch, seq-len, seed and so data order, the evaluation).
METHOD_BACKENDS = {"galore-r16": "jax"}
# LoSiA ablations: name -> extra flags (added to the LoSiA run at its chosen rate).
ABLATIONS: dict[str, tuple[str, ...]] = {
    "sync": ("--schedule", "sync"),
    "no-rewarm": ("--no-rewarm",),
    "p=1/16": ("--rank-factor", "0.0625"),
    "p=1/4": ("--rank-factor", "0.25"),
    "T=3": ("--period", "3"),
    "T=10": ("--period", "10"),
    "T=50": ("--period", "50"),
    "non-target freeze": ("--non-target", "freeze"),
    "output layer not a target": ("--output-rank-factor", "0"),
    "no clipping": ("--max-grad-norm", "0"),
}
ABLATION_GROUPS = {"schedule": ("sync",), "rewarm": ("no-rewarm",), "p": ("p=1/16", "p=1/4"),
                   "period": ("T=3", "T=10", "T=50"),
                   "policy": ("non-target freeze", "output layer not a target", "no clipping")}

PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"tasks": ["arithmetic"], "methods": ["full", "lora-r8", "losia"], "steps": 80,
              "seeds": [0], "ablate": [], "continual": False, "n_val": 48, "n_test": 96,
              "n_capitals": 40, "ppl_chunks": 4, "ppl_len": 128, "pro_sweep": False},
    "full": {"tasks": ["arithmetic", "cities"], "methods": list(METHODS), "steps": 100,
             "seeds": [0, 1, 2], "ablate": list(ABLATION_GROUPS), "continual": True,
             "n_val": 64, "n_test": 160, "n_capitals": 80, "ppl_chunks": 8, "ppl_len": 128,
             "pro_sweep": False},
}
CONTINUAL_METHODS = ("full", "lora-r8", "losia")
# For --dry-run's estimate before any run is done: one SmolLM2 step of 8 x 64 tokens on one
# idle CPU core (LoSiA, torch; full fine-tuning is slower, LoRA faster), and the per-run
# model load, export and evaluation.
DEFAULT_S_PER_STEP = 5.5
RUN_OVERHEAD_S = 90


@dataclasses.dataclass(frozen=True)
class Run:
  """One ``losia-finetune`` invocation and its evaluation."""

  phase: str        # sweep | seeds | ablation | continual
  task: str
  label: str        # METHODS key
  lr: float
  seed: int
  steps: int
  extra: tuple[str, ...] = ()
  ablation: str = ""
  init: str = ""    # key of the run whose exported model this one starts from
  other_task: str = ""
  precision: str = "fp32"  # the CLI's --precision: bf16 on a GPU sitting (see resolve_precision)

  @property
  def method(self) -> str:
    return METHODS[self.label][0]

  def backend(self, default: str) -> str:
    return METHOD_BACKENDS.get(self.label, default)

  @property
  def key(self) -> str:
    tag = hashlib.sha1(json.dumps([self.extra, self.init]).encode()).hexdigest()[:6]
    abl = "-" + "".join(c if c.isalnum() else "_" for c in self.ablation) if self.ablation else ""
    # fp32 keys carry no precision tag, so the CPU sittings' keys are what they always were
    prec = "" if self.precision == "fp32" else "-" + self.precision
    return (f"{self.task}-{self.label}{abl}-lr{self.lr:.0e}-s{self.seed}-{self.steps}st-"
            f"{tag}{'-cont' if self.init else ''}{prec}")


def precision_of(run: dict[str, Any]) -> str:
  """A recorded run's precision (runs recorded before it was a field were fp32)."""
  return run.get("precision", "fp32")


def resolve_precision(choice: str) -> str:
  """``auto``: bf16 compute when a CUDA device is visible (the GPU sitting), fp32 on a CPU."""
  if choice != "auto":
    return choice
  import torch
  return "bf16" if torch.cuda.is_available() else "fp32"


def selection_key(res: dict[str, Any]) -> tuple[float, float]:
  """Order of swept runs: best validation accuracy first, then lower tail training loss."""
  return (-(res["val"] or 0.0), res["loss_tail"])


def next_rate(lr: float, up: bool) -> float:
  """The neighbour of ``lr`` on the 1-2-5 series (5e-4 -> 1e-3 up, -> 2e-4 down): one
  significant digit, so run keys (``lr`` written as ``%.0e``) never collide."""
  exp = math.floor(math.log10(lr) + 1e-9)
  series = (1, 2, 5)
  i = min(range(3), key=lambda k: abs(series[k] - lr / 10 ** exp)) + (1 if up else -1)
  exp, i = exp + i // 3, i % 3
  return float(f"{series[i]}e{exp}")
