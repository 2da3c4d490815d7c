"""uncurl_jax: sparse mixture-of-experts LMs in JAX/Flax and task-specific expert pruning.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import uncurl_jax
  >>> cfg = uncurl_jax.configs.get("tiny", num_experts=8)
  >>> model = uncurl_jax.SMoEDecoder(cfg)
  >>> tokens = jnp.ones((2, 16), jnp.int32)
  >>> params = model.init(jax.random.key(0), tokens, tokens, enable_dropout=False)["params"]
  >>> logits = model.apply({"params": params}, tokens, tokens, enable_dropout=False)

The package imports without TensorFlow; seqio tasks live in `uncurl_jax.tasks`
(importing it registers them and loads TensorFlow).
"""

from uncurl_jax import configs
from uncurl_jax import losses
from uncurl_jax import optim
from uncurl_jax import partitioning
from uncurl_jax import router
from uncurl_jax import train_step
from uncurl_jax.configs import ModelConfig
from uncurl_jax.decoder import SMoEDecoder
from uncurl_jax.decoder import param_count
from uncurl_jax.moe import MoeLayer

__all__ = [
    "ModelConfig",
    "MoeLayer",
    "SMoEDecoder",
    "configs",
    "losses",
    "optim",
    "param_count",
    "partitioning",
    "router",
    "train_step",
]
