"""``losia-finetune``: the driver that ties data, a backend, evaluation and reports together.

``main(argv)`` returns the exit code (0 success; 2 bad input, a damaged
checkpoint or an unusable output directory, each one line; 1 unexpected, with
a traceback; 128 + the signal after SIGTERM/SIGINT, with a checkpoint) and
never calls ``sys.exit``, so tests can call it directly.
The backend (model + optimizer) is imported only when chosen, so the torch
backend works without JAX installed and vice versa.

Under ``torchrun`` (``losia_cli.distributed``) every process runs this whole driver
on the same inputs; rank 0 alone prints, writes the metrics, pictures, summary and
checkpoint files, and reports errors (the others fail the same way, silently).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
import traceback
from typing import Any, Optional

from losia_cli import checkpoints as ck
from losia_cli import data as D
from losia_cli import distributed as P
from losia_cli import report as R
from losia_cli import resume as RS
from losia_cli import signals as S
from losia_cli import tasks
from losia_cli.args import (PROG, HelpExit, RunConfig, UsageError,
                            build_config, default_warmup, output_dir_of, parse_flags)
from losia_cli.backend import SetupError, TrainSettings
from losia_cli.model_files import ModelFileError, load_tokenizer, model_facts

EVAL_CHUNK = 32          # prompts per backend.generate call (progress between calls)
SHOWN_EXAMPLES = 3
DRIVER_FORMAT = RS.DRIVER_FORMAT


class CliError(Exception):
  """Bad input found after parsing (exit code 2)."""


def main(argv: Optional[list[str]] = None) -> int:
  # torchrun's other processes meet the same bad input as rank 0: one report is enough.
  rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
  say = (lambda text: print(text, file=sys.stderr)) if rank == "0" else (lambda text: None)
  internal = PROG if rank == "0" else f"{PROG} (rank {rank})"
  # An error that ends the run: the others wait for rank 0's report (distributed.py).
  fail = say if rank == "0" else (
      lambda text: P.report_unless_rank0_does(text.replace(PROG, internal, 1)))
  try:
    return Run(parse_flags(argv)).execute()
  except HelpExit as e:
    return e.status
  except (UsageError, CliError, D.DataError, ck.OutputDirError, RS.ResumeError,
          ModelFileError, P.LaunchError) as e:
    fail(f"{PROG}: error: {e}")
    return 2
  except S.Preempted as e:
    say(f"{PROG}: {e.message}")
    return e.exit_code
  except OSError as e:
    if e.filename is None:
      traceback.print_exc()
      print(f"{internal}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
      return 1
    # The environment (a full disk, a permission, a vanished mount), not a bug:
    # name the path; what was saved before is intact (every write is atomic).
    fail(f"{PROG}: error: cannot write or read {e.filename}: {e.strerror or e}; fix that "
        "(free space, permissions), then continue with --resume")
    return 2
  except KeyboardInterrupt:
    say(f"\n{PROG}: interrupted; continue later with --resume (from the latest checkpoint)")
    return 130
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    print(f"{internal}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1


# --- the model's files, read before the backend loads (losia_cli.model_files) -------------

def make_backend(cfg: RunConfig, settings: TrainSettings):
  try:
    if cfg.backend == "jax":
      from losia_cli.jax_backend import JaxBackend as cls
    else:
      from losia_cli.torch_backend import TorchBackend as cls
  except ImportError as e:
    extra = "jax" if cfg.backend == "jax" else "torch"
    raise CliError(f"--backend {cfg.backend} is not available ({e}); install it with "
                   f"pip install 'open-losia[{extra}]'")
  try:
    return cls(cfg.model, settings)
  except SetupError as e:
    raise CliError(str(e)) from None
  except (ValueError, NotImplementedError) as e:
    # NotImplementedError: what the library refuses by design, e.g. LoSiA-Pro under DDP.
    raise CliError(f"--method {cfg.method} on {cfg.model.description}: "
                   f"{' '.join(str(e).split())}") from None


def _check_positions(what: str, seq_len: int, max_positions: Optional[int]) -> None:
  if max_positions is not None and seq_len > max_positions:
    raise CliError(f"argument --seq-len: {seq_len} is more than the model's "
                   f"max_position_embeddings {max_positions} ({what})")


def _fmt_pct(x: Optional[float]) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


# --- the run -----------------------------------------------------------------------------------

@dataclasses.dataclass
class DriverState:
  """What the driver itself needs to continue a run exactly (saved as driver.json)."""

  step: int = 0
  tokens_seen: int = 0
  train_seconds: float = 0.0
  elapsed_s: float = 0.0
  eval_before: Optional[dict[str, Any]] = None


class Run:
  """One invocation: prepare, (restore,) evaluate, train, evaluate, export, report."""

  def __init__(self, given: dict[str, Any]):
    self.given = given  # the flags, by dest, as parse_flags returns them
    self.state = DriverState()
    self.timings: dict[str, float] = {}
    self.resume_from: Optional[tuple[int, str]] = None
    self.saved: Optional[dict[str, Any]] = None

  def log(self, text: str = "") -> None:
    if self.procs.is_main:
      print(text, flush=True)

  def log_err(self, text: str) -> None:
    if self.procs.is_main:
      print(f"{PROG}: {text}", file=sys.stderr, flush=True)

  # -- preparation --

  def execute(self) -> int:
    self.procs = P.from_env()
    with S.StopSignals(announce=self.procs.is_main) as self.stop:
      code = self._execute()
    self.procs.stop()
    return code

  def _execute(self) -> int:
    t_start = R.now()
    rf = self.given.get("resume_from")
    if rf is not None:
      rf = os.path.abspath(os.path.expanduser(rf))
      self.out = output_dir_of({"output_dir": RS.output_dir_for_resume_from(
          rf, self.given.get("output_dir"))})
    else:
      self.out = output_dir_of(self.given)
    if self.given.get("resume") or rf is not None:
      # The checkpoint's flags fill in what is not given now (validated together below).
      step, path, self.saved = RS.select(self.out, rf, self.log_err)
      self.resume_from = (step, path)
      self.cfg = cfg = build_config(RS.merge_given(self.given, self.saved, self.out))
    else:
      self.cfg = cfg = build_config(self.given)  # bad flags fail before anything is looked at
      ck.check_output_dir(self.out, False)
    P.check(cfg, self.procs)
    self.procs.start()  # torchrun: join the other processes (nothing alone)
    t0 = R.now()
    # config.json first: the tokenizer loader reads it too, and would report a
    # broken one as "could not load a tokenizer".
    max_pos, num_layers = model_facts(cfg.model)
    self.tokenizer = load_tokenizer(cfg.model)
    _check_positions("from the model config", cfg.seq_len, max_pos)
    self.formatter = D.Formatter(self.tokenizer)
    self.timings["tokenizer_s"] = R.now() - t0
    self._load_data()
    self.total_steps = (cfg.steps if cfg.steps is not None else
                        D.steps_for_epochs(cfg.epochs, len(self.train_enc), cfg.step_batch))
    self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None else
                         default_warmup(self.total_steps))
    if self.warmup_steps > self.total_steps:
      raise CliError(f"argument --warmup-steps: {cfg.warmup_steps} is more than the run's "
                     f"{self.total_steps} steps")
    self.model_fingerprint = RS.model_fingerprint(cfg.model)
    self.losia = None
    if cfg.uses_losia:
      if num_layers is None:
        raise CliError(f"cannot tell how many layers {cfg.model.path} has (needed for "
                       "--period auto); pass --period N")
      self.losia = cfg.losia_config_for(num_layers, self.total_steps)
    if self.saved is not None:
      RS.check_compatible(self.saved, self.resume_from[1], cfg.to_dict(),
                          self.losia.to_dict() if self.losia else None, self.total_steps,
                          self.data_fingerprint, self.model_fingerprint, self.out)
    settings = TrainSettings(
        method=cfg.method, losia=self.losia, lr=cfg.lr, lr_schedule=cfg.lr_schedule,
        warmup_steps=self.warmup_steps, total_steps=self.total_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_variant=cfg.lora_variant,
        seed=cfg.seed, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        precision=cfg.precision, grad_accum=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing, fsdp=cfg.fsdp, devices=cfg.devices,
        **cfg.galore_settings)
    self.log(f"loading {cfg.model.description} on the {cfg.backend} backend ...")
    t0 = R.now()
    self.backend = make_backend(cfg, settings)
    self.timings["model_load_s"] = R.now() - t0
    _check_positions("reported by the backend", cfg.seq_len, self.backend.max_positions)
    self._check_generation_fits()
    self.procs.barrier()  # every process has checked the output directory before it changes
    if self.procs.is_main:
      ck.create_output_dir(self.out)  # the inputs are good: only now does the run leave traces
    self.log(self.backend.describe())
    self.tracker = R.SubnetTracker()
    if self.resume_from is not None:
      self._restore()
    else:
      self.tracker.observe(0, self.backend.subnets())
    self._print_plan()
    if self.state.eval_before is None and self.eval_examples:
      self.state.eval_before = self._evaluate("before")
    self._train()
    after = self._evaluate("after") if self.eval_examples else None
    self._report_eval(after)
    if cfg.export:
      self._export()
    self._pictures()
    self.timings["total_s"] = R.now() - t_start
    self._write_summary(after)
    return 0

  def _load_data(self) -> None:
    cfg = self.cfg
    fp: dict[str, Any] = {}
    if cfg.task is not None:
      task = tasks.get_task(cfg.task)
      train, evals = task.splits(cfg.seed, eval_size=cfg.eval_size)
      train_ex = [D.Example(p.prompt, p.response) for p in train]
      eval_ex = [D.Example(p.prompt, p.response) for p in evals]
      self.scorer = task.scorer
      fp["task"] = cfg.task
    else:
      train_ex = D.load_jsonl(cfg.data)
      fp["data"] = D.file_fingerprint(cfg.data)
      if cfg.eval_data is not None:
        eval_ex = D.load_jsonl(cfg.eval_data)[:cfg.eval_size]
        fp["eval_data"] = D.file_fingerprint(cfg.eval_data)
      else:
        train_ex, eval_ex = D.heldout_split(train_ex, cfg.eval_size, cfg.seed)
      self.scorer = tasks.EXACT_MATCH
    self.data_fingerprint = fp
    train_ex, self.train_enc, dropped = D.encode_all(train_ex, self.formatter, cfg.seq_len)
    self.dropped = dropped
    if not self.train_enc:
      raise CliError(f"all {dropped} training examples are longer than --seq-len "
                     f"{cfg.seq_len} tokens; raise --seq-len")
    if dropped:
      self.log(f"note: dropped {dropped} training example(s) longer than --seq-len "
               f"{cfg.seq_len} tokens ({len(self.train_enc)} kept)")
    self.eval_examples, eval_enc, eval_dropped = D.encode_all(eval_ex, self.formatter,
                                                              cfg.seq_len)
    if eval_dropped:
      self.log(f"note: dropped {eval_dropped} eval example(s) longer than --seq-len")
    self.eval_prompts = [list(e.prompt_ids) for e in eval_enc]
    if cfg.max_new_tokens is not None:
      self.max_new_tokens = cfg.max_new_tokens
    elif cfg.task is not None:
      self.max_new_tokens = tasks.get_task(cfg.task).max_new_tokens
    else:
      self.max_new_tokens = max((len(e.target_ids) for e in eval_enc), default=1)
    self.order = D.BatchOrder(len(self.train_enc), cfg.step_batch, cfg.seed)

  def _check_generation_fits(self) -> None:
    if not self.eval_prompts:
      return
    longest = max(len(p) for p in self.eval_prompts)
    if longest + self.max_new_tokens > self.backend.max_positions:
      raise CliError(
          f"argument --max-new-tokens: {self.max_new_tokens} new tokens after the longest eval "
          f"prompt ({longest} tokens) exceed the model's max_position_embeddings "
          f"{self.backend.max_positions}")

  def _restore(self) -> None:
    step, path = self.resume_from
    self.log(f"resuming from {path}")
    try:
      self.backend.restore_checkpoint(path)
    except Exception as e:  # pylint: disable=broad-except
      # The manifest matched, so the files are as saved; what a backend refuses
      # (another method or backend, an old format) or fails to parse is still
      # about this checkpoint, not a bug to show a traceback for.
      detail = " ".join(str(e).split())
      if len(detail) > 300:  # TensorStore and friends append pages of internals
        detail = detail[:300] + " ..."
      raise RS.ResumeError(f"cannot resume from checkpoint {path}: {detail} "
                           f"({type(e).__name__}); resume from another with --resume-from, "
                           "or start a new run in another --output-dir") from None
    s = self.saved
    self.state = DriverState(step=s["step"], tokens_seen=s["tokens_seen"],
                             train_seconds=s["train_seconds"], elapsed_s=s["elapsed_s"],
                             eval_before=s.get("eval_before"))
    if self.backend.step != self.state.step:
      raise RS.ResumeError(f"{path}: the backend restored step {self.backend.step} but "
                           f"driver.json says {self.state.step}; the checkpoint is inconsistent")
    # Continuing another run's checkpoint in a new --output-dir: bring its metrics
    # (the loss history the smoothed loss and loss.png carry on from).
    source = RS.run_dir_of_checkpoint(path)
    mine = os.path.join(self.out, "metrics.jsonl")
    if source not in (None, self.out) and not os.path.exists(mine) and self.procs.is_main:
      theirs = os.path.join(source, "metrics.jsonl")
      if os.path.isfile(theirs):
        shutil.copyfile(theirs, mine)
    subnets = os.path.join(path, "subnets.npz")
    if os.path.exists(subnets):
      try:
        self.tracker = R.SubnetTracker.load(subnets)
      except Exception as e:  # pylint: disable=broad-except
        raise RS.ResumeError(f"cannot resume from checkpoint {path}: subnets.npz is not a "
                             f"subnet history ({type(e).__name__}: {e})") from None

  def _print_plan(self) -> None:
    cfg = self.cfg
    n = len(self.train_enc)
    epochs = self.total_steps * cfg.step_batch / n
    data = f"task {cfg.task}" if cfg.task else cfg.data
    seqs = (f"{cfg.grad_accum} micro-batches × {cfg.batch_size}" if cfg.grad_accum > 1
            else str(cfg.batch_size))
    self.log(f"data: {data}: {n} training examples, {len(self.eval_examples)} held out; "
             f"{self.total_steps} steps × {seqs} sequences × ≤ {cfg.seq_len} tokens "
             f"= {epochs:.2f} epochs; {cfg.precision}"
             + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))
    sched = f"lr {cfg.lr:g} ({cfg.lr_schedule}, {self.warmup_steps} warmup steps)"
    if self.losia is not None:
      sched += (f"; LoSiA p={self.losia.rank_factor:g}, period {self.losia.period}, "
                f"{self.losia.schedule}, output rows {self.losia.output_rank_factor:g}")
    elif any(k.startswith("losia") for k in cfg.explicit):
      sched += f"; note: the LoSiA settings do not apply to --method {cfg.method}"
    self.log(sched)
    self.log(f"output: {self.out}")

  # -- evaluation --

  def _evaluate(self, label: str) -> dict[str, Any]:
    t0 = R.now()
    preds: list[str] = []
    n = len(self.eval_prompts)
    from tqdm.auto import tqdm
    with tqdm(total=n, desc=f"eval {label}", unit="ex", file=sys.stderr,
              disable=self.cfg.quiet or not self.procs.is_main, leave=False) as bar:
      for i in range(0, n, EVAL_CHUNK):
        self._stop_if_requested(f"during the evaluation {label} training")
        chunk = self.eval_prompts[i:i + EVAL_CHUNK]
        outs = self.backend.generate(chunk, self.max_new_tokens, self.formatter.eos_id)
        preds.extend(self.formatter.decode(o) for o in outs)
        bar.update(len(chunk))
    correct = [self.scorer.correct(p, e.response) for p, e in zip(preds, self.eval_examples)]
    score = sum(correct) / len(correct) if correct else None
    seconds = R.now() - t0
    self.timings[f"eval_{label}_s"] = seconds
    self.log(f"{self.scorer.name} {label} training: {_fmt_pct(score)} "
             f"({sum(correct)}/{len(correct)}, {seconds:.1f} s)")
    return {"score": score, "correct": int(sum(correct)), "n": len(correct),
            "predictions": preds, "seconds": seconds}

  def _report_eval(self, after: Optional[dict[str, Any]]) -> None:
    before = self.state.eval_before
    if before is None or after is None:
      return
    self.log(f"{self.scorer.name} before: {_fmt_pct(before['score'])} → after: "
             f"{_fmt_pct(after['score'])}")
    for i, ex in enumerate(self.eval_examples[:SHOWN_EXAMPLES]):
      self.log(f"  [{i + 1}] prompt: {ex.prompt}")
      self.log(f"      target: {ex.response!r}  before: {before['predictions'][i]!r}  "
               f"after: {after['predictions'][i]!r}")

  # -- training --

  def _driver_json(self) -> dict[str, Any]:
    s = self.state
    return {
        "format": DRIVER_FORMAT,
        "step": s.step,
        "total_steps": self.total_steps,
        "examples_seen": s.step * self.cfg.step_batch,
        "epochs_done": s.step * self.cfg.step_batch / len(self.train_enc),
        "seed": self.cfg.seed,
        "data_order": "batch k = stream positions [k*B, (k+1)*B), B = batch_size * "
                      "grad_accum; epoch e = permutation(seed, e) (losia_cli.data.BatchOrder)",
        "num_train_examples": len(self.train_enc),
        "tokens_seen": s.tokens_seen,
        "train_seconds": s.train_seconds,
        "elapsed_s": s.elapsed_s,
        "eval_before": s.eval_before,
        "given": _explicit_values(self.cfg),
        "config": self.cfg.to_dict(),
        "losia": self.losia.to_dict() if self.losia else None,
        "data": self.data_fingerprint,
        "model": self.model_fingerprint,
        "backend": self.backend.name,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }

  def _checkpoint(self) -> Optional[str]:
    if not self.procs.is_main:
      self.backend.save_checkpoint(None)  # FSDP2: this process's shards (DDP: nothing)
      self.procs.barrier()  # rank 0 has renamed the checkpoint into place
      self.saved_step = self.state.step
      return None

    def extra(tmp: str) -> None:
      if self.tracker.segments:
        self.tracker.save(os.path.join(tmp, "subnets.npz"))
    try:
      path = ck.write_checkpoint(self.out, self.state.step, self.backend.save_checkpoint,
                                 self._driver_json(), extra)
    except OSError as e:
      latest = ck.latest_checkpoint(self.out)
      kept = (f"the previous checkpoint (step {latest[0]}) is intact" if latest else
              "no earlier checkpoint exists")
      raise CliError(f"cannot write the step-{self.state.step} checkpoint in "
                     f"{os.path.join(self.out, ck.CHECKPOINTS)}: {e.strerror or e}; {kept}: "
                     "free space or fix permissions, then continue with --resume") from None
    ck.apply_retention(self.out, self.cfg.keep_checkpoints)
    self.procs.barrier()
    self.saved_step = self.state.step
    return path

  def _stop_signal(self) -> Optional[int]:
    """SIGTERM/SIGINT if it reached this process, or under torchrun any of them."""
    return self.procs.agree_signal(self.stop.signum)

  def _stop_if_requested(self, where: str) -> None:
    """Raises :class:`S.Preempted` once SIGTERM/SIGINT arrived, with how to continue."""
    signum = self._stop_signal()
    if signum is None:
      return
    latest = ck.latest_checkpoint(self.out)
    again = (f"torchrun --nproc-per-node {self.procs.world_size} -m losia_cli"
             if self.procs.distributed else PROG)
    how = (f"latest checkpoint: step {latest[0]}; continue with: {again} --resume "
           f"--output-dir {self.out}" if latest else
           "nothing was saved yet; run the same command again")
    raise S.Preempted(signum, f"stopped by {S.name(signum)} {where}; {how}")

  def _train(self) -> None:
    cfg, st = self.cfg, self.state
    metrics_path = os.path.join(self.out, "metrics.jsonl")
    # The other processes under torchrun keep no files: rank 0 reports.
    history = R.truncate_metrics(metrics_path, st.step) if self.procs.is_main else []
    self.records = history
    if st.step >= self.total_steps:
      self.log(f"training already complete ({st.step} steps)")
      return
    self._stop_if_requested(f"before training step {st.step + 1}")
    progress = R.Progress(self.total_steps, st.step, cfg.quiet or not self.procs.is_main, history)
    warned = False
    loop_start = R.now() - st.elapsed_s
    self.saved_step = self.first_step
    try:
      with (R.MetricsWriter(metrics_path) if self.procs.is_main else R.NullWriter()) as writer:
        for k in range(st.step, self.total_steps):
          batch = D.make_batch([self.train_enc[i] for i in self.order.indices(k)],
                               cfg.seq_len, self.formatter.pad_id)
          tokens = int(batch.attention_mask.sum())
          t0 = R.now()
          m = self.backend.train_step(batch)
          dt = R.now() - t0
          if k == self.first_step:
            self.timings["first_step_s"] = dt
          st.step, st.tokens_seen, st.train_seconds = k + 1, st.tokens_seen + tokens, \
              st.train_seconds + dt
          loss = float(m["loss"])
          smoothed, _ = progress.update(loss, tokens, dt)
          if (m.get("skipped") or not math.isfinite(loss)) and not warned:
            progress.write(f"warning: non-finite loss or gradients at step {k + 1}; the "
                           "backend skipped the update (counted in summary.json)")
            warned = True
          self.tracker.observe(k + 1, self.backend.subnets())
          st.elapsed_s = R.now() - loop_start
          rec = {"step": k + 1, "loss": loss, "lr": float(m.get("lr", float("nan"))),
                 "tokens": tokens, "target_tokens": int(batch.loss_mask.sum()),
                 "tokens_per_s": tokens / dt if dt > 0 else None,
                 "elapsed_s": round(st.elapsed_s, 3), "loss_smoothed": smoothed,
                 "epoch": self.order.epoch_of(k)}
          rec.update({key: v for key, v in m.items() if key not in rec})
          writer.write(rec)
          self.records.append(rec)
          if cfg.save_every and st.step % cfg.save_every == 0 and st.step < self.total_steps:
            self._checkpoint()
          if st.step < self.total_steps and self._stop_signal() is not None:
            # Preempted: the step is done and logged; keep it, then stop.
            if self.saved_step != st.step:
              self._checkpoint()
            progress.close()
            self._stop_if_requested(f"after step {st.step} of {self.total_steps}")
      self._checkpoint()
    finally:
      progress.close()
    self.log(f"trained {self.total_steps} steps; final loss {self.records[-1]['loss']:.4f} "
             f"(smoothed {self.records[-1].get('loss_smoothed', float('nan')):.4f})")

  @property
  def first_step(self) -> int:
    """The first step this process runs (its time includes compilation)."""
    return self.saved["step"] if self.saved else 0

  # -- outputs --

  def _export(self) -> None:
    t0 = R.now()
    final = os.path.join(self.out, "model")
    if not self.procs.is_main:
      self.backend.export_hf(None)  # FSDP2: this process's shards to gather (DDP: nothing)
      self.procs.barrier()
      return

    def build(tmp: str) -> None:
      self.backend.export_hf(tmp)
      self.tokenizer.save_pretrained(tmp)

    ck.build_dir_atomic(final, build, "model")
    self.procs.barrier()
    self.timings["export_s"] = R.now() - t0
    self.log(f"exported the fine-tuned model to {final}")

  def _pictures(self) -> None:
    if not self.cfg.plots or not self.procs.is_main:
      return
    title = f"{self.cfg.method} on {self.cfg.model.description} ({self.cfg.backend})"
    if self.records:
      R.plot_loss(self.records, os.path.join(self.out, "loss.png"), title)
    drawn = R.plot_subnets(self.tracker, self.total_steps,
                           os.path.join(self.out, "subnets.png"), f"LoSiA subnets: {title}")
    if drawn:
      self.tracker.save(os.path.join(self.out, "subnets.npz"))
    else:
      self.log(f"note: no subnets.png (method {self.cfg.method} has no LoSiA subnets)")

  def _write_summary(self, after: Optional[dict[str, Any]]) -> None:
    if not self.procs.is_main:
      return
    st, before = self.state, self.state.eval_before
    measured = [r for r in self.records if r["step"] > self.first_step + 1]
    steady_tokens = sum(r["tokens"] for r in measured)
    steady_s = sum(r["tokens"] / r["tokens_per_s"] for r in measured if r.get("tokens_per_s"))
    last = self.records[-1] if self.records else {}
    examples = [{"prompt": ex.prompt, "target": ex.response,
                 "before": before["predictions"][i] if before else None,
                 "after": after["predictions"][i] if after else None}
                for i, ex in enumerate(self.eval_examples[:SHOWN_EXAMPLES])]
    summary = {
        "config": self.cfg.to_dict(),
        "losia": self.losia.to_dict() if self.losia else None,
        "backend": self.backend.describe(),
        "trainable_params": int(self.backend.trainable_params()),
        "steps": st.step,
        "total_steps": self.total_steps,
        "warmup_steps": self.warmup_steps,
        "train_examples": len(self.train_enc),
        "dropped_examples": self.dropped,
        "eval_examples": len(self.eval_examples),
        "metric": self.scorer.name,
        "score_before": before["score"] if before else None,
        "score_after": after["score"] if after else None,
        "examples": examples,
        "skipped_steps": sum(1 for r in self.records if r.get("skipped")),
        "final_loss": last.get("loss"),
        "final_loss_smoothed": last.get("loss_smoothed"),
        "tokens_seen": st.tokens_seen,
        "throughput": {
            "tokens_per_s": st.tokens_seen / st.train_seconds if st.train_seconds else None,
            "tokens_per_s_after_first_step": steady_tokens / steady_s if steady_s else None,
            "steps_per_s": st.step / st.train_seconds if st.train_seconds else None,
        },
        "timings": {**self.timings, "train_s": st.train_seconds},
        "resumed_from_step": self.saved["step"] if self.saved else None,
    }
    ck.write_json_atomic(os.path.join(self.out, "summary.json"), summary)
    self.log(f"summary: {os.path.join(self.out, 'summary.json')} "
             f"(total {self.timings['total_s']:.0f} s)")


def _explicit_values(cfg: RunConfig) -> dict[str, Any]:
  """The flags the user gave, as ``build_config`` takes them (for driver.json and resume)."""
  out: dict[str, Any] = {}
  for key in cfg.explicit:
    if key.startswith("losia."):
      v = cfg.losia[key[len("losia."):]]
    elif key == "model":
      v = cfg.model.path
    else:
      v = getattr(cfg, key)
    out[key] = list(v) if isinstance(v, tuple) else v
  return out


def main_entry() -> None:
  """The ``losia-finetune`` console script."""
  sys.exit(main())
