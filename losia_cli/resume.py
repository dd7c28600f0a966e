"""Which checkpoint a resumed run starts from, and whether it may continue it.

``--resume`` takes the newest checkpoint of ``--output-dir`` whose files match
its manifest; a damaged one is reported in one line and the next older one is
tried. ``--resume-from DIR`` names the checkpoint; it is verified the same way
but never replaced by another.

A run is identified by *content*, not by paths: the data file by its size and
sha256, the model by the sha256 of its weight, config and tokenizer files. So
a run whose output directory, data file or model directory moved (another
node, another mount) still resumes; a path the checkpoint recorded that no
longer exists is taken from the flag given now.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Optional

from losia_cli import checkpoints as ck
from losia_cli.backend import ModelSource

DRIVER_FORMAT = 1
# Settings a resumed run may change: they do not touch the training trajectory.
# Gradient checkpointing only recomputes activations (same loss and gradients, bit
# for bit on the CPU): a run that ran out of memory may continue with it.
# The JAX device count only re-lays the same arrays (Orbax restores onto any mesh) and
# splits the same global batch: a run saved on 4 devices may continue on 2 or 1. (The
# torch process count is no setting at all: a DDP checkpoint is one process's files.)
SOFT_FIELDS = frozenset({"output_dir", "resume", "resume_from", "quiet", "plots", "export",
                         "save_every", "keep_checkpoints", "explicit", "gradient_checkpointing",
                         "devices"})
# Settings added after the first checkpoints were written, with the value those
# runs used: a checkpoint that lacks one was made with that value.
ADDED_DEFAULTS = {"grad_accum": 1, "precision": "fp32", "fsdp": False}
# Settings compared by content (fingerprints) rather than by their paths, and the
# run's length, compared as its total steps (--steps or --epochs).
PATH_FIELDS = frozenset({"model", "data", "eval_data", "losia_config"})
LENGTH_FIELDS = frozenset({"steps", "epochs"})
EXCLUSIVE = (("steps", "epochs"), ("data", "task"))
# What driver.json must hold, with the types a resume relies on.
_DRIVER_FIELDS = {"step": int, "total_steps": int, "tokens_seen": int,
                  "train_seconds": (int, float), "elapsed_s": (int, float), "given": dict,
                  "config": dict, "data": dict}
# Files of a transformers model directory that decide what training does.
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")


class ResumeError(ValueError):
  """The run cannot be resumed as asked (exit code 2)."""


def _driver_problem(saved: Any) -> Optional[str]:
  if not isinstance(saved, dict):
    return "driver.json is not a JSON object"
  if saved.get("format") != DRIVER_FORMAT:
    return f"driver.json has format {saved.get('format')!r}, not {DRIVER_FORMAT}"
  for key, kind in _DRIVER_FIELDS.items():
    value = saved.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
      return f"driver.json has no valid {key!r}"
  return None


def _load_verified(path: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
  """``(driver state, None)`` for an intact checkpoint, else ``(None, what is wrong)``."""
  problem = ck.verify_checkpoint(path)
  if problem is not None:
    return None, problem
  try:
    saved = ck.read_driver_state(path)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    return None, f"driver.json cannot be read ({type(e).__name__}: {e})"
  problem = _driver_problem(saved)
  return (None, problem) if problem else (saved, None)


def run_dir_of_checkpoint(path: str) -> Optional[str]:
  """The output directory a ``.../checkpoints/step-N`` directory belongs to, if it is one."""
  parent = os.path.dirname(path)
  return os.path.dirname(parent) if os.path.basename(parent) == ck.CHECKPOINTS else None


def output_dir_for_resume_from(path: str, given_output_dir: Optional[str]) -> str:
  """``--resume-from DIR`` continues in ``--output-dir`` if given, else in DIR's own run."""
  if not os.path.isdir(path):
    raise ResumeError(f"argument --resume-from: no such directory: {path}")
  if given_output_dir is not None:
    return given_output_dir
  run_dir = run_dir_of_checkpoint(path)
  if run_dir is None:
    raise ResumeError(f"argument --resume-from: {path} is not inside an output directory's "
                      f"{ck.CHECKPOINTS}/; pass --output-dir for the continued run")
  return run_dir


def select(out: str, resume_from: Optional[str],
           warn: Callable[[str], None]) -> tuple[int, str, dict[str, Any]]:
  """``(step, checkpoint path, driver state)`` to resume from; checks ``out`` can be used.

  Raises:
    ResumeError: the named checkpoint, or every checkpoint of ``out``, is damaged.
    ck.OutputDirError: ``out`` cannot be used.
  """
  if resume_from is not None:
    if not os.path.isdir(resume_from):
      raise ResumeError(f"argument --resume-from: no such directory: {resume_from}")
    inside = run_dir_of_checkpoint(resume_from) == out
    has_own = bool(ck.list_checkpoints(out))
    if has_own and not inside:
      raise ResumeError(
          f"argument --resume-from: --output-dir {out} already holds checkpoints of a run; "
          f"continue a checkpoint from elsewhere in an empty --output-dir")
    ck.check_output_dir(out, resume=has_own)
    saved, problem = _load_verified(resume_from)
    if problem is not None:
      raise ResumeError(f"argument --resume-from: checkpoint {resume_from} is damaged: "
                        f"{problem}")
    return int(saved["step"]), resume_from, saved
  ck.check_output_dir(out, resume=True)
  damaged = []
  for step, path in reversed(ck.list_checkpoints(out)):
    saved, problem = _load_verified(path)
    if problem is None:
      return step, path, saved
    damaged.append(os.path.basename(path))
    warn(f"warning: checkpoint {path} is damaged ({problem}); trying the previous one")
  raise ResumeError(f"--resume: no intact checkpoint in {os.path.join(out, ck.CHECKPOINTS)} "
                    f"(damaged: {', '.join(damaged)}); start a new run in another --output-dir")


def merge_given(now: dict[str, Any], saved: dict[str, Any], out: str) -> dict[str, Any]:
  """The checkpoint's flags, overridden by the flags given now (compared later).

  A recorded path that no longer exists (the run moved) is dropped when the flag
  is given now, and reported with what to pass when it is not.
  """
  given = dict(saved["given"])
  for key in ("resume", "resume_from", "output_dir"):
    given.pop(key, None)  # where to resume from is this invocation's business
  for a, b in EXCLUSIVE:  # e.g. --epochs now replaces the checkpoint's --steps
    if a in now or b in now:
      given.pop(a, None)
      given.pop(b, None)
  flags = {"model": "--model", "data": "--data", "eval_data": "--eval-data",
           "losia_config": "--losia-config"}
  for key, flag in flags.items():
    path = given.get(key)
    if key not in now and isinstance(path, str) and not os.path.exists(path):
      raise ResumeError(f"--resume: the run's {flag} {path} no longer exists; pass {flag} "
                        "with its new location (it is checked by content)")
  given.update(now)
  given["output_dir"] = out
  return given


def model_fingerprint(source: ModelSource) -> dict[str, Any]:
  """sha256 over the model's weights, config and tokenizer files (not their paths)."""
  if source.kind == "gguf":
    names, root = [os.path.basename(source.path)], os.path.dirname(source.path)
  else:
    root = source.path
    names = sorted(n for n in os.listdir(root) if n in _MODEL_FILES or n.endswith(
        (".safetensors", ".safetensors.index.json")))
  h, total = hashlib.sha256(), 0
  for name in names:
    path = os.path.join(root, name)
    # A gguf file is identified by its contents alone, whatever it is called.
    h.update(f"{name if source.kind == 'hf' else 'model.gguf'}\0"
             f"{ck.sha256_file(path)}\0".encode())
    total += os.path.getsize(path)
  return {"kind": source.kind, "files": len(names), "bytes": total, "sha256": h.hexdigest()}


def _content(fp: dict[str, Any]) -> dict[str, Any]:
  """A data fingerprint without the paths (``losia_cli.data.file_fingerprint`` records one)."""
  return {k: ({kk: vv for kk, vv in v.items() if kk != "path"} if isinstance(v, dict) else v)
          for k, v in fp.items()}


def check_compatible(saved: dict[str, Any], path: str, config: dict[str, Any],
                     losia: Optional[dict[str, Any]], total_steps: int,
                     data_fp: dict[str, Any], model_fp: dict[str, Any], out: str) -> None:
  """Raises :class:`ResumeError` if the settings given now would change the run."""
  old = saved["config"]
  diffs = [k for k in config if k not in SOFT_FIELDS | PATH_FIELDS | LENGTH_FIELDS | {"losia"}
           and old.get(k, ADDED_DEFAULTS.get(k)) != config[k]]
  if saved.get("losia") != losia:
    diffs.append("LoSiA settings")
  if _content(saved["data"]) != _content(data_fp):
    diffs.append("data file contents")
  saved_model = saved.get("model")
  if (saved_model.get("sha256") if isinstance(saved_model, dict) else None) != model_fp["sha256"]:
    diffs.append("model (its weights, config or tokenizer files)")
  if diffs:
    raise ResumeError(
        f"--resume: the checkpoint {path} was made with different settings: "
        f"{', '.join(sorted(set(diffs)))}; resume with the original flags (or omit them: "
        "the checkpoint's are used), or start a new run in another --output-dir")
  planned = saved["total_steps"]
  if planned != total_steps:
    # The learning-rate schedule (warmup, decay to the end) and LoSiA's period
    # were laid out for the planned length, so a longer run is not this run
    # continued; its exported model is the honest starting point of a new one.
    more = "longer" if total_steps > planned else "shorter"
    raise ResumeError(
        f"--resume: this run was planned for {planned} steps, and its learning-rate schedule "
        f"and LoSiA period are laid out for them; it cannot be made {more} ({total_steps} "
        f"steps asked). To train further, finish it, then start a continuation from its "
        f"exported model: losia-finetune --model {os.path.join(out, 'model')} "
        f"--output-dir NEW_DIR --steps N (with the data flags)")
