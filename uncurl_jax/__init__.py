"""uncurl_jax: sparse mixture-of-experts LMs in JAX/Flax and task-specific expert pruning.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import uncurl_jax
  >>> cfg = uncurl_jax.configs.get("tiny", num_experts=8)
  >>> model = uncurl_jax.SMoEDecoder(cfg)
  >>> tokens = jnp.ones((2, 16), jnp.int32)
  >>> params = model.init(jax.random.key(0), tokens, tokens, enable_dropout=False)["params"]
  >>> logits = model.apply({"params": params}, tokens, tokens, enable_dropout=False)
  >>> router_logits = uncurl_jax.collect_router_logits(model, params, task_batches)
  >>> small = uncurl_jax.prune_params(params, router_logits, 2, method="uncurl")

The package imports without TensorFlow; seqio tasks live in `uncurl_jax.tasks`
(importing it registers them and loads TensorFlow).
"""

from uncurl_jax import configs
from uncurl_jax import losses
from uncurl_jax import optim
from uncurl_jax import partitioning
from uncurl_jax import pruning
from uncurl_jax import router
from uncurl_jax import train_step
from uncurl_jax.configs import ModelConfig
from uncurl_jax.decoder import SMoEDecoder
from uncurl_jax.decoder import param_count
from uncurl_jax.moe import MoeLayer
from uncurl_jax.pruning import PrunePlan
from uncurl_jax.pruning import apply_plan
from uncurl_jax.pruning import collect_router_logits
from uncurl_jax.pruning import plan_pruning
from uncurl_jax.pruning import prune_params
from uncurl_jax.pruning import pruned_config

__all__ = [
    "ModelConfig",
    "MoeLayer",
    "PrunePlan",
    "SMoEDecoder",
    "apply_plan",
    "collect_router_logits",
    "configs",
    "losses",
    "optim",
    "param_count",
    "partitioning",
    "plan_pruning",
    "prune_params",
    "pruned_config",
    "pruning",
    "router",
    "train_step",
]
