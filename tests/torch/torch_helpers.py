"""Small models and glue shared by the torch tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from losia_common.subnet import block_size
from tests.torch.torch_reference import RefTarget


class Attn(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.q_proj = nn.Linear(d, d, bias=False)
    self.o_proj = nn.Linear(d, d, bias=True)


class Mlp(nn.Module):
  def __init__(self, d, ff):
    super().__init__()
    self.up_proj = nn.Linear(d, ff, bias=False)
    self.down_proj = nn.Linear(ff, d, bias=False)


class Block(nn.Module):
  def __init__(self, d, ff):
    super().__init__()
    self.norm = nn.LayerNorm(d)
    self.self_attn = Attn(d)
    self.mlp = Mlp(d, ff)

  def forward(self, h):
    x = self.norm(h)
    h = h + self.self_attn.o_proj(torch.tanh(self.self_attn.q_proj(x)))
    return h + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class Toy(nn.Module):
  """A tiny decoder-shaped model: ``layers.i.{self_attn.{q,o}_proj, mlp.{up,down}_proj}``."""

  def __init__(self, layers=3, d=12, ff=20, vocab=16, tied=False):
    super().__init__()
    self.embed_tokens = nn.Embedding(vocab, d)
    self.layers = nn.ModuleList([Block(d, ff) for _ in range(layers)])
    self.final_norm = nn.LayerNorm(d)
    self.lm_head = nn.Linear(d, vocab, bias=False)
    self.tied = tied
    if tied:
      self.lm_head.weight = self.embed_tokens.weight

  def get_output_embeddings(self):
    return self.lm_head

  def forward(self, ids):
    h = self.embed_tokens(ids)
    for layer in self.layers:
      h = layer(h)
    return self.lm_head(self.final_norm(h))

  def loss(self, ids, targets, reduction="mean"):
    logits = self(ids)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                       targets.reshape(-1), reduction=reduction)


TOY_TARGET_ROLES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def toy_ref_targets(model: Toy, cfg) -> tuple[dict[str, RefTarget], int]:
  """Targets of :class:`Toy` described by hand (the reference does not use the planner)."""
  a = int(cfg.output_rank_factor > 0)
  out = {}
  for i, _ in enumerate(model.layers):
    for role in TOY_TARGET_ROLES:
      name = f"layers.{i}.{role}.weight"
      w = model.get_parameter(name)
      out[name] = RefTarget(i + a, role, f"layer{i}.{role}", block_size(cfg.rank_factor, w.shape[0]),
                            block_size(cfg.rank_factor, w.shape[1]))
  if a:
    name = "embed_tokens.weight" if model.tied else "lm_head.weight"
    w = model.get_parameter(name)
    out[name] = RefTarget(0, "output", "output", block_size(cfg.output_rank_factor, w.shape[0]),
                          w.shape[1], row_mode=True)
  return out, len(model.layers) + a


def weights_np(model) -> dict[str, np.ndarray]:
  return {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}


def random_grads(model, rng: np.random.Generator, scale=1.0) -> dict[str, np.ndarray]:
  """fp32-representable random gradients (as float64 arrays)."""
  return {n: (scale * rng.standard_normal(p.shape)).astype(np.float32).astype(np.float64)
          for n, p in model.named_parameters()}


def set_grads(model, grads: dict[str, np.ndarray]) -> None:
  for n, p in model.named_parameters():
    p.grad = torch.tensor(grads[n], dtype=p.dtype)
