"""Task-specific expert pruning of SMoE parameter pytrees (UNCURL and baselines).

The steps are separate modules of pure functions, each usable alone: router logits
(`uncurl_jax.model.collect`) and `stats` (the experts' task statistics) -> `features`
(similarity, selection frequencies) -> `clustering` ->
`alignment` (Hungarian weight matching) -> `merge` (weighted averaging, router
re-indexing). `methods` is the registry of pruning methods, `validate` checks the
arguments (MoE layers are found by `uncurl_jax.model.layout`), `oracle` selects experts greedily by a
black-box score (the study's ceiling). `plan_pruning` composes the
deciding part into a `PrunePlan`, `apply_plan` executes one; `prune_params` does both.

This package's list is the pruning API; the MoE-layer layouts `plan_pruning(layout=...)`
takes and `collect_router_logits` belong to `uncurl_jax.model` (its `__all__`), as do
`find_moe_layers` and `expert_counts`.

Example:
  >>> from uncurl_jax import model, pruning
  >>> logits = model.collect_router_logits(decoder, params, batches, max_tokens=65536)
  >>> small_params = pruning.prune_params(params, logits, 8, method="uncurl")
"""
from uncurl_jax.pruning.clustering import CLUSTER_METHODS
from uncurl_jax.pruning.features import ExpertStats
from uncurl_jax.pruning.merge import ROUTER_MODES
from uncurl_jax.pruning.methods import METHODS
from uncurl_jax.pruning.methods import Method
from uncurl_jax.pruning.methods import MethodInputs
from uncurl_jax.pruning.methods import register as register_method
from uncurl_jax.pruning.oracle import greedy_selection
from uncurl_jax.pruning.plan import ExpertAlignment
from uncurl_jax.pruning.plan import LayerPlan
from uncurl_jax.pruning.plan import PrunePlan
from uncurl_jax.pruning.prune import apply_plan
from uncurl_jax.pruning.prune import plan_pruning
from uncurl_jax.pruning.prune import prune_params
from uncurl_jax.pruning.prune import pruned_config
from uncurl_jax.pruning.stats import collect_expert_stats
from uncurl_jax.pruning.validate import default_num_experts

__all__ = [
    "CLUSTER_METHODS",
    "METHODS",
    "ROUTER_MODES",
    "ExpertAlignment",
    "ExpertStats",
    "LayerPlan",
    "Method",
    "MethodInputs",
    "PrunePlan",
    "apply_plan",
    "collect_expert_stats",
    "default_num_experts",
    "greedy_selection",
    "plan_pruning",
    "prune_params",
    "pruned_config",
    "register_method",
]
