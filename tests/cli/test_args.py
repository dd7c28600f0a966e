"""Command line: defaults, LoSiA flags, --losia-config merging, and every bad input → exit 2."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from losia_cli import args as A
from losia_cli.main import main
from losia_common.config import LoSiAConfig
from tests.cli.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def jsonl(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n"
                          for i in range(20)))
  return str(path)


def test_defaults(tiny, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = A.parse_args(["--model", tiny])
  assert (c.backend, c.method, c.task, c.data) == ("jax", "losia", "arithmetic", None)
  assert (c.steps, c.epochs, c.batch_size, c.seq_len) == (80, None, 8, 64)
  assert c.lr == A.DEFAULT_LR["losia"] and c.lr_schedule == "cosine"
  assert c.output_dir == str(tmp_path / "losia-run")
  assert c.model.kind == "hf" and c.model.path == tiny
  assert (c.export, c.plots, c.resume, c.quiet) == (True, True, False, False)
  assert c.explicit == frozenset({"model"})
  cfg = c.losia_config_for(num_layers=30, total_steps=80)
  assert cfg == LoSiAConfig(rank_factor=0.125, output_rank_factor=0.125, period=1, seed=0)


@pytest.mark.skipif(importlib.util.find_spec(A.EMBEDDED_PACKAGE) is None,
                    reason="embedded model package not installed")
def test_default_model_is_the_embedded_gguf():
  c = A.parse_args([])
  assert c.model.kind == "gguf" and c.model.path.endswith(A.EMBEDDED_FILE)
  assert os.path.isfile(c.model.path)


def test_method_picks_its_default_lr(tiny):
  assert A.parse_args(["--model", tiny, "--method", "full"]).lr == A.DEFAULT_LR["full"]
  assert A.parse_args(["--model", tiny, "--method", "full", "--lr", "0.1"]).lr == 0.1


def test_galore_settings(tiny, capsys):
  c = A.parse_args(["--model", tiny, "--method", "galore"])
  assert (c.backend, c.lr) == ("jax", A.DEFAULT_LR["galore"])
  # LLaMA-Factory's defaults: rank 16, projection update interval 200, scale 2.0
  assert c.galore_settings == {"galore_rank": 16, "galore_update_gap": 200, "galore_scale": 2.0}
  c = A.parse_args(["--model", tiny, "--method", "galore", "--galore-rank", "4",
                    "--galore-update-gap", "50", "--galore-scale", "0.25"])
  assert c.galore_settings == {"galore_rank": 4, "galore_update_gap": 50, "galore_scale": 0.25}
  assert c.to_dict()["galore_rank"] == 4
  # other methods carry none (a checkpoint written before GaLore resumes unchanged)
  c = A.parse_args(["--model", tiny, "--method", "full"])
  assert c.galore_settings == {} and c.to_dict()["galore_rank"] is None
  assert main(["--help"]) == 0
  text = capsys.readouterr().out
  for flag in ("--galore-rank", "--galore-update-gap", "--galore-scale", "galore"):
    assert flag in text


def test_auto_period():
  assert A.auto_period(80, 31) == 1
  assert A.auto_period(1000, 31) == 16
  assert A.auto_period(10 ** 6, 31) == A.MAX_AUTO_PERIOD
  assert A.auto_period(5, 31) == 1


def test_losia_flags_make_the_config(tiny):
  c = A.parse_args(["--model", tiny, "--seed", "3", "--rank-factor", "0.25", "--period", "7",
                    "--schedule", "sync", "--importance", "param_first", "--importance-beta1",
                    "0.5", "--importance-beta2", "0.6", "--scale", "2", "--no-rewarm",
                    "--non-target", "freeze", "--target-modules", "q_proj, v_proj",
                    "--output-rank-factor", "0"])
  assert c.losia_config_for(2, 100) == LoSiAConfig(
      rank_factor=0.25, output_rank_factor=0.0, period=7, schedule="sync",
      importance="param_first", importance_beta1=0.5, importance_beta2=0.6, scale=2.0,
      rewarm=False, non_target="freeze", target_modules=("q_proj", "v_proj"), seed=3)
  assert A.parse_args(["--model", tiny, "--seed", "3", "--losia-seed", "9"]).losia["seed"] == 9


def test_every_losia_field_has_a_flag():
  text = A.build_parser().format_help()
  for name in LoSiAConfig.__dataclass_fields__:
    assert A._losia_flag(name) in text


def test_losia_config_file_then_flags(tiny, tmp_path):
  path = tmp_path / "losia.json"
  path.write_text(json.dumps({"rank_factor": 0.5, "period": 20, "seed": 11}))
  c = A.parse_args(["--model", tiny, "--losia-config", str(path), "--period", "9"])
  cfg = c.losia_config_for(2, 100)
  # file over the CLI defaults, flags over the file; fields the file omits keep CLI defaults
  assert (cfg.rank_factor, cfg.period, cfg.seed) == (0.5, 9, 11)
  assert cfg.output_rank_factor == A.LOSIA_DEFAULTS["output_rank_factor"]
  full = tmp_path / "full.json"
  LoSiAConfig(rank_factor=0.3, period=4).save(full)
  c = A.parse_args(["--model", tiny, "--losia-config", str(full)])
  assert c.losia_config_for(2, 100) == LoSiAConfig(rank_factor=0.3, period=4)


def run_main(argv, capsys):
  rc = main(argv)
  err = capsys.readouterr().err
  return rc, err


BAD = [
    (["--steps", "0"], "--steps"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "nan"], "--epochs"),
    (["--steps", "5", "--epochs", "1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "1"], "--seq-len"),
    (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "abc"], "--lr"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--warmup-steps", "10", "--steps", "5"], "--warmup-steps"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--eval-size", "-1"], "--eval-size"),
    (["--save-every", "-1"], "--save-every"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--lora-rank", "0"], "--lora-rank"),
    (["--lora-alpha", "0"], "--lora-alpha"),
    (["--backend", "tensorflow"], "--backend"),
    (["--method", "qlora"], "--method"),
    (["--lr-schedule", "step"], "--lr-schedule"),
    (["--task", "chess"], "--task"),
    (["--rank-factor", "0"], "--rank-factor"),
    (["--rank-factor", "1.5"], "--rank-factor"),
    (["--output-rank-factor", "-1"], "--output-rank-factor"),
    (["--period", "0"], "--period"),
    (["--period", "soon"], "--period"),
    (["--schedule", "lazy"], "--schedule"),
    (["--importance", "grad"], "--importance"),
    (["--importance-beta1", "1"], "--importance-beta1"),
    (["--importance-beta2", "-0.1"], "--importance-beta2"),
    (["--scale", "0"], "--scale"),
    (["--non-target", "drop"], "--non-target"),
    (["--target-modules", ","], "--target-modules"),
    (["--target-modules", "q_proj,(["], "--target-modules"),
    (["--losia-seed", "1.5"], "--losia-seed"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--grad-accum", "two"], "--grad-accum"),
    (["--precision", "fp16"], "--precision"),
    (["--gradient-checkpointing"], "--gradient-checkpointing"),  # the default backend is jax
    (["--backend", "jax", "--gradient-checkpointing"], "--gradient-checkpointing"),
    (["--method", "galore", "--galore-rank", "0"], "--galore-rank"),
    (["--method", "galore", "--galore-rank", "1.5"], "--galore-rank"),
    (["--method", "galore", "--galore-update-gap", "0"], "--galore-update-gap"),
    (["--method", "galore", "--galore-scale", "0"], "--galore-scale"),
    (["--method", "galore", "--galore-scale", "nan"], "--galore-scale"),
    (["--method", "lora", "--galore-rank", "8"], "--galore-rank"),  # GaLore's flags only
    (["--backend", "torch", "--method", "galore"], "add --backend jax"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_exit_2_naming_the_flag(argv, flag, tiny, tmp_path, capsys):
  rc, err = run_main(["--model", tiny, "--output-dir", str(tmp_path / "o")] + argv, capsys)
  assert rc == 2
  assert err.startswith("losia-finetune: error:"), err
  assert flag in err, err
  assert "Traceback" not in err
  assert len(err.strip().splitlines()) == 1


def test_bad_paths(tiny, jsonl, tmp_path, capsys):
  missing = str(tmp_path / "nope")
  cases = [
      (["--model", missing], ["--model", missing]),
      (["--model", missing + ".gguf"], ["--model", missing + ".gguf"]),
      (["--model", str(tmp_path)], ["--model", "config.json"]),
      (["--model", jsonl], ["--model", jsonl]),
      (["--model", tiny, "--data", missing], ["--data", missing]),
      (["--model", tiny, "--data", jsonl, "--eval-data", missing], ["--eval-data", missing]),
      (["--model", tiny, "--eval-data", jsonl], ["--eval-data", "--data"]),
      (["--model", tiny, "--data", jsonl, "--task", "arithmetic"], ["--task"]),
      (["--model", tiny, "--losia-config", missing], ["--losia-config", missing]),
  ]
  for argv, words in cases:
    rc, err = run_main(argv + ["--output-dir", str(tmp_path / "o")], capsys)
    assert rc == 2, (argv, err)
    assert err.startswith("losia-finetune: error:")
    for w in words:
      assert w in err, (argv, err)


def test_bad_losia_config_file(tiny, tmp_path, capsys):
  for content, words in [
      ("{not json", ["--losia-config", "not valid JSON"]),
      (json.dumps({"rank_factor": 2}), ["--losia-config", "rank_factor"]),
      (json.dumps({"rank": 0.1}), ["--losia-config", "unknown", "'rank'"]),
      (json.dumps([1]), ["--losia-config", "JSON object"]),
  ]:
    path = tmp_path / "c.json"
    path.write_text(content)
    rc, err = run_main(["--model", tiny, "--losia-config", str(path)], capsys)
    assert rc == 2 and err.startswith("losia-finetune: error:"), err
    for w in words:
      assert w in err, (content, err)


def test_help_returns_0(capsys):
  assert main(["--help"]) == 0
  assert "--rank-factor" in capsys.readouterr().out


def test_precision_accumulation_and_checkpointing_flags(tiny, capsys):
  c = A.parse_args(["--model", tiny])
  assert (c.precision, c.grad_accum, c.gradient_checkpointing) == ("fp32", 1, False)
  assert c.step_batch == 8
  c = A.parse_args(["--model", tiny, "--backend", "torch", "--precision", "bf16",
                    "--batch-size", "4", "--grad-accum", "3", "--gradient-checkpointing"])
  assert (c.precision, c.grad_accum, c.gradient_checkpointing) == ("bf16", 3, True)
  assert c.batch_size == 4 and c.step_batch == 12  # --batch-size is per micro-batch
  assert c.to_dict()["grad_accum"] == 3
  c = A.parse_args(["--model", tiny, "--precision", "bf16", "--grad-accum", "2"])  # jax too
  assert (c.backend, c.precision, c.grad_accum) == ("jax", "bf16", 2)
  assert main(["--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  # --help says which bf16 it is: autocast compute on fp32 weights, not bf16 weights.
  assert "torch autocast" in text and "on fp32 weights" in text and "master copies" in text


def test_device_flags(tiny, capsys):
  c = A.parse_args(["--model", tiny])
  assert (c.fsdp, c.devices) == (False, 1)
  c = A.parse_args(["--model", tiny, "--backend", "torch", "--fsdp"])
  assert c.fsdp and c.to_dict()["fsdp"] is True
  c = A.parse_args(["--model", tiny, "--devices", "4", "--batch-size", "8"])
  assert c.devices == 4 and c.batch_size == 8  # the global batch, split over the devices
  assert main(["--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "torchrun --nproc-per-node N -m losia_cli --backend torch" in text
  assert "--fsdp" in text and "FSDP2" in text and "--devices N" in text
  assert "XLA_FLAGS=--xla_force_host_platform_device_count=N" in text


# --- errors the driver finds before it builds a backend --------------------------------------

def test_output_dir_is_a_file(tiny, tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  rc, err = run_main(["--model", tiny, "--output-dir", str(f)], capsys)
  assert rc == 2 and "--output-dir" in err and "file" in err


def test_output_dir_not_writable(tiny, tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")  # a directory under a file can never be created, even by root
  rc, err = run_main(["--model", tiny, "--output-dir", str(f / "sub")], capsys)
  assert rc == 2 and "not writable" in err and str(f / "sub") in err


def test_resume_without_checkpoint(tiny, tmp_path, capsys):
  rc, err = run_main(["--model", tiny, "--output-dir", str(tmp_path / "o"), "--resume"], capsys)
  assert rc == 2 and "--resume" in err and "no complete checkpoint" in err


def test_existing_checkpoints_need_resume(tiny, tmp_path, capsys):
  ck = tmp_path / "o" / "checkpoints" / "step-000004"
  ck.mkdir(parents=True)
  (ck / "driver.json").write_text("{}")
  rc, err = run_main(["--model", tiny, "--output-dir", str(tmp_path / "o")], capsys)
  assert rc == 2 and "--resume" in err and "another --output-dir" in err


def test_model_dir_without_tokenizer(tiny, tmp_path, capsys):
  import shutil
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(tiny, name), bare)
  rc, err = run_main(["--model", str(bare), "--output-dir", str(tmp_path / "o")], capsys)
  assert rc == 2 and "tokenizer" in err and str(bare) in err, err


def test_seq_len_over_max_positions(tiny, tmp_path, capsys):
  rc, err = run_main(["--model", tiny, "--seq-len", "300", "--output-dir",
                      str(tmp_path / "o")], capsys)
  assert rc == 2 and "--seq-len" in err and "300" in err and "256" in err, err


def test_all_examples_too_long(tiny, tmp_path, capsys):
  data = tmp_path / "long.jsonl"
  data.write_text(json.dumps({"prompt": "x" * 40, "response": "y" * 40}) + "\n")
  rc, err = run_main(["--model", tiny, "--data", str(data), "--seq-len", "16",
                      "--output-dir", str(tmp_path / "o")], capsys)
  assert rc == 2 and "--seq-len" in err and "longer" in err, err


def test_bad_data_file(tiny, tmp_path, capsys):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
  rc, err = run_main(["--model", tiny, "--data", str(data), "--output-dir",
                      str(tmp_path / "o")], capsys)
  assert rc == 2 and f"{data}:2" in err and "response" in err, err
