"""LLaMA-family causal LMs in Flax NNX with Hugging Face weight conversion.

- :class:`LlamaForCausalLM`, :class:`ModelConfig`: the model; :func:`default_linear`: its
  projection hook (defined once in :mod:`losia_jax.linear`, shared with LoSiA-Pro);
- :func:`from_hf_state_dict`, :func:`to_hf_state_dict`, :func:`load_hf`,
  :func:`save_hf`, :func:`load_gguf`, :func:`to_hf_config`: conversion and IO;
- :func:`greedy_generate`: batched greedy decoding with a KV cache;
- :func:`functional`, :func:`masked_nll`: the model as a function of a params
  dict (what Optax and LoSiA update) and the response-only fine-tuning loss.
"""

from losia_jax.models.functional import functional, masked_nll
from losia_jax.models.generate import greedy_generate
from losia_jax.models.hf import (
                                 from_hf_state_dict,
                                 hf_key,
                                 load_gguf,
                                 load_hf,
                                 save_hf,
                                 to_hf_config,
                                 to_hf_state_dict,
)
from losia_jax.models.llama import (
                                 KVCache,
                                 LlamaForCausalLM,
                                 ModelConfig,
                                 default_linear,
                                 default_positions,
                                 projection_identities,
)

__all__ = [
    "KVCache",
    "LlamaForCausalLM",
    "ModelConfig",
    "default_linear",
    "default_positions",
    "from_hf_state_dict",
    "functional",
    "greedy_generate",
    "hf_key",
    "load_gguf",
    "load_hf",
    "masked_nll",
    "projection_identities",
    "save_hf",
    "to_hf_config",
    "to_hf_state_dict",
]
