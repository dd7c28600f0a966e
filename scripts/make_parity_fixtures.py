"""Writes the cross-framework parity fixtures under ``shared/parity/``.

A tiny LLaMA-shaped weight set in PyTorch naming and layout (``[d_out, d_in]``,
tied embedding/output), seeded per-step gradients, and what the spec-literal
NumPy oracle (``tests/common/oracle.py``) says LoSiA does with them: the subnet
indices of every target and every weight after every step, through at least
two relocalizations of every layer. ``tests/jax/test_parity_fixtures.py`` and
``tests/torch/test_torch_parity_fixtures.py`` replay the same gradients through
each backend and compare. Format: ``shared/parity/README.md``.

    .venv/bin/python scripts/make_parity_fixtures.py [--out shared/parity] [--check]

``--check`` regenerates into memory and exits 1 if a stored file differs.
The files are byte-for-byte deterministic (fixed zip timestamps), so a rerun
that changes nothing leaves ``git status`` clean.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from losia_common import LoSiAConfig  # noqa: E402
from tests.common.oracle import OracleLoSiA  # noqa: E402

FORMAT_VERSION = 1

# transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=3,
#   num_attention_heads=4, num_key_value_heads=2, head_dim=4, vocab_size=32,
#   tie_word_embeddings=True) has exactly these parameters.
MODEL = dict(hidden=16, intermediate=24, layers=3, heads=4, kv_heads=2, head_dim=4, vocab=32)

ADAM = dict(b1=0.9, b2=0.999, eps=1e-8)

# name -> (config kwargs, lr, weight decay). Steps: 2*T*total + T + 1, so every
# layer relocalizes at least twice and the last relocalization is followed by
# steps on its rewarm ramp.
# Weights and lr are LLaMA-fine-tuning-sized (std 0.02, lr 2e-3): the float64 oracle and
# the fp32 backends then stay within ~1e-7 of each other, while one step moves a trained
# entry by ~lr, four orders of magnitude above the tests' tolerance.
CASES = {
    "async_default": (dict(rank_factor=0.25, period=2), 2e-3, 0.01),
    "sync_output": (dict(rank_factor=0.25, period=2, schedule="sync", output_rank_factor=0.25),
                    2e-3, 0.01),
}

WEIGHT_SEED = 20250704
GRAD_SEED = 7


def weight_shapes(m=MODEL) -> dict[str, tuple[int, ...]]:
  """Parameter names and shapes of the tiny LLaMA, in ``named_parameters()`` order."""
  h, i, q, kv = m["hidden"], m["intermediate"], m["heads"] * m["head_dim"], \
      m["kv_heads"] * m["head_dim"]
  out = {"model.embed_tokens.weight": (m["vocab"], h)}
  for l in range(m["layers"]):
    p = f"model.layers.{l}."
    out.update({
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "mlp.gate_proj.weight": (i, h),
        p + "mlp.up_proj.weight": (i, h),
        p + "mlp.down_proj.weight": (h, i),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    })
  out["model.norm.weight"] = (h,)
  return out


def initial_weights() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(WEIGHT_SEED)
  out = {}
  for name, shape in weight_shapes().items():
    if name.endswith("norm.weight"):
      out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
  return out


def gradients(steps: int) -> dict[str, np.ndarray]:
  """``{name: [steps, *shape]}``; values are exactly representable in float16."""
  rng = np.random.default_rng(GRAD_SEED)
  out = {n: np.empty((steps,) + s, np.float16) for n, s in weight_shapes().items()}
  for k in range(steps):
    for n, s in weight_shapes().items():
      out[n][k] = rng.standard_normal(s).astype(np.float16)
  return out


def _split_targets(weights: dict, cfg: LoSiAConfig):
  """The oracle's ``targets`` (name -> (layer or None, role, W)) and ``non_targets``."""
  from losia_common import names as _names
  targets, non_targets = {}, {}
  for n, w in weights.items():
    parsed = _names.parse_name(tuple(n.split(".")))
    if cfg.output_rank_factor > 0 and n == "model.embed_tokens.weight":
      targets[n] = (None, "output", w)  # tied embedding/lm_head: the output layer
    elif _names.is_target_leaf(parsed, cfg.target_modules):
      targets[n] = (parsed.layer_index, parsed.role, w)
    else:
      non_targets[n] = w
  return targets, non_targets


def build_case(name: str) -> dict[str, np.ndarray]:
  """All arrays of one fixture file (see shared/parity/README.md)."""
  kw, lr, wd = CASES[name]
  cfg = LoSiAConfig(**kw)
  w0 = initial_weights()
  targets, non_targets = _split_targets(w0, cfg)
  # Both backends round Adam's bias corrections 1 - b**t to fp32 (optax computes them in
  # fp32; losia_torch copies that). With b2 = 0.999 that rounding alone moves an update by
  # ~1e-5 relative, so the oracle gets the betas as np.float32: its bias corrections are
  # then computed exactly as losia_torch.schedule.adam_bias_correction does.
  oracle = OracleLoSiA(cfg, targets, non_targets, lr, weight_decay=wd,
                       b1=np.float32(ADAM["b1"]), b2=np.float32(ADAM["b2"]), eps=ADAM["eps"])
  steps = 2 * cfg.period * oracle.total + cfg.period + 1
  grads = gradients(steps)
  names = list(w0)
  weights = {n: np.empty((steps + 1,) + w0[n].shape, np.float32) for n in names}
  rows = {n: np.empty((steps + 1, len(oracle.targets[n].rows)), np.int64) for n in targets}
  cols = {n: np.empty((steps + 1, len(oracle.targets[n].cols)), np.int64) for n in targets}

  def record(k):
    for n in names:
      weights[n][k] = oracle.targets[n].w if n in targets else oracle.non_targets[n]
    for n in targets:
      rows[n][k] = oracle.targets[n].rows
      cols[n][k] = oracle.targets[n].cols

  record(0)
  for k in range(steps):
    g = {n: grads[n][k].astype(np.float32) for n in names}
    ok = oracle.step({n: g[n] for n in targets}, {n: g[n] for n in non_targets})
    assert ok, "fixture gradients are finite"
    record(k + 1)
  relocs = np.array([[s, names.index(n)] for s, e, n in oracle.log if e == "relocalize"],
                    np.int64).reshape(-1, 2)
  per_target = {n: int((relocs[:, 1] == names.index(n)).sum()) for n in targets}
  assert min(per_target.values()) >= 2, per_target
  meta = dict(format_version=FORMAT_VERSION, case=name, config=json.loads(cfg.to_json()),
              lr=lr, weight_decay=wd, **ADAM, steps=steps, model=MODEL,
              total=oracle.total, names=names, targets=list(targets),
              non_targets=list(non_targets),
              tied_output="model.embed_tokens.weight", weight_seed=WEIGHT_SEED,
              grad_seed=GRAD_SEED)
  arrays = {
      "meta_json": np.frombuffer(json.dumps(meta, indent=1).encode("utf-8"), np.uint8),
      "config_json": np.frombuffer(cfg.to_json().encode("utf-8"), np.uint8),
      "relocalizations": relocs,
  }
  for n in names:
    arrays[f"weights/{n}"] = weights[n]
    arrays[f"grads/{n}"] = grads[n]
  for n in targets:
    arrays[f"rows/{n}"] = rows[n]
    arrays[f"cols/{n}"] = cols[n]
  return arrays


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  """An ``np.load``-able .npz with fixed member timestamps (byte-for-byte reproducible)."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for key in sorted(arrays):
      info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      body = io.BytesIO()
      np.lib.format.write_array(body, np.ascontiguousarray(arrays[key]), allow_pickle=False)
      zf.writestr(info, body.getvalue(), compresslevel=9)
  return buf.getvalue()


def load(path) -> tuple[dict, dict[str, np.ndarray]]:
  """``(meta, arrays)`` of a fixture file."""
  with np.load(path, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  meta = json.loads(arrays["meta_json"].tobytes().decode("utf-8"))
  return meta, arrays


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=os.path.join(ROOT, "shared", "parity"))
  ap.add_argument("--check", action="store_true",
                  help="compare with the stored files instead of writing them")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  stale = []
  for case in CASES:
    data = npz_bytes(build_case(case))
    path = os.path.join(args.out, f"{case}.npz")
    if args.check:
      with open(path, "rb") as f:
        same = f.read() == data
      print(f"{path}: {'up to date' if same else 'STALE'}")
      if not same:
        stale.append(path)
    else:
      tmp = f"{path}.tmp-{os.getpid()}"
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
      print(f"wrote {path} ({len(data) / 1024:.0f} KiB)")
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
