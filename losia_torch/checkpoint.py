"""Where the LoSiA optimizer state lives: checkpoints, and following the parameters' device.

Kept apart from the step so that ``optimizer.py`` holds only the method. Uses the
optimizer's documented interface (``importance``, ``pro_blocks``, ``slot_key``,
``sync_pro_blocks``; see :class:`losia_torch.LoSiAOptimizer`).

- ``state_dict`` / ``load_state_dict``: torch's format plus a ``"losia"`` entry,
  keeping saved dtypes (int64 indices, fp32 moments; torch's default would cast
  them to the parameter's dtype, and bf16 holds integers exactly only up to 256).
  LoSiA-Pro's delta leaves (which sit in ``param_groups``, see ``pro.py``) are
  left out, so a checkpoint is the same with and without Pro.
- ``follow_parameters``: state tensors move to their parameter's device when
  the model moved after the optimizer was built (``model.to("cuda")``,
  ``model.double()``: the Trainer and accelerate build the optimizer first);
  LoSiA-Pro's delta leaves take the weight's dtype and device in place.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from losia_torch import pro as _pro
from losia_torch.importance import ImportanceSlot

TARGET_KEYS = ("rows", "cols", "exp_avg", "exp_avg_sq", "step", "last_relocalization")


def clone_state_value(v: Any, device: torch.device) -> Any:
  """Deep copy onto ``device`` keeping dtypes (indices stay int64, moments fp32)."""
  if isinstance(v, torch.Tensor):
    return v.detach().to(device=device, copy=True)
  if isinstance(v, dict):
    return {k: clone_state_value(x, device) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return type(v)(clone_state_value(x, device) for x in v)
  return v


def groups_without_deltas(opt) -> list[dict]:
  """``opt.param_groups`` with LoSiA-Pro's delta leaves (and their names) left out."""
  deltas = {id(b.delta) for b in opt.pro_blocks.values()}
  out = []
  for g in opt.param_groups:
    keep = [i for i, p in enumerate(g["params"]) if id(p) not in deltas]
    ng = dict(g, params=[g["params"][i] for i in keep])
    if "param_names" in g:
      ng["param_names"] = [g["param_names"][i] for i in keep]
    out.append(ng)
  return out


def state_dict(opt, base_state_dict) -> dict[str, Any]:
  groups = opt.param_groups
  opt.param_groups = groups_without_deltas(opt)
  try:
    sd = base_state_dict()
  finally:
    opt.param_groups = groups
  sd["losia"] = {
      "step": opt.losia_step,
      "num_skipped_steps": opt.num_skipped_steps,
      "importance": {k: slot.state_dict() for k, slot in opt.importance.items()},
      "config": opt.config.to_dict(),
      "targets": [t.name for t in opt.plan.targets],
  }
  return sd


def check_compatible(opt, saved_cfg: dict, saved_targets) -> None:
  """Raises ``ValueError`` naming the fields if the saved config or targets differ."""
  diff = sorted(k for k, v in opt.config.to_dict().items() if saved_cfg.get(k) != v)
  if diff:
    raise ValueError("the saved LoSiA state was made with a different config; fields "
                     + ", ".join(f"{k} (saved {saved_cfg.get(k)!r}, now "
                                 f"{getattr(opt.config, k)!r})" for k in diff))
  names = [t.name for t in opt.plan.targets]
  if list(saved_targets) != names:
    raise ValueError("the saved LoSiA state has different targets: saved "
                     f"{saved_targets}, now {names}")


def load_state_dict(opt, state_dict: dict[str, Any], base_load_state_dict) -> None:
  sd = dict(state_dict)
  extra = sd.pop("losia", None)
  if not isinstance(extra, dict):
    raise ValueError("not a LoSiAOptimizer state dict: it has no 'losia' entry")
  check_compatible(opt, extra.get("config", {}), extra.get("targets", []))
  saved_state = sd.get("state", {})
  sd["state"] = {}
  opt.param_groups = groups_without_deltas(opt)
  try:
    base_load_state_dict(sd)  # hyper-parameters; torch rebuilds the group dicts
  finally:
    for t in opt.plan.targets:  # the deltas go back into the (new) groups
      block = opt.pro_blocks.get(id(t.param))
      if block is not None:
        _pro.add_delta(opt.param_groups, t.param, block.delta, t.name)
  params = [p for g in groups_without_deltas(opt) for p in g["params"]]
  saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
  id_map = dict(zip(saved_ids, params))
  state: defaultdict = defaultdict(dict)
  for k, v in saved_state.items():
    if k in id_map:
      state[id_map[k]] = clone_state_value(v, id_map[k].device)
  for t in opt.plan.targets:
    st = state[t.param]
    missing = [k for k in TARGET_KEYS if k not in st]
    if missing:
      raise ValueError(f"the saved state of target {t.name} lacks {missing}")
    if tuple(st["exp_avg"].shape) != t.block_shape or st["rows"].numel() != t.k_out:
      raise ValueError(f"the saved state of target {t.name} has block shape "
                       f"{tuple(st['exp_avg'].shape)}; expected {t.block_shape}")
    st["step"] = int(st["step"])
    st["last_relocalization"] = int(st["last_relocalization"])
  opt.state = state
  opt.losia_step = int(extra["step"])
  opt.num_skipped_steps = int(extra.get("num_skipped_steps", 0))
  dev = params[0].device if params else torch.device("cpu")
  opt.importance = {
      k: ImportanceSlot(clone_state_value(v["ibar"], dev), clone_state_value(v["ubar"], dev))
      for k, v in extra.get("importance", {}).items()}
  opt.sync_pro_blocks()


def follow_parameters(opt) -> None:
  """Moves every state tensor to its parameter's device (dtypes stay: int64, fp32).

  Cheap when nothing moved (one device comparison per parameter). LoSiA-Pro's
  delta leaves take the weight's dtype and device (they hold no state, only the
  gradient of the current step; a Pro layer does the same in its forward).
  """
  for p, st in opt.state.items():
    for k, v in st.items():
      if isinstance(v, torch.Tensor) and v.device != p.device:
        st[k] = v.to(p.device)
  for t in opt.plan.targets:
    slot = opt.importance.get(opt.slot_key(t))
    if slot is not None and slot.ibar.device != t.param.device:
      slot.ibar, slot.ubar = slot.ibar.to(t.param.device), slot.ubar.to(t.param.device)
    block = opt.pro_blocks.get(id(t.param))
    if block is not None and (block.delta.device != t.param.device
                              or block.delta.dtype != t.param.dtype):
      block.follow(t.param)
  opt.sync_pro_blocks()
