"""The SMoE decoder: config, router math, MoE layer, attention, decoder, sharding rules.

Example:
  >>> from uncurl_jax import model
  >>> cfg = model.configs.get("tiny", num_experts=8)
  >>> decoder = model.SMoEDecoder(cfg)
"""

from uncurl_jax.model import attention
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import inputs
from uncurl_jax.model import moe
from uncurl_jax.model import partitioning
from uncurl_jax.model import router
from uncurl_jax.model.configs import ModelConfig
from uncurl_jax.model.configs import with_expert_counts
from uncurl_jax.model.decoder import SMoEDecoder
from uncurl_jax.model.decoder import param_count
from uncurl_jax.model.moe import MoeLayer

__all__ = [
    "ModelConfig",
    "MoeLayer",
    "SMoEDecoder",
    "attention",
    "configs",
    "decoder",
    "inputs",
    "moe",
    "param_count",
    "partitioning",
    "router",
    "with_expert_counts",
]
