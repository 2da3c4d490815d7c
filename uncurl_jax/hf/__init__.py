"""Hugging Face MoE checkpoints in JAX: read, run, collect, prune layer by layer, write back.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (with a JAX forward checked against
transformers) and DeepSeek-V2/V3 (pruned and written; no forward). `python -m
uncurl_jax.hf.prune` is the command. See docs/checkpoints.md.

Example:
  >>> from uncurl_jax import collect_router_logits, hf
  >>> config, params = hf.load_checkpoint("Qwen3-30B-A3B")
  >>> model = hf.HfMoeDecoder(config)
  >>> logits = collect_router_logits(model, params, batches, max_tokens=65536)
  >>> plan = hf.prune_checkpoint("Qwen3-30B-A3B", "Qwen3-pruned", logits, 64,
  ...                            method="uncurl", router="merge")
"""
from uncurl_jax.hf.checkpoint import Checkpoint
from uncurl_jax.hf.checkpoint import load as load_checkpoint
from uncurl_jax.hf.config import HfMoeConfig
from uncurl_jax.hf.families import FAMILIES
from uncurl_jax.hf.families import Family
from uncurl_jax.hf.modeling import HfMoeDecoder


def __getattr__(name):
  # The command's module is imported on first use, so that `python -m uncurl_jax.hf.prune`
  # runs it fresh (runpy warns when the package has imported it already).
  if name == "prune_checkpoint":
    from uncurl_jax.hf import prune  # pylint: disable=import-outside-toplevel
    return prune.prune_checkpoint
  raise AttributeError(f"module 'uncurl_jax.hf' has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "Checkpoint",
    "Family",
    "HfMoeConfig",
    "HfMoeDecoder",
    "load_checkpoint",
    "prune_checkpoint",
]
