"""The SMoE decoder: config, router math, MoE layer, attention, decoder, parameter layouts,
the inference forward, sharding rules.

Modules: `configs`, `router`, `moe`, `attention`, `decoder`, `inputs` (the decoder call of
every pass), `forward` (the jitted forward with sown collections; whether params fit a
model), `collect` (router logits on task batches), `layout` (where MoE layers keep their
weights in this project's, t5x's and MaxText's params), `partitioning`.

Example:
  >>> from uncurl_jax import model
  >>> cfg = model.configs.get("tiny", num_experts=8)
  >>> decoder = model.SMoEDecoder(cfg)
  >>> model.expert_counts(params)                       # {'layers_1/mlp': 8, ...}
"""

from uncurl_jax.model import attention
from uncurl_jax.model import collect
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import forward
from uncurl_jax.model import inputs
from uncurl_jax.model import layout
from uncurl_jax.model import moe
from uncurl_jax.model import partitioning
from uncurl_jax.model import router
from uncurl_jax.model.collect import collect_router_logits
from uncurl_jax.model.configs import ModelConfig
from uncurl_jax.model.configs import with_expert_counts
from uncurl_jax.model.decoder import SMoEDecoder
from uncurl_jax.model.decoder import param_count
from uncurl_jax.model.forward import check_params
from uncurl_jax.model.layout import DEFAULT_LAYOUT
from uncurl_jax.model.layout import HF_MIXTRAL_LAYOUT
from uncurl_jax.model.layout import HF_QWEN_MOE_LAYOUT
from uncurl_jax.model.layout import MAXTEXT_LAYOUT
from uncurl_jax.model.layout import MAXTEXT_SCANNED_LAYOUT
from uncurl_jax.model.layout import T5X_GATED_LAYOUT
from uncurl_jax.model.layout import T5X_LAYOUT
from uncurl_jax.model.layout import MoeLayout
from uncurl_jax.model.layout import detect_layout
from uncurl_jax.model.layout import expert_counts
from uncurl_jax.model.layout import find_moe_layers
from uncurl_jax.model.moe import MoeLayer

__all__ = [
    "DEFAULT_LAYOUT",
    "HF_MIXTRAL_LAYOUT",
    "HF_QWEN_MOE_LAYOUT",
    "MAXTEXT_LAYOUT",
    "MAXTEXT_SCANNED_LAYOUT",
    "ModelConfig",
    "MoeLayer",
    "MoeLayout",
    "SMoEDecoder",
    "T5X_GATED_LAYOUT",
    "T5X_LAYOUT",
    "attention",
    "check_params",
    "collect",
    "collect_router_logits",
    "configs",
    "decoder",
    "detect_layout",
    "expert_counts",
    "find_moe_layers",
    "forward",
    "inputs",
    "layout",
    "moe",
    "param_count",
    "partitioning",
    "router",
    "with_expert_counts",
]
