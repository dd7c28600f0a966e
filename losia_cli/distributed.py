"""``losia-finetune`` under ``torchrun``: which process this is, and what the processes agree on.

``torchrun --nproc-per-node N -m losia_cli ...`` starts N copies of the same
command with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment.
Every process runs the whole driver on the same inputs (flags, data, the
global batch of every step), so they make the same decisions without talking;
the torch backend trains each on its rows of every batch (DDP, or FSDP2 with
``--fsdp``). The processes talk only where one may know something the others
do not: a stop signal that reached some of them first (:meth:`Processes.agree_signal`),
and the end of a checkpoint or export that one of them writes (:meth:`Processes.barrier`).
Rank 0 alone prints and writes files.

torch is imported only when the command really runs in several processes, so the
JAX backend and a single-process run never touch ``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Mapping, Optional

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TORCHRUN = "torchrun --nproc-per-node N -m losia_cli --backend torch ..."


class LaunchError(ValueError):
  """The command cannot run as launched (exit code 2, one line)."""


# How long a process other than rank 0 waits, after meeting an error, for torchrun to stop it.
REPORT_WAIT_S = 60.0


def report_unless_rank0_does(text: str, environ: Mapping[str, str] = os.environ) -> None:
  """Prints ``text`` (an error of a process other than rank 0) unless torchrun ends us first.

  Every process meets the same bad input, and rank 0 alone reports it. Were the others
  to exit at once, torchrun would see a failed worker first and stop rank 0 (SIGTERM),
  possibly before it has printed anything: the user would get torchrun's summary and no
  reason. So under torchrun the others wait; once rank 0 has exited with its report,
  torchrun stops them. If that does not come within :data:`REPORT_WAIT_S` (the error was
  this process's own), this one reports it.
  """
  if "TORCHELASTIC_RUN_ID" in environ:
    time.sleep(REPORT_WAIT_S)
  print(text, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class Processes:
  """This process's place among the ones torchrun started (one process: the defaults)."""

  world_size: int = 1
  rank: int = 0
  local_rank: int = 0

  @property
  def distributed(self) -> bool:
    return self.world_size > 1

  @property
  def is_main(self) -> bool:
    return self.rank == 0

  # --- the process group -------------------------------------------------------------------

  def start(self) -> str:
    """Joins the process group (gloo on the CPU; NCCL for CUDA tensors); returns the device.

    Each process uses the GPU of its ``LOCAL_RANK`` when torch sees GPUs, else the CPU.
    """
    import torch
    import torch.distributed as dist
    if not self.distributed or dist.is_initialized():
      return _device(self)
    if torch.cuda.is_available():
      if self.local_rank >= torch.cuda.device_count():
        raise LaunchError(f"LOCAL_RANK {self.local_rank} has no GPU: torch sees "
                          f"{torch.cuda.device_count()}; pass --nproc-per-node at most that")
      torch.cuda.set_device(self.local_rank)
      # CPU tensors (the driver's small agreements, checkpoint metadata) go over gloo.
      backend = "cpu:gloo,cuda:nccl"
    else:
      backend = "gloo"
    dist.init_process_group(backend)
    return _device(self)

  def stop(self) -> None:
    if not self.distributed:
      return
    import torch.distributed as dist
    if dist.is_initialized():
      dist.destroy_process_group()

  # --- agreements ----------------------------------------------------------------------------

  def barrier(self) -> None:
    """Waits until every process got here (after rank 0 wrote a checkpoint or the export)."""
    if self.distributed:
      import torch.distributed as dist
      dist.barrier()

  def agree_signal(self, signum: Optional[int]) -> Optional[int]:
    """The stop signal any process received (the largest number), None if none did.

    A signal reaches the processes at different moments (torchrun forwards SIGTERM to
    each; Ctrl-C reaches them all, each in its own step); all must stop after the same
    step, or the ones still training would wait for the others forever.
    """
    if not self.distributed:
      return signum
    import torch
    import torch.distributed as dist
    flag = torch.tensor([signum or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None

  def broadcast(self, obj: Any) -> Any:
    """Rank 0's ``obj``, on every process."""
    if not self.distributed:
      return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _device(p: Processes) -> str:
  import torch
  return f"cuda:{p.local_rank}" if torch.cuda.is_available() else "cpu"


def from_env(environ: Mapping[str, str] = os.environ) -> Processes:
  """The torchrun environment, or a single process when ``WORLD_SIZE`` is not set."""
  if "WORLD_SIZE" not in environ:
    return Processes()
  values = {}
  for key in ENV:
    text = environ.get(key, "0" if key != "WORLD_SIZE" else "")
    try:
      values[key] = int(text)
    except ValueError:
      raise LaunchError(f"environment variable {key}={text!r} is not an integer (torchrun "
                        "sets WORLD_SIZE, RANK and LOCAL_RANK; launch with "
                        f"{TORCHRUN})") from None
  world, rank = values["WORLD_SIZE"], values["RANK"]
  if world < 1 or not 0 <= rank < world:
    raise LaunchError(f"environment: RANK {rank} is not in [0, WORLD_SIZE {world})")
  return Processes(world, rank, values["LOCAL_RANK"])


def check(cfg, procs: Processes) -> None:
  """Refuses what cannot run as launched, before any work (the same on every process).

  ``cfg`` is the :class:`losia_cli.args.RunConfig`.
  """
  if procs.distributed and cfg.backend != "torch":
    raise LaunchError(
        f"this is process {procs.rank} of {procs.world_size} started by torchrun, which runs "
        "the torch backend: add --backend torch (the JAX backend runs in one process over "
        "local devices: drop torchrun and pass --devices N)")
  if cfg.fsdp and not procs.distributed:
    raise LaunchError(
        "argument --fsdp: shards the model over the processes torchrun starts, and this is "
        f"{'one process' if 'WORLD_SIZE' not in os.environ else 'WORLD_SIZE 1'}: launch "
        f"with torchrun --nproc-per-node N (N >= 2) -m losia_cli --backend torch --fsdp ..., "
        "or drop --fsdp")
  if procs.distributed and cfg.batch_size % procs.world_size:
    raise LaunchError(
        f"argument --batch-size: {cfg.batch_size} sequences (the global batch of a "
        f"micro-batch) cannot be split evenly over {procs.world_size} processes; use a "
        f"multiple of {procs.world_size}")
