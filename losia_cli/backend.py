"""What the ``losia-finetune`` driver needs from a training backend.

``losia_cli.main`` owns the command line, the data, evaluation, progress,
metrics, pictures and the checkpoint *schedule*; a backend (``losia_cli.jax_backend``,
``losia_cli.torch_backend``) owns the model, the optimizer and the on-disk
format of its checkpoints. Both backends implement :class:`Backend`, so the
driver and its tests treat them alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np

METHODS = ("losia", "losia-pro", "full", "lora", "galore")
BACKENDS = ("jax", "torch")
# Methods only one backend has: GaLore is optax's (the registry's galore-torch needs
# bitsandbytes), so the torch backend does not offer it.
BACKEND_OF_METHOD = {"galore": "jax"}
# Methods the torch backend runs under FSDP2 (--fsdp). LoRA's adapters are tiny (DDP,
# the default under torchrun, trains it); LoSiA-Pro runs where losia_torch supports it.
FSDP_METHODS = ("losia", "losia-pro", "full")
LR_SCHEDULES = ("constant", "linear", "cosine")
LORA_VARIANTS = ("lora", "dora", "pissa")
PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where the pretrained model comes from (resolved and checked by the driver).

  Attributes:
    kind: ``"hf"`` (a directory with ``config.json`` and safetensors weights) or
      ``"gguf"`` (a ``.gguf`` file, read with transformers' GGUF loader).
    path: the directory (hf) or the ``.gguf`` file (gguf).
    description: for reports, e.g. ``"SmolLM2-135M-Instruct (embedded, GGUF Q4_1)"``.
  """

  kind: str
  path: str
  description: str


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Everything a backend needs to build its model and optimizer.

  ``losia`` holds the ``losia_common.LoSiAConfig`` (used by methods ``losia``
  and ``losia-pro``; None for the others). ``total_steps`` is the number of
  optimizer steps of the whole run (resumed runs included), for the
  learning-rate schedule.
  """

  method: str
  losia: Any  # losia_common.LoSiAConfig
  lr: float
  lr_schedule: str
  warmup_steps: int
  total_steps: int
  weight_decay: float
  max_grad_norm: float  # 0: no clipping
  lora_rank: int
  lora_alpha: float
  seed: int
  seq_len: int
  batch_size: int
  lora_variant: str = "lora"  # torch: "lora", "dora" (PEFT use_dora) or "pissa" (PiSSA init)
  # "fp32", or "bf16": bf16 compute (torch autocast; the JAX model's compute dtype) on
  # fp32 weights, optimizer state and loss.
  precision: str = "fp32"
  # Micro-batches per optimizer step: train_step splits its batch row-wise into this
  # many, sums their gradients weighted by loss tokens, then steps once.
  grad_accum: int = 1
  gradient_checkpointing: bool = False  # torch: recompute each decoder layer in backward
  # Method "galore" (JAX): projection rank, steps between SVD refreshes of the
  # projectors, and the scale of the projected-back update. The defaults are
  # LLaMA-Factory's (galore_rank, galore_update_interval, galore_scale; proj_type std).
  galore_rank: int = 16
  galore_update_gap: int = 200
  galore_scale: float = 2.0
  # Across devices. torch: under torchrun (a process group of several processes) the
  # backend trains data-parallel, each process on its rows of every batch: DDP, or FSDP2
  # (fully_shard) with fsdp=True. JAX: ``devices`` local devices, parameters sharded
  # FSDP-style and each batch split over them.
  fsdp: bool = False
  devices: int = 1


class SetupError(ValueError):
  """A backend cannot start as configured; the message stands alone (names the flag)."""


class Batch(NamedTuple):
  """One training batch, right-padded (``losia_cli.data.make_batch``: to its longest
  sequence, rounded up to a multiple of 8, at most ``seq_len``).

  A NamedTuple, hence a JAX pytree: it can be passed to jitted functions as is.

  Attributes:
    input_ids: int32 ``[B, S]``.
    attention_mask: int32 ``[B, S]``, 1 on real tokens.
    loss_mask: float32 ``[B, S]``, 1 where the *next* token (``input_ids[:, t+1]``)
      is a response token to predict; the loss is
      ``sum(mask * nll(logits[:, t], ids[:, t+1])) / sum(mask)``.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray


class Backend(Protocol):
  """A model plus its optimizer, driven one step at a time.

  Constructed as ``JaxBackend(source, settings)`` / ``TorchBackend(source,
  settings)``: loads the model (fp32), builds the method's optimizer, and
  raises ``ValueError`` with a clear message when the method cannot apply
  (e.g. LoSiA targets not found in the model).
  """

  name: str  # "jax" or "torch"
  max_positions: int  # the model's max_position_embeddings
  vocab_size: int
  step: int  # optimizer steps taken (restored by restore_checkpoint)

  def describe(self) -> str:
    """Human-readable summary: model, method, trainable parameters, optimizer-state bytes."""

  def trainable_params(self) -> int:
    """Parameters the method updates (LoSiA: the block parameters, plus every
    non-target parameter when ``non_target="train"``)."""

  def train_step(self, batch: Batch) -> dict[str, float]:
    """One optimizer step; returns at least ``{"loss": ..., "lr": ...}`` (host floats).

    With ``settings.grad_accum = N`` the batch is split row-wise into N
    micro-batches whose gradients are summed before the one step; each is
    weighted by its share of the batch's loss tokens, so the loss (and the
    gradient) is the batch's token mean, as if it were one batch.

    A step whose gradients are not finite changes no weight and returns
    ``"skipped": 1.0``; ``step`` still advances (it counts batches consumed).
    """

  def generate(self, prompts: list[list[int]], max_new_tokens: int,
               eos_token_id: Optional[int]) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids, without the prompt), stopping at EOS."""

  def subnets(self) -> Optional[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """LoSiA methods: ``{identity: (rows, cols)}`` of every target, identities as in
    ``losia_common.names.target_identity`` (``layer3.self_attn.q_proj``, ``output``);
    None for other methods."""

  def save_checkpoint(self, directory: Optional[str]) -> None:
    """Writes model + optimizer state + step into ``directory`` (which does not
    exist yet; the driver makes the write atomic by renaming afterwards).

    Under torchrun every process calls it at the same step: rank 0 with the
    directory, the others with None (they write their shards, if any, into rank
    0's directory)."""

  def restore_checkpoint(self, directory: str) -> None:
    """Restores exactly what :meth:`save_checkpoint` wrote."""

  def export_hf(self, directory: Optional[str]) -> None:
    """Writes the fine-tuned model as a transformers checkpoint (config.json +
    safetensors; LoRA merged) into ``directory`` (which does not exist yet);
    under torchrun as :meth:`save_checkpoint` (rank 0 writes)."""
