"""Smoke test of ``benchmarks/peers.py``: a tiny run end to end, both backends.

Checks the JSON it writes has every method row with finite figures. Nothing
about timing is asserted: the figures of a shared CPU say nothing here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests.parity_fixtures import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "peers.py")


def _peers_module():
  return load_script("peers_under_test", SCRIPT)


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_peers_tiny_run_reports_every_method(tmp_path):
  out = tmp_path / "results.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one host device, as a benchmark run has
  subprocess.run(
      [sys.executable, SCRIPT, "--tiny", "--workloads", "smollm2-135m", "--steps", "2",
       "--rounds", "1", "--warmup", "1", "--isolation", "inline", "--json-out", str(out),
       "--model-dir", str(tmp_path / "models")],
      check=True, cwd=ROOT, env=env, timeout=300)
  doc = json.loads(out.read_text())
  assert doc["partial"] is None
  peers = _peers_module()
  (w,) = doc["workloads"]
  specs = peers.method_specs(w)
  by_name = {s["name"]: s for s in specs}
  # the default rows leave the output layer out; one Pro row adds it in row mode
  assert {s.get("output_rank_factor") for s in specs if s["method"] == "losia-pro"} == {0.0, 0.125}
  assert set(doc["results"]) == {"jax/smollm2-135m", "torch/smollm2-135m"}
  for key, res in doc["results"].items():
    backend = key.split("/")[0]
    want = {s["name"] for s in specs if s["backends"] is None or backend in s["backends"]}
    assert set(res["rows"]) == want, key
    assert res["best_lora"] in res["rows"] and res["matched_lora"] in res["rows"]
    for name, row in res["rows"].items():
      assert row["trainable_params"] > 0 and row["opt_state_bytes"] >= 0, (key, name)
      if name.startswith("losia"):
        assert row["plan_block_params"] == peers.losia_block_params(
            w["config"], by_name[name]["output_rank_factor"]), (key, name)
        if name in ("losia", "losia-pro"):
          assert row["plan_block_params"] == res["losia_block_params"], (key, name)
      if name == "losia (non_target=train)":
        continue  # built for its optimizer state only
      assert len(row["times_s"]) == 2, (key, name)
      for k in ("median_s", "min_s", "max_s", "ratio_full", "ratio_best_lora", "peak_bytes"):
        assert _finite(row[k]) and row[k] > 0, (key, name, k)
      if backend == "jax":
        assert _finite(row["compile_s"]) and _finite(row["gflops"]), (key, name)
    for t in res["targets"].values():
      assert _finite(t["value"]) and isinstance(t["met"], bool), (key, t)
  # LoSiA with trained non-targets keeps Adam moments for them: more state than frozen.
  for res in doc["results"].values():
    rows = res["rows"]
    assert rows["losia (non_target=train)"]["opt_state_bytes"] > rows["losia"]["opt_state_bytes"]


# --- benchmarks/gpu.py: the GPU run's dry run on the CPU ---------------------------------------

GPU_SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.py")
RESULTS_MD = os.path.join(ROOT, "benchmarks", "RESULTS.md")


def _gpu_module():
  return load_script("gpu_under_test", GPU_SCRIPT)


def test_gpu_step_flops_of_the_7b_shape():
  """The FLOP model behind the MFU column, against the 6 N P rule of thumb."""
  gpu = _gpu_module()
  c = gpu.LLAMA2_7B
  specs = {s["name"]: s for s in gpu.method_specs(c)}
  f = {n: gpu.step_flops(c, 4, 2048, s) for n, s in specs.items()}
  n_tok, matrices = 4 * 2048, 32 * 202_375_168 + 2 * 32000 * 4096  # decoder + embed/lm_head
  dense = 6 * n_tok * (matrices - 32000 * 4096)  # the embedding lookup is no matmul
  attn = 32 * 3 * 2 * 4 * 2048 * 2048 * 4096  # causal: fwd 2 B S^2 h, bwd twice that
  assert f["full"] == pytest.approx(dense + attn, rel=1e-9)
  # LoRA and LoSiA-Pro skip the frozen weights' gradients: about 2/3 of full, Pro a bit more
  assert f["lora r=8"] < f["losia-pro"] < f["full"]
  assert f["losia"] == f["losia-pro"]  # what the method needs, whatever it computes
  assert 0.6 < f["losia-pro"] / f["full"] < 0.72
  assert set(specs) >= {"lora r=8", "losia-pro", "losia", "full"}
  assert any(s.get("matched") for s in specs.values())


def test_gpu_section_replaces_only_its_own_block(tmp_path):
  gpu = _gpu_module()
  md = tmp_path / "R.md"
  md.write_text("# title\n\nbody\n")
  gpu.insert_section(str(md), f"{gpu.BEGIN}\nfirst\n{gpu.END}\n")
  gpu.insert_section(str(md), f"{gpu.BEGIN}\nsecond\n{gpu.END}\n")
  text = md.read_text()
  assert text.startswith("# title\n\nbody\n") and text.count(gpu.BEGIN) == 1
  assert "second" in text and "first" not in text
  md.write_text(text + "\nafter\n")  # text below the section stays too
  gpu.insert_section(str(md), f"{gpu.BEGIN}\nthird\n{gpu.END}\n")
  assert md.read_text().endswith(f"{gpu.END}\n\nafter\n") and "second" not in md.read_text()


def test_peers_rewrite_keeps_the_sections_other_scripts_generate(tmp_path):
  peers = _peers_module()
  md = tmp_path / "R.md"
  fsdp = "<!-- torch_fsdp_memory.py: begin generated section -->\nfsdp rows\n" \
         "<!-- torch_fsdp_memory.py: end -->"
  md.write_text(f"# old cpu tables\n\n{peers.GPU_BEGIN}\ngpu rows\n{peers.GPU_END}\n\n"
                f"old text\n\n{fsdp}\n")
  peers.write_md("# new cpu tables\n", str(md))
  text = md.read_text()
  assert text.startswith("# new cpu tables\n") and "old cpu" not in text
  assert "old text" not in text
  assert f"{peers.GPU_BEGIN}\ngpu rows\n{peers.GPU_END}" in text and fsdp in text
  peers.write_md(text, str(md))  # rewriting with the sections in place adds no copy
  assert md.read_text().count("fsdp rows") == 1 and md.read_text().count("gpu rows") == 1


@pytest.mark.slow
def test_gpu_dry_run_checks_benchmarks_and_writes_the_section(tmp_path):
  """``gpu.py --dry-run``: both backends' device checks (the CPU standing in for the GPU),
  the benchmark rows with FLOPs, MFU and the targets, and the markdown section in a copy
  of RESULTS.md; the committed RESULTS.md is not touched."""
  with open(RESULTS_MD, encoding="utf-8") as f:
    committed = f.read()
  md, out = tmp_path / "RESULTS.md", tmp_path / "gpu.json"
  md.write_text(committed)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  methods = ["lora r=8", "losia-pro"]
  subprocess.run(
      [sys.executable, GPU_SCRIPT, "--dry-run", "--layers", "1", "--methods", ",".join(methods),
       "--peak-tflops", "1", "--json", str(out), "--md", str(md)],
      check=True, cwd=ROOT, env=env, timeout=300)
  with open(RESULTS_MD, encoding="utf-8") as f:
    assert f.read() == committed
  gpu = _gpu_module()
  doc = json.loads(out.read_text())
  assert doc["partial"] is None and set(doc["results"]) == {"torch", "jax"}
  for backend, res in doc["results"].items():
    assert res["status"] == "finished" and res["error"] is None, (backend, res["status"])
    assert len(res["checks"]) == (3 if backend == "torch" else 2)
    assert all(ch["passed"] for ch in res["checks"]), res["checks"]
    bench = res["bench"]
    assert (bench["layers"], bench["batch"], bench["seq"]) == (1, 1, 16)
    assert list(bench["rows"]) == methods and not bench["skipped"]
    for name, row in bench["rows"].items():
      assert "error" not in row, (backend, name, row.get("error"))
      assert len(row["times_s"]) == 2, (backend, name)
      for k in ("median_s", "peak_bytes", "tflop", "mfu", "ratio_best_lora", "trainable_params"):
        assert _finite(row[k]) and row[k] > 0, (backend, name, k)
      if backend == "jax":
        assert _finite(row["compile_s"]) and _finite(row["gflops"]), (backend, name)
    assert bench["best_lora"] == "lora r=8"
    assert set(res["targets"]) == {"pro_vs_best_lora", "peak_pro_vs_lora", "pro_mfu"}
    for t in res["targets"].values():
      assert _finite(t["value"]) and isinstance(t["met"], bool), (backend, t)
  text = md.read_text()
  assert text.startswith(committed) and text.count(gpu.BEGIN) == 1
  block = text[text.index(gpu.BEGIN):]
  assert block.rstrip().endswith(gpu.END)
  for needle in ("### Correctness on the device", "### Training step", "### Targets",
                 "LoSiA-Pro step / best LoRA step", "**torch**: 1 layers", "**jax**: 1 layers"):
    assert needle in block, needle
  assert "**FAIL**" not in block


def test_gpu_bench_loop_halves_the_batch_and_keeps_to_the_deadline(tmp_path):
  """The first method not fitting halves the batch; later methods are skipped when the
  time left is shorter than the longest method took; the file is rewritten as it goes."""
  workers = load_script("gpu_workers_under_test",
                        os.path.join(ROOT, "benchmarks", "gpu_workers.py"))
  names = ["lora r=8", "losia-pro", "losia", "full"]
  calls = []

  def run_method(spec, job):
    calls.append((spec["name"], job["batch"]))
    if job["batch"] > 2:
      raise MemoryError("does not fit: XLA needs 200 GiB")
    if spec["name"] == "losia-pro":
      time.sleep(0.2)
    return {"method": spec["name"], "times_s": [0.1]}

  rec = workers.Recorder(str(tmp_path / "w.json"), "fake")
  job = {"batch": 8, "seq": 16, "config": {"num_hidden_layers": 1},
         "methods": [{"name": n, "method": n} for n in names], "deadline": time.time() + 0.1}
  workers.bench_loop(rec, job, run_method)
  bench = json.loads((tmp_path / "w.json").read_text())["bench"]
  assert calls == [("lora r=8", 8), ("lora r=8", 4), ("lora r=8", 2), ("losia-pro", 2)]
  assert bench["batch"] == 2 and [a["batch"] for a in bench["batch_attempts"]] == [8, 4]
  assert list(bench["rows"]) == ["lora r=8", "losia-pro"]
  assert set(bench["skipped"]) == {"losia", "full"}


def test_gpu_jax_layer_count_from_the_compile_probe():
  workers = load_script("gpu_workers_under_test2",
                        os.path.join(ROOT, "benchmarks", "gpu_workers.py"))
  # 4 s + 2 s per layer, 0.5 s per layer to run: 3 methods at n layers take 3 * (4 + 2.5 n)
  assert workers.choose_layers({2: 8.0, 4: 12.0}, 3 * (4 + 2.5 * 32), 32) == 32
  assert workers.choose_layers({2: 8.0, 4: 12.0}, 3 * (4 + 2.5 * 16), 32) == 16
  assert workers.choose_layers({2: 8.0, 4: 12.0}, 1.0, 32) == 1
  # a difference below noise falls back to a quarter of the larger probe per layer
  assert workers.choose_layers({2: 12.0, 4: 12.0}, 3 * (10.5 + 1.25 * 8), 32) == 8


# --- benchmarks/torch_fsdp_memory.py: LoSiA against AdamW under FSDP2 ------------------------

FSDP_MEMORY_SCRIPT = os.path.join(ROOT, "benchmarks", "torch_fsdp_memory.py")


@pytest.mark.slow
def test_torch_fsdp_memory_tiny_run(tmp_path):
  """Two gloo processes per method on a tiny Llama: every figure is there, the state
  compares as the method says, and the collective counts add up (LoSiA's relocalization
  bytes equal the formula of docs/torch.md exactly). No timing is asserted."""
  pytest.importorskip("transformers")
  out, md = tmp_path / "fsdp.json", tmp_path / "R.md"
  md.write_text("# title\n")
  env = {**os.environ, "OMP_NUM_THREADS": "1"}
  run = subprocess.run(
      [sys.executable, FSDP_MEMORY_SCRIPT, "--hidden", "32", "--intermediate", "48",
       "--layers", "2", "--vocab", "64", "--heads", "4", "--kv-heads", "2", "--seq", "8",
       "--json", str(out), "--md", str(md)],
      check=True, cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
  doc = json.loads(out.read_text())
  s = doc["summary"]
  bench = load_script("torch_fsdp_memory_under_test", FSDP_MEMORY_SCRIPT)
  assert list(s) == list(bench.METHODS)
  train, freeze, adamw = (s[m] for m in bench.METHODS)
  assert train["param_bytes_rank"] == freeze["param_bytes_rank"] == adamw["param_bytes_rank"]
  assert adamw["param_bytes_model"] <= 2 * adamw["param_bytes_rank"]  # 2 ranks, dim-0 halves
  # AdamW: two fp32 moments of every local shard (and a step counter per parameter)
  assert 2 * adamw["param_bytes_rank"] <= adamw["state_bytes"] < 2.1 * adamw["param_bytes_rank"]
  assert freeze["state_bytes"] < train["state_bytes"] < adamw["state_bytes"]
  # every parameter has its gradient shard but the frozen non-targets
  assert freeze["grad_bytes"] < train["grad_bytes"] == adamw["grad_bytes"]
  assert adamw["grad_bytes"] == adamw["param_bytes_rank"]
  for m in bench.METHODS:
    assert s[m]["peak_rss_growth"] > 0 and len(s[m]["per_rank"]["state_bytes"]) == 2, m
    # every parameter is gathered for the forward at least once a step
    assert s[m]["fsdp_bytes"]["all_gather_single"] >= s[m]["param_bytes_model"], m
  # frozen non-targets have no gradients to reduce-scatter
  assert (freeze["fsdp_bytes"]["reduce_scatter_single"]
          < train["fsdp_bytes"]["reduce_scatter_single"]
          == adamw["fsdp_bytes"]["reduce_scatter_single"])
  for m in ("losia-train", "losia-freeze"):
    rl = s[m]["relocalization"]
    assert rl["step"] == 1 and rl["targets"] == 7, (m, rl)  # layer 0's seven projections
    assert rl["losia_bytes"] == rl["formula_bytes"] + s[m]["ordinary_step_losia_bytes"], m
    assert s[m]["ordinary_step_losia_bytes"] == 4  # the one-flag non-finite check
    ranks = doc["results"][m]
    assert all(not r["steps"][i]["fwd_bwd"].get("losia") for r in ranks for i in range(3)), m
  for m, ranks in doc["results"].items():  # every collective is FSDP's or LoSiA's
    assert all(not r["steps"][i][part].get("other") for r in ranks for i in range(3)
               for part in ("fwd_bwd", "opt_step")), m
  assert "losia-train / adamw: optimizer state" in run.stdout
  assert "/ parameter bytes of the model" in run.stdout
  text = md.read_text()
  assert text.startswith("# title\n\n" + bench.MD_BEGIN)
  assert "## FSDP2 memory (torch, 2 gloo processes)" in text and run.stdout.strip() in text
  assert f"--md {md}`" in text and "--json" not in text  # the command, less the JSON path


def test_torch_fsdp_memory_section_replaces_only_its_own_block(tmp_path):
  bench = load_script("torch_fsdp_memory_md", FSDP_MEMORY_SCRIPT)
  md = tmp_path / "R.md"
  md.write_text("# title\n\nbody\n")
  for body in ("first", "second"):
    bench.insert_section(str(md), f"{bench.MD_BEGIN}\n{body}\n{bench.MD_END}\n")
  md.write_text(md.read_text() + "\nafter\n")
  bench.insert_section(str(md), f"{bench.MD_BEGIN}\nthird\n{bench.MD_END}\n")
  assert md.read_text() == f"# title\n\nbody\n\n{bench.MD_BEGIN}\nthird\n{bench.MD_END}\n\nafter\n"


def test_torch_fsdp_memory_refuses_unclear_arguments():
  bench = load_script("torch_fsdp_memory_args", FSDP_MEMORY_SCRIPT)
  for argv in (["--methods", "losia,adamw"], ["--steps", "2", "--period", "2"]):
    with pytest.raises(SystemExit):
      bench.parse_args(argv)
  assert bench.parse_args([]).methods == list(bench.METHODS)


def test_jax_torch_step_tiny_run(tmp_path, capsys):
  """benchmarks/jax_torch_step.py end to end on a tiny LLaMA: every row, finite figures."""
  bench = load_script("jax_torch_step_under_test",
                      os.path.join(ROOT, "benchmarks", "jax_torch_step.py"))
  out = tmp_path / "step.json"
  assert bench.main(["--tiny", "--layers", "1", "--vocab", "128", "--batch", "1", "--seq", "8",
                     "--steps", "1", "--json", str(out)]) == 0
  text = capsys.readouterr().out
  for row in ("jax ", "jax, autodiff dot", "torch ", "x^T @ dy", "all of them"):
    assert row in text, row
  data = json.loads(out.read_text())
  assert set(data["steps_s"]) == {"jax", "jax, autodiff dot", "torch"}
  assert len(data["gemms"]) == 12
  assert all(_finite(v) and v > 0 for v in data["steps_s"].values())



def test_jax_compile_time_runs_and_writes_its_section(tmp_path):
  """benchmarks/jax_compile_time.py on one layer (optimizer step and the scatter
  floor, abstract SmolLM2 shapes): every variant has a compile time and an HLO
  count, and the section names the non-target policy it measured."""
  bench = load_script("jax_compile_time_under_test",
                      os.path.join(ROOT, "benchmarks", "jax_compile_time.py"))
  out, md = tmp_path / "ct.json", tmp_path / "R.md"
  md.write_text("# results\n")
  bench.main(["--layers", "1", "--parts", "opt", "floor", "--json", str(out), "--md", str(md)])
  doc = json.loads(out.read_text())
  assert set(doc["opt 1"]) == {"adamw", "losia", "adamw stacked", "losia stacked"}
  assert set(doc["floor 1"]) == {"adds", "scatters", "masked writes"}
  rows = [*doc["opt 1"].values(), *doc["floor 1"].values()]
  assert all(_finite(r["compile_s"]) and r["hlo"] > 0 for r in rows)
  assert "`floor`:" in md.read_text()
  assert "--non-target train" in md.read_text()

@pytest.mark.slow
def test_peers_7b_tiny_run_amortizes_pro_over_the_slots(tmp_path):
  """``peers_7b.py --tiny``: every LoRA and LoSiA row in both backends, no full or
  GaLore row, the slot-amortized LoSiA-Pro step, the computed AdamW state, and
  its own section of a copy of RESULTS.md (the rest of the file untouched)."""
  md = tmp_path / "R.md"
  md.write_text("# tables\n\nkept\n")
  out = tmp_path / "7b.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "peers_7b.py"), "--tiny", "--layers",
       "2", "--seq", "8", "--steps", "1", "--rounds", "1", "--isolation", "inline",
       "--write", "--results-md", str(md), "--json-out", str(out)],
      check=True, cwd=ROOT, env=env, timeout=300)
  doc = json.loads(out.read_text())
  bench = load_script("peers_7b_under_test", os.path.join(ROOT, "benchmarks", "peers_7b.py"))
  assert set(doc["results"]) == {"jax/llama2-7b-2l", "torch/llama2-7b-2l"}
  for key, res in doc["results"].items():
    names = set(res["rows"])
    assert "full" not in names and not any(n.startswith("galore") for n in names), key
    assert {"losia-pro", "losia-pro (layer profiling)", res["matched_lora"]} <= names, key
    s = res["summary"]
    out_slot = res["rows"]["losia-pro"]["median_s"]
    layer_slot = res["rows"]["losia-pro (layer profiling)"]["median_s"]
    assert math.isclose(s["pro_amortized_s"], (out_slot + 2 * layer_slot) / 3)
    assert s["adamw_state_bytes"] == 8 * bench.total_params(doc["workload"]["config"])
    assert _finite(s["state_vs_adamw"]) and _finite(s["pro_amortized_vs_best_lora"])
  # the model the workers built has exactly the counted parameters
  import transformers
  cfg = transformers.LlamaConfig(**doc["workload"]["config"])
  with __import__("torch").device("meta"):
    n = sum(p.numel() for p in transformers.LlamaForCausalLM(cfg).parameters())
  assert n == bench.total_params(doc["workload"]["config"])
  text = md.read_text()
  assert text.startswith("# tables\n\nkept\n")
  assert text.count(bench.MD_BEGIN) == 1 and "of the fastest LoRA's" in text


@pytest.mark.parametrize("backend, method", [("jax", "losia-pro"), ("torch", "full")])
def test_cli_step_times_a_whole_step_and_counts_page_faults(backend, method):
  bench = load_script("cli_step_under_test", os.path.join(ROOT, "benchmarks", "cli_step.py"))
  out = bench.main(["--tiny", "--backend", backend, "--method", method, "--steps", "2",
                    "--warmup", "1"])
  assert out["backend"] == backend and out["workload"] == "smollm2-135m"
  assert _finite(out["median_s"]) and out["median_s"] > 0 and out["faults_per_step"] >= 0
