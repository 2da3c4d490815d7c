"""uncurl_jax: sparse mixture-of-experts LMs in JAX/Flax and task-specific expert pruning.

Sub-packages, by role: `model` (config, router, MoE layer, decoder, sharding rules),
`pruning` (router-logit collection, UNCURL and the baselines, plans), `train` (losses,
optimizer, steps, checkpoints, the training loop, `python -m uncurl_jax.train`), `data`
(seqio -> batches, the synthetic corpus), `study` (the UNCURL study,
`python -m uncurl_jax.study`). seqio tasks live in `uncurl_jax.tasks`; importing it
registers them and loads TensorFlow, which the rest of this top-level API does not.

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
"""

from uncurl_jax import pruning
from uncurl_jax.model import configs
from uncurl_jax.model import partitioning
from uncurl_jax.model import router
from uncurl_jax.model.configs import ModelConfig
from uncurl_jax.model.configs import with_expert_counts
from uncurl_jax.model.decoder import SMoEDecoder
from uncurl_jax.model.decoder import param_count
from uncurl_jax.model.moe import MoeLayer
from uncurl_jax.pruning import PrunePlan
from uncurl_jax.pruning import apply_plan
from uncurl_jax.pruning import collect_router_logits
from uncurl_jax.pruning import plan_pruning
from uncurl_jax.pruning import prune_params
from uncurl_jax.pruning import pruned_config
from uncurl_jax.train import losses
from uncurl_jax.train import optim
from uncurl_jax.train import step as train_step

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
    "with_expert_counts",
]
