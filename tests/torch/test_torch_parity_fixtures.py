"""losia_torch replays the shared cross-framework fixtures (shared/parity/), and
both backends reject the same bad inputs with messages naming the same thing.

The fixtures are replayed by tests/jax/test_parity_fixtures.py too, so both
backends are held to one recorded trajectory of the spec-literal oracle:
identical subnet indices at every step (initial ones included) and weights
within rtol 1e-5 / atol 1e-6.
"""

import numpy as np
import pytest
import torch
from torch import nn

import losia_torch
from tests.parity_fixtures import CASES, Fixture, nest


class _Tied(nn.Module):
  """A module tree whose ``named_parameters()`` are exactly the fixture's names.

  Matrices sit in ``nn.Linear`` modules, so that their ``[d_out, d_in]`` layout is known.

  Like a transformers ``LlamaForCausalLM`` with tied embeddings, its output layer
  (``get_output_embeddings()``) holds the embedding matrix.
  """

  def __init__(self, weights: dict):
    super().__init__()

    def build(mod, tree):
      for k, v in tree.items():
        if isinstance(v, dict) and set(v) <= {"weight", "bias"} and np.ndim(v["weight"]) == 2:
          # A matrix owner must say its layout (LOSIA_SPEC.md section 1): nn.Linear's.
          w = torch.tensor(v["weight"])
          child = nn.Linear(w.shape[1], w.shape[0], bias="bias" in v)
          with torch.no_grad():
            child.weight.copy_(w)
            if "bias" in v:
              child.bias.copy_(torch.tensor(v["bias"]))
          mod.add_module(k, child)
        elif isinstance(v, dict):
          child = nn.Module()
          mod.add_module(k, child)
          build(child, v)
        else:
          mod.register_parameter(k, nn.Parameter(torch.tensor(v)))

    build(self, nest(weights))

  def get_output_embeddings(self):
    return self.model.embed_tokens


def _llama(fx):
  transformers = pytest.importorskip("transformers")
  m = fx.meta["model"]
  cfg = transformers.LlamaConfig(
      hidden_size=m["hidden"], intermediate_size=m["intermediate"],
      num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
      num_key_value_heads=m["kv_heads"], head_dim=m["head_dim"], vocab_size=m["vocab"],
      tie_word_embeddings=True)
  model = transformers.LlamaForCausalLM(cfg)
  params = dict(model.named_parameters())
  assert sorted(params) == sorted(fx.names), "fixture names are transformers' LLaMA names"
  assert model.get_output_embeddings().weight is params["model.embed_tokens.weight"]
  with torch.no_grad():
    for n, p in params.items():
      p.copy_(torch.from_numpy(fx.weights(n, 0)))
  return model


def _check_indices(fx, opt, k, what):
  for n in fx.targets:
    rows, cols = opt.subnet(n)
    np.testing.assert_array_equal(rows.numpy(), fx.rows(n, k), err_msg=f"{what} rows {n} ({fx.case})")
    np.testing.assert_array_equal(cols.numpy(), fx.cols(n, k), err_msg=f"{what} cols {n} ({fx.case})")


@pytest.mark.parametrize("model_kind", ["module_tree", "transformers_llama"])
@pytest.mark.parametrize("case", CASES)
def test_torch_replays_parity_fixture(case, model_kind):
  fx = Fixture(case)
  m = fx.meta
  cfg = losia_torch.LoSiAConfig.from_json(fx.config_json)
  if model_kind == "module_tree":
    model = _Tied({n: fx.weights(n, 0) for n in fx.names})
  else:
    model = _llama(fx)
  params = dict(model.named_parameters())
  opt = losia_torch.LoSiAOptimizer(model, cfg, lr=m["lr"], betas=(m["b1"], m["b2"]), eps=m["eps"],
                                   weight_decay=m["weight_decay"])
  assert [t.name for t in opt.plan.targets] == [n for n in params if n in set(fx.targets)]
  assert sorted(t.name for t in opt.plan.targets) == sorted(fx.targets)
  _check_indices(fx, opt, 0, "initial")
  for k in range(fx.steps):
    for n, p in params.items():
      p.grad = torch.from_numpy(fx.grad(n, k))
    opt.step()
    opt.zero_grad()
    _check_indices(fx, opt, k + 1, f"step {k}")
    for n, p in params.items():
      np.testing.assert_allclose(p.detach().numpy(), fx.weights(n, k + 1), rtol=1e-5, atol=1e-6,
                                 err_msg=f"{n} after step {k} ({case}, {model_kind})")
  assert opt.losia_step == fx.steps


# --- bad inputs: both backends refuse them, naming the same field / parameter -----------------

def _tiny(shapes: dict) -> dict:
  rng = np.random.default_rng(0)
  return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


_GOOD = {
    "model.embed_tokens.weight": (32, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 24),
    "model.layers.0.input_layernorm.weight": (16,),
}


def _errors(weights: dict, cfg_kwargs: dict, **hp):
  """``(jax message, torch message)`` of building each backend's optimizer."""
  jax = pytest.importorskip("jax")
  jnp = pytest.importorskip("jax.numpy")
  losia_jax = pytest.importorskip("losia_jax")
  msgs = []
  with pytest.raises(ValueError) as e:
    cfg = losia_jax.LoSiAConfig(**cfg_kwargs)
    tx = losia_jax.losia(1e-3, cfg, **hp)
    tx.init(nest({n: jnp.asarray(w) for n, w in weights.items()}))
  msgs.append(str(e.value))
  with pytest.raises(ValueError) as e:
    cfg = losia_torch.LoSiAConfig(**cfg_kwargs)
    losia_torch.LoSiAOptimizer(
        [(n, nn.Parameter(torch.from_numpy(w))) for n, w in weights.items()], cfg, lr=1e-3, **hp)
  msgs.append(str(e.value))
  del jax
  return msgs


BAD = {
    # (a) a config field out of range
    "rank_factor_out_of_range": (_GOOD, dict(rank_factor=1.5), {}, ["rank_factor"]),
    "period_zero": (_GOOD, dict(period=0), {}, ["period"]),
    "beta_out_of_range": (_GOOD, dict(importance_beta2=1.0), {}, ["importance_beta2"]),
    "unknown_schedule": (_GOOD, dict(schedule="round_robin"), {}, ["schedule", "round_robin"]),
    "weight_decay_negative": (_GOOD, {}, dict(weight_decay=-0.1), ["weight_decay"]),
    # (b) target_modules matching nothing
    "target_modules_match_nothing": (_GOOD, dict(target_modules=("qkv_proj",)), {},
                                     ["target_modules", "qkv_proj", "match no parameter"]),
    # (c) a target that is not 2-D
    "target_not_2d": ({**_GOOD, "model.layers.0.self_attn.q_proj.weight": (16, 16, 1)}, {}, {},
                      ["model.layers.0.self_attn.q_proj.weight", "(16, 16, 1)", "2-D"]),
    # the output layer asked for but not there
    "output_layer_missing": (_GOOD, dict(output_rank_factor=0.25), {},
                             ["output_module='lm_head'", "output_rank_factor=0.25"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_same_error_in_both_backends(case):
  shapes, cfg_kwargs, hp, keys = BAD[case]
  jax_msg, torch_msg = _errors(_tiny(shapes), cfg_kwargs, **hp)
  for key in keys:
    assert key in jax_msg, f"jax message lacks {key!r}: {jax_msg}"
    assert key in torch_msg, f"torch message lacks {key!r}: {torch_msg}"
