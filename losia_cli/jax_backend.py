"""The JAX backend of ``losia-finetune``: the Flax NNX LLaMA model and Optax.

Methods:
- ``losia``: ``losia_jax.losia`` (AdamW on each target's core block), applied
  with the fused in-place ``apply_gradients``;
- ``losia-pro``: the same optimizer fed by ``losia_jax.pro.value_and_grad``
  (compact block gradients through the model's ``linear`` hook);
- ``full``: ``optax.adamw`` on every parameter;
- ``lora``: LoRA adapters on the same target projections, added through the
  ``linear`` hook (``y = x W + b + (alpha / r) (x A) B``, ``A`` Kaiming-uniform,
  ``B`` zero, as in PEFT), ``optax.adamw`` on the adapters; merged on export;
- ``galore``: GaLore (``losia_cli.jax_optim``, optax.contrib's with galore-torch's
  ``std`` projection side) on the same target projections, every other parameter
  plain AdamW; dense gradients like ``full``.

The parameters are a plain nested dict (``nnx.to_pure_dict``), merged back into
the module inside the jitted step; checkpoints are Orbax (params, optimizer
state, LoRA adapters) plus a small JSON with the step.

Precision and accumulation: ``precision="bf16"`` trains through the same model
built with compute dtype bfloat16 on the fp32 parameters (``LlamaForCausalLM(...,
dtype=bfloat16, param_dtype=float32)``: bf16 matmuls, fp32 norms statistics,
softmax and loss; gradients reach the fp32 parameters through the casts);
generation and the export use the fp32 model. ``grad_accum = N`` splits a step's
batch into N micro-batches inside the one jitted step (``lax.scan``), sums their
gradients weighted by loss tokens (dense, LoRA or LoSiA-Pro's compact ones), and
applies them in one fused LoSiA / Optax step. Gradient checkpointing is not
available: the model has no rematerialization hook around its decoder layers.

Devices: ``devices = N > 1`` shards the parameters FSDP-style over N local
devices and every batch over them by rows (``losia_cli.jax_mesh``); the
checkpoint is the same Orbax tree, restored onto whatever mesh the resuming run
has (each array's target sharding is the one this run placed it with).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import losia_jax
from losia_cli import jax_mesh, jax_optim
from losia_cli.backend import METHODS, PRECISIONS, Batch, ModelSource, TrainSettings
from losia_cli.schedules import lr_multiplier
from losia_common import LoSiAConfig
from losia_jax import pro
from losia_jax.models import (LlamaForCausalLM, default_linear, functional, greedy_generate,
                              load_gguf, load_hf, masked_nll, save_hf)

CHECKPOINT_FORMAT = 1  # backend.json "format": the layout of the Orbax tree below


def _lr_table(s: TrainSettings) -> np.ndarray:
  """The learning rate of every step 0..total_steps, from the schedule both backends share."""
  n = max(1, s.total_steps) + 1
  return np.asarray([s.lr * lr_multiplier(i, s.lr_schedule, s.warmup_steps, s.total_steps)
                     for i in range(n)], np.float32)


class JaxBackend:
  """See ``losia_cli.backend.Backend``."""

  name = "jax"

  def __init__(self, source: ModelSource, settings: TrainSettings):
    self.source, self.settings = source, settings
    if settings.precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got "
                       f"{settings.precision!r}")
    if settings.grad_accum < 1:
      raise ValueError(f"grad_accum must be >= 1; got {settings.grad_accum}")
    if settings.gradient_checkpointing:
      raise ValueError("gradient checkpointing needs the torch backend (the JAX LLaMA of "
                       "losia_jax.models has no rematerialization hook around its layers)")
    # Before the model loads: too few devices is one line, not a wait.
    self.mesh = jax_mesh.make_mesh(settings.devices) if settings.devices > 1 else None
    if source.kind == "hf":
      model, self.hf_config = load_hf(source.path)
    elif source.kind == "gguf":
      model, self.hf_config = load_gguf(source.path)
    else:
      raise ValueError(f"model source kind must be 'hf' or 'gguf'; got {source.kind!r}")
    self.config = model.config
    self.max_positions = int(self.config.max_position_embeddings)
    self.vocab_size = int(self.config.vocab_size)
    self.params, self._apply, self._bind = functional(model)
    if settings.precision == "bf16":
      # The same model with bf16 compute on fp32 parameters, built abstractly (its
      # weights are self.params); only the training loss runs through it.
      abstract = nnx.eval_shape(lambda r: LlamaForCausalLM(
          self.config, rngs=r, dtype=jnp.bfloat16, param_dtype=jnp.float32), nnx.Rngs(0))
      _, self._apply, _ = functional(abstract)
    self.step = 0
    self._lr = _lr_table(settings)
    lr_table = jnp.asarray(self._lr)
    lr_fn = lambda count: lr_table[jnp.minimum(count, lr_table.shape[0] - 1)]
    clip = ([optax.clip_by_global_norm(settings.max_grad_norm)]
            if settings.max_grad_norm > 0 else [])
    self.lora = None
    method = settings.method
    if method in ("losia", "losia-pro"):
      output_module = "embed_tokens" if self.config.tie_word_embeddings else "lm_head"
      # clip_norm: the norm of the gradient values LoSiA reads, as the torch backend
      # clips, the same for dense and Pro gradients (optax.clip_by_global_norm in
      # front would take the full gradient's norm, or under Pro the compact one's).
      self.tx = losia_jax.losia(lr_fn, settings.losia, weight_decay=settings.weight_decay,
                                output_module=output_module,
                                clip_norm=settings.max_grad_norm if clip else None)
      self.plan = self.tx.plan(self.params)  # raises when no target is found
      self.opt_state = self.tx.init(self.params)
    elif method in ("full", "lora", "galore"):
      if method == "galore":
        # GaLore on LoSiA's target projections (LLaMA-Factory's galore_target "all": every
        # decoder linear); the embedding (the tied output), norms and an untied lm_head
        # are not projected and get plain AdamW, like LLaMA-Factory's non-GaLore groups.
        self._galore_dims = jax_optim.target_dimension_numbers(
            self.params, self._target_plan().targets)
        inner = jax_optim.galore(lr_fn, rank=settings.galore_rank,
                                 update_proj_gap=settings.galore_update_gap,
                                 scale=settings.galore_scale,
                                 weight_dimension_numbers=self._galore_dims,
                                 weight_decay=settings.weight_decay)
      else:
        inner = optax.adamw(lr_fn, weight_decay=settings.weight_decay)
      # A non-finite gradient skips the step (as LoSiA does) instead of writing NaN everywhere.
      self.tx = optax.apply_if_finite(optax.chain(*clip, inner), max_consecutive_errors=2**30)
      if method == "lora":
        self.lora, self._lora_scale = self._init_lora()
      self.opt_state = self.tx.init(self.lora if method == "lora" else self.params)
    else:
      raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if self.mesh is None:
      self._step_fn = jax.jit(self._make_step(), donate_argnums=(0, 1))
    else:
      self._step_fn = self._place_on_mesh()

  def _place_on_mesh(self):
    """Shards parameters, adapters and optimizer state over the mesh; returns the
    jitted step that keeps them there and splits each batch's rows over it."""
    mesh = self.mesh
    params_sh = jax_mesh.tree_shardings(mesh, self.params)
    self.params = jax.device_put(self.params, params_sh)
    if self.lora is not None:
      opt_sh = jax_mesh.tree_shardings(mesh, self.lora)
      self.lora = jax.device_put(self.lora, opt_sh)
      tree_sh = (params_sh, opt_sh)
    else:
      opt_sh = tree_sh = params_sh
    state_sh = losia_jax.state_shardings(
        self.tx, self.lora if self.lora is not None else self.params, opt_sh)
    self.opt_state = jax.device_put(self.opt_state, state_sh)
    accum = self.settings.grad_accum > 1  # [N, B, S] then: rows are axis 1
    rows = jax_mesh.batch_sharding(mesh, 3 if accum else 2, 1 if accum else 0)
    return jax.jit(self._make_step(), donate_argnums=(0, 1),
                   in_shardings=(tree_sh, state_sh, rows, rows, rows),
                   out_shardings=(tree_sh, state_sh, jax_mesh.replicated(mesh)))

  # --- model ------------------------------------------------------------------

  def _merge(self, params):
    return self._bind(params)

  def _loss(self, params, linear, ids, attention_mask, loss_mask):
    return masked_nll(self._apply(params, ids, attention_mask, linear=linear), ids, loss_mask)

  def _target_plan(self):
    """The projections LoSiA targets (its target_modules; the CLI passes no LoSiA
    config to other methods: the defaults), without the output layer."""
    cfg = dataclasses.replace(self.settings.losia or LoSiAConfig(), output_rank_factor=0.0)
    return losia_jax.make_plan(self.params, cfg)  # raises when no target is found

  def _init_lora(self):
    """LoRA factors for every projection LoSiA would target (same target_modules)."""
    s = self.settings
    if s.lora_rank < 1:
      raise ValueError(f"lora_rank must be >= 1; got {s.lora_rank}")
    rng = np.random.default_rng(s.seed)
    lora = {}
    for t in self._target_plan().targets:
      bound = 1.0 / math.sqrt(t.d_in)  # kaiming_uniform(a=sqrt(5)), PEFT's init of A
      lora[t.identities[0]] = {
          "a": jnp.asarray(rng.uniform(-bound, bound, (t.d_in, s.lora_rank)), jnp.float32),
          "b": jnp.zeros((s.lora_rank, t.d_out), jnp.float32)}
    return lora, s.lora_alpha / s.lora_rank

  def _lora_linear(self, lora):
    scale = self._lora_scale

    def linear(identity, x, kernel, bias):
      y = default_linear(identity, x, kernel, bias)
      ab = lora.get(identity)
      if ab is None:
        return y
      return y + scale * ((x @ ab["a"]) @ ab["b"]).astype(y.dtype)
    return linear

  def _make_grad(self):
    """``grad(trainable, opt_state, ids, am, lm) -> (loss, gradients)`` of one (micro-)batch."""
    method, tx = self.settings.method, self.tx
    if method in ("losia", "full", "galore"):
      def grad(params, opt_state, ids, am, lm):
        return jax.value_and_grad(lambda p: self._loss(p, default_linear, ids, am, lm))(params)
    elif method == "losia-pro":
      vg = pro.value_and_grad(lambda p, linear, ids, am, lm: self._loss(p, linear, ids, am, lm),
                              tx)

      def grad(params, opt_state, ids, am, lm):
        return vg(params, opt_state, ids, am, lm)
    else:  # lora: the trainable tree is (frozen params, adapters)
      def grad(both, opt_state, ids, am, lm):
        params, lora = both
        return jax.value_and_grad(
            lambda a: self._loss(params, self._lora_linear(a), ids, am, lm))(lora)
    return grad

  def _make_step(self):
    method, tx = self.settings.method, self.tx
    grad = self._make_grad()

    def apply(tree, opt_state, g):
      if method in ("losia", "losia-pro"):
        return tx.apply_gradients(g, opt_state, tree)
      if method in ("full", "galore"):
        u, opt_state = tx.update(g, opt_state, tree)
        return optax.apply_updates(tree, u), opt_state
      params, lora = tree
      u, opt_state = tx.update(g, opt_state, lora)
      return (params, optax.apply_updates(lora, u)), opt_state

    if self.settings.grad_accum == 1:
      def step(tree, opt_state, ids, am, lm):
        loss, g = grad(tree, opt_state, ids, am, lm)
        tree, opt_state = apply(tree, opt_state, g)
        return tree, opt_state, loss
      return step

    def step(tree, opt_state, ids, am, lm):
      # ids, am, lm: [N, B, S], one row per micro-batch. Micro-batch i's mean loss
      # is weighted by its share of the loss tokens: the sum is the batch's mean.
      counts = jnp.sum(lm[:, :, :-1], axis=(1, 2))
      weights = counts / jnp.maximum(jnp.sum(counts), 1.0)
      shapes = jax.eval_shape(grad, tree, opt_state, ids[0], am[0], lm[0])[1]
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

      def micro(carry, xs):
        total, acc = carry
        w, i, a, m = xs
        loss, g = grad(tree, opt_state, i, a, m)
        acc = jax.tree.map(lambda s, x: s + (w * x).astype(s.dtype), acc, g)
        return (total + w * loss, acc), None

      (loss, g), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros),
                                  (weights, ids, am, lm))
      tree, opt_state = apply(tree, opt_state, g)
      return tree, opt_state, loss
    return step

  # --- the Backend protocol -----------------------------------------------------

  def _trainable_tree(self):
    return (self.params, self.lora) if self.lora is not None else self.params

  def trainable_params(self) -> int:
    m = self.settings.method
    if m in ("losia", "losia-pro"):
      return int(self.plan.trainable_block_params) + (
          sum(int(np.prod(self.params_leaf(k).shape)) for k, _ in self.plan.non_targets)
          if self.settings.losia.non_target == "train" else 0)
    if m == "lora":
      return int(sum(x.size for x in jax.tree.leaves(self.lora)))
    return int(sum(x.size for x in jax.tree.leaves(self.params)))

  def params_leaf(self, key: str):
    node = self.params
    for part in key.split("."):
      node = node[int(part)] if part.isdigit() and int(part) in node else node[part]
    return node

  def describe(self) -> str:
    total = sum(x.size for x in jax.tree.leaves(self.params))
    state = losia_jax.state_nbytes(self.opt_state)
    lines = [f"model: {self.source.description} ({total / 1e6:.1f} M parameters, "
             f"{self.config.num_hidden_layers} layers); backend jax ({jax.devices()[0].platform}), "
             + ("fp32" if self.settings.precision == "fp32" else
                "fp32 weights, bf16 compute")
             + (f", {self.settings.grad_accum} micro-batches per step"
                if self.settings.grad_accum > 1 else "")
             + (f"; {self.mesh.size} devices: parameters sharded FSDP-style, each batch "
                "split over them by rows" if self.mesh is not None else ""),
             f"method: {self.settings.method}; trainable parameters {self.trainable_params():,} "
             f"({self.trainable_params() / total:.2%}); optimizer state "
             f"{state / 2**20:.1f} MiB (AdamW on all: {8 * total / 2**20:.1f} MiB)"]
    if self.settings.method in ("losia", "losia-pro"):
      lines.append(self.plan.summary())
    if self.settings.method == "galore":
      lines.append(self._describe_galore())
    return "\n".join(lines)

  def _describe_galore(self) -> str:
    s = self.settings
    galore = jax_optim.find_state(self.opt_state)
    b = jax_optim.state_bytes(galore, self._galore_dims, self.params)
    others = sum(x.size for x, d in zip(jax.tree.leaves(self.params),
                                        jax_optim.flat_dims(self._galore_dims, self.params))
                 if d is None)
    ranks = "/".join(str(r) for r in sorted({int(p.shape[1]) for p in galore.projector}))
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    return (f"GaLore: rank {s.galore_rank} (std side), projections refreshed by SVD every "
            f"{s.galore_update_gap} steps, scale {s.galore_scale:g}; {len(galore.projector)} "
            f"projected matrices (rank {ranks}); optimizer state: projectors "
            f"{mib(b['projectors'])}, their low-rank Adam moments {mib(b['projected'])}, the "
            f"full Adam moments of the {others:,} unprojected parameters {mib(b['full'])}")

  def train_step(self, batch: Batch) -> dict[str, float]:
    lr = float(self._lr[min(self._lr_count(), len(self._lr) - 1)])
    skipped_before = self._skipped()
    arrays = _pad_to_bucket([np.asarray(x) for x in batch], self.settings.seq_len)
    n = self.settings.grad_accum
    if n > 1:
      # [N, B/N, S]: every micro-batch has the step's width (one compiled shape per width).
      if arrays[0].shape[0] % n:
        raise ValueError(f"a batch of {arrays[0].shape[0]} sequences cannot be split into "
                         f"{n} equal micro-batches")
      arrays = [x.reshape(n, x.shape[0] // n, *x.shape[1:]) for x in arrays]
    ids, am, lm = arrays
    tree, self.opt_state, loss = self._step_fn(
        self._trainable_tree(), self.opt_state, jnp.asarray(ids, jnp.int32),
        jnp.asarray(am, jnp.int32), jnp.asarray(lm, jnp.float32))
    if self.lora is not None:
      self.params, self.lora = tree
    else:
      self.params = tree
    self.step += 1
    out = {"loss": float(loss), "lr": lr}
    if self._skipped() > skipped_before:
      out["skipped"] = 1.0
    return out

  def _lr_count(self) -> int:
    if self.settings.method in ("losia", "losia-pro"):
      return int(losia_jax.find_losia_state(self.opt_state).count)
    return self.step

  def _skipped(self) -> int:
    if self.settings.method in ("losia", "losia-pro"):
      return int(losia_jax.find_losia_state(self.opt_state).notfinite_count)
    return int(self.opt_state.total_notfinite)

  def _export_params(self):
    """The weights to serve: the params, with LoRA merged into the kernels."""
    if self.lora is None:
      return self.params
    params = jax.tree.map(lambda x: x, self.params)
    for identity, ab in self.lora.items():
      layer, role = identity[len("layer"):].split(".", 1)
      node = params["model"]["layers"][int(layer)]
      for part in role.split("."):
        node = node[part]
      node["kernel"] = node["kernel"] + self._lora_scale * (ab["a"] @ ab["b"])
    return params

  def generate(self, prompts: list[list[int]], max_new_tokens: int,
               eos_token_id: Optional[int]) -> list[list[int]]:
    model = self._merge(self._export_params())
    return greedy_generate(model, prompts, max_new_tokens, eos_token_id)

  def subnets(self):
    if self.settings.method not in ("losia", "losia-pro"):
      return None
    st = losia_jax.find_losia_state(self.opt_state)
    out = {}
    for b in self.plan.buckets:
      rows, cols = np.asarray(st.targets[b.role].rows), np.asarray(st.targets[b.role].cols)
      for p, identity in enumerate(b.identities):
        out[identity] = (rows[p], cols[p])
    return out

  def save_checkpoint(self, directory: str) -> None:
    os.makedirs(directory)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(os.path.abspath(directory), "state"),
              {"trainable": self._trainable_tree(), "opt_state": self.opt_state})
    ckpt.wait_until_finished()
    ckpt.close()
    with open(os.path.join(directory, "backend.json"), "w", encoding="utf-8") as f:
      json.dump({"format": CHECKPOINT_FORMAT, "backend": "jax", "method": self.settings.method,
                 "step": self.step}, f)

  def restore_checkpoint(self, directory: str) -> None:
    with open(os.path.join(directory, "backend.json"), encoding="utf-8") as f:
      meta = json.load(f)
    if not isinstance(meta, dict):
      raise ValueError(f"{directory}/backend.json is not a JSON object")
    if meta.get("method") != self.settings.method or meta.get("backend") != "jax":
      raise ValueError(f"checkpoint {directory} was written by backend {meta.get('backend')!r} "
                       f"method {meta.get('method')!r}; this run is jax {self.settings.method!r}")
    # The Orbax tree's layout is this module's; a checkpoint of another layout
    # (or one without a version) would restore into the wrong leaves.
    if meta.get("format") != CHECKPOINT_FORMAT:
      raise ValueError(f"{directory}: checkpoint format {meta.get('format')!r} is not "
                       f"{CHECKPOINT_FORMAT}")
    if not isinstance(meta.get("step"), int) or meta["step"] < 0:
      raise ValueError(f"{directory}/backend.json has no valid step")
    # Each array where this run keeps it: a checkpoint from another device count (4
    # devices, restored on 2 or 1) is re-laid, not placed as saved.
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          {"trainable": self._trainable_tree(), "opt_state": self.opt_state})
    ckpt = ocp.StandardCheckpointer()
    out = ckpt.restore(os.path.join(os.path.abspath(directory), "state"), target)
    ckpt.close()
    if self.lora is not None:
      self.params, self.lora = out["trainable"]
    else:
      self.params = out["trainable"]
    self.opt_state = out["opt_state"]
    self.step = int(meta["step"])

  def export_hf(self, directory: str) -> None:
    save_hf(self._merge(self._export_params()), self.hf_config, directory)


def _pad_to_bucket(arrays: list, seq_len: int) -> list:
  """Pads (ids, attention mask, loss mask) on the right to the next power of two (at
  most ``seq_len``): XLA compiles one step per width, so a few width buckets cost a
  few compilations, where every multiple of 8 could cost one each (~30 s on SmolLM2).
  Padded positions are masked out of attention and loss, so nothing else changes."""
  width = arrays[0].shape[-1]
  bucket = min(seq_len, 1 << max(3, (width - 1).bit_length()))
  if bucket <= width:
    return arrays
  pad = [(0, 0)] * (arrays[0].ndim - 1) + [(0, bucket - width)]
  return [np.pad(x, pad) for x in arrays]
