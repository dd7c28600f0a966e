"""losia_torch on a CUDA GPU: correctness against the CPU, LoSiA-Pro, and a timing table.

Run it whenever a CUDA device is available (it exits 0, printing
"no CUDA device; skipped", when there is none):

    .venv/bin/python benchmarks/torch_gpu_check.py [--layers 30] [--steps 7] [--batch 4]
        [--seq 256] [--no-timing]

1. CPU vs CUDA: the same tiny ``transformers`` LlamaForCausalLM (built from a
   config, nothing is downloaded) on both devices, the same seeded token batches,
   ``2 * T * total + 1`` steps of LoSiA with clipping (every layer relocalizes at
   least twice), fp32 with TF32 off. Checked twice: replaying the CPU's gradients
   on the GPU (the optimizer alone), and with each device's own forward/backward.
   Asserts identical subnet indices at every step and weights within 1e-4.
2. LoSiA-Pro vs plain LoSiA on CUDA, same model and data: identical indices at
   every step, losses and weights within 1e-4; non-profiling Pro targets never
   hold a full-size weight gradient.
3. Timing on a SmolLM2-135M-shaped LlamaConfig (hidden 576, intermediate 1536,
   30 layers, 9 heads, 3 kv heads, vocab 49152, tied) in bf16: the optimizer
   step of LoSiA vs ``torch.optim.AdamW``, and the backward pass with LoSiA-Pro
   vs plain, each the median of ``--steps`` runs with ``torch.cuda.synchronize()``,
   and the peak of ``torch.cuda.max_memory_allocated()``.

Exits 1 (an AssertionError) if a check fails. ``--device cpu`` runs the same
code with the CPU standing in for the GPU (a self-test of this script; use a
small ``--layers``).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losia_torch  # noqa: E402
from losia_common import LoSiAConfig  # noqa: E402
from torch_optimizer_step import SMOLLM2, fake_grads  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
CHECK_CFG = LoSiAConfig(rank_factor=0.25, period=2, output_rank_factor=0.125)
TOL = 1e-4


def sync(device: str) -> None:
  if device.startswith("cuda"):
    torch.cuda.synchronize()


def tiny_llama(device: str, dtype=torch.float32):
  import transformers
  cfg = transformers.LlamaConfig(**TINY, attn_implementation="eager")
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def batches(n: int, vocab: int, batch=2, seq=16):
  g = torch.Generator().manual_seed(1)
  return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def indices(opt) -> dict:
  return {t.name: tuple(x.cpu().tolist() for x in opt.subnet(t.name)) for t in opt.plan.targets}


def max_weight_diff(m0, m1) -> tuple[float, str]:
  return max(((p0.detach().float().cpu() - p1.detach().float().cpu()).abs().max().item(), n)
             for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()))


def compare_step(k, what, o0, o1, m0, m1):
  i0, i1 = indices(o0), indices(o1)
  for name in i0:
    assert i0[name] == i1[name], (f"{what}: subnet of {name} differs after step {k}:\n"
                                  f"  {i0[name]}\n  {i1[name]}")
  diff, name = max_weight_diff(m0, m1)
  assert diff <= TOL, f"{what}: {name} differs by {diff:.3g} > {TOL} after step {k}"
  return i0, diff


# --- 1. CPU vs accelerator ---------------------------------------------------------------------

def check_cpu_vs_device(device: str, replay: bool) -> None:
  what = f"CPU vs {device} ({'replayed CPU gradients' if replay else 'own forward/backward'})"
  m_cpu = tiny_llama("cpu")
  m_dev = copy.deepcopy(m_cpu).to(device)
  o_cpu = losia_torch.LoSiAOptimizer(m_cpu, CHECK_CFG, lr=1e-2, weight_decay=0.01)
  o_dev = losia_torch.LoSiAOptimizer(m_dev, CHECK_CFG, lr=1e-2, weight_decay=0.01)
  steps = 2 * CHECK_CFG.period * o_cpu.plan.total + 1
  compare_step(-1, what, o_cpu, o_dev, m_cpu, m_dev)  # initial subnets
  history, worst, loss_diff = [], 0.0, 0.0
  for k, ids in enumerate(batches(steps, TINY["vocab_size"])):
    loss = m_cpu(input_ids=ids, labels=ids).loss
    loss.backward()
    if replay:
      for p0, p1 in zip(m_cpu.parameters(), m_dev.parameters()):
        p1.grad = None if p0.grad is None else p0.grad.to(device, copy=True)
    else:
      ids_d = ids.to(device)
      loss_d = m_dev(input_ids=ids_d, labels=ids_d).loss
      loss_d.backward()
      loss_diff = max(loss_diff, abs(loss.item() - loss_d.item()))
    for o in (o_cpu, o_dev):
      o.clip_grad_norm_(1.0)
      o.step()
      o.zero_grad()
    idx, diff = compare_step(k, what, o_cpu, o_dev, m_cpu, m_dev)
    history.append(idx)
    worst = max(worst, diff)
  moves = sum(history[k] != history[k + 1] for k in range(len(history) - 1))
  assert moves >= 2, f"{what}: the subnets never moved"
  relocs = [o_dev.state[t.param]["last_relocalization"] for t in o_dev.plan.targets]
  assert min(relocs) >= CHECK_CFG.period * o_dev.plan.total, "a layer relocalized only once"
  extra = "" if replay else f", max loss diff {loss_diff:.2g}"
  print(f"  PASS {what}: {steps} steps, {len(o_dev.plan.targets)} targets, identical indices "
        f"(changed at {moves} steps), max weight diff {worst:.2g}{extra}")


# --- 2. Pro vs plain --------------------------------------------------------------------------

def _pro_run(device: str, pro: bool, clip: float | None):
  model = tiny_llama(device)
  opt = losia_torch.LoSiAOptimizer(model, CHECK_CFG, lr=1e-2, weight_decay=0.01)
  n_pro = len(opt.enable_pro(model)) if pro else 0
  steps = 2 * CHECK_CFG.period * opt.plan.total + 1
  losses, hist, norms = [], [], []
  for ids in batches(steps, TINY["vocab_size"]):
    ids = ids.to(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if pro:
      for t in opt.plan.targets:
        if not t.row_mode and not opt.profiles(t):
          assert t.param.grad is None, f"Pro target {t.name} got a full-size gradient"
    norms.append(float(opt.clip_grad_norm_(clip if clip is not None else float("inf"))))
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
    hist.append(indices(opt))
  return model, losses, hist, norms, n_pro


def check_pro(device: str) -> None:
  """Pro vs plain with an active clip: the same trajectory (LOSIA_SPEC.md section 8)."""
  m0, l0, h0, g0, _ = _pro_run(device, False, 0.5)
  m1, l1, h1, g1, n_pro = _pro_run(device, True, 0.5)
  for k, (a, b) in enumerate(zip(h0, h1)):
    assert a == b, f"Pro vs plain: subnets differ after step {k}"
  dl = max(abs(a - b) for a, b in zip(l0, l1))
  assert dl <= TOL * max(1.0, max(map(abs, l0))), f"Pro vs plain: losses differ by {dl:.3g}"
  dw, name = max_weight_diff(m0, m1)
  assert dw <= TOL, f"Pro vs plain: {name} differs by {dw:.3g}"
  print(f"  PASS LoSiA-Pro vs plain on {device}: {len(l0)} steps, {n_pro} Pro targets, identical "
        f"indices, max loss diff {dl:.2g}, max weight diff {dw:.2g} "
        f"(loss {l0[0]:.4f} -> {l0[-1]:.4f})")
  # The global norm is taken over the gradient values the step reads, so it is the same
  # with and without Pro and an active clip scales both runs alike.
  assert abs(g0[0] - g1[0]) <= 1e-4 * max(1.0, g0[0]), f"clip norms differ: {g0[0]} vs {g1[0]}"
  print(f"  PASS clip norm at step 0: plain {g0[0]:.4f}, Pro {g1[0]:.4f}")


# --- 3. timing ------------------------------------------------------------------------------------

def peak_reset(device):
  if device.startswith("cuda"):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()
  return 0


def peak_mib(device, base):
  if device.startswith("cuda"):
    return (torch.cuda.max_memory_allocated() - base) / 2**20
  return float("nan")


def fmt_mib(x: float) -> str:
  return "     n/a" if x != x else f"{x:8.1f}"  # nan: no CUDA memory statistics


def state_bytes(opt) -> int:
  if isinstance(opt, losia_torch.LoSiAOptimizer):
    return opt.state_nbytes()
  return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
             if isinstance(v, torch.Tensor))


def time_steps(opt, n, device, classify=lambda: "step"):
  for _ in range(2):  # warm-up (also allocates the state)
    opt.step()
  sync(device)
  out: dict[str, list] = {}
  while sum(map(len, out.values())) < n:
    key = classify()
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    out.setdefault(key, []).append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in out.items()}


def timing(device: str, layers: int, n: int, batch: int, seq: int) -> None:
  import transformers
  cfg = transformers.LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers})
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
  nparams = sum(p.numel() for p in model.parameters())
  print(f"\nSmolLM2-135M-shaped, {layers} layers, {nparams / 1e6:.1f}M params, bf16, {device}; "
        f"median of {n}")
  fake_grads(model)
  rows = []
  for name, make in [
      ("AdamW (torch default)", lambda: torch.optim.AdamW(model.parameters(), lr=1e-5)),
      ("AdamW fused=True", lambda: torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)),
  ]:
    if "fused" in name and not device.startswith("cuda"):
      continue
    base = peak_reset(device)
    opt = make()
    t = time_steps(opt, n, device)["step"]
    rows.append((name, t, None, peak_mib(device, base), state_bytes(opt)))
    del opt
  t_adamw = rows[0][1]
  for policy in ("train", "freeze"):
    base = peak_reset(device)
    lcfg = LoSiAConfig(period=4, non_target=policy)
    opt = losia_torch.LoSiAOptimizer(model, lcfg, lr=1e-5)
    classify = lambda: "reloc" if (opt.losia_step + 1) % lcfg.period == 0 else "step"
    res = time_steps(opt, 4 * n, device, classify)
    reg, rel = res["step"], res.get("reloc", res["step"])
    amort = (reg * 99 + rel) / 100
    rows.append((f"LoSiA non_target={policy}", amort, (reg, rel), peak_mib(device, base),
                 state_bytes(opt)))
    del opt
  print("  optimizer step (after backward)   ms    /AdamW  peak MiB  state MiB  [regular / relocalizing ms]")
  for name, t, split, mem, sb in rows:
    extra = "" if split is None else f"  [{split[0] * 1e3:.2f} / {split[1] * 1e3:.2f}, amortized T=100]"
    print(f"  {name:<31} {t * 1e3:7.2f}  {t / t_adamw:6.3f}  {fmt_mib(mem)}  {sb / 2**20:9.1f}{extra}")
  print("  (AdamW keeps its moments in the parameter dtype, bf16; LoSiA keeps fp32 moments)")

  model.zero_grad(set_to_none=True)
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(0, SMOLLM2["vocab_size"], (batch, seq), generator=g).to(device)
  opt = losia_torch.LoSiAOptimizer(model, LoSiAConfig(), lr=1e-5)  # step 0: layer 0 profiles

  def backward_time():
    times, mem = [], float("nan")
    for i in range(n + 1):
      model.zero_grad(set_to_none=True)
      opt.zero_grad()
      base = peak_reset(device)
      loss = model(input_ids=ids, labels=ids).loss
      sync(device)
      t0 = time.perf_counter()
      loss.backward()
      sync(device)
      if i:
        times.append(time.perf_counter() - t0)
        m = peak_mib(device, base)
        mem = m if mem != mem else max(mem, m)
    return statistics.median(times), mem

  t_plain, m_plain = backward_time()
  opt.enable_pro(model)
  t_pro, m_pro = backward_time()
  opt.disable_pro()
  print(f"  backward, batch {batch} x {seq} tokens    ms    /plain  peak MiB (forward+backward)")
  print(f"  {'plain (full weight gradients)':<31} {t_plain * 1e3:7.2f}  {1.0:6.3f}  {fmt_mib(m_plain)}")
  print(f"  {'LoSiA-Pro (block gradients)':<31} {t_pro * 1e3:7.2f}  {t_pro / t_plain:6.3f}  {fmt_mib(m_pro)}")


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--device", default="cuda",
                  help="the accelerator (default cuda; 'cpu' self-tests this script)")
  ap.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"],
                  help="decoder layers of the timed SmolLM2-shaped model")
  ap.add_argument("--steps", type=int, default=7, help="timed repetitions (median)")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--no-timing", action="store_true", help="run the correctness checks only")
  args = ap.parse_args()
  dev = args.device
  if dev.startswith("cuda"):
    if not torch.cuda.is_available():
      print("no CUDA device; skipped")
      return 0
    name = torch.cuda.get_device_name(torch.device(dev))
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity with the CPU
    torch.backends.cudnn.allow_tf32 = False
  else:
    print(f"self-test on {dev} ({platform.machine()}, torch {torch.__version__}); "
          "pass --device cuda on a GPU machine")
  try:
    import transformers  # noqa: F401
  except ImportError:
    print("transformers is not installed (pip install -e '.[torch]'); skipped")
    return 0
  print("correctness (tiny LLaMA, fp32, LoSiAConfig(rank_factor=0.25, period=2, "
        "output_rank_factor=0.125)):")
  check_cpu_vs_device(dev, replay=True)
  check_cpu_vs_device(dev, replay=False)
  check_pro(dev)
  if not args.no_timing:
    timing(dev, args.layers, args.steps, args.batch, args.seq)
  print("\nall checks passed")
  return 0


if __name__ == "__main__":
  sys.exit(main())
