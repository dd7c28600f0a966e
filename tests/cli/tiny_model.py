"""A tiny local transformers model with a character-level tokenizer, for CLI tests.

Nothing is downloaded: the tokenizer is built with the ``tokenizers`` library
(one token per character, plus ``<pad>``, ``<eos>``, ``<unk>``) and the model is
a randomly initialised 2-layer ``LlamaForCausalLM``. It has no chat template, so
the driver uses plain ``prompt + "\\n"`` formatting with it.
"""

from __future__ import annotations

import os
import string

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
# Every character of the embedded task's templates, plus what the tests' JSONL uses.
CHARACTERS = (string.digits + string.ascii_letters + " \n.,?!:;'\"-+=*/()<>[]{}_#%&@")


def make_tokenizer():
  """A ``PreTrainedTokenizerFast``: one id per character, eos ``<eos>``, pad ``<pad>``."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers

  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
  core = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  # Split into single characters (newlines included); Fuse joins them back on decode.
  core.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
  core.decoder = decoders.Fuse()
  core.add_special_tokens(list(SPECIAL_TOKENS))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_tiny_model(directory: str, *, tied: bool = True, seed: int = 0) -> str:
  """Writes a tiny LlamaForCausalLM + tokenizer into ``directory``; returns the directory.

  Hidden 32, 2 layers, 4 heads (2 KV heads), intermediate 64, 256 positions,
  vocabulary = the tokenizer's size; fp32 safetensors.
  """
  import torch
  import transformers

  tok = make_tokenizer()
  config = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=tied, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
      bos_token_id=None)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).to(torch.float32)
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory)
  tok.save_pretrained(directory)
  return directory


class FakeBackend:
  """A deterministic stand-in for a real backend (``losia_cli.backend.Backend``).

  Lets the driver's tests run ``main()`` end to end in well under a second per
  run: the "model" is a NumPy vector whose update depends on every batch's
  token ids, so a resumed run reproduces an uninterrupted one only if the data
  order, the step count and the restored state are all exact. LoSiA methods
  report two layers' subnets that move every ``period`` steps.

  ``fail_at_step`` (class attribute): ``train_step`` raises ``RuntimeError`` when
  asked for that 0-based step, to simulate a crash mid-run.
  """

  fail_at_step: int | None = None
  ROLES = ("self_attn.q_proj", "mlp.down_proj")
  WIDTH = 32

  def __init__(self, source, settings):
    import json as _json
    import numpy as np
    self.np = np
    self.source, self.settings = source, settings
    with open(os.path.join(source.path, "config.json")) as f:
      cfg = _json.load(f)
    self.name = "fake"
    self.max_positions = cfg["max_position_embeddings"]
    self.vocab_size = cfg["vocab_size"]
    self.step = 0
    self.params = np.random.default_rng(settings.seed).normal(size=8)
    self._subnets = self._draw(0) if settings.method in ("losia", "losia-pro") else None

  def _draw(self, epoch: int):
    np = self.np
    period = self.settings.losia.period
    out = {}
    for layer in range(2):
      for role in self.ROLES:
        rng = np.random.default_rng([self.settings.seed, epoch // period, layer, len(role)])
        k = self.WIDTH // 8
        out[f"layer{layer}.{role}"] = (np.sort(rng.choice(self.WIDTH, k, replace=False)),
                                       np.sort(rng.choice(self.WIDTH, k, replace=False)))
    return out

  def describe(self) -> str:
    return f"fake backend, method {self.settings.method}"

  def trainable_params(self) -> int:
    return int(self.params.size)

  def train_step(self, batch) -> dict:
    np = self.np
    if self.fail_at_step is not None and self.step == self.fail_at_step:
      raise RuntimeError(f"simulated crash at step {self.step}")
    ids = batch.input_ids.astype(np.float64) * batch.loss_mask
    feature = np.resize(ids.sum(axis=0), self.params.shape) / (1 + batch.loss_mask.sum())
    loss = float(np.mean((self.params - feature / 50.0) ** 2))
    lr = self.settings.lr
    self.params = self.params - lr * 2 * (self.params - feature / 50.0)
    self.step += 1
    if self._subnets is not None:
      self._subnets = self._draw(self.step)
    return {"loss": loss, "lr": lr, "grad_norm": float(np.abs(self.params).sum())}

  def generate(self, prompts, max_new_tokens, eos_token_id):
    return [list(p[-2:])[:max_new_tokens] for p in prompts]

  def subnets(self):
    return None if self._subnets is None else dict(self._subnets)

  def save_checkpoint(self, directory: str) -> None:
    assert not os.path.exists(directory), "the contract: the directory does not exist yet"
    os.makedirs(directory)
    self.np.save(os.path.join(directory, "params.npy"), self.params)
    with open(os.path.join(directory, "step.txt"), "w") as f:
      f.write(str(self.step))

  def restore_checkpoint(self, directory: str) -> None:
    self.params = self.np.load(os.path.join(directory, "params.npy"))
    with open(os.path.join(directory, "step.txt")) as f:
      self.step = int(f.read())
    if self._subnets is not None:
      self._subnets = self._draw(self.step)

  def export_hf(self, directory: str) -> None:
    import shutil
    assert not os.path.exists(directory)
    os.makedirs(directory)
    for name in ("config.json", "model.safetensors"):
      shutil.copy(os.path.join(self.source.path, name), directory)
