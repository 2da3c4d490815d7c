"""uncurl_jax: sparse mixture-of-experts LMs in JAX/Flax and task-specific expert pruning.

The package re-exports a small core: the model (`ModelConfig`, `configs`, `SMoEDecoder`,
`with_expert_counts`) and pruning (`collect_router_logits`, `collect_expert_stats`,
`plan_pruning`, `apply_plan`, `prune_params`, `PrunePlan`, `pruned_config`). Each
sub-package owns the list of the rest (`uncurl_jax.model.__all__`,
`uncurl_jax.pruning.__all__`, ...): `model` (config, router, MoE layer, decoder, parameter
layouts, sharding rules), `pruning` (UNCURL and the baselines, plans), `train` (losses,
optimizer, steps, checkpoints, the training loop, `python -m uncurl_jax.train`), `data`
(seqio -> batches, the synthetic corpus), `tasks` (the seqio registrations), `study` (the
UNCURL study, `python -m uncurl_jax.study`). `import uncurl_jax` loads neither seqio nor
TensorFlow; `data`, `tasks`, `study` and `train.run` do.

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

from uncurl_jax import model
from uncurl_jax import pruning
from uncurl_jax.model import configs
from uncurl_jax.model.collect import collect_router_logits
from uncurl_jax.model.configs import ModelConfig
from uncurl_jax.model.configs import with_expert_counts
from uncurl_jax.model.decoder import SMoEDecoder
from uncurl_jax.pruning.plan import PrunePlan
from uncurl_jax.pruning.prune import apply_plan
from uncurl_jax.pruning.prune import plan_pruning
from uncurl_jax.pruning.prune import prune_params
from uncurl_jax.pruning.prune import pruned_config
from uncurl_jax.pruning.stats import collect_expert_stats

__all__ = [
    "ModelConfig",
    "PrunePlan",
    "SMoEDecoder",
    "apply_plan",
    "collect_expert_stats",
    "collect_router_logits",
    "configs",
    "model",
    "plan_pruning",
    "prune_params",
    "pruned_config",
    "pruning",
    "with_expert_counts",
]
