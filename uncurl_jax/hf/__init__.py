"""Hugging Face MoE checkpoints in JAX: read, run, prune, write back.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (with a JAX forward checked against
transformers) and DeepSeek-V2/V3 (pruned and written; no forward). See docs/checkpoints.md.

Example:
  >>> from uncurl_jax import hf, pruning, collect_router_logits
  >>> config, params = hf.load_checkpoint("Qwen3-30B-A3B")
  >>> model = hf.HfMoeDecoder(config)
  >>> logits = collect_router_logits(model, params, batches, max_tokens=65536)
  >>> hf.prune_checkpoint("Qwen3-30B-A3B", "Qwen3-pruned", logits, 64, method="uncurl")
"""
from uncurl_jax.hf.config import HfMoeConfig
from uncurl_jax.hf.families import FAMILIES
from uncurl_jax.hf.modeling import HfMoeDecoder

__all__ = [
    "FAMILIES",
    "HfMoeConfig",
    "HfMoeDecoder",
]
