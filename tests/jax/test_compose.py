"""losia_jax.chain and the misuse of optax.chain: the promised `chain(losia(config), adamw)` form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import losia_jax
from losia_jax.alias import LoSiAStage
from tests.jax.helpers import indices_of, random_grads, tiny_params

CFG = losia_jax.LoSiAConfig(rank_factor=0.25, period=2)  # 3 layers + output: 4 slots of 2 steps
OUT = dict(output_module="embed_tokens")
STEPS = 20  # every layer relocalizes at least twice


def _run(tx, steps=STEPS, fused=True, params=None, seed=1, cfg=CFG):
  params = tiny_params() if params is None else params
  state = tx.init(params)
  if fused:
    step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  else:
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
  rng = np.random.default_rng(seed)
  plan = losia_jax.make_plan(params, cfg, **OUT)
  history = []
  for _ in range(steps):
    params, state = step(params, state, random_grads(params, rng))
    history.append(indices_of(state, plan))
  return params, state, history


def _assert_same_run(a, b, rtol=1e-5, atol=1e-6):
  pa, _, ha = a
  pb, _, hb = b
  for ia, ib in zip(ha, hb):  # identical subnets at every step
    for k in ia:
      np.testing.assert_array_equal(ia[k][0], ib[k][0])
      np.testing.assert_array_equal(ia[k][1], ib[k][1])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), pa, pb)


@pytest.mark.parametrize("fused", [True, False])
def test_chain_with_adamw_equals_builtin_losia(fused):
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, STEPS)
  cfg = CFG.replace(output_rank_factor=0.25)  # the output layer's row block too
  ours = losia_jax.chain(losia_jax.losia(cfg, **OUT), optax.adamw(sched, weight_decay=0.1))
  ref = losia_jax.losia(sched, cfg, weight_decay=0.1, **OUT)
  a, b = _run(ours, fused=fused, cfg=cfg), _run(ref, fused=fused, cfg=cfg)
  _assert_same_run(a, b)
  # as compact as the built-in: the same state, in bytes and in structure
  params = tiny_params()
  sa = jax.eval_shape(ours.init, params)
  sb = jax.eval_shape(ref.init, params)
  assert losia_jax.state_nbytes(sa) <= losia_jax.state_nbytes(sb) + 64
  inner = losia_jax.find_losia_state(sa).targets["self_attn.q_proj"].inner
  mu = [x for x in jax.tree_util.tree_leaves(inner) if x.ndim == 3]
  assert mu and all(x.shape == (3, 3, 3) for x in mu)  # [layers, k_in, k_out] blocks only


def test_schedule_follows_the_global_step_not_the_block():
  # A schedule that is zero from step 6 on: if the inner optimizer's schedule
  # restarted with each relocalized block, blocks would move again later.
  sched = optax.piecewise_constant_schedule(0.05, {6: 0.0})
  tx = losia_jax.chain(losia_jax.losia(CFG, **OUT), optax.adam(sched))
  params = tiny_params()
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.apply_gradients(g, s, p))
  rng = np.random.default_rng(0)
  for _ in range(6):
    params, state = step(params, state, random_grads(params, rng))
  frozen = jax.tree.map(np.asarray, params)
  for _ in range(12):  # through relocalizations of every layer
    params, state = step(params, state, random_grads(params, rng))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), frozen)


@pytest.mark.parametrize("name", ["lion", "sgd_momentum", "user_chain"])
def test_other_elementwise_optimizers_equal_scale_by_losia(name):
  lr = 0.02
  ours, base = {
      "lion": (optax.lion(lr, weight_decay=0.0), optax.scale_by_lion()),
      "sgd_momentum": (optax.sgd(lr, momentum=0.9), optax.trace(0.9)),
      "user_chain": (optax.chain(optax.scale_by_rms(), optax.scale_by_learning_rate(lr)),
                     optax.scale_by_rms()),
  }[name]
  a = _run(losia_jax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(CFG, **OUT), ours))
  b = _run(losia_jax.chain(optax.clip_by_global_norm(1.0),
                           losia_jax.scale_by_losia(CFG, base, learning_rate=lr, **OUT)))
  _assert_same_run(a, b)


def test_optimizer_pieces_after_the_stage_are_chained():
  a = _run(losia_jax.chain(losia_jax.losia(CFG, **OUT), optax.scale_by_adam(),
                           optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(0.05)))
  b = _run(losia_jax.losia(0.05, CFG, weight_decay=0.1, **OUT))
  _assert_same_run(a, b)


def test_only_the_block_moves_and_moments_reset():
  params = {"layers": [{"q_proj": {"weight": jnp.ones((8, 8))}}]}
  cfg = losia_jax.LoSiAConfig(rank_factor=0.25, period=3, non_target="freeze")
  tx = losia_jax.chain(losia_jax.losia(cfg), optax.adamw(0.01, weight_decay=0.01))
  state = tx.init(params)
  st = losia_jax.find_losia_state(state).targets["q_proj"]
  rows, cols = np.asarray(st.rows[0]), np.asarray(st.cols[0])
  g = {"layers": [{"q_proj": {"weight": jnp.full((8, 8), 0.5)}}]}
  new, state = tx.apply_gradients(g, state, params)
  moved = np.asarray(new["layers"][0]["q_proj"]["weight"]) != 1
  mask = np.zeros((8, 8), bool)
  mask[np.ix_(rows, cols)] = True
  np.testing.assert_array_equal(moved, mask)
  for _ in range(2):  # the end of the window: new block, fresh Adam count
    new, state = tx.apply_gradients(g, state, new)
  adam = [s for s in jax.tree_util.tree_leaves(
      losia_jax.find_losia_state(state).targets["q_proj"].inner,
      is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  assert int(adam.count[0]) == 0 and float(jnp.abs(adam.mu).sum()) == 0


# --- what is refused, and how -------------------------------------------------------------

SPELLING = "losia_jax.chain(losia_jax.losia(config), optax.adamw(lr"


@pytest.mark.parametrize("make", [
    lambda: optax.chain(losia_jax.losia(1e-2, CFG, **OUT), optax.adamw(1e-2)),
    lambda: optax.chain(losia_jax.scale_by_losia(CFG, **OUT), optax.adamw(1e-2)),
    lambda: optax.chain(optax.clip_by_global_norm(1.0), losia_jax.losia(1e-2, CFG, **OUT),
                        optax.sgd(1e-2, momentum=0.9)),
    lambda: optax.named_chain(("losia", losia_jax.losia(1e-2, CFG, **OUT)),
                              ("adam", optax.adam(1e-2))),
    lambda: optax.chain(optax.MultiSteps(losia_jax.losia(1e-2, CFG, **OUT), 2)
                        .gradient_transformation(), optax.adamw(1e-2)),
], ids=["losia", "scale_by_losia", "after_clip", "named_chain", "multisteps"])
def test_optax_chain_with_an_optimizer_after_losia_is_refused_at_init(make):
  tx = make()
  with pytest.raises(ValueError, match="Adam runs twice") as e:
    tx.init(tiny_params())
  assert SPELLING in str(e.value)
  with pytest.raises(ValueError, match="Adam runs twice"):  # under eval_shape too
    jax.eval_shape(tx.init, tiny_params())


def test_stateless_followers_stay_allowed():
  # scale_by_losia's documented use: the direction, then the learning rate
  tx = optax.chain(losia_jax.scale_by_losia(CFG, **OUT), optax.scale_by_learning_rate(0.05))
  a = _run(tx, fused=False)
  b = _run(losia_jax.losia(0.05, CFG, **OUT), fused=False)
  _assert_same_run(a, b)


def test_stage_alone_or_in_optax_chain_is_refused():
  stage = losia_jax.losia(CFG)
  assert isinstance(stage, LoSiAStage)
  for tx in (stage, optax.chain(stage, optax.adamw(1e-2))):
    with pytest.raises(ValueError, match=r"losia_jax.chain\(losia_jax.losia\(config\)"):
      tx.init(tiny_params())
  with pytest.raises(TypeError, match=r"optax.adamw\(lr, b1=0.8, weight_decay=0.1\)"):
    losia_jax.losia(CFG, b1=0.8, weight_decay=0.1)


@pytest.mark.parametrize("args, match", [
    (lambda: (losia_jax.losia(1e-2, CFG), optax.adamw(1e-2)), "follow a complete LoSiA"),
    (lambda: (losia_jax.losia(CFG),), "needs the optimizer that trains the blocks"),
    (lambda: (optax.adamw(1e-2),), "exactly one LoSiA element"),
    (lambda: (losia_jax.losia(CFG), optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))),
     "clip_by_global_norm updates an entry depending on the other entries"),
    (lambda: (losia_jax.losia(CFG), optax.adafactor(1e-2)), "scale_by_factored_rms keeps state"),
    (lambda: (losia_jax.losia(CFG), optax.lamb(1e-2)), "scale_by_trust_ratio"),
    (lambda: (losia_jax.losia(CFG), losia_jax.losia(1e-2, CFG)), "exactly one LoSiA element"),
], ids=["complete_then_adamw", "stage_alone", "no_losia", "clip_inside", "adafactor", "lamb",
        "two_losia"])
def test_losia_chain_refuses_with_the_fix(args, match):
  with pytest.raises(ValueError, match=match):
    losia_jax.chain(*args())


# --- optax wrappers -------------------------------------------------------------------------

def test_inject_hyperparams_works_under_jit_and_the_injected_lr_drives_the_step():
  tx = optax.inject_hyperparams(losia_jax.losia, static_args=("config", "output_module"))(
      learning_rate=0.05, config=CFG, output_module="embed_tokens")
  params = tiny_params()
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  ref = losia_jax.losia(0.05, CFG, **OUT)
  rstate = ref.init(params)
  rstep = jax.jit(lambda p, s, g: ref.apply_gradients(g, s, p))
  rng = np.random.default_rng(3)
  p1, p2 = params, params
  for _ in range(4):
    g = random_grads(params, rng)
    p1, state = step(p1, state, g)
    p2, rstate = rstep(p2, rstate, g)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)
  # doubling the injected learning rate doubles the (Adam-normalised) block step
  g = random_grads(params, rng)
  _, half = tx.update(g, state, p1)
  u1, _ = tx.update(g, state, p1)
  state.hyperparams["learning_rate"] = jnp.asarray(0.1)
  u2, _ = tx.update(g, state, p1)
  q1 = np.asarray(u1["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"])
  q2 = np.asarray(u2["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"])
  assert np.abs(q1).max() > 0
  np.testing.assert_allclose(q2, 2 * q1, rtol=1e-5, atol=1e-8)
