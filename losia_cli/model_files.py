"""What the driver reads from the model's files before any backend loads it.

The tokenizer (for the data) and two config values (for --seq-len and
--period auto) are needed early, so that bad input is refused before the
weights load; both are read here, and their failures are
one-line errors (:class:`ModelFileError`, exit code 2) that name the file.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from losia_cli.backend import ModelSource


class ModelFileError(ValueError):
  """The model's files cannot be used (exit code 2); the message names the file."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: ModelSource):
  """The model's tokenizer (``AutoTokenizer``, from the directory or the GGUF file)."""
  if source.kind == "hf" and not any(
      os.path.isfile(os.path.join(source.path, n)) for n in TOKENIZER_FILES):
    raise ModelFileError(f"argument --model: {source.path} has no tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES)}); save it there with "
                         "tokenizer.save_pretrained(DIR)")
  import transformers
  try:
    if source.kind == "gguf":
      return transformers.AutoTokenizer.from_pretrained(
          os.path.dirname(source.path), gguf_file=os.path.basename(source.path))
    return transformers.AutoTokenizer.from_pretrained(source.path)
  except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is missing
    detail = " ".join(str(e).split())
    raise ModelFileError(f"could not load a tokenizer from {source.path}: {detail}") from None


def model_facts(source: ModelSource) -> tuple[Optional[int], Optional[int]]:
  """``(max_position_embeddings, num_hidden_layers)`` read without loading the weights."""
  if source.kind == "hf":
    try:
      with open(os.path.join(source.path, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ModelFileError(f"cannot read {source.path}/config.json: {e}") from None
    if not isinstance(c, dict) or not isinstance(c.get("text_config", c), dict):
      raise ModelFileError(f"{source.path}/config.json is not a model configuration "
                           "(expected a JSON object)")
    c = c.get("text_config", c)
    return c.get("max_position_embeddings"), c.get("num_hidden_layers")
  import transformers
  try:
    c = transformers.AutoConfig.from_pretrained(
        os.path.dirname(source.path), gguf_file=os.path.basename(source.path))
  except Exception as e:
    raise ModelFileError(f"cannot read the model configuration of {source.path}: {e}") from None
  return getattr(c, "max_position_embeddings", None), getattr(c, "num_hidden_layers", None)
