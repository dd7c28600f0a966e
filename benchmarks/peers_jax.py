"""JAX half of ``benchmarks/peers.py``: every method's training step, side by side.

Each method is ``losia_cli.jax_backend.JaxBackend`` (losia, losia-pro, full,
lora) or :class:`GaLoreBackend` (the same backend with ``optax.contrib.galore``
in place of AdamW). For each one, in one process:

- the backend's jitted step is lowered and compiled ahead of time with the
  step's real arguments, which gives the compile time apart from the step time,
  XLA's memory accounting (``compiled.memory_analysis()``) and its FLOP count
  (``compiled.cost_analysis()``); the compiled executable then replaces the
  backend's ``_step_fn`` so ``train_step`` runs exactly what was measured;
- ``train_step`` (forward, backward, optimizer; it blocks on the loss) is timed
  in rounds that alternate the method order (A B C, C B A, ...), so drift of a
  shared machine spreads over every method instead of biasing the last ones.

Run by ``peers.py`` in a child process per workload (``--isolation process``)
or in its own process (``inline``); the command line here is that protocol:
``peers_jax.py JOB.json OUT.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losia_jax  # noqa: E402
from losia_cli.backend import Batch, ModelSource, TrainSettings  # noqa: E402
from losia_cli.jax_backend import JaxBackend  # noqa: E402
from losia_common import LoSiAConfig  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers_common import make_batch, settings_for  # noqa: E402
from losia_common import names as _names  # noqa: E402

GALORE_UPDATE_GAP = 200  # optax's default; the SVD then runs once, in the first (untimed) step


def galore_dimension_numbers(params):
  """GaLore projects the LoSiA/LoRA target kernels only; every other leaf (embeddings,
  norms) gets plain Adam, as in the GaLore paper (attention and MLP matrices)."""
  patterns = LoSiAConfig().target_modules

  def spec(path, leaf):
    parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if leaf.ndim == 2 and parts[-1] == "kernel" and _names.is_target_leaf(
        _names.parse_name(parts), patterns):
      return optax.contrib.GaLoreDimensionNumbers(reduction_axis=0, output_axis=1)
    return None
  return jax.tree_util.tree_map_with_path(spec, params)


class GaLoreBackend(JaxBackend):
  """``JaxBackend`` method ``full`` with ``optax.contrib.galore`` instead of AdamW.

  The step is the backend's own ``full`` step (plain ``jax.value_and_grad`` of
  every parameter, then ``tx.update``); only the transformation differs. It is
  wrapped in ``optax.apply_if_finite`` like the backend's AdamW, so both skip
  non-finite steps at the same cost.
  """

  def __init__(self, source: ModelSource, settings: TrainSettings, rank: int):
    super().__init__(source, dataclasses.replace(settings, method="full"))
    self.galore_rank = rank
    self.opt_state = None  # drop the AdamW moments the parent allocated
    table = jnp.asarray(self._lr)
    lr_fn = lambda count: table[jnp.minimum(count, table.shape[0] - 1)]
    self.tx = optax.apply_if_finite(
        optax.contrib.galore(lr_fn, rank=rank, update_proj_gap=GALORE_UPDATE_GAP,
                             weight_decay=settings.weight_decay,
                             weight_dimension_numbers=galore_dimension_numbers),
        max_consecutive_errors=2**30)
    self.opt_state = self.tx.init(self.params)
    self._step_fn = jax.jit(self._make_step(), donate_argnums=(0, 1))


def build(spec: dict, job: dict):
  source = ModelSource("hf", job["model_dir"], job["workload"])
  s = settings_for(spec, job)
  if spec["method"] == "galore":
    return GaLoreBackend(source, dataclasses.replace(s, method="full"), spec["galore_rank"])
  return JaxBackend(source, s)


def compile_ahead(backend, batch: Batch) -> dict[str, Any]:
  """Compiles the backend's step for ``batch`` and installs the executable.

  Returns compile seconds, XLA's memory figures and FLOPs. ``peak_bytes`` is
  what the step holds at once: arguments (params, optimizer state, batch) plus
  outputs not aliased to donated arguments plus XLA's temporaries.
  """
  args = (backend._trainable_tree(), backend.opt_state, jnp.asarray(batch.input_ids, jnp.int32),
          jnp.asarray(batch.attention_mask, jnp.int32), jnp.asarray(batch.loss_mask, jnp.float32))
  t0 = time.perf_counter()
  compiled = backend._step_fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  backend._step_fn = compiled
  out: dict[str, Any] = {"compile_s": compile_s}
  mem = compiled.memory_analysis()
  if mem is not None:
    arg, outb = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    out.update(argument_bytes=arg, output_bytes=outb, alias_bytes=alias, temp_bytes=temp,
               peak_bytes=arg + outb - alias + temp)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    out["gflops"] = float(cost["flops"]) / 1e9
  return out


def trainable(backend) -> int:
  if isinstance(backend, GaLoreBackend):
    return int(sum(x.size for x in jax.tree.leaves(backend.params)))
  return backend.trainable_params()


def _timed(backend, batch: Batch, n: int) -> list[float]:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    out = backend.train_step(batch)  # returns host floats: the step has finished
    times.append(time.perf_counter() - t0)
    if not np.isfinite(out["loss"]):
      raise FloatingPointError(f"non-finite loss {out['loss']}")
  return times


def run(job: dict, log=print) -> dict:
  """Runs the job (see ``peers.py``); returns ``{"rows": {name: figures}, ...}``."""
  batch = make_batch(job)
  specs = [s for s in job["methods"] if s["backends"] is None or "jax" in s["backends"]]
  rows: dict[str, dict] = {}
  live: dict[str, Any] = {}
  resident = job["resident"]

  def setup(spec, first: bool):
    t0 = time.perf_counter()
    b = build(spec, job)
    load_s = time.perf_counter() - t0
    if first:
      r = rows[spec["name"]] = {"method": spec["method"], "load_s": load_s,
                                "trainable_params": trainable(b),
                                "opt_state_bytes": int(losia_jax.state_nbytes(b.opt_state)),
                                "times_s": []}
      if spec["method"] in ("losia", "losia-pro"):
        r["plan_block_params"] = int(b.plan.trainable_block_params)
        r["importance_bytes"] = int(losia_jax.state_nbytes(
            losia_jax.find_losia_state(b.opt_state).importance))
      if spec.get("state_only"):
        return b
      r.update(compile_ahead(b, batch))
      t0 = time.perf_counter()
      b.train_step(batch)  # GaLore: the projector SVD; LoSiA: the first profiling step
      r["first_step_s"] = time.perf_counter() - t0
      warm = job["warmup"]
    else:
      compile_ahead(b, batch)
      warm = 1
    for _ in range(warm):
      b.train_step(batch)
    return b

  for spec in specs:
    if resident or spec.get("state_only"):
      log(f"  jax: building {spec['name']}")
      b = setup(spec, True)
      if not spec.get("state_only"):
        live[spec["name"]] = b
      else:
        del b
  timed = [s for s in specs if not s.get("state_only")]
  per_round = max(1, -(-job["steps"] // job["rounds"]))
  for rnd in range(job["rounds"]):
    order = timed if rnd % 2 == 0 else timed[::-1]
    for spec in order:
      name = spec["name"]
      b = live.get(name)
      if b is None:
        log(f"  jax: building {name} (round {rnd + 1})")
        b = setup(spec, name not in rows)
      elif rnd > 0:
        b.train_step(batch)  # re-warm caches after the other methods ran
      t = _timed(b, batch, per_round)
      rows[name]["times_s"].extend(t)
      log(f"  jax round {rnd + 1} {name}: median {1e3 * float(np.median(t)):.0f} ms")
      if not resident:
        del b
  return {"rows": rows, "device": str(jax.devices()[0]), "platform": jax.devices()[0].platform}


def main(argv: Optional[list[str]] = None) -> None:
  job_path, out_path = (argv or sys.argv[1:])[:2]
  with open(job_path, encoding="utf-8") as f:
    job = json.load(f)
  result = run(job, log=lambda m: print(m, flush=True))
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
