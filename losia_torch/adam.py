"""Adam (``optax.scale_by_adam``'s formula) on lists of fp32 tensors, in torch.

``m = (1-b1) g + b1 m``; ``v = (1-b2) g² + b2 v``;
``u = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``: eps outside the square root,
after bias correction, and the bias corrections ``1 - b^t`` rounded to fp32,
as the JAX backend computes them.
"""

from __future__ import annotations

import torch

from losia_torch import schedule as _sched

_CHUNK = 1 << 16  # chunk of the large-tensor path on CPU (entries)


def adam_directions(ms: list, vs: list, gs: list, counts: list, b1: float, b2: float,
                    eps: float) -> list:
  """Adam in place on fp32 moments; returns the directions ``u`` (optax.scale_by_adam).

  ``m = (1-b1) g + b1 m``; ``v = (1-b2) g² + b2 v``;
  ``u = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`` with each tensor's own count ``t``.
  """
  if not ms:
    return []
  torch._foreach_mul_(ms, b1)
  torch._foreach_add_(ms, torch._foreach_mul(gs, 1.0 - b1))
  torch._foreach_mul_(vs, b2)
  torch._foreach_add_(vs, torch._foreach_mul(torch._foreach_mul(gs, gs), 1.0 - b2))
  bc1 = [_sched.adam_bias_correction(b1, t) for t in counts]
  bc2 = [_sched.adam_bias_correction(b2, t) for t in counts]
  mhat = torch._foreach_div(ms, bc1)
  denom = torch._foreach_sqrt(torch._foreach_div(vs, bc2))
  torch._foreach_add_(denom, eps)
  return torch._foreach_div(mhat, denom)


def adam_update_large(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                      count: int, b1: float, b2: float, eps: float, lr: float,
                      wd: float) -> None:
  """Full Adam(W) update of one large non-target, in place, same arithmetic as
  :func:`adam_directions` followed by ``u += wd * W; W += (-lr * u).to(W.dtype)``.

  On CPU the tensor is processed in cache-sized chunks (one pass over memory
  instead of one per operation); elsewhere in one piece with two scratch buffers.
  """
  bc1 = _sched.adam_bias_correction(b1, count)
  bc2 = _sched.adam_bias_correction(b2, count)
  n = p.numel()
  chunked = (p.device.type == "cpu" and p.is_contiguous() and g.is_contiguous())
  step = _CHUNK if chunked else n
  flat = lambda x: x.view(-1) if chunked else x
  pf, mf, vf, gf = flat(p), flat(m), flat(v), flat(g)
  size = min(step, n)
  tmp = torch.empty(size if chunked else p.shape, dtype=torch.float32, device=p.device)
  u = torch.empty_like(tmp)
  for lo in range(0, n, step):
    hi = min(lo + step, n)
    if chunked:
      pc, mc, vc, gc = pf[lo:hi], mf[lo:hi], vf[lo:hi], gf[lo:hi]
      t, uc = tmp[:hi - lo], u[:hi - lo]
    else:
      pc, mc, vc, gc, t, uc = pf, mf, vf, gf, tmp, u
    torch.mul(gc, 1.0 - b1, out=t)
    mc.mul_(b1).add_(t)
    torch.mul(gc, gc, out=t).mul_(1.0 - b2)
    vc.mul_(b2).add_(t)
    torch.div(vc, bc2, out=t).sqrt_().add_(eps)
    torch.div(mc, bc1, out=uc).div_(t)
    if wd:
      t.copy_(pc).mul_(wd)  # wd * W in fp32
      uc.add_(t)
    uc.mul_(-lr)
    pc.add_(uc if pc.dtype == torch.float32 else uc.to(pc.dtype))
