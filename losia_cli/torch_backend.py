"""The PyTorch backend of ``losia-finetune``: a transformers model plus its optimizer.

Implements :class:`losia_cli.backend.Backend` with ``losia_torch`` (methods
``losia`` and ``losia-pro``), ``torch.optim.AdamW`` (``full``) and PEFT LoRA
(``lora``). The weights, the optimizer state and the loss are fp32; with
``precision="bf16"`` the forward and backward run under ``torch.autocast``
(bfloat16) on those fp32 weights, so no fp32 master copies are needed and the
optimizer sees fp32 gradients. ``grad_accum`` micro-batches are summed, each
weighted by its loss tokens, before one step; ``gradient_checkpointing`` turns
on transformers' (non-reentrant) activation checkpointing. On the GPU when
torch sees one.

Checkpoint layout (one directory, written whole by :meth:`TorchBackend.save_checkpoint`):

- ``model.safetensors``: every model tensor (for LoRA the PEFT model: adapters
  and base), tied weights stored once;
- ``optimizer.pt``: optimizer and LR-scheduler state dicts, and the torch RNG
  state (loadable with ``weights_only=True``);
- ``backend.json``: format version, backend, method, step, LoSiA config.

Under torchrun (``losia_cli.torch_parallel``) each process trains on its rows of
every batch, with DDP (the checkpoint above, written by rank 0) or FSDP2
(``fsdp=True``: ``dcp/``, a ``torch.distributed.checkpoint`` directory of every
process's shards, plus ``trainer.pt`` with the scheduler and RNG state, and
``backend.json``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers

import losia_torch
from losia_cli import data as _data
from losia_cli import torch_parallel as _par
from losia_cli.backend import (BACKEND_OF_METHOD, FSDP_METHODS, METHODS, PRECISIONS, Batch,
                               ModelSource, TrainSettings)
from losia_cli.schedules import lr_multiplier
from losia_common import LoSiAConfig
from losia_common import names as _names

CHECKPOINT_FORMAT = 1
GENERATE_CHUNK = 32  # prompts per generate() call: bounds the padded batch's memory

_MODEL_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.pt"
_META_FILE = "backend.json"
_TRAINER_FILE = "trainer.pt"  # FSDP2 checkpoints: scheduler and RNG (the rest is in dcp/)


def masked_next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                           loss_mask: torch.Tensor) -> torch.Tensor:
  """``sum(mask * nll(logits[:, t], ids[:, t+1])) / sum(mask)`` in fp32 (``Batch.loss_mask``).

  The last position predicts nothing, so its mask entry is ignored. A batch
  whose mask is all zero gives 0 (not NaN): dividing by 1 instead of 0.
  """
  logits = logits[:, :-1].float()
  targets = input_ids[:, 1:]
  mask = loss_mask[:, :-1].to(torch.float32)
  nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                        reduction="none").view_as(mask)
  denom = mask.sum()
  return (nll * mask).sum() / torch.where(denom > 0, denom, torch.ones_like(denom))


def _without_gguf(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
  """A copy of ``config`` without the GGUF loader's ``quantization_config``.

  transformers loads a GGUF file through a (non-serializable) quantizer and
  records it in the config; a plain fp32 model built from this config saves and
  reloads like any other checkpoint.
  """
  config = copy.deepcopy(config)
  qc = getattr(config, "quantization_config", None)
  if qc is not None:
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
      del config.quantization_config
  return config


def _plain_copy(model: transformers.PreTrainedModel,
                state_dict: Optional[dict[str, torch.Tensor]] = None,
                cls: Optional[type] = None) -> transformers.PreTrainedModel:
  """A fresh ``cls`` (default ``type(model)``) on the CPU holding ``state_dict``
  (default: the model's).

  The documented way around ``save_pretrained`` refusing a model loaded from
  GGUF; it also drops anything attached to the training model (LoSiA-Pro
  forwards, PEFT wrappers; FSDP2, which swaps the class of what it shards).
  """
  with torch.random.fork_rng(devices=[]):  # its random init must not shift the training RNG
    fresh = (cls or type(model))(_without_gguf(model.config))
  fresh.load_state_dict(model.state_dict() if state_dict is None else state_dict, strict=True)
  fresh.generation_config = copy.deepcopy(model.generation_config)
  return fresh.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
  """Hides transformers' per-tensor progress bars (the driver reports progress itself)."""
  tlog = transformers.utils.logging
  was = tlog.is_progress_bar_enabled()
  tlog.disable_progress_bar()
  try:
    yield
  finally:
    if was:
      tlog.enable_progress_bar()


def load_model(source: ModelSource) -> transformers.PreTrainedModel:
  """Loads the pretrained causal LM of ``source`` in fp32, from local files only."""
  kw: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True}
  if source.kind == "hf":
    with _quiet_transformers():
      return transformers.AutoModelForCausalLM.from_pretrained(source.path, **kw)
  if source.kind == "gguf":
    # dequantize=True: weights must be dense fp32 tensors to be trained; without it
    # transformers may keep them packed in GGUF blocks when a kernel is installed.
    kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
    with _quiet_transformers():
      model = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.dirname(os.path.abspath(source.path)), gguf_file=os.path.basename(source.path),
          **kw)
    # Rebuild as a plain model: the GGUF quantizer stays attached otherwise and
    # makes save_pretrained (and PEFT's quantization checks) treat it as quantized.
    return _plain_copy(model)
  raise ValueError(f"unknown model source kind {source.kind!r} (expected 'hf' or 'gguf')")


def _enable_checkpointing(model: transformers.PreTrainedModel) -> None:
  """transformers' activation checkpointing of every decoder layer, non-reentrant.

  Non-reentrant: gradients reach every parameter inside a checkpointed layer
  even when its input does not require grad (frozen embeddings, LoRA), and
  LoSiA-Pro's compact gradient leaves are filled like any other.
  """
  if not getattr(model, "supports_gradient_checkpointing", False):
    raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
  kw = {"use_reentrant": False}
  if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
  else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def _lora_target_modules(model: torch.nn.Module, losia_config) -> list[str]:
  """Full module names of the matrices LoSiA would target, for PEFT.

  Resolved with LoSiA's own rules (a name matches a path component, a regex the
  whole dotted path), so ``--target-modules`` means the same for both methods and
  a miss raises the same ``ValueError``; PEFT's own matching differs (suffixes,
  and a regex only as a single string).
  """
  named = list(model.named_parameters())
  parsed = [_names.parse_name(n.split(".")) for n, _ in named]
  positions, _ = _names.find_targets(parsed, [tuple(p.shape) for _, p in named],
                                     losia_config.replace(output_rank_factor=0.0))
  return sorted({parsed[i].module_path for i in positions})


def _tensor_bytes(obj: Any) -> int:
  """Bytes held by this process (a DTensor: its local shard)."""
  if hasattr(obj, "to_local"):
    obj = obj.to_local()
  if isinstance(obj, torch.Tensor):
    return obj.numel() * obj.element_size()
  if isinstance(obj, dict):
    return sum(_tensor_bytes(v) for v in obj.values())
  if isinstance(obj, (list, tuple)):
    return sum(_tensor_bytes(v) for v in obj)
  return 0


def _mib(n: int) -> str:
  return f"{n / 2**20:.2f} MiB"


class TorchBackend:
  """A transformers causal LM and the optimizer of one method (see ``losia_cli.backend``).

  Args:
    source: where the pretrained model is.
    settings: method, hyper-parameters and schedule.
    device: torch device; default ``cuda`` when available, else ``cpu``.

  Raises:
    ValueError: an unknown method or schedule, or LoSiA / LoRA targets not
      found in the model (the message names ``target_modules``).
  """

  name = "torch"

  def __init__(self, source: ModelSource, settings: TrainSettings,
               device: Optional[str] = None):
    if settings.method not in METHODS:
      raise ValueError(f"method must be one of {', '.join(METHODS)}; got {settings.method!r}")
    if BACKEND_OF_METHOD.get(settings.method, self.name) != self.name:
      raise ValueError(f"method {settings.method!r} runs on the "
                       f"{BACKEND_OF_METHOD[settings.method]} backend, not torch")
    lr_multiplier(0, settings.lr_schedule, settings.warmup_steps, settings.total_steps)  # validates
    if settings.precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got "
                       f"{settings.precision!r}")
    if settings.grad_accum < 1:
      raise ValueError(f"grad_accum must be >= 1; got {settings.grad_accum}")
    self.source = source
    self.settings = settings
    # Under torchrun: this process's share (losia_cli.torch_parallel); None alone.
    self.parallel = _par.DataParallel(settings.fsdp) if _par.process_group_active() else None
    if settings.fsdp and self.parallel is None:
      raise ValueError("fsdp needs a torch.distributed process group of several processes "
                       "(torchrun --nproc-per-node N)")
    if device is None and torch.cuda.is_available():
      device = f"cuda:{torch.cuda.current_device()}"  # torchrun: the LOCAL_RANK's GPU
    self.device = torch.device(device or "cpu")
    torch.manual_seed(settings.seed)
    base = load_model(source).to(self.device)
    self._model_class = type(base)  # FSDP2 swaps the class of the modules it shards
    self.base_model = base  # the transformers model (inside the PEFT wrapper for LoRA)
    self._export_generation_config = copy.deepcopy(base.generation_config)
    # Greedy-only generation config: a checkpoint's sampling defaults (temperature,
    # top_p) would make transformers warn on every do_sample=False call.
    base.generation_config = transformers.GenerationConfig(
        do_sample=False, bos_token_id=base.config.bos_token_id)
    self.max_positions = int(base.config.max_position_embeddings)
    self.vocab_size = int(base.config.vocab_size)
    self.step = 0
    self.model_params = sum(p.numel() for p in base.parameters())
    self._stepped = False  # optimizer state exists in full only after a step
    if settings.gradient_checkpointing:
      _enable_checkpointing(base)

    s = settings
    if self.parallel is not None and self.parallel.fsdp:
      if s.method not in FSDP_METHODS:
        raise ValueError(f"method {s.method!r} does not run under FSDP2 (fsdp); "
                         f"{', '.join(FSDP_METHODS)} do")
      self.parallel.shard(base)  # before the optimizer, which must see the DTensors
    self.losia_opt: Optional[losia_torch.LoSiAOptimizer] = None
    if s.method in ("losia", "losia-pro"):
      self.model = base
      # Under torchrun Pro is switched on after wrapping (below): what it attaches to
      # is the wrapper that averages gradients.
      self.losia_opt = losia_torch.get_losia_optimizer(
          base, s.losia, lr=s.lr, weight_decay=s.weight_decay,
          pro=s.method == "losia-pro" and self.parallel is None, verbose=False)
      self.optimizer: torch.optim.Optimizer = self.losia_opt
    elif s.method == "full":
      self.model = base
      self.optimizer = torch.optim.AdamW(base.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    else:  # lora
      if s.lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1; got {s.lora_rank}")
      import peft  # imported here: only LoRA runs need it
      # PEFT's own variants: DoRA (magnitude-direction split) and PiSSA (adapters
      # initialised from the principal singular vectors, the residual in the base).
      variant = {"lora": {}, "dora": {"use_dora": True},
                 "pissa": {"init_lora_weights": "pissa"}}[s.lora_variant]
      cfg = peft.LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha,
                            target_modules=_lora_target_modules(base, s.losia or LoSiAConfig()),
                            lora_dropout=0.0, task_type="CAUSAL_LM", **variant)
      with warnings.catch_warnings():
        # peft calls a transformers method deprecated in v5; nothing for a user to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        self.model = peft.get_peft_model(base, cfg)
      self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                         lr=s.lr, weight_decay=s.weight_decay)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer,
        lambda step: lr_multiplier(step, s.lr_schedule, s.warmup_steps, s.total_steps))
    if self.parallel is not None and not self.parallel.fsdp:
      # After the optimizer: LoSiA's frozen non-targets must be frozen when DDP is built.
      self.parallel.wrap(self.model, self.device)
    if self.parallel is not None and s.method == "losia-pro":
      # The library raises NotImplementedError where Pro cannot run (make_backend: one line).
      names = self.losia_opt.enable_pro(self.parallel.module)
      self.losia_opt.report += (f"\n  LoSiA-Pro: {len(names)} of "
                                f"{len(self.losia_opt.plan.targets)} targets use the compact "
                                "backward")

  # --- reports -------------------------------------------------------------------

  def trainable_params(self) -> int:
    """Parameters the method updates.

    LoSiA: the target blocks plus, with ``non_target="train"``, every non-target
    (embeddings, norms, ...), which get full Adam updates.
    """
    if self.losia_opt is not None:
      plan = self.losia_opt.plan
      n = plan.trainable_block_params
      if self.losia_opt.config.non_target == "train":
        n += plan.non_target_params
      return n
    return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

  def optimizer_state_bytes(self) -> tuple[int, bool]:
    """``(bytes, exact)``: the optimizer state now, or before the first step an
    estimate of it (Adam's moments are created lazily on the first step)."""
    if self.losia_opt is not None:
      if self._stepped:
        return self.losia_opt.state_nbytes(), True
      return self._losia_state_estimate(), False
    if self._stepped:
      return _tensor_bytes(list(self.optimizer.state.values())), True
    return 8 * self.trainable_params(), False  # two fp32 moments per parameter

  def _losia_state_estimate(self) -> int:
    """Target moments and indices (allocated already), trained non-targets' moments,
    and the importance buffers (two fp32 per entry) at their peak: the largest
    layer's (async: one layer profiles at a time), or every target's (sync)."""
    opt = self.losia_opt
    plan = opt.plan
    n = opt.state_nbytes()
    if opt.config.non_target == "train":
      n += 8 * plan.non_target_params
    per_layer: dict[int, int] = {}
    for t in plan.targets:
      per_layer[t.layer_id] = per_layer.get(t.layer_id, 0) + t.d_out * t.d_in
    if opt.config.schedule == "sync":
      return n + 8 * sum(per_layer.values())
    return n + 8 * max(per_layer.values(), default=0)

  def describe(self) -> str:
    s = self.settings
    how = "fp32" if s.precision == "fp32" else "fp32 weights, bf16 autocast"
    if s.grad_accum > 1:
      how += f", {s.grad_accum} micro-batches per step"
    if s.gradient_checkpointing:
      how += ", gradient checkpointing"
    lines = [(f"model: {self.source.description} ({self.source.kind}), "
              f"{self.model_params:,} parameters, {how} on {self.device}")]
    if self.parallel is not None:
      lines.append(f"across processes: {self.parallel.describe()}")
    if self.losia_opt is not None:
      c = s.losia
      lines.append(f"method: {s.method} (rank_factor {c.rank_factor}, output_rank_factor "
                   f"{c.output_rank_factor}, period {c.period}, {c.schedule}, non_target "
                   f"{c.non_target})")
      lines.extend("  " + ln for ln in self.losia_opt.report.splitlines())
    elif s.method == "lora":
      lines.append(f"method: lora ({s.lora_variant}, rank {s.lora_rank}, alpha {s.lora_alpha}, "
                   f"{len(self.model.peft_config['default'].target_modules)} modules)")
    else:
      lines.append("method: full (AdamW)")
    n = self.trainable_params()
    lines.append(f"trainable parameters: {n:,} ({n / max(self.model_params, 1):.2%} of the model)")
    nbytes, exact = self.optimizer_state_bytes()
    per = " per process" if self.parallel is not None and self.parallel.fsdp else ""
    lines.append(f"optimizer state{per}: {_mib(nbytes)}" + (
        "" if exact else " (estimate before the first step)"))
    return "\n".join(lines)

  def subnets(self) -> Optional[dict[str, tuple[np.ndarray, np.ndarray]]]:
    if self.losia_opt is None:
      return None
    out = {}
    for t in self.losia_opt.plan.targets:
      rows, cols = self.losia_opt.subnet(t.name)
      # t.identity is target_identity(layer_index, role), "output" for the output layer.
      out[t.identity] = (rows.cpu().numpy().copy(), cols.cpu().numpy().copy())
    return out

  # --- training ----------------------------------------------------------------

  def _micro_loss(self, batch: Batch) -> torch.Tensor:
    """The masked mean loss of one (micro-)batch, in fp32, with the forward under autocast."""
    dev = self.device
    ids = torch.as_tensor(np.asarray(batch.input_ids), dtype=torch.int64, device=dev)
    attn = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.int64, device=dev)
    mask = torch.as_tensor(np.asarray(batch.loss_mask), dtype=torch.float32, device=dev)
    forward = self.parallel.module if self.parallel is not None else self.model
    with torch.autocast(dev.type, dtype=torch.bfloat16,
                        enabled=self.settings.precision == "bf16"):
      logits = forward(input_ids=ids, attention_mask=attn, use_cache=False).logits
    return masked_next_token_loss(logits, ids, mask)

  def _forward_backward(self, batch: Batch) -> float:
    """Accumulates the step's gradient into ``.grad``; returns the step's loss.

    One micro-batch: ``loss.backward()``. ``N = grad_accum`` micro-batches:
    each loss is weighted by its share of the batch's loss tokens before its
    backward, so the summed gradient is that of the whole batch's token mean.
    """
    n = self.settings.grad_accum
    if self.parallel is not None:
      return self._forward_backward_shared(batch, n)
    if n == 1:
      loss = self._micro_loss(batch)
      loss.backward()
      return float(loss.detach())
    parts = _data.micro_batches(batch, n)
    counts = [_data.loss_tokens(p) for p in parts]
    total = sum(counts)
    value = 0.0
    for part, count in zip(parts, counts):
      weight = count / total if total > 0 else 0.0
      loss = self._micro_loss(part) * weight
      loss.backward()
      value += float(loss.detach())
    return value

  def _forward_backward_shared(self, batch: Batch, n: int) -> float:
    """Under torchrun: this process's rows of each micro-batch, weighted so that the
    averaged gradient is the global batch's (``losia_cli.torch_parallel``)."""
    par = self.parallel
    parts, total = par.my_parts(batch, n)
    value = 0.0
    for i, part in enumerate(parts):
      share = _data.loss_tokens(part) / total if total > 0 else 0.0
      with par.accumulating(last=i == len(parts) - 1):
        loss = self._micro_loss(part)
        (loss * (share * par.world)).backward()
      value += float(loss.detach()) * share
    return par.sum(value, self.device)

  def train_step(self, batch: Batch) -> dict[str, float]:
    self.model.train()
    lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step uses
    out = {"loss": self._forward_backward(batch), "lr": lr}
    grad_norm = None
    if self.settings.max_grad_norm > 0:
      if self.losia_opt is not None:
        # LoSiA's norm covers the gradient values it reads (with Pro: block grads).
        grad_norm = self.losia_opt.clip_grad_norm_(self.settings.max_grad_norm)
      else:
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.settings.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of all shards
          grad_norm = grad_norm.full_tensor()
      out["grad_norm"] = float(grad_norm)
    if self.losia_opt is not None:
      before = self.losia_opt.num_skipped_steps
      self.optimizer.step()  # skips by itself on a non-finite gradient
      skipped = self.losia_opt.num_skipped_steps > before
    else:
      # AdamW would write NaN into every weight; skip like LoSiA does.
      finite_norm = grad_norm is None or np.isfinite(out["grad_norm"])
      skipped = not (np.isfinite(out["loss"]) and finite_norm)
      if not skipped:
        self.optimizer.step()
    # The schedule follows the driver's step count (batches consumed), skipped or not.
    with warnings.catch_warnings():
      # A skipped first AdamW step never called optimizer.step(); torch would warn
      # that the schedule moves first, which is what is meant here.
      warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
      self.scheduler.step()
    self.optimizer.zero_grad(set_to_none=True)
    self.step += 1
    self._stepped = True
    if skipped:
      out["skipped"] = 1.0
    return out

  @torch.no_grad()
  def generate(self, prompts: list[list[int]], max_new_tokens: int,
               eos_token_id: Optional[int]) -> list[list[int]]:
    """Greedy continuations, batched with left padding; EOS itself is not returned."""
    if any(len(p) == 0 for p in prompts):
      raise ValueError("generate needs non-empty prompts")
    if max_new_tokens <= 0:
      return [[] for _ in prompts]
    self.model.eval()
    pad = eos_token_id if eos_token_id is not None else 0
    gen_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
        pad_token_id=pad, bos_token_id=self.base_model.config.bos_token_id)
    # FSDP2: every process runs every forward (each all-gathers the layers), in step.
    synced = {"synced_gpus": True} if self.parallel is not None and self.parallel.fsdp else {}
    results: list[list[int]] = []
    for start in range(0, len(prompts), GENERATE_CHUNK):
      chunk = prompts[start:start + GENERATE_CHUNK]
      width = max(len(p) for p in chunk)
      ids = torch.full((len(chunk), width), pad, dtype=torch.int64)
      attn = torch.zeros((len(chunk), width), dtype=torch.int64)
      for i, p in enumerate(chunk):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.int64)
        attn[i, width - len(p):] = 1
      seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                 generation_config=gen_config, **synced)
      for row in seqs[:, width:].tolist():
        if eos_token_id is not None and eos_token_id in row:
          row = row[:row.index(eos_token_id)]
        results.append(row)
    return results

  # --- checkpoints -------------------------------------------------------------

  def _rng_state(self) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if self.device.type == "cuda":
      rng["cuda"] = torch.cuda.get_rng_state(self.device)
    return rng

  def _set_rng_state(self, rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and self.device.type == "cuda":
      torch.cuda.set_rng_state(rng["cuda"], self.device)

  @property
  def _sharded(self) -> bool:
    return self.parallel is not None and self.parallel.fsdp

  def save_checkpoint(self, directory: Optional[str]) -> None:
    """Writes the checkpoint into ``directory`` (which must not exist yet).

    Under torchrun every process calls it, rank 0 with the directory and the others
    with None: with DDP rank 0 writes alone (every process holds the same state);
    with FSDP2 every process writes its shards into rank 0's directory.
    """
    if self._sharded:
      if self.parallel.is_main:
        os.makedirs(directory)
      directory = self.parallel.broadcast(directory)
      self.parallel.save_sharded(directory, self.model, self.optimizer, self.losia_opt is not None)
      if not self.parallel.is_main:
        return
      torch.save({"scheduler": self.scheduler.state_dict(), "rng": self._rng_state()},
                 os.path.join(directory, _TRAINER_FILE))
    elif directory is None:
      return
    else:
      os.makedirs(directory)  # must not exist: the driver renames it into place afterwards
      # save_model stores tied (shared) tensors once; save_file would refuse them.
      safetensors.torch.save_model(self.model, os.path.join(directory, _MODEL_FILE))
      torch.save({"optimizer": self.optimizer.state_dict(),
                  "scheduler": self.scheduler.state_dict(), "rng": self._rng_state()},
                 os.path.join(directory, _OPTIMIZER_FILE))
    meta = {"format": CHECKPOINT_FORMAT, "backend": self.name, "method": self.settings.method,
            "step": self.step, "stepped": self._stepped, "model": self.source.description,
            "losia": self.settings.losia.to_dict() if self.losia_opt is not None else None,
            "fsdp": self._sharded}
    with open(os.path.join(directory, _META_FILE), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)
      f.write("\n")

  def restore_checkpoint(self, directory: str) -> None:
    """Restores :meth:`save_checkpoint`'s files (every process reads them under torchrun)."""
    with open(os.path.join(directory, _META_FILE), encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("backend") != self.name:
      raise ValueError(f"{directory} is a checkpoint of the {meta.get('backend')!r} backend, "
                       f"not {self.name!r}")
    if meta.get("format") != CHECKPOINT_FORMAT:
      raise ValueError(f"{directory}: checkpoint format {meta.get('format')!r} is not "
                       f"{CHECKPOINT_FORMAT}")
    if meta.get("method") != self.settings.method:
      raise ValueError(f"{directory} was written by method {meta.get('method')!r}; this run "
                       f"uses {self.settings.method!r}")
    if bool(meta.get("fsdp", False)) != self._sharded:
      raise ValueError(
          f"{directory} holds FSDP2 shards (torch.distributed.checkpoint): resume it under "
          "torchrun with --fsdp" if meta.get("fsdp") else
          f"{directory} is a whole-model checkpoint; resume it without --fsdp")
    if self._sharded:
      self.parallel.load_sharded(directory, self.model, self.optimizer, self.losia_opt is not None)
      ck = torch.load(os.path.join(directory, _TRAINER_FILE), map_location="cpu",
                      weights_only=True)
    else:
      safetensors.torch.load_model(self.model, os.path.join(directory, _MODEL_FILE),
                                   strict=True, device=str(self.device))
      # CPU first: the RNG state must stay a CPU tensor; load_state_dict moves the
      # optimizer state onto the parameters' device.
      ck = torch.load(os.path.join(directory, _OPTIMIZER_FILE), map_location="cpu",
                      weights_only=True)
      self.optimizer.load_state_dict(ck["optimizer"])
    self.scheduler.load_state_dict(ck["scheduler"])
    self._set_rng_state(ck["rng"])
    self.step = int(meta["step"])
    self._stepped = bool(meta.get("stepped", self.step > 0))

  def export_hf(self, directory: Optional[str]) -> None:
    """Writes the transformers model; under torchrun every process calls it (rank 0
    with the directory, the others with None: FSDP2 gathers the shards onto rank 0)."""
    if self._sharded:
      state = self.parallel.full_state(self.model)
    elif self.settings.method == "lora" and directory is not None:
      # Merge on a copy: merging in place and unmerging is not bit-exact in fp32,
      # and training may continue after an export.
      merged = copy.deepcopy(self.model).merge_and_unload()
      state = merged.state_dict()
    else:
      state = self.base_model.state_dict()
    if directory is None:
      return
    plain = _plain_copy(self.base_model, state, cls=self._model_class)
    plain.generation_config = copy.deepcopy(self._export_generation_config)
    with _quiet_transformers():
      plain.save_pretrained(directory)
