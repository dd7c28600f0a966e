"""transformers.Trainer with LoSiA: LoSiATrainer follows the manual loop exactly (default
max_grad_norm=1.0, with and without Pro), logs LoSiA's clip norm, resumes bit for bit."""

from __future__ import annotations

import pytest
import torch
import transformers

import losia_torch
from losia_torch import LoSiAConfig, LoSiAOptimizer

CFG = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.1)
STEPS, BATCH, LR = 6, 4, 1e-2  # 6 steps: every one of the 3 slots relocalizes once


def _llama(seed=0):
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True))


class _Data(torch.utils.data.Dataset):
  def __init__(self):
    g = torch.Generator().manual_seed(3)
    self.ids = torch.randint(0, 64, (BATCH * STEPS, 8), generator=g)

  def __len__(self):
    return len(self.ids)

  def __getitem__(self, i):
    return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Recording(losia_torch.LoSiATrainer):
  """Records what the Trainer feeds the model, for the manual loop to replay."""

  def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    self.fed.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _args(tmp_path, **kw):
  return transformers.TrainingArguments(
      output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
      learning_rate=LR, logging_steps=1, save_steps=3, report_to=[], use_cpu=True,
      dataloader_num_workers=0, disable_tqdm=True, **kw)


def _trainer(tmp_path, pro, model=None):
  t = _Recording(model=model or _llama(), args=_args(tmp_path), train_dataset=_Data(),
                 losia_config=CFG, pro=pro)
  t.fed = []
  return t


def _manual(fed, pro):
  """The documented loop, with the Trainer's defaults (AdamW betas/eps, linear schedule)."""
  model = _llama()
  opt = LoSiAOptimizer(model, CFG, lr=LR, betas=(0.9, 0.999), eps=1e-8)
  if pro:
    assert len(opt.enable_pro(model)) == 14
  sched = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
  norms = []
  for inputs, n in fed:
    model(**inputs, num_items_in_batch=n).loss.backward()
    norms.append(float(opt.clip_grad_norm_(1.0)))
    opt.step()
    sched.step()
    opt.zero_grad()
  return model, opt, norms


@pytest.mark.parametrize("pro", [False, True], ids=["losia", "pro"])
def test_trainer_follows_the_manual_loop_and_resumes(tmp_path, pro):
  tr = _trainer(tmp_path / "a", pro)
  assert tr.args.max_grad_norm == 1.0  # the default, active here
  tr.train()
  opt = tr._losia_optimizer()
  assert opt.losia_step == STEPS and bool(opt.pro_blocks) == pro
  model, mopt, norms = _manual(tr.fed, pro)
  assert max(norms) > 1.0  # the clip is active
  logged = [h["grad_norm"] for h in tr.state.log_history if "grad_norm" in h]
  assert logged == pytest.approx(norms, rel=1e-6)  # it logs the norm LoSiA clipped by
  for t in mopt.plan.targets:
    assert torch.equal(mopt.subnet(t.name)[0], opt.subnet(t.name)[0])
  for (n, p0), p1 in zip(model.named_parameters(), tr.model.parameters()):
    assert torch.equal(p0, p1), n

  # Resume from the step-3 checkpoint (mid-round, a profiling window open) on a new model.
  tr2 = _trainer(tmp_path / "a", pro, model=_llama(seed=5))
  tr2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
  assert tr2._losia_optimizer().losia_step == STEPS
  for (n, p0), p1 in zip(tr.model.named_parameters(), tr2.model.parameters()):
    assert torch.equal(p0, p1), n


def test_plain_trainer_with_optimizer_cls_says_to_use_losia_trainer(tmp_path):
  tr = transformers.Trainer(model=_llama(), args=_args(tmp_path), train_dataset=_Data(),
                            optimizer_cls_and_kwargs=(LoSiAOptimizer, {"config": CFG}))
  with pytest.raises(TypeError, match="use losia_torch.LoSiATrainer"):
    tr.create_optimizer()


def test_losia_trainer_takes_optimizer_cls_and_kwargs(tmp_path):
  tr = losia_torch.LoSiATrainer(model=_llama(), args=_args(tmp_path), train_dataset=_Data(),
                                optimizer_cls_and_kwargs=(LoSiAOptimizer, {"config": CFG}))
  opt = tr.create_optimizer()
  assert isinstance(opt, LoSiAOptimizer) and opt.config == CFG
  assert opt.plan.output_is_target  # the tied output layer was found through the model
