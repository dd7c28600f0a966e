"""From what a user passes to ``LoSiAOptimizer`` to torch param groups and a LoSiA plan.

LoSiA finds its targets by parameter name, so the optimizer is built from a model,
from ``(name, parameter)`` pairs, or from param-group dicts whose ``"params"`` are
such pairs. Here those become torch's param groups (of ``(name, tensor)`` pairs,
which ``torch.optim.Optimizer`` splits into ``params`` and ``param_names``) and the
:class:`LoSiAPlan` (targets, their layouts, the output layer).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from losia_common import LoSiAConfig
from losia_torch.targets import LoSiAPlan, layouts_of, make_plan, named_parameters_of


def check_hparams(lr, betas, eps, weight_decay) -> None:
  """Raises ``ValueError`` naming the first Adam(W) hyper-parameter out of range."""
  def num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

  if isinstance(lr, torch.Tensor):
    lr = float(lr)
  if not num(lr) or lr < 0:
    raise ValueError(f"`lr` must be a finite number >= 0; got {lr!r}")
  if not (isinstance(betas, (tuple, list)) and len(betas) == 2
          and all(num(b) and 0.0 <= b < 1.0 for b in betas)):
    raise ValueError(f"`betas` must be two numbers in [0, 1); got {betas!r}")
  if not num(eps) or eps < 0:
    raise ValueError(f"`eps` must be a finite number >= 0; got {eps!r}")
  if not num(weight_decay) or weight_decay < 0:
    raise ValueError(f"`weight_decay` must be a finite number >= 0; got {weight_decay!r}")


def groups_and_plan(params: Any, config: LoSiAConfig, lr, betas, eps, weight_decay,
                    output_module: str, model: Optional[torch.nn.Module]
                    ) -> tuple[list[dict], LoSiAPlan]:
  """The param groups (``"params"`` as ``(name, tensor)`` pairs) and the plan.

  Args: those of ``LoSiAOptimizer`` (``model``: the model the pairs belong to, for the
  output layer and the layouts; a model passed as ``params`` is its own).
  """
  check_hparams(lr, betas, eps, weight_decay)
  if not isinstance(output_module, str) or not output_module:
    raise ValueError(f"`output_module` must be a non-empty string; got {output_module!r}")
  if isinstance(params, (list, tuple)) and params and isinstance(params[0], dict):
    groups = [dict(g) for g in params]
    named = []
    for g in groups:
      g_named, _ = named_parameters_of(g["params"])
      g["params"] = g_named
      named.extend(g_named)
      check_hparams(g.get("lr", lr), g.get("betas", betas), g.get("eps", eps),
                    g.get("weight_decay", weight_decay))
    output_param = None
  else:
    named, output_param = named_parameters_of(params)
    groups = [{"params": named}]
    if isinstance(params, torch.nn.Module):
      model = params
  layouts = None
  if model is not None:
    _, model_output = named_parameters_of(model)
    output_param = output_param if output_param is not None else model_output
    layouts = layouts_of(model)
  plan = make_plan(named, config, output_param=output_param, output_module=output_module,
                   layouts=layouts)
  return groups, plan
