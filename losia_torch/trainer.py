"""LoSiA in ``transformers.Trainer``: :class:`LoSiATrainer`.

Two things in ``Trainer`` do not fit LoSiA, so this subclass overrides them
(read against transformers 5.24's ``trainer.py``):

- ``create_optimizer`` builds torch optimizers from unnamed tensors, and LoSiA
  finds its targets by name: here it builds a :class:`LoSiAOptimizer` from the
  model's named parameters (and the model itself, for the output layer and the
  targets' layouts), with ``TrainingArguments``' lr, betas, eps, weight decay.
- ``_clip_grad_norm`` / ``_get_grad_norm`` clip and log by the norm of
  ``model.parameters()``' ``.grad``, which under LoSiA-Pro misses the compact
  block gradients and without Pro counts entries LoSiA never reads: here they use
  the optimizer's rule (:meth:`LoSiAOptimizer.clip_grad_norm_`, the norm of the
  gradient values the step reads), after unscaling fp16 gradients.

So a Trainer run with default arguments (``max_grad_norm=1.0``) follows the
manual loop ``backward; opt.clip_grad_norm_(1.0); opt.step(); sched.step()``
exactly, with or without Pro, logs that norm as ``grad_norm``, and
``resume_from_checkpoint`` resumes bit for bit (``tests/torch/test_torch_trainer.py``).
"""

from __future__ import annotations

from typing import Optional

import transformers

from losia_common import LoSiAConfig
from losia_torch.optimizer import LoSiAOptimizer


class LoSiATrainer(transformers.Trainer):
  """``transformers.Trainer`` training with LoSiA (see the module docstring).

  Args:
    *args, **kwargs: those of ``transformers.Trainer``. ``optimizers=(opt, sched)``
      with a :class:`LoSiAOptimizer` also works (clipping still uses its rule);
      ``optimizer_cls_and_kwargs=(LoSiAOptimizer, {...})`` passes the dict as
      extra keyword arguments (e.g. ``config``) to the optimizer built here.
    losia_config: the :class:`LoSiAConfig` (defaults if None).
    pro: switch the targets to LoSiA-Pro (compact backward).
    output_module: as in :class:`LoSiAOptimizer`.
  """

  def __init__(self, *args, losia_config: Optional[LoSiAConfig] = None, pro: bool = False,
               output_module: str = "lm_head", **kwargs):
    self.losia_config = losia_config
    self.losia_pro = pro
    self.losia_output_module = output_module
    super().__init__(*args, **kwargs)
    cls_kw = self.optimizer_cls_and_kwargs
    if cls_kw is not None and not (isinstance(cls_kw[0], type)
                                   and issubclass(cls_kw[0], LoSiAOptimizer)):
      raise ValueError("LoSiATrainer trains with LoSiAOptimizer; optimizer_cls_and_kwargs names "
                       f"{cls_kw[0]!r}")

  def create_optimizer(self, model=None):
    model = self.model if model is None else model
    if self.optimizer is not None:
      return self.optimizer
    args = self.args
    cls, extra = LoSiAOptimizer, {}
    if self.optimizer_cls_and_kwargs is not None:
      cls, extra = self.optimizer_cls_and_kwargs[0], dict(self.optimizer_cls_and_kwargs[1])
    kw = dict(config=self.losia_config, lr=args.learning_rate,
              betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
              weight_decay=args.weight_decay, output_module=self.losia_output_module)
    kw.update(extra)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if kw["weight_decay"]:
      # Trainer's rule: no decay for biases and norms (for targets LoSiA decays only the block).
      decay = set(self.get_decay_parameter_names(model))
      groups = [{"params": [(n, p) for n, p in named if n in decay]},
                {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
      params = [g for g in groups if g["params"]]
    else:
      params = named  # one group, in the model's order: the manual loop's exact arithmetic
    self.optimizer = cls(params, model=model, **kw)
    if self.losia_pro:
      self.optimizer.enable_pro(model)
    return self.optimizer

  def _losia_optimizer(self) -> Optional[LoSiAOptimizer]:
    opt = self.optimizer
    while opt is not None and not isinstance(opt, LoSiAOptimizer):
      opt = getattr(opt, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps it
    return opt

  def _clip_grad_norm(self, model):
    opt = self._losia_optimizer()
    if opt is None:
      return super()._clip_grad_norm(model)
    self.accelerator.unscale_gradients()  # fp16: GradScaler.unscale_ (Pro's deltas included)
    return opt.clip_grad_norm_(self.args.max_grad_norm)

  def _get_grad_norm(self, model, grad_norm=None):
    opt = self._losia_optimizer()
    if grad_norm is None and opt is not None:  # max_grad_norm == 0: log the same norm
      self.accelerator.unscale_gradients()
      grad_norm = opt.grad_norm()
    return super()._get_grad_norm(model, grad_norm=grad_norm)
