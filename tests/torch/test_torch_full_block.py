"""An analytic limit: LoSiA whose block is the whole matrix is AdamW.

With ``rank_factor = output_rank_factor = 1`` every target's block is all of
its rows and columns, and before the first relocalization the rewarm factor is
1 and the inner Adam state is never reset, so LoSiA (and LoSiA-Pro, whose block
gradient is then the full gradient) must follow ``torch.optim.AdamW`` step by
step on a real transformers model: the same decoupled weight decay, bias
correction and eps placement on targets and non-targets alike. If this breaks,
the gap between LoSiA and full fine-tuning in docs/QUALITY.md is no longer a
question of block size.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import losia_torch
from losia_torch import LoSiAConfig

STEPS = 6
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _llama():
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))


def _train(make_opt, clip=None):
  model = _llama()
  opt = make_opt(model)
  g = torch.Generator().manual_seed(1)
  for _ in range(STEPS):
    ids = torch.randint(0, 64, (2, 8), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    if clip is not None:
      if isinstance(opt, torch.optim.AdamW):
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
      else:
        opt.clip_grad_norm_(clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pro", [False, True], ids=["plain", "pro"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["noclip", "clip"])
def test_whole_matrix_block_is_adamw(pro, clip):
  cfg = LoSiAConfig(rank_factor=1.0, output_rank_factor=1.0, period=10 * STEPS)
  want = _train(lambda m: torch.optim.AdamW(m.parameters(), **HP), clip)
  got = _train(lambda m: losia_torch.get_losia_optimizer(m, cfg, pro=pro, verbose=False, **HP),
               clip)
  assert want.keys() == got.keys()
  for k in want:
    torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6, msg=k)
