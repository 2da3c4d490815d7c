"""`plan_pruning`, `apply_plan`, `prune_params`: task-specific expert pruning of a pytree.

Example:
  >>> from uncurl_jax import pruning
  >>> logits = pruning.collect_router_logits(model, params, task_batches, max_tokens=65536)
  >>> plan = pruning.plan_pruning(params, logits, 8, method="uncurl", router="anchor")
  >>> small_params = pruning.apply_plan(params, plan)
  >>> small_model = SMoEDecoder(pruning.pruned_config(config, plan))
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np
from absl import logging

from uncurl_jax import configs
from uncurl_jax.pruning import alignment as alignment_lib
from uncurl_jax.pruning import clustering
from uncurl_jax.pruning import features
from uncurl_jax.pruning import layout as layout_lib
from uncurl_jax.pruning import merge as merge_lib
from uncurl_jax.pruning import methods
from uncurl_jax.pruning.plan import METHODS
from uncurl_jax.pruning.plan import SELECTION_METHODS
from uncurl_jax.pruning.plan import ExpertAlignment
from uncurl_jax.pruning.plan import LayerPlan
from uncurl_jax.pruning.plan import PrunePlan

# Methods that need no router logits (they may be given, for the record of frequencies).
_LOGIT_FREE_METHODS = ("router_norm", "random")
_SIMILARITY_METHODS = ("uncurl", "frequency_merge", "mc_smoe")


def default_num_experts(num_experts: int) -> int:
  """The paper's threshold finding: reduce 4x up to 32 experts, 2x above.

  Example:
    >>> [default_num_experts(e) for e in (8, 32, 64, 128)]
    [2, 8, 32, 64]
  """
  return max(1, num_experts // 4) if num_experts <= 32 else num_experts // 2


def plan_pruning(params: Mapping[str, Any], logits: Mapping[str, Any] | None,
                 num_experts: int | Mapping[str, int] | None = None, *,
                 method: str = "uncurl", cluster: str = "spectral", router: str | None = None,
                 seed: int = 0, top_k: int = 1,
                 layout: layout_lib.MoeLayout = layout_lib.DEFAULT_LAYOUT,
                 pretrained_params: Mapping[str, Any] | None = None,
                 router_init_std: float = 0.02, num_workers: int | None = None,
                 timings: dict[str, float] | None = None) -> PrunePlan:
  """Decides how to prune every MoE layer of `params` for the task behind `logits`.

  Args:
    params: Parameter pytree (numpy or jax arrays, possibly sharded).
    logits: {MoE layer path: [tokens, E] raw router logits on the task, padding
      excluded} (`collect_router_logits`). May be None for "random" and "router_norm".
    num_experts: Experts to keep: one int for every layer, a {layer: int} mapping, or
      None for the paper's default (`default_num_experts`). For "mc_smoe" only the total
      over layers is used (its allocation varies per layer).
    method: "uncurl" (cluster, align, merge: the paper), "frequency" (keep the most
      selected), "frequency_merge" (most selected anchor, others merge into the most
      similar), "mc_smoe" (global dominant experts, merge), "router_norm" (keep the
      largest router-norm change; needs `pretrained_params`) or "random".
    cluster: "spectral", "kmeans" or "agglomerative" (method "uncurl" only).
    router: "reinit", "anchor" or "merge" (see `merge.reindex_router`); None picks
      "reinit" (the paper) for merging methods and "anchor" (slice the router to the
      kept experts) for the selection methods.
    seed: Seed of clustering, random pruning and a re-initialized router.
    top_k: Router choices per token counted in the selection frequencies (the model's
      top_k counts every routed choice; 1 counts first choices, as the paper).
    layout: Where MoE layers keep their weights (`layout.T5X_LAYOUT` for t5x).
    pretrained_params: The pretrained model's params (method "router_norm").
    router_init_std: Standard deviation of a re-initialized router (the model's init).
    num_workers: Assignment-solver threads; None: all cores; 0: sequential.
    timings: If given, receives seconds per stage.

  Returns:
    The PrunePlan.

  Raises:
    ValueError: Before any work, for an unknown option, a target outside [1, E], logits
      missing or extra for a layer, logits not [tokens, E], non-finite logits, no tokens,
      a layout that does not match the params, or router_norm without pretrained params.

  Example:
    >>> plan = plan_pruning(params, logits, 8, method="uncurl", seed=0)
    >>> plan.num_experts
    {'layers_0/mlp': 8, 'layers_2/mlp': 8}
  """
  router = _checked_options(method, cluster, router, pretrained_params, logits)
  layers = layout_lib.find_moe_layers(params, layout)
  host_logits = _checked_logits(logits, layers)
  targets = _checked_targets(num_experts, layers)
  for name, weights in layers.items():
    if not 1 <= top_k <= weights.num_experts:
      raise ValueError(f"top_k must be in [1, E={weights.num_experts}] (layer {name!r}), "
                       f"got {top_k}")
  pretrained = None
  if method == "router_norm":
    pretrained = _checked_pretrained(pretrained_params, layers, layout)
  timings = {} if timings is None else timings

  start = time.perf_counter()
  frequencies = None
  if host_logits is not None:
    frequencies = {name: features.selection_frequencies(h, top_k)
                   for name, h in host_logits.items()}
  similarities = {}
  if method in _SIMILARITY_METHODS:
    similarities = {name: features.router_similarity(h) for name, h in host_logits.items()}
  timings["similarity"] = time.perf_counter() - start

  start = time.perf_counter()
  groupings = _groupings(method, layers, targets, frequencies, similarities, pretrained,
                         cluster=cluster, seed=seed)
  timings["clustering"] = time.perf_counter() - start

  alignments = _alignments(layers, groupings, num_workers, timings)
  layer_plans = {}
  for name, grouping in groupings.items():
    freq = None if frequencies is None else frequencies[name]
    weights = (np.where(grouping.labels >= 0, 1.0, 0.0) if method in SELECTION_METHODS
               else methods.merge_weights(grouping.labels, freq))
    layer_plans[name] = LayerPlan(
        num_experts=layers[name].num_experts,
        labels=tuple(int(x) for x in grouping.labels),
        anchors=tuple(int(x) for x in grouping.anchors),
        member_weights=tuple(float(x) for x in weights),
        frequencies=None if freq is None else tuple(float(x) for x in freq),
        alignments=alignments[name])
  return PrunePlan(method=method, router=router, layers=layer_plans, seed=seed,
                   router_init_std=float(router_init_std),
                   cluster=cluster if method == "uncurl" else None, top_k=top_k, layout=layout)


def _alignments(layers, groupings, num_workers, timings) -> dict[str, tuple[ExpertAlignment]]:
  """Aligns every grouping's members to their references, all layers in one pool."""
  tasks = [alignment_lib.AlignmentTask(name, reference, member)
           for name, grouping in groupings.items()
           for member, reference in sorted(grouping.references.items())]
  logging.info("plan_pruning: %d experts to align", len(tasks))
  results = alignment_lib.align_experts(layers, tasks, num_workers=num_workers, timings=timings)
  aligned = {name: [] for name in layers}
  for task, result in zip(tasks, results):
    aligned[task.layer].append(ExpertAlignment(
        task.member, task.reference, tuple(int(i) for i in result.permutation),
        result.score_before, result.score_after))
  return {name: tuple(items) for name, items in aligned.items()}


def _groupings(method, layers, targets, frequencies, similarities, pretrained, *, cluster,
               seed) -> dict[str, methods.Grouping]:
  if method == "mc_smoe":
    dominant = clustering.global_dominant_experts(frequencies, sum(targets.values()))
    return {name: methods.mc_smoe_grouping(similarities[name], dominant[name])
            for name in layers}
  groupings = {}
  for name, weights in layers.items():
    num_kept = targets[name]
    if method == "uncurl":
      grouping = methods.uncurl_grouping(similarities[name], frequencies[name], num_kept,
                                         cluster=cluster, seed=seed)
    elif method == "frequency":
      grouping = methods.frequency_grouping(frequencies[name], num_kept)
    elif method == "frequency_merge":
      grouping = methods.frequency_merge_grouping(similarities[name], frequencies[name],
                                                  num_kept)
    elif method == "router_norm":
      grouping = methods.router_norm_grouping(np.asarray(weights.router_kernel),
                                              pretrained[name], num_kept)
    else:  # random
      rng = np.random.default_rng([seed, _name_hash(name)])
      grouping = methods.random_grouping(weights.num_experts, num_kept, rng)
    groupings[name] = grouping
  return groupings


def _name_hash(layer_name: str) -> int:
  """Per-layer seed offset that depends on the layer's name, not on the layers' order."""
  return zlib.crc32(layer_name.encode()) & 0x7FFFFFFF


def _checked_options(method, cluster, router, pretrained_params, logits) -> str:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if cluster not in clustering.CLUSTER_METHODS:
    raise ValueError(f"cluster must be one of {clustering.CLUSTER_METHODS}, got {cluster!r}")
  if router is not None and router not in merge_lib.ROUTER_MODES:
    raise ValueError(f"router must be one of {merge_lib.ROUTER_MODES} or None, got {router!r}")
  if method == "router_norm" and pretrained_params is None:
    raise ValueError("method 'router_norm' needs pretrained_params= (the router before "
                     "finetuning) to measure the change of router-column norms")
  if method != "router_norm" and pretrained_params is not None:
    raise ValueError(f"pretrained_params is only used by method 'router_norm', not {method!r}")
  if logits is None and method not in _LOGIT_FREE_METHODS:
    raise ValueError(f"method {method!r} needs router logits; only {_LOGIT_FREE_METHODS} "
                     f"accept logits=None")
  if router is None:
    return "anchor" if method in SELECTION_METHODS else "reinit"
  return router


def _checked_logits(logits, layers) -> dict[str, np.ndarray] | None:
  if logits is None:
    return None
  if not isinstance(logits, Mapping):
    raise TypeError(f"logits must be a mapping {{layer path: [tokens, E] array}}, got "
                    f"{type(logits).__name__}")
  missing, extra = sorted(set(layers) - set(logits)), sorted(set(logits) - set(layers))
  if missing or extra:
    raise ValueError(f"logits must have one entry per MoE layer {sorted(layers)}: missing "
                     f"{missing}, extra {extra}")
  checked = {}
  for name, weights in layers.items():
    h = np.asarray(logits[name], np.float32)
    if h.ndim != 2 or h.shape[1] != weights.num_experts:
      raise ValueError(f"logits[{name!r}] must be [tokens, E={weights.num_experts}], got "
                       f"shape {h.shape}")
    if h.shape[0] == 0:
      raise ValueError(f"logits[{name!r}] has no tokens")
    if not np.all(np.isfinite(h)):
      raise ValueError(f"logits[{name!r}] has {int(np.sum(~np.isfinite(h)))} NaN or "
                       f"infinite values")
    checked[name] = h
  return checked


def _checked_targets(num_experts, layers) -> dict[str, int]:
  if num_experts is None:
    targets = {name: default_num_experts(w.num_experts) for name, w in layers.items()}
  elif isinstance(num_experts, Mapping):
    missing = sorted(set(layers) - set(num_experts))
    extra = sorted(set(num_experts) - set(layers))
    if missing or extra:
      raise ValueError(f"num_experts must have one entry per MoE layer: missing {missing}, "
                       f"extra {extra}")
    targets = {name: num_experts[name] for name in layers}
  else:
    targets = {name: num_experts for name in layers}
  for name, target in targets.items():
    e = layers[name].num_experts
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
      raise TypeError(f"num_experts for layer {name!r} must be an int, got {target!r}")
    if not 1 <= target <= e:
      raise ValueError(f"num_experts for layer {name!r} must be in [1, E={e}], got {target}")
  return {name: int(target) for name, target in targets.items()}


def _checked_pretrained(pretrained_params, layers, layout) -> dict[str, np.ndarray]:
  pretrained = layout_lib.find_moe_layers(pretrained_params, layout)
  if set(pretrained) != set(layers):
    raise ValueError(f"pretrained_params has MoE layers {sorted(pretrained)}, params have "
                     f"{sorted(layers)}")
  kernels = {}
  for name, weights in layers.items():
    kernel = np.asarray(pretrained[name].router_kernel)
    if kernel.shape != tuple(weights.router_kernel.shape):
      raise ValueError(f"pretrained router of {name!r} has shape {kernel.shape}, finetuned "
                       f"{tuple(weights.router_kernel.shape)}")
    kernels[name] = kernel
  return kernels


def apply_plan(params: Mapping[str, Any], plan: PrunePlan) -> Any:
  """Returns new params with every MoE layer pruned as `plan` says.

  Pure: the inputs are not modified; leaves outside the MoE layers are shared with the
  input, pruned leaves are new. numpy leaves give numpy results; jax leaves (sharded
  too) give jax results computed on their devices. A FrozenDict input gives a FrozenDict.

  Example:
    >>> small = apply_plan(params, plan)
    >>> small["layers_0"]["mlp"]["expert"]["wi"]["kernel"].shape     # [D, d, f]
  """
  if not isinstance(plan, PrunePlan):
    raise TypeError(f"plan must be a PrunePlan, got {type(plan).__name__}")
  layers = layout_lib.find_moe_layers(params, plan.layout)
  missing, extra = sorted(set(plan.layers) - set(layers)), sorted(set(layers) - set(plan.layers))
  if missing or extra:
    raise ValueError(f"plan and params disagree on MoE layers: plan layers not in params "
                     f"{missing}, params layers not in plan {extra}")
  for name, layer_plan in plan.layers.items():
    if layer_plan.num_experts != layers[name].num_experts:
      raise ValueError(f"plan for {name!r} expects E={layer_plan.num_experts}, params have "
                       f"{layers[name].num_experts}")
  flat = dict(layout_lib.flatten_params(params))
  for name, layer_plan in plan.layers.items():
    prefix = layout_lib.split_path(name)
    for field_name, array in _pruned_layer(layers[name], layer_plan, plan, name).items():
      flat[prefix + layout_lib.split_path(getattr(plan.layout, field_name))] = array
  pruned = flax.traverse_util.unflatten_dict(flat)
  return flax.core.freeze(pruned) if isinstance(params, flax.core.FrozenDict) else pruned


def _pruned_layer(weights: layout_lib.MoeLayerWeights, layer_plan: LayerPlan,
                  plan: PrunePlan, name: str) -> dict[str, Any]:
  merge = layer_plan.merge_matrix()
  permutations = layer_plan.permutations(weights.d_ff)
  new = {"wi_kernel": merge_lib.merge_experts(weights.wi_kernel, merge, permutations, 2),
         "wo_kernel": merge_lib.merge_experts(weights.wo_kernel, merge, permutations, 1)}
  if weights.wi_bias is not None:
    new["wi_bias"] = merge_lib.merge_experts(weights.wi_bias, merge, permutations, 1)
  if weights.wo_bias is not None:
    new["wo_bias"] = merge_lib.merge_experts(weights.wo_bias, merge)
  key = jax.random.fold_in(jax.random.key(plan.seed), _name_hash(name))
  kernel, bias = merge_lib.reindex_router(
      weights.router_kernel, weights.router_bias, mode=plan.router, merge=merge,
      anchors=np.asarray(layer_plan.anchors), key=key, init_std=plan.router_init_std)
  new["router_kernel"] = kernel
  if bias is not None:
    new["router_bias"] = bias
  return new


def prune_params(params: Mapping[str, Any], logits: Mapping[str, Any] | None,
                 num_experts: int | Mapping[str, int] | None = None, **kwargs: Any) -> Any:
  """`apply_plan(params, plan_pruning(params, logits, num_experts, **kwargs))`.

  Example:
    >>> small = prune_params(params, logits, 8, method="uncurl", router="reinit", seed=0)
  """
  return apply_plan(params, plan_pruning(params, logits, num_experts, **kwargs))


def pruned_config(config: configs.ModelConfig, plan: PrunePlan) -> configs.ModelConfig:
  """The model config for params pruned by `plan`.

  A plan that keeps the same D in every layer gives `num_experts=D`; one that keeps
  different counts (MC-SMoE, per-layer targets) gives `layer_num_experts`.

  Example:
    >>> pruned_config(configs.get("354m", num_experts=32), plan).num_experts
    8
  """
  counts = set(plan.num_experts.values())
  if len(counts) == 1:
    return dataclasses.replace(config, num_experts=counts.pop(), layer_num_experts=None)
  per_layer = []
  for index in config.moe_layers:
    names = [name for name in plan.num_experts if name.split("/")[0] == f"layers_{index}"]
    if len(names) != 1:
      raise ValueError(f"cannot find MoE block {index} of the config among the plan's layers "
                       f"{sorted(plan.num_experts)}")
    per_layer.append(plan.num_experts[names[0]])
  return dataclasses.replace(config, layer_num_experts=tuple(per_layer))
