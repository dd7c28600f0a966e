"""Per-rank memory and collective bytes of LoSiA against AdamW under FSDP2 (CPU, gloo).

One command: for each method (LoSiA with non-targets trained, LoSiA with them frozen,
``torch.optim.AdamW``) a fresh group of ``--nproc`` gloo CPU processes builds the same
``transformers.LlamaForCausalLM`` from a config (no download), shards it with
``fully_shard`` per decoder layer and at the root, and runs ``--steps`` steps on the same
batch (each rank its slice), at least one of them a LoSiA relocalization. Printed side
by side, per rank:

- parameter bytes (local shards) and optimizer-state bytes (LoSiA's ``state_nbytes()``:
  compact moments, indices, importance buffers; AdamW's local shards of
  ``exp_avg``/``exp_avg_sq``), the largest after any step;
- peak memory: the peak RSS (``VmHWM``) over the steps, less the RSS after the model was
  built and sharded. The peak is reset there (``/proc/self/clear_refs`` = 5), and
  ``MALLOC_MMAP_THRESHOLD_`` puts every tensor of 128 KiB or more in its own mapping, so
  a freed tensor leaves the RSS at once and the RSS follows the live tensors. Without
  it glibc keeps freed tensors of up to 32 MiB in fragmented heap arenas, and the peak
  says more about the allocator than about the method (on the default model: AdamW
  2,140 instead of 1,608 MiB, LoSiA with frozen non-targets 1,122 instead of 689);
- collective bytes per step, from wrapping the ``torch.distributed`` collectives and
  recording, per call, the size of the whole tensor it moves (the gathered output, the
  reduce-scatter input, the all-reduced or broadcast tensor), split by caller: FSDP's
  parameter all-gathers and gradient reduce-scatters, and LoSiA's own all-reduces and
  broadcasts. LoSiA's bytes on a relocalization step are checked against the formula of
  ``docs/torch.md`` and set against the parameter bytes.

  python benchmarks/torch_fsdp_memory.py --md benchmarks/RESULTS.md  # hidden 1024, 8 layers

``--md`` writes the report as the section "FSDP2 memory (torch, 2 gloo processes)" between
its own markers, replacing that section only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import md_sections  # noqa: E402

METHODS = ("losia-train", "losia-freeze", "adamw")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "all_gather_single", "reduce_scatter", "reduce_scatter_tensor",
               "reduce_scatter_single", "all_to_all_single")


# --- measuring, inside a worker -----------------------------------------------------------

def _status_kib(key: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak_rss() -> int:
  """Resets ``VmHWM`` to the current RSS (Linux >= 4.0) and returns that RSS in bytes."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _status_kib("VmRSS") * 1024


class CollectiveLog:
  """Wraps ``torch.distributed``'s collectives; records ``(caller, op, bytes)`` per call.

  FSDP2 and ``losia_torch.fsdp`` call them as ``dist.<op>`` at call time, so replacing the
  module attributes sees every call. The caller is the module of the calling frame."""

  def __init__(self):
    import torch
    import torch.distributed as dist
    self.calls: list[tuple[str, str, int]] = []
    for name in COLLECTIVES:
      fn = getattr(dist, name, None)
      if fn is not None:
        setattr(dist, name, self._wrap(name, fn, torch.Tensor))

  def _wrap(self, name, fn, tensor_cls):
    def nbytes(x):
      if isinstance(x, tensor_cls):
        return x.numel() * x.element_size()
      if isinstance(x, (list, tuple)):
        return sum(nbytes(y) for y in x)
      return 0

    def wrapped(*args, **kwargs):
      caller = sys._getframe(1).f_globals.get("__name__", "")
      who = ("losia" if caller.startswith("losia_torch") else
             "fsdp" if caller.startswith("torch.distributed.fsdp") else "other")
      # the whole tensor moved: the larger of output and input
      self.calls.append((who, name, max(nbytes(a) for a in (*args, *kwargs.values()))))
      return fn(*args, **kwargs)
    return wrapped

  def since(self, mark: int) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for who, op, n in self.calls[mark:]:
      out[who][op] += n
    return {k: dict(v) for k, v in out.items()}


def relocalization_formula_bytes(targets) -> int:
  """Bytes LoSiA's relocalization of ``targets`` all-reduces and broadcasts (docs/torch.md):
  fp32 row and column sums and three block sums, then int64 indices."""
  n = 0
  for t in targets:
    if t.row_mode:  # row sums, then rows and the whole column range
      n += 4 * t.d_out + 8 * (t.k_out + t.d_in)
    else:
      n += 4 * (2 * t.d_out + 2 * t.d_in + 3) + 8 * (t.k_out + t.k_in)
  return n


# --- the worker -----------------------------------------------------------------------------

def _build(args):
  import torch
  import transformers
  from torch.distributed.fsdp import fully_shard
  torch.manual_seed(0)  # the same model in every process and for every method
  cfg = transformers.LlamaConfig(
      hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
      max_position_embeddings=max(args.seq, 16), tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg)
  for layer in model.model.layers:
    fully_shard(layer)
  fully_shard(model)
  return model


def _optimizer(method, model, args):
  import torch
  import losia_torch
  if method == "adamw":
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  cfg = losia_torch.LoSiAConfig(period=args.period,
                                non_target="train" if method == "losia-train" else "freeze")
  return losia_torch.get_losia_optimizer(model, cfg, lr=1e-4, verbose=False)


def _worker(rank, world, method, args, out_dir):
  import torch
  import torch.distributed as dist
  from losia_torch import fsdp as losia_fsdp
  torch.set_num_threads(args.threads)
  dist.init_process_group("gloo", init_method=f"file://{out_dir}/init-{method}", rank=rank,
                          world_size=world)
  try:
    log = CollectiveLog()
    model = _build(args)
    param_bytes = sum(losia_fsdp.local(p).numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (world * args.batch, args.seq), generator=g)
    ids = ids[rank * args.batch:(rank + 1) * args.batch]
    base_rss = _reset_peak_rss()  # after the model is built and sharded, before the optimizer
    opt = _optimizer(method, model, args)
    steps = []
    for s in range(args.steps):
      mark, t0 = len(log.calls), time.perf_counter()
      model(input_ids=ids, labels=ids).loss.backward()
      fb = log.since(mark)
      grad_bytes = sum(losia_fsdp.local(p.grad).numel() * p.grad.element_size()
                       for p in model.parameters() if p.grad is not None)
      mark = len(log.calls)
      opt.step()
      opt.zero_grad()
      row = {"seconds": time.perf_counter() - t0, "fwd_bwd": fb, "opt_step": log.since(mark),
             "grad_bytes": grad_bytes,
             "state_bytes": (opt.state_nbytes() if method != "adamw"
                             else losia_fsdp.optimizer_state_nbytes(opt)),
             "peak_rss_growth": _status_kib("VmHWM") * 1024 - base_rss}
      if method != "adamw":
        moved = [t for t in opt.plan.targets if opt.state[t.param]["last_relocalization"] == s]
        row["relocalized"] = [t.name for t in moved]
        row["relocalized_param_bytes"] = sum(t.param.numel() * t.param.element_size()
                                             for t in moved)
        row["formula_bytes"] = relocalization_formula_bytes(moved)
      steps.append(row)
    res = {"rank": rank, "method": method, "param_bytes_rank": param_bytes,
           "param_bytes_model": sum(p.numel() * p.element_size() for p in model.parameters()),
           "num_params": sum(p.numel() for p in model.parameters()),
           "base_rss": base_rss, "steps": steps}
    with open(os.path.join(out_dir, f"{method}-rank{rank}.json"), "w") as f:
      json.dump(res, f)
  finally:
    dist.destroy_process_group()


def run_method(method, args, out_dir, timeout=1800):
  """One fresh process group for ``method``; returns each rank's result."""
  import torch.multiprocessing as mp
  ctx = mp.spawn(_worker, args=(args.nproc, method, args, out_dir), nprocs=args.nproc,
                 join=False)
  deadline = time.time() + timeout
  while not ctx.join(timeout=2):
    if time.time() > deadline:
      for p in ctx.processes:
        p.kill()
      raise TimeoutError(f"{method}: workers did not finish in {timeout} s")
  out = []
  for r in range(args.nproc):
    with open(os.path.join(out_dir, f"{method}-rank{r}.json")) as f:
      out.append(json.load(f))
  return out


# --- the report -----------------------------------------------------------------------------

def summarize(results: dict) -> dict:
  """Per method: the largest per-rank figures, and LoSiA's relocalization collectives."""
  out = {}
  for method, ranks in results.items():
    steps = [r["steps"] for r in ranks]
    s = {"param_bytes_rank": max(r["param_bytes_rank"] for r in ranks),
         "param_bytes_model": ranks[0]["param_bytes_model"],
         "state_bytes": max(x["state_bytes"] for st in steps for x in st),
         "grad_bytes": max(x["grad_bytes"] for st in steps for x in st),
         "peak_rss_growth": max(x["peak_rss_growth"] for st in steps for x in st),
         "per_rank": {k: [max(x[k] for x in st) for st in steps]
                      for k in ("state_bytes", "peak_rss_growth")},
         # FSDP's collectives of one step (the last; every step has the same ones)
         "fsdp_bytes": {op: max(st[-1]["fwd_bwd"].get("fsdp", {}).get(op, 0) for st in steps)
                        for op in ("all_gather_single", "reduce_scatter_single")}}
    if method != "adamw":
      first = ranks[0]["steps"]
      reloc = [i for i, x in enumerate(first) if x["relocalized"]]
      plain = [i for i, x in enumerate(first) if not x["relocalized"]]
      losia = lambda i: max(sum(st[i]["opt_step"].get("losia", {}).values()) for st in steps)
      if reloc:
        i = reloc[0]
        s["relocalization"] = {"step": i, "targets": len(first[i]["relocalized"]),
                               "losia_bytes": losia(i), "formula_bytes": first[i]["formula_bytes"],
                               "relocalized_param_bytes": first[i]["relocalized_param_bytes"]}
      s["ordinary_step_losia_bytes"] = losia(plain[0]) if plain else None
    out[method] = s
  return out


def _mb(n) -> str:
  return f"{n / 2**20:,.2f} MiB"


def report(summary: dict, args, num_params: int) -> str:
  cols = [m for m in METHODS if m in summary]
  lines = [f"FSDP2 memory: {args.nproc} gloo CPU processes, LlamaForCausalLM hidden "
           f"{args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
           f"{args.vocab} ({num_params / 1e6:.1f} M params, fp32), batch {args.batch} x "
           f"{args.seq} tokens per rank, {args.steps} steps, LoSiA defaults but period "
           f"{args.period}", "",
           f"{'per rank (largest over ranks)':<40}" + "".join(f"{m:>18}" for m in cols)]

  def row(label, f):
    lines.append(f"{label:<40}" + "".join(f"{f(summary[m]):>18}" for m in cols))

  row("parameter bytes", lambda s: _mb(s["param_bytes_rank"]))
  row("optimizer state (max over steps)", lambda s: _mb(s["state_bytes"]))
  row("gradients after backward", lambda s: _mb(s["grad_bytes"]))
  row("peak RSS growth over model build", lambda s: _mb(s["peak_rss_growth"]))
  # what FSDP holds unsharded for a moment (a layer's weights and gradients, the root's
  # embedding and output layer), activations and temporaries
  row("  of which not state or gradients", lambda s: _mb(s["peak_rss_growth"] - s["state_bytes"]
                                                         - s["grad_bytes"]))
  row("FSDP all-gather per step", lambda s: _mb(s["fsdp_bytes"]["all_gather_single"]))
  row("FSDP reduce-scatter per step", lambda s: _mb(s["fsdp_bytes"]["reduce_scatter_single"]))
  lines.append("")
  if "adamw" in summary:
    a = summary["adamw"]
    for m in cols:
      if m != "adamw":
        s = summary[m]
        lines.append(f"{m} / adamw: optimizer state {s['state_bytes'] / a['state_bytes']:.3f}, "
                     f"peak RSS growth {s['peak_rss_growth'] / a['peak_rss_growth']:.3f}")
  for m in cols:
    rl = summary[m].get("relocalization")
    if rl is None:
      continue
    s = summary[m]
    b = rl["losia_bytes"]
    lines += [
        f"{m}: relocalization at step {rl['step']} ({rl['targets']} targets), LoSiA's own "
        f"collectives per rank {b:,} B",
        f"  = {rl['formula_bytes']:,} B (formula of docs/torch.md) + "
        f"{s['ordinary_step_losia_bytes']:,} B (every step's non-finite check)",
        f"  / parameter bytes of the model ({s['param_bytes_model']:,} B): "
        f"{b / s['param_bytes_model']:.2e}; / the relocalized matrices "
        f"({rl['relocalized_param_bytes']:,} B): {b / rl['relocalized_param_bytes']:.2e}; "
        f"/ FSDP's all-gather per step: {b / s['fsdp_bytes']['all_gather_single']:.2e}"]
  return "\n".join(lines)


MD_BEGIN = "<!-- torch_fsdp_memory.py: begin generated section -->"
MD_END = "<!-- torch_fsdp_memory.py: end -->"


def markdown(text: str, argv: list[str], nproc: int) -> str:
  import torch
  import transformers
  # where the JSON goes changes no figure: the command is recorded without it
  keep = [a for i, a in enumerate(argv)
          if a != "--json" and not (i and argv[i - 1] == "--json") and not a.startswith("--json=")]
  cmd = " ".join(["python benchmarks/torch_fsdp_memory.py", *keep])
  return "\n".join([
      MD_BEGIN, f"## FSDP2 memory (torch, {nproc} gloo processes)", "",
      f"Generated by `{cmd}` (rerun it instead of editing); "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
      f"{os.cpu_count()} cores, torch {torch.__version__}, transformers "
      f"{transformers.__version__}. How each figure is measured: the module docstring of "
      "`benchmarks/torch_fsdp_memory.py`.", "", "```", text, "```", MD_END, ""])


def insert_section(path: str, block: str) -> None:
  """Replaces this script's marked section of ``path`` (appends it if absent)."""
  md_sections.replace_section(path, block, MD_BEGIN, MD_END)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--nproc", type=int, default=2)
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--intermediate", type=int, default=2816)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=16)
  p.add_argument("--batch", type=int, default=1, help="sequences per rank")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=3,
                 help="steps per method; with --period 2 step 1 relocalizes a layer and "
                      "step 2 ends inside the next profiling window")
  p.add_argument("--period", type=int, default=2)
  p.add_argument("--threads", type=int, default=1, help="torch threads per process")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--json", help="write the per-rank results and the summary here")
  p.add_argument("--md", help="write the report as its section of this markdown file")
  args = p.parse_args(argv)
  args.methods = args.methods.split(",")
  bad = [m for m in args.methods if m not in METHODS]
  if bad:
    p.error(f"unknown --methods {bad}; choose from {','.join(METHODS)}")
  if args.steps < args.period + 1:
    p.error(f"--steps must be at least --period + 1 ({args.period + 1}) to include a "
            "relocalization and a step after it")
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  # set before the workers start: glibc reads it once per process (why: module docstring)
  os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
  os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for method in args.methods:
      t0 = time.time()
      results[method] = run_method(method, args, tmp)
      print(f"{method}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
  summary = summarize(results)
  text = report(summary, args, results[args.methods[0]][0]["num_params"])
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=1)
  if args.md:
    insert_section(args.md, markdown(text, argv, args.nproc))
  return summary


if __name__ == "__main__":
  main()
