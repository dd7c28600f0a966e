"""LoSiA-Pro in JAX: compact gradients, exact input gradients, same trajectory as LoSiA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import losia_jax
from losia_jax.schedule import slot_owner
from losia_jax import pro

H, I, V, L = 16, 24, 32, 3


def toy_params(seed=0):
  rng = np.random.default_rng(seed)
  w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
  layer = lambda: {"self_attn": {"q_proj": {"kernel": w(H, H), "bias": w(H)}},
                   "mlp": {"up_proj": {"kernel": w(H, I)}, "down_proj": {"kernel": w(I, H)}}}
  return {"model": {"embed_tokens": {"embedding": w(V, H)}, "layers": [layer() for _ in range(L)],
                    "norm": {"scale": jnp.ones((H,))}}}


def toy_loss(params, linear, ids):
  """A small residual network whose projections go through the ``linear`` hook."""
  m = params["model"]
  h = m["embed_tokens"]["embedding"][ids]
  for i, lp in enumerate(m["layers"]):
    a = lp["self_attn"]["q_proj"]
    h = h + jnp.tanh(linear(f"layer{i}.self_attn.q_proj", h, a["kernel"], a["bias"]))
    u = jnp.tanh(linear(f"layer{i}.mlp.up_proj", h, lp["mlp"]["up_proj"]["kernel"], None))
    h = h + linear(f"layer{i}.mlp.down_proj", u, lp["mlp"]["down_proj"]["kernel"], None)
  h = h * m["norm"]["scale"]
  logits = h[:, :-1] @ m["embed_tokens"]["embedding"].T
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))


def _run(use_pro, steps, non_target="freeze", fused=True, importance="param_mix", clip_norm=None):
  cfg = losia_jax.LoSiAConfig(rank_factor=0.5, period=2, output_rank_factor=0.25,
                              non_target=non_target, importance=importance)
  tx = losia_jax.losia(3e-2, cfg, output_module="embed_tokens", weight_decay=0.01,
                       clip_norm=clip_norm)
  params = toy_params()
  state = tx.init(params)
  rng = np.random.default_rng(1)
  if use_pro:
    vg = pro.value_and_grad(toy_loss, tx)
    grad_fn = lambda p, s, ids: vg(p, s, ids)
  else:
    grad_fn = lambda p, s, ids: jax.value_and_grad(
        lambda q: toy_loss(q, pro.default_linear, ids))(p)

  @jax.jit
  def step(params, state, ids):
    loss, g = grad_fn(params, state, ids)
    if fused:
      params, state = tx.apply_gradients(g, state, params)
    else:
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state, loss

  losses, idx = [], []
  for _ in range(steps):
    ids = jnp.asarray(rng.integers(0, V, (4, 10)))
    params, state, loss = step(params, state, ids)
    losses.append(float(loss))
    idx.append({r: (np.asarray(t.rows), np.asarray(t.cols)) for r, t in state.targets.items()})
  return params, state, np.array(losses), idx


@pytest.mark.parametrize("non_target,fused,importance,clip", [
    ("freeze", True, "param_mix", None), ("train", True, "param_second", None),
    ("train", False, "param_first", None),
    ("train", True, "param_mix", 0.05), ("freeze", False, "param_mix", 0.05)])
def test_same_trajectory_as_losia_through_two_rounds(non_target, fused, importance, clip):
  """Pro == plain, also with an active clip_norm (both clip by the norm of the values
  the step reads, which is the same set for dense and for compact gradients)."""
  total = L + 1  # three layers and the output layer
  steps = 2 * total * 2 + 3  # two full rounds of relocalizations (period 2), and then some
  pa, sa, la, ia = _run(False, steps, non_target, fused, importance, clip)
  pb, sb, lb, ib = _run(True, steps, non_target, fused, importance, clip)
  if clip is not None:  # the clip is active: the unclipped run goes elsewhere
    _, _, lc, _ = _run(False, steps, non_target, fused, importance)
    assert np.abs(lc - la).max() > 1e-3
  # every matrix relocalized twice
  assert all(int(x) >= total * 2 for t in sb.targets.values() for x in t.last_relocalization)
  assert int(sb.count) == steps
  for a, b in zip(ia, ib):
    for role in a:
      np.testing.assert_array_equal(a[role][0], b[role][0])
      np.testing.assert_array_equal(a[role][1], b[role][1])
  np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=2e-6)
  # the subnets did move: the selected rows differ from the seeded initial ones
  assert any((ia[0][r][0] != ia[-1][r][0]).any() for r in ia[0])


def test_pro_linear_gradients_are_the_block_of_the_full_gradient():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 12)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(12, 10)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(10,)), jnp.float32)
  rows, cols = jnp.array([1, 4, 7], jnp.int32), jnp.array([0, 2, 3, 9], jnp.int32)
  block = k[cols][:, rows]
  ct = jnp.asarray(rng.normal(size=(3, 5, 10)), jnp.float32)
  f_pro = lambda x, b, bias: jnp.sum(pro.pro_linear(x, k, bias, b, rows, cols) * ct)
  f_ref = lambda x, k, bias: jnp.sum((x @ k + bias) * ct)
  y_pro = pro.pro_linear(x, k, bias, block, rows, cols)
  np.testing.assert_array_equal(np.asarray(y_pro), np.asarray(x @ k + bias))
  gx, gb, gbias = jax.grad(f_pro, argnums=(0, 1, 2))(x, block, bias)
  rx, rk, rbias = jax.grad(f_ref, argnums=(0, 1, 2))(x, k, bias)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gb, rk[cols][:, rows], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gbias, rbias, rtol=1e-5, atol=1e-5)
  assert gb.shape == (4, 3)


def test_residuals_hold_only_the_block_columns():
  """The saved activations of a Pro projection are x[..., cols], not x."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(32, 32)), jnp.float32)
  rows, cols = jnp.arange(0, 32, 8, dtype=jnp.int32), jnp.arange(0, 32, 8, dtype=jnp.int32)
  block = k[cols][:, rows]
  _, res = jax.vjp(lambda x, b: pro.pro_linear(x, k, None, b, rows, cols), x, block)
  saved = [a.shape for a in jax.tree_util.tree_leaves(res) if hasattr(a, "shape")]
  assert (2, 7, 4) in saved  # x restricted to the 4 columns
  assert (2, 7, 32) not in saved, saved  # no full-width x


def test_gradients_are_compact_and_profile_the_owner_layer():
  cfg = losia_jax.LoSiAConfig(rank_factor=0.5, period=2, output_rank_factor=0.25,
                              non_target="freeze")
  tx = losia_jax.losia(1e-2, cfg, output_module="embed_tokens")
  params = toy_params()
  state = tx.init(params)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 6)))
  _, g = pro.value_and_grad(toy_loss, tx)(params, state, ids)
  assert g.blocks["mlp.up_proj"].shape == (L, H // 2, I // 2)
  assert set(g.dense) == {"model.embed_tokens.embedding"}  # the row-mode output layer
  full = jax.grad(lambda p: toy_loss(p, pro.default_linear, ids))(params)
  # step 0 is the output layer's slot (layer id 0): no decoder matrix profiles
  assert all(float(jnp.abs(v).max()) == 0 for v in g.profile.values())
  state = state._replace(count=jnp.asarray(2 * 2, jnp.int32))  # slot of layer id 2 = layers[1]
  _, g = pro.value_and_grad(toy_loss, tx)(params, state, ids)
  np.testing.assert_allclose(g.profile["mlp.down_proj"],
                             full["model"]["layers"][1]["mlp"]["down_proj"]["kernel"],
                             rtol=1e-5, atol=1e-6)


def test_bad_use_is_refused_clearly():
  params = toy_params()
  ids = jnp.zeros((1, 4), jnp.int32)
  sync = losia_jax.losia(1e-2, losia_jax.LoSiAConfig(rank_factor=0.5, schedule="sync"))
  with pytest.raises(ValueError, match="schedule='async'"):
    pro.value_and_grad(toy_loss, sync)(params, sync.init(params), ids)
  tx = losia_jax.losia(1e-2, losia_jax.LoSiAConfig(rank_factor=0.5))
  skip_hook = lambda p, linear, ids: toy_loss(p, pro.default_linear, ids)
  with pytest.raises(ValueError, match="never called for .*layer0"):
    pro.value_and_grad(skip_hook, tx)(params, tx.init(params), ids)
  with pytest.raises(TypeError, match="LoSiA transformation"):
    pro.value_and_grad(toy_loss, optax.adam(1e-3))
  with pytest.raises(ValueError, match="ProGradients.blocks"):
    bad = losia_jax.ProGradients({}, {}, {})
    tx.apply_gradients(bad, tx.init(params), params)


def _bf16_llama(layers=2):
  """A tiny LLaMA computing in bf16 on fp32 params (the usual mixed-precision setup)."""
  from flax import nnx
  from losia_jax.models import LlamaForCausalLM, ModelConfig, functional, masked_nll
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    tie_word_embeddings=True)
  model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params, apply, _ = functional(model)
  return params, lambda p, linear, ids: masked_nll(apply(p, ids, linear=linear), ids)


def test_pro_follows_the_models_compute_dtype():
  """bf16 compute on fp32 params: Pro's forward is the plain forward bit for bit (its
  projections cast the kernel to the activation dtype, as the model's own hook does), and
  its block and profiling gradients are the plain ones within bf16 rounding."""
  from losia_jax.models import default_linear
  assert pro.default_linear is default_linear  # one hook definition (losia_jax.linear)
  params, loss_fn = _bf16_llama()
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  tx = losia_jax.losia(1e-2, losia_jax.LoSiAConfig(rank_factor=0.5, period=2))
  plan = tx.plan(params)
  # a decoder layer's profiling slot, so the profile gradients are compared too
  state = tx.init(params)._replace(count=jnp.asarray(2 * 2, jnp.int32))
  owner = int(slot_owner(state.count, 2, plan.total))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)))

  plain_loss, plain = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, default_linear, ids)))(
      params)
  pro_loss, g = jax.jit(pro.value_and_grad(loss_fn, tx))(params, state, ids)
  assert pro_loss.dtype == plain_loss.dtype
  assert float(pro_loss) == float(plain_loss), (float(pro_loss), float(plain_loss))

  full = jax.tree_util.tree_leaves(plain)
  # bf16 tolerance: two bf16 ulps (2^-7) at the scale of the matrix's largest entry
  # (measured: blocks 3.7e-3, profiles <= 3.4e-3; Pro in fp32 projections: 1.1e-2)
  bf16_tol = lambda want: dict(rtol=0, atol=2 ** -7 * float(np.abs(want).max()))
  profiled = 0
  for b in plan.buckets:
    if b.first.row_mode:
      continue
    ts = state.targets[b.role]
    for t, o in zip(b.members, b.offsets):
      rows, cols = np.asarray(ts.rows[o]), np.asarray(ts.cols[o])
      want = np.asarray(full[t.leaf_index])
      assert g.blocks[b.role].dtype == jnp.float32  # the params' dtype, as the plain gradient
      np.testing.assert_allclose(np.asarray(g.blocks[b.role][o]), want[cols][:, rows],
                                 err_msg=t.key, **bf16_tol(want))
      if t.layer_ids[0] == owner:
        np.testing.assert_allclose(np.asarray(g.profile[b.role]), want, err_msg=t.key,
                                   **bf16_tol(want))
        profiled += 1
  assert profiled == 7  # every projection of the profiling layer


def test_roles_that_read_one_input_share_its_profiling_chain():
  """The profiling layer's input reaches the backward through one select per layer
  and input: q, k and v read the same activation, and so do gate and up, so a LLaMA
  layer carries four activation-sized selects instead of seven (each is a pass over
  an activation at run time). Counted in the jaxpr on a model whose projection
  widths differ from the residual width (16 against 12), so that the selects of the
  residual width are the q/k/v and gate/up links plus the o and down probes
  (27 with a chain per role)."""
  from flax import nnx
  from losia_jax.models import LlamaForCausalLM, ModelConfig, functional, masked_nll
  layers, b, t = 3, 2, 5
  cfg = ModelConfig(vocab_size=32, hidden_size=12, intermediate_size=20,
                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=8, tie_word_embeddings=True)
  params, apply, _ = functional(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
  loss_fn = lambda p, linear, ids: masked_nll(apply(p, ids, linear=linear), ids)
  tx = losia_jax.losia(1e-2, losia_jax.LoSiAConfig(rank_factor=0.5, period=2))
  ids = jnp.zeros((b, t), jnp.int32)
  jaxpr = jax.make_jaxpr(pro.value_and_grad(loss_fn, tx))(params, tx.init(params), ids)

  def selects(jaxpr, shape):  # select_n of that shape, inside jnp.where's pjit too
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "select_n" and eqn.outvars[0].aval.shape == shape
      for p in eqn.params.values():
        sub = getattr(p, "jaxpr", p)
        if hasattr(sub, "eqns"):
          n += selects(sub, shape)
    return n
  # per layer: the q/k/v and the gate/up link, and the o and down probes in the
  # forward and their transposes in the backward (one chain per role: 9)
  assert selects(jaxpr.jaxpr, (b, t, 12)) == 6 * layers


@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_a_non_finite_profiling_gradient_skips_the_step(clip_norm):
  """Pro's profiling gradients are read without a switch over layers: a NaN in the
  profiling layer's matrix skips the step (params, indices and importance as they
  were, ``notfinite_count`` + 1), as a NaN in a block does; the same NaN where no
  matrix of that role profiles (the output layer's slot) is not read, and the step runs."""
  cfg = losia_jax.LoSiAConfig(rank_factor=0.5, period=2, output_rank_factor=0.25,
                              non_target="freeze")
  tx = losia_jax.losia(1e-2, cfg, output_module="embed_tokens", clip_norm=clip_norm)
  params = toy_params()
  ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 6)))
  vg = pro.value_and_grad(toy_loss, tx)

  def step_with(count, poison):
    state = tx.init(params)._replace(count=jnp.asarray(count, jnp.int32))
    _, g = vg(params, state, ids)
    g = poison(g)
    new, s = jax.jit(tx.apply_gradients)(g, state, params)
    moved = any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new),
                                                       jax.tree.leaves(params)))
    return moved, int(s.notfinite_count), int(s.count) - count

  nan_profile = lambda g: g._replace(profile={**g.profile, "mlp.down_proj":
                                              g.profile["mlp.down_proj"].at[0, 0].set(jnp.nan)})
  nan_block = lambda g: g._replace(blocks={**g.blocks, "mlp.up_proj":
                                           g.blocks["mlp.up_proj"].at[1, 0, 0].set(jnp.inf)})
  assert step_with(4, lambda g: g) == (True, 0, 1)  # layers[1] profiles (id 2)
  assert step_with(4, nan_profile) == (False, 1, 0)
  assert step_with(4, nan_block) == (False, 1, 0)
  assert step_with(0, nan_profile) == (True, 0, 1)  # the output layer's slot: not read
