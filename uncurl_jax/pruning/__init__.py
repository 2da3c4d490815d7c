"""Task-specific expert pruning of SMoE parameter pytrees (UNCURL and baselines).

The steps are separate modules of pure functions, each usable alone:
`collect` and `stats` (router logits, the experts' task statistics) -> `features`
(similarity, selection frequencies) -> `clustering` ->
`alignment` (Hungarian weight matching) -> `merge` (weighted averaging, router
re-indexing). `methods` is the registry of pruning methods, `validate` checks the
arguments, `layout` finds MoE layers in a params tree, `oracle` selects experts greedily by a
black-box score (the study's ceiling). `plan_pruning` composes the
deciding part into a `PrunePlan`, `apply_plan` executes one; `prune_params` does both.

Example:
  >>> from uncurl_jax import pruning
  >>> logits = pruning.collect_router_logits(model, params, batches, max_tokens=65536)
  >>> small_params = pruning.prune_params(params, logits, 8, method="uncurl")
"""
from uncurl_jax.pruning.clustering import CLUSTER_METHODS
from uncurl_jax.pruning.collect import collect_router_logits
from uncurl_jax.pruning.features import ExpertStats
from uncurl_jax.pruning.layout import DEFAULT_LAYOUT
from uncurl_jax.pruning.layout import MAXTEXT_LAYOUT
from uncurl_jax.pruning.layout import T5X_GATED_LAYOUT
from uncurl_jax.pruning.layout import T5X_LAYOUT
from uncurl_jax.pruning.layout import MoeLayout
from uncurl_jax.pruning.layout import detect_layout
from uncurl_jax.pruning.layout import expert_counts
from uncurl_jax.pruning.layout import find_moe_layers
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
    "DEFAULT_LAYOUT",
    "MAXTEXT_LAYOUT",
    "METHODS",
    "ROUTER_MODES",
    "T5X_GATED_LAYOUT",
    "T5X_LAYOUT",
    "ExpertAlignment",
    "ExpertStats",
    "LayerPlan",
    "Method",
    "MethodInputs",
    "MoeLayout",
    "PrunePlan",
    "apply_plan",
    "collect_expert_stats",
    "collect_router_logits",
    "default_num_experts",
    "detect_layout",
    "expert_counts",
    "find_moe_layers",
    "greedy_selection",
    "plan_pruning",
    "prune_params",
    "pruned_config",
    "register_method",
]
