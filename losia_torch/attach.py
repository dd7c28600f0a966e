"""One-call, PEFT-style setup of LoSiA for a (transformers) model."""

from __future__ import annotations

import gc
import logging
from typing import Optional

import torch

from losia_common import LoSiAConfig
from losia_torch.optimizer import LoSiAOptimizer

logger = logging.getLogger("losia_torch")


def get_losia_optimizer(model: torch.nn.Module, config: Optional[LoSiAConfig] = None, *,
                        lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                        eps: float = 1e-8, weight_decay: float = 0.0, pro: bool = False,
                        output_module: str = "lm_head", verbose: bool = True,
                        freeze_non_targets: Optional[bool] = None) -> LoSiAOptimizer:
  """Builds a :class:`LoSiAOptimizer` for ``model`` and reports what it selected.

  Finds the targets by the config's ``target_modules`` (by default the q, k, v, o,
  gate, up and down projections, the naming of LLaMA, Qwen2 and Mistral in
  transformers); the output layer is ``model.get_output_embeddings()`` (for
  tied embeddings the shared embedding matrix) when ``output_rank_factor > 0``.

  Args:
    model: an ``nn.Module``, e.g. a ``transformers`` ``*ForCausalLM``.
    config: the LoSiA configuration (defaults if None).
    lr, betas, eps, weight_decay: Adam(W) hyper-parameters.
    pro: switch the targets' linear layers to LoSiA-Pro (compact backward).
    output_module: output-layer module name when the model has no
      ``get_output_embeddings()``.
    verbose: print the report (it is also logged at INFO level and kept in
      ``optimizer.report``).
    freeze_non_targets: set ``requires_grad=False`` on every non-target parameter, so
      that autograd does not compute gradients the optimizer would discard (with tied
      embeddings, the output layer's full weight gradient: 2 x tokens x vocab x hidden
      FLOPs per step), as PEFT freezes its base model. Default (None): True exactly
      when ``config.non_target == "freeze"``; True with ``non_target="train"`` is an
      error (those parameters need their gradients).

  Under ``DistributedDataParallel`` with ``non_target="freeze"``, call this on the
  model before wrapping it (DDP must see the frozen parameters when it is built);
  given a DDP wrapper, freezing is refused with a message saying so.

  Returns:
    The optimizer; ``optimizer.plan`` lists the targets, ``optimizer.report``
    holds the text report (target count, trainable block parameters).
  """
  if not isinstance(model, torch.nn.Module):
    raise TypeError(f"get_losia_optimizer needs an nn.Module; got {type(model).__name__}")
  opt = LoSiAOptimizer(model, config, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                       output_module=output_module)
  non_target = opt.config.non_target
  if freeze_non_targets is None:
    freeze_non_targets = non_target == "freeze"
  elif not isinstance(freeze_non_targets, bool):
    raise TypeError(f"freeze_non_targets must be True, False or None; got {freeze_non_targets!r}")
  if freeze_non_targets and non_target != "freeze":
    raise ValueError('freeze_non_targets=True needs config.non_target="freeze"; got '
                     f"non_target={non_target!r} (the non-targets are trained)")
  if freeze_non_targets and (isinstance(model, torch.nn.parallel.DistributedDataParallel)
                             or _ddp_wrapper_of(model) is not None) \
      and any(p.requires_grad for _, p in opt.plan.non_targets):
    # DDP fixed the set of parameters it reduces when it was built; freezing some now
    # makes its reducer wait for gradients that never come ("Expected to have finished
    # reduction in the prior iteration" at the second step).
    raise ValueError(
        'non_target="freeze" sets requires_grad=False on the non-targets, which '
        "DistributedDataParallel must see when it is built, and this model is already "
        "wrapped: call get_losia_optimizer on the model first, then wrap the model in "
        "DistributedDataParallel (or pass freeze_non_targets=False)")
  report = opt.summary()
  if freeze_non_targets:
    frozen = [p for _, p in opt.plan.non_targets if p.requires_grad]
    for p in frozen:
      p.requires_grad_(False)
    report += (f"\n  requires_grad=False on {len(frozen)} non-target tensors "
               "(no gradients computed for them)")
  if pro:
    names = opt.enable_pro(model)
    report += f"\n  LoSiA-Pro: {len(names)} of {len(opt.plan.targets)} targets use the compact backward"
  opt.report = report
  logger.info("%s", report)
  if verbose:
    print(report)
  return opt


def _ddp_wrapper_of(model: torch.nn.Module):
  """The ``DistributedDataParallel`` that already wraps ``model`` (``ddp.module``), if any.

  A module does not know its parent, so this looks for a DDP instance among the
  referrers of ``model`` (the wrapper's ``_modules`` dict, its instance dict);
  only under an initialized process group, where DDP can exist (~0.1 s).
  """
  dist = torch.distributed
  if not (dist.is_available() and dist.is_initialized()):
    return None
  seen, frontier = set(), [model]
  for _ in range(3):  # model <- _modules dict <- instance dict <- the wrapper
    nxt = []
    for obj in frontier:
      for ref in gc.get_referrers(obj):
        if id(ref) in seen or ref is frontier:
          continue
        seen.add(id(ref))
        if isinstance(ref, torch.nn.parallel.DistributedDataParallel) and ref.module is model:
          return ref
        if isinstance(ref, dict):
          nxt.append(ref)
    frontier = nxt
  return None
