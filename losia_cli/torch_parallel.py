"""The torch backend across processes (``torchrun``): DDP, or FSDP2 with ``--fsdp``.

The driver hands every process the same *global* batch; :class:`DataParallel`
gives each its rows (within every micro-batch, ``micro_batches(part, world)[rank]``)
and weights each process's loss so that the gradient DDP or FSDP2 averages over
the processes is the gradient of the global batch's token mean, the loss a single
process computes on the whole batch:

    loss_r = mean_r · tokens_r / tokens_global · world

(DDP and FSDP2 divide the summed gradients by ``world``). The loss reported is
the all-reduced sum of ``mean_r · tokens_r / tokens_global``: the global mean, the
same on every process, so a non-finite loss skips the step everywhere.

- DDP: each process holds the whole model; the optimizer is built on the plain
  model first, then wrapped (LoSiA's rule for frozen non-targets). Checkpoints
  and the export are the single-process files, written by rank 0 alone.
- FSDP2: ``fully_shard`` on every decoder layer (the classes transformers lists
  in ``_no_split_modules``) and the root, then the optimizer on the sharded model
  (``LoSiAOptimizer`` detects it). Checkpoints are ``torch.distributed.checkpoint``
  directories every process writes its shards into; the export gathers the full
  state dict onto rank 0. Generation runs on every process together
  (``synced_gpus``: each forward all-gathers the layers it needs).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from losia_cli import data as _data
from losia_cli.backend import Batch

DCP_DIR = "dcp"


def process_group_active() -> bool:
  """Whether this process trains with others (a process group of more than one)."""
  return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DataParallel:
  """This process's share of the training: its rank, and how the model is wrapped."""

  def __init__(self, fsdp: bool):
    self.fsdp = fsdp
    self.world = dist.get_world_size()
    self.rank = dist.get_rank()
    self.module: Optional[torch.nn.Module] = None  # what the training forward calls

  @property
  def is_main(self) -> bool:
    return self.rank == 0

  def describe(self) -> str:
    how = "FSDP2 (fully_shard)" if self.fsdp else "DDP"
    return (f"{how} over {self.world} processes ({dist.get_backend()}), each training on "
            f"1/{self.world} of every batch")

  # --- building -------------------------------------------------------------------------

  def shard(self, model: torch.nn.Module) -> None:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (in place)."""
    from torch.distributed.fsdp import fully_shard
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
      raise ValueError(f"--fsdp: cannot tell the decoder layers of {type(model).__name__} "
                       "(transformers lists no _no_split_modules for it); drop --fsdp (DDP)")
    for layer in layers:
      fully_shard(layer)
    fully_shard(model)
    self.module = model

  def wrap(self, model: torch.nn.Module, device: torch.device) -> None:
    """DDP: the wrapper the training forward goes through (``model`` stays the plain one)."""
    ids = [device.index] if device.type == "cuda" else None
    self.module = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

  # --- a step ---------------------------------------------------------------------------

  def my_parts(self, batch: Batch, n: int) -> tuple[list[Batch], float]:
    """This process's rows of each of the ``n`` micro-batches, and the step's global
    loss-token count."""
    parts = _data.micro_batches(batch, n) if n > 1 else [batch]
    total = sum(_data.loss_tokens(p) for p in parts)
    return [_data.micro_batches(p, self.world)[self.rank] for p in parts], total

  @contextlib.contextmanager
  def accumulating(self, last: bool) -> Iterator[None]:
    """No gradient communication in a backward that is not the step's last micro-batch."""
    if last:
      yield
    elif self.fsdp:
      self.module.set_requires_gradient_sync(False)
      try:
        yield
      finally:
        self.module.set_requires_gradient_sync(True)
    else:
      with self.module.no_sync():
        yield

  def sum(self, value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())

  def broadcast(self, obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

  # --- FSDP2 checkpoints and export ---------------------------------------------------------

  def save_sharded(self, directory: str, model, optimizer, losia: bool) -> None:
    """Every process writes its shards of model and optimizer state into ``directory/dcp``."""
    import torch.distributed.checkpoint as dcp
    dcp.save(_sharded_state(model, optimizer, losia),
             checkpoint_id=os.path.join(directory, DCP_DIR))

  def load_sharded(self, directory: str, model, optimizer, losia: bool) -> None:
    """Loads :meth:`save_sharded`'s directory into the sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    state = _sharded_state(model, optimizer, losia)  # the template: shapes and shardings
    dcp.load(state, checkpoint_id=os.path.join(directory, DCP_DIR))
    set_model_state_dict(model, state["model"])
    if losia:
      optimizer.load_state_dict(state["optim"])
    else:
      set_optimizer_state_dict(model, optimizer, state["optim"])

  def full_state(self, model) -> dict[str, torch.Tensor]:
    """The full model state dict on rank 0's CPU (empty elsewhere); every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def _sharded_state(model, optimizer, losia: bool) -> dict[str, Any]:
  from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                       get_optimizer_state_dict)
  # LoSiA's own state_dict is DCP-ready (docs/torch.md); torch's helper assumes
  # parameter-shaped state, which LoSiA's compact moments are not.
  optim = optimizer.state_dict() if losia else get_optimizer_state_dict(model, optimizer)
  return {"model": get_model_state_dict(model), "optim": optim}
