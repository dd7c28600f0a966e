"""``docs/QUALITY.md`` and its pictures from ``benchmarks/quality.json`` (see quality.py).

Every table is built from the JSON alone, so the report can be rewritten at any
time (``python benchmarks/quality.py --report-only``); rows whose runs are not
in the JSON yet are listed as missing rather than left out silently.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from quality_plan import precision_of


def _pct(x) -> str:
  return "—" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt=".3f") -> str:
  return "—" if x is None else format(x, fmt)


def _runs(state, **match) -> list[dict[str, Any]]:
  out = []
  for res in state["runs"].values():
    r = res["run"]
    if all(r.get(k) == v for k, v in match.items()):
      out.append(res)
  return out


def best_sweep(state, task: str, label: str):
  """The sweep run with the best validation accuracy (ties: lower tail loss), or None."""
  src = label
  if label == "losia-pro" and not _runs(state, phase="sweep", task=task, label=label):
    src = "losia"
  runs = [r for r in _runs(state, phase="sweep", task=task, label=src) if r["val"] is not None]
  if not runs:
    return None
  return min(runs, key=lambda r: (-r["val"], r["loss_tail"]))


def seed_runs(state, task: str, label: str) -> list[dict[str, Any]]:
  best = best_sweep(state, task, label)
  if best is None:
    return []
  lr = best["run"]["lr"]
  out = [r for r in _runs(state, task=task, label=label) if r["run"]["lr"] == lr
         and r["run"]["phase"] in ("sweep", "seeds") and r["test"] is not None]
  return sorted(out, key=lambda r: r["run"]["seed"])


def _mean_spread(xs: list[float]) -> str:
  if not xs:
    return "—"
  if len(xs) == 1:
    return f"{100 * xs[0]:.1f}% (1 seed)"
  return (f"{100 * statistics.mean(xs):.1f}% ± {100 * statistics.stdev(xs):.1f} "
          f"({len(xs)} seeds, range {100 * min(xs):.1f}–{100 * max(xs):.1f})")


def _pictures(state, docs: str, tasks: list[str], labels: list[str]) -> list[str]:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  files = []
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for label in labels:
      pts = sorted((r["run"]["lr"], r["val"]) for r in _runs(state, phase="sweep", task=task,
                                                              label=label) if r["val"] is not None)
      if pts:
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{task}: learning-rate sweep (seed 0)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(docs, "quality_lr.png"), dpi=110)
  plt.close(fig)
  files.append("quality_lr.png")
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for i, label in enumerate(labels):
      xs = [100 * r["test"] for r in seed_runs(state, task, label)]
      if xs:
        ax.scatter([i] * len(xs), xs, s=18)
        ax.hlines(statistics.mean(xs), i - 0.3, i + 0.3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: chosen rate, per seed (line: mean)")
  fig.tight_layout()
  fig.savefig(os.path.join(docs, "quality_seeds.png"), dpi=110)
  plt.close(fig)
  files.append("quality_seeds.png")
  base = state["base"].get(tasks[0], {})
  rows = [(label, best_sweep(state, tasks[0], label)) for label in labels]
  rows = [(label, r) for label, r in rows if r is not None and r.get("capitals") is not None]
  if rows and base:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = ["base"] + [label for label, _ in rows]
    a1.bar(names, [100 * base["capitals"]["score"]] + [100 * r["capitals"] for _, r in rows])
    a1.set_ylabel("capitals recall (%)")
    a1.set_title(f"knowledge kept after {tasks[0]}")
    a2.bar(names, [base["ppl"]["ppl"]] + [r["ppl"] for _, r in rows])
    a2.set_ylabel("perplexity, pydoc topics")
    a2.set_title("general text")
    for a in (a1, a2):
      a.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "quality_forgetting.png"), dpi=110)
    plt.close(fig)
    files.append("quality_forgetting.png")
  return files


def _other_lengths(add, runs: list[dict[str, Any]], steps: int) -> None:
  """Longer (or shorter) runs, each at one rate chosen by this report's sweep."""
  add("## Other run lengths (one rate each, chosen at the report's length)\n")
  add(f"Each row trains for the steps shown at the rate its method's sweep chose for {steps} "
      "steps (not re-selected at this length, so a row says how a method continues, not its "
      "best setting there). The cosine schedule spans the run's own length.\n")
  add("| task | method | steps | lr | seed | T | val | test | train loss, last quarter | "
      "capitals | ppl |")
  add("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in sorted(runs, key=lambda r: (r["run"]["task"], r["run"]["steps"], r["run"]["label"],
                                       r["run"]["seed"])):
    run = r["run"]
    period = (r.get("losia") or {}).get("period", "—")
    add(f"| {run['task']} | {run['label']} | {run['steps']} | {run['lr']:g} | {run['seed']} | "
        f"{period} | {_pct(r['val'])} | {_pct(r['test'])} | {r['loss_tail']:.3f} | "
        f"{_pct(r['capitals'])} | {_num(r['ppl'], '.2f')} |")
  add("")
  n = max(r["run"]["steps"] for r in runs)
  edges = [(a, min(a + n // 8 - 1, n)) for a in range(1, n + 1, max(1, n // 8))]
  add("Mean training loss over windows of steps:\n")
  add("| task | method | steps | " + " | ".join(f"{a}–{b}" for a, b in edges) + " |")
  add("|---|---|---|" + "---|" * len(edges))
  for r in sorted(runs, key=lambda r: (r["run"]["task"], r["run"]["steps"], r["run"]["label"],
                                       r["run"]["seed"])):
    cells = []
    for a, b in edges:
      xs = r["losses"][a - 1:b]
      cells.append(f"{sum(xs) / len(xs):.3f}" if len(xs) == b - a + 1 else "—")
    add(f"| {r['run']['task']} | {r['run']['label']} (seed {r['run']['seed']}) | "
        f"{r['run']['steps']} | " + " | ".join(cells) + " |")
  add("")


def _other_precision(add, runs: list[dict[str, Any]], precision: str) -> None:
  """Rows trained at another compute precision (a GPU sitting's bf16 next to the CPU's fp32)."""
  add(f"## Runs at another precision (not in the tables above, which are {precision})\n")
  add("A sitting on a GPU trains in bf16 (`--precision auto`); its rows are kept apart from the "
      "fp32 rows of the CPU sittings, never pooled with them. *where* is the "
      "run's precision and device.\n")
  add("| task | method | phase | steps | lr | seed | where | val | test | "
      "train loss, last quarter | capitals | ppl | s/step |")
  add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in sorted(runs, key=lambda r: (r["run"]["task"], r["run"]["label"], r["run"]["phase"],
                                       r["run"]["steps"], r["run"]["lr"], r["run"]["seed"])):
    run = r["run"]
    where = r.get("where") or r.get("backend", "").rsplit(", ", 1)[-1] or "—"
    add(f"| {run['task']} | {run['label']} | {run['phase']} | {run['steps']} | {run['lr']:g} | "
        f"{run['seed']} | {where} | {_pct(r['val'])} | {_pct(r['test'])} | "
        f"{r['loss_tail']:.3f} | {_pct(r['capitals'])} | {_num(r['ppl'], '.2f')} | "
        f"{_num(r.get('s_per_step'), '.2f')} |")
  add("")


def _loss_picture(runs: list[dict[str, Any]], docs: str) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for r in sorted(runs, key=lambda r: (r["run"]["task"], r["run"]["label"], r["run"]["seed"])):
    xs = r["losses"]
    w = max(1, len(xs) // 20)
    smooth = [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1])
              for i in range(len(xs))]
    ax.plot(range(1, len(xs) + 1), smooth,
            label=f"{r['run']['task']}: {r['run']['label']} lr {r['run']['lr']:g}, "
                  f"seed {r['run']['seed']} ({r['run']['steps']} steps)")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (running mean over 1/20 of the run)")
  ax.set_title("longer runs: training loss")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(docs, "quality_long.png"), dpi=110)
  plt.close(fig)
  return True


def write(state: dict[str, Any], path: str, opts: dict[str, Any], methods, ablations,
          notes: str = "") -> None:
  docs = os.path.dirname(os.path.abspath(path))
  os.makedirs(docs, exist_ok=True)
  # Runs of another length (a longer run at a rate chosen here) are not part of this
  # report's sweeps and seeds: their schedule differs. They get their own section.
  precision = opts.get("precision", "fp32")
  other_prec = {k: r for k, r in state["runs"].items()
                if precision_of(r["run"]) != precision}
  other_len = {k: r for k, r in state["runs"].items()
               if r["run"]["steps"] != opts["steps"] and k not in other_prec}
  state = dict(state, runs={k: r for k, r in state["runs"].items()
                            if k not in other_len and k not in other_prec})
  tasks = list(opts["tasks"])
  labels = list(opts["methods"])
  L: list[str] = []
  add = L.append
  add("# Quality: does LoSiA learn as promised?\n")
  add("Generated by `benchmarks/quality.py` from `benchmarks/quality.json` — do not edit by "
      "hand; rerun `python benchmarks/quality.py --report-only`. Every run goes through "
      "`losia-finetune` (the CLI's backends) with the same data order (seed), steps, batch and "
      "sequence length; learning rates are chosen on the validation split, scores reported on "
      "the test split, which takes part in no choice.\n")
  if notes and os.path.exists(notes):
    with open(notes, encoding="utf-8") as f:
      add(f.read().rstrip() + "\n")
  add("## Sittings (machine, versions, commands)\n")
  add("| date | machine | device | commit | versions | command |")
  add("|---|---|---|---|---|---|")
  for s in state.get("sittings", []):
    v = ", ".join(f"{k} {x}" for k, x in s["versions"].items())
    device = s["device"] + (f", {s['precision']}" if "precision" in s else "")
    add(f"| {s['date']} | {s['machine']} | {device} | {s['commit']} | {v} | "
        f"`{s['command']}` |")
  add("")
  add(f"Settings of this report: tasks {', '.join(tasks)}; {opts['steps']} steps × batch "
      f"{opts['batch_size']} × seq {opts['seq_len']}, backend {opts['backend']}, {precision}; "
      f"seeds {opts['seeds']}; validation {opts['n_val']}, test {opts['n_test']} problems; "
      f"capitals probe {opts['n_capitals']} countries; perplexity on {opts['ppl_chunks']} × "
      f"{opts['ppl_len']} tokens of Python's `pydoc_data` topics.\n")
  add("## Before training\n")
  add("| task | val | test | capitals recall | perplexity (pydoc) |")
  add("|---|---|---|---|---|")
  for task, b in state.get("base", {}).items():
    add(f"| {task} | {_pct(b['val']['score'])} | {_pct(b['test']['score'])} | "
        f"{_pct(b['capitals']['score'])} | {_num(b['ppl']['ppl'], '.2f')} |")
  add("")
  for task in tasks:
    base = state["base"].get(task)
    add(f"## Task `{task}`\n")
    add("### Results at the chosen learning rate (test split)\n")
    add("| method | trainable params | chosen lr | test accuracy | val (seed 0) | "
        "train loss, last quarter | capitals recall | perplexity | s/step |")
    add("|---|---|---|---|---|---|---|---|---|")
    missing = []
    for label in labels:
      best = best_sweep(state, task, label)
      seeds = seed_runs(state, task, label)
      if best is None or not seeds:
        missing.append(label)
        continue
      r0 = seeds[0]
      add(f"| {label} | {r0['trainable_params']:,} | {best['run']['lr']:g} | "
          f"{_mean_spread([r['test'] for r in seeds])} | {_pct(r0['val'])} | "
          f"{_num(statistics.mean(r['loss_tail'] for r in seeds))} | "
          f"{_pct(statistics.mean(r['capitals'] for r in seeds))} | "
          f"{_num(statistics.mean(r['ppl'] for r in seeds), '.2f')} | "
          f"{_num(statistics.mean(r['s_per_step'] for r in seeds), '.1f')} |")
    if base:
      add(f"| *base model* | — | — | {_pct(base['test']['score'])} | {_pct(base['val']['score'])}"
          f" | — | {_pct(base['capitals']['score'])} | {_num(base['ppl']['ppl'], '.2f')} | — |")
    add("")
    if missing:
      add(f"Missing (sweep or seeds not run yet): {', '.join(missing)}.\n")
    add("### Learning-rate sweep (validation accuracy; train loss of the last quarter)\n")
    add("| method | runs (lr: val, loss) |")
    add("|---|---|")
    for label in labels:
      runs = sorted(_runs(state, phase="sweep", task=task, label=label),
                    key=lambda r: r["run"]["lr"])
      best = best_sweep(state, task, label)
      cells = []
      for r in runs:
        c = f"{r['run']['lr']:g}: {_pct(r['val'])}, {r['loss_tail']:.3f}"
        cells.append(f"**{c}**" if best is r else c)
      grid = ", ".join(f"{x:g}" for x in methods[label][2])
      add(f"| {label} | {'; '.join(cells) or f'not run (grid {grid})'} |")
    add("")
  abl = _runs(state, phase="ablation")
  if abl:
    task0 = abl[0]["run"]["task"]
    chosen = best_sweep(state, task0, "losia")
    add(f"## LoSiA ablations (`{task0}`, seed 0)\n")
    add("Each variant changes one setting of LoSiA at the learning rate in its row (LoSiA's "
        "chosen rate"
        + (f", {chosen['run']['lr']:g}," if chosen else "") + " unless a sitting asked for "
        "another); the reference row at each rate is the sweep's run of the paper's defaults.\n")
    add("| variant | flags | lr | T | val | test | train loss, last quarter | capitals | ppl |")
    add("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for lr in sorted({r["run"]["lr"] for r in abl}):
      ref = _runs(state, phase="sweep", task=task0, label="losia", lr=lr)
      rows += [("paper default (CLI)", r) for r in ref[:1]] + [
          (r["run"]["ablation"], r) for r in sorted(abl, key=lambda r: r["run"]["ablation"])
          if r["run"]["lr"] == lr]
    for name, r in rows:
      flags = " ".join(r["run"]["extra"]) or "—"
      period = (r.get("losia") or {}).get("period", "—")
      add(f"| {name} | `{flags}` | {r['run']['lr']:g} | {period} | {_pct(r['val'])} | "
          f"{_pct(r['test'])} | {r['loss_tail']:.3f} | {_pct(r['capitals'])} | "
          f"{_num(r['ppl'], '.2f')} |")
    add("")
  cont = _runs(state, phase="continual")
  if cont:
    add("## Continual learning (task A, then task B from A's model)\n")
    add("| method | A after A | A after B | B after B | capitals after B |")
    add("|---|---|---|---|---|")
    for a in [r for r in cont if not r["run"]["init"]]:
      b = next((r for r in cont if r["run"]["init"] and r["run"]["label"] == a["run"]["label"]),
               None)
      a_after_b = b["eval"]["other"]["score"] if b and "other" in b.get("eval", {}) else None
      add(f"| {a['run']['label']} ({a['run']['task']} → {a['run']['other_task']}) | "
          f"{_pct(a['test'])} | {_pct(a_after_b)} | {_pct(b['test'] if b else None)} | "
          f"{_pct(b['capitals'] if b else None)} |")
    add("")
  probes = state.get("probes", {})
  if probes:
    add("## Loss-only probes (why does LoSiA under-fit?)\n")
    add("Short runs varying one factor at a time: training loss only, same data order, batch, "
        "sequence length and learning-rate schedule (a run's total steps fix its schedule, so "
        "runs stopped early are compared at matched steps). Imported with `--import-probes`. "
        "Cells: mean training loss over the steps of the column; — where the run had not got "
        "there.\n")
    n = max(p["steps"] for p in probes.values())
    edges = [(a, min(a + 9, n)) for a in range(1, n + 1, 10)]
    add("| probe | flags | steps run | " + " | ".join(f"{a}–{b}" for a, b in edges) + " |")
    add("|---|---|---|" + "---|" * len(edges))
    for name, p in sorted(probes.items()):
      cells = []
      for a, b in edges:
        xs = p["losses"][a - 1:b]
        cells.append(f"{sum(xs) / len(xs):.3f}" if len(xs) == b - a + 1 else "—")
      done = f"{p['steps']}" + ("" if p.get("finished", True) else " (partial)")
      add(f"| {name} | `{p['flags']}` | {done} | " + " | ".join(cells) + " |")
    add("")
  if other_len:
    _other_lengths(add, list(other_len.values()), opts["steps"])
  if other_prec:
    _other_precision(add, list(other_prec.values()), precision)
  pics = _pictures(state, docs, tasks, labels) if state["runs"] else []
  if other_len and _loss_picture(list(other_len.values()), docs):
    pics.append("quality_long.png")
  if pics:
    add("## Pictures\n")
    for f in pics:
      add(f"![{f}]({f})\n")
  failed = state.get("failed", {})
  if failed:
    add("## Failed runs (rerun to retry)\n")
    for k, e in sorted(failed.items()):
      if k not in state["runs"]:
        add(f"- `{k}`: {e}")
    add("")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(L) + "\n")
  os.replace(tmp, path)


def tail_mean(losses: list[float], n: int = 50) -> float:
  xs = [x for x in losses[-n:] if math.isfinite(x)]
  return sum(xs) / len(xs) if xs else float("nan")
