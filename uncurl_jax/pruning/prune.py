"""`plan_pruning`, `apply_plan`, `prune_params`: task-specific expert pruning of a pytree.

`plan_pruning` reads as its steps: validate the arguments -> task features (selection
frequencies; similarities on demand) -> the method's grouping of experts -> alignment of
the members to their references -> merge weights -> the `PrunePlan`. `apply_plan`
executes a plan on the arrays.

Example:
  >>> from uncurl_jax import model as model_lib, pruning
  >>> logits = model_lib.collect_router_logits(model, params, task_batches, max_tokens=65536)
  >>> plan = pruning.plan_pruning(params, logits, 8, method="uncurl", router="anchor")
  >>> small_params = pruning.apply_plan(params, plan)
  >>> small_model = SMoEDecoder(pruning.pruned_config(config, plan))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from uncurl_jax import checks
from uncurl_jax.model import configs
from uncurl_jax.pruning import alignment as alignment_lib
from uncurl_jax.pruning import features as features_lib
from uncurl_jax.model import layout as layout_lib
from uncurl_jax.pruning import merge as merge_lib
from uncurl_jax.pruning import methods as methods_lib
from uncurl_jax.pruning import validate
from uncurl_jax.pruning.plan import ExpertAlignment
from uncurl_jax.pruning.plan import LayerPlan
from uncurl_jax.pruning.plan import PrunePlan


def plan_pruning(params: Mapping[str, Any], logits: Mapping[str, Any] | None,
                 num_experts: int | Mapping[str, int] | None = None, *,
                 method: str = methods_lib.DEFAULT_METHOD, cluster: str = "spectral", router: str | None = None,
                 features: str = "router_logits", seed: int = 0, top_k: int = 1,
                 layout: layout_lib.MoeLayout = layout_lib.DEFAULT_LAYOUT,
                 pretrained_params: Mapping[str, Any] | None = None,
                 router_init_std: float = 0.02, num_workers: int | None = None,
                 timings: dict[str, float] | None = None,
                 selection: Mapping[str, Any] | None = None) -> PrunePlan:
  """Decides how to prune every MoE layer of `params` for the task behind `logits`.

  Args:
    params: Parameter pytree (numpy or jax arrays, possibly sharded).
    logits: {MoE layer path: [tokens, E] raw router logits on the task, padding
      excluded} (`collect_router_logits`), or {MoE layer path: ExpertStats}
      (`collect_expert_stats`: the logits and what the experts compute, which "reap",
      "hc_smoe" and features="expert_outputs" need). May be None for methods that need
      neither ("random", "router_norm"). The layers of a scanned block P (a layout with
      a `scan_axis`, e.g. `MAXTEXT_SCANNED_LAYOUT`) are 'P[0]', 'P[1]', ...: give one
      [tokens, E] entry per layer, or one [L, tokens, E] array keyed by P.
    num_experts: Experts to keep: one int for every layer, a {layer: int} mapping, or
      None for the paper's default (`default_num_experts`). For "mc_smoe" only the total
      over layers is used (its allocation varies per layer). A scanned block keeps one
      count in all its layers (a mapping may name the block P for all of them).
    method: A registered method (`methods.names()`): "uncurl" (cluster, align, merge:
      the paper), "frequency" (keep the most selected), "frequency_merge" (most selected
      anchor, others merge into the most similar), "mc_smoe" (global dominant experts,
      merge), "router_norm" (keep the largest router-norm change; needs
      `pretrained_params`), "random", "reap" (keep the largest router-weighted output
      norms) or "hc_smoe" (hierarchical clustering on expert outputs, merge).
    cluster: "spectral", "kmeans" or "agglomerative" (methods that cluster).
    features: What "uncurl" clusters on: "router_logits" (the paper's similarity of the
      router-logit columns) or "expert_outputs" (of the experts' mean outputs; needs
      ExpertStats).
    router: "reinit", "anchor" or "merge" (see `merge.reindex_router`); None takes the
      method's default: "reinit" (the paper) for merging methods, "anchor" (slice the
      router to the kept experts) for the selection methods.
    seed: Seed of clustering, random pruning and a re-initialized router.
    top_k: Router choices per token counted in the selection frequencies (the model's
      top_k counts every routed choice; 1 counts first choices, as the paper).
    layout: Where MoE layers keep their weights: `layout.T5X_LAYOUT` /
      `T5X_GATED_LAYOUT` for t5x/flaxformer, `MAXTEXT_LAYOUT`, or
      `layout.detect_layout(params)`.
    pretrained_params: The pretrained model's params (method "router_norm").
    router_init_std: Standard deviation of a re-initialized router (the model's init).
    num_workers: Assignment-solver threads; None: all cores; 0: sequential.
    timings: If given, receives seconds per stage.
    selection: {MoE layer path: expert indices to keep} for method "selection" (the
      count per layer is the selection's; `num_experts` must agree or be None).

  Returns:
    The PrunePlan.

  Raises:
    TypeError, ValueError: Before any work (`validate`), naming the argument: an unknown
      option; a target outside [1, E]; logits that are not a mapping with one finite,
      real floating [tokens > 0, E] array per MoE layer; NaN or infinite MoE weights; a
      layout that does not match the params; a seed that is not an int in [0, 2**32); a
      router_init_std that is not a finite positive number; pretrained params missing
      for router_norm or given to another method; uneven counts in a scanned block (or a
      method that allocates them, "mc_smoe").

  Example:
    >>> plan = plan_pruning(params, logits, 8, method="uncurl", seed=0)
    >>> plan.num_experts
    {'layers_0/mlp': 8, 'layers_2/mlp': 8}
  """
  validate.scalars(seed=seed, router_init_std=router_init_std, num_workers=num_workers,
                   layout=layout, timings=timings)
  layers = layout_lib.find_moe_layers(checks.mapping("params", params), layout)
  blocks = validate.scanned_blocks(layers, layout)
  logits = validate.scanned_logits(logits, blocks)
  stats = validate.expert_stats(logits, layers)
  spec, router = validate.options(method, cluster, router, has_logits=logits is not None,
                                  has_stats=stats is not None, features_from=features,
                                  has_pretrained=pretrained_params is not None,
                                  has_selection=selection is not None)
  validate.scanned_method(spec, blocks)
  num_experts = validate.scanned_targets(num_experts, blocks)
  kept = validate.selection(selection, layers)
  if kept is not None:
    counts = {name: len(experts) for name, experts in kept.items()}
    if num_experts is not None and validate.targets(num_experts, layers) != counts:
      raise ValueError(f"num_experts {num_experts!r} disagrees with the selection's counts "
                       f"{counts}; pass None")
    num_experts = counts
  validate.finite_weights(layers)
  host_logits = validate.router_logits(logits, layers)
  pretrained_router = validate.pretrained_router(pretrained_params, layers, layout)
  targets = validate.targets(num_experts, layers)
  validate.equal_scanned_counts(targets, blocks, "num_experts")
  top_k = validate.top_k(top_k, layers)
  timings = {} if timings is None else timings
  start = time.perf_counter()
  inputs = methods_lib.MethodInputs(
      layers=layers, targets=targets, logits=host_logits,
      frequencies=None if host_logits is None else {
          name: features_lib.selection_frequencies(h, top_k)
          for name, h in host_logits.items()},
      pretrained_router=pretrained_router,
      stats=stats, cluster=cluster, features=features, seed=seed, selection=kept)
  timings["features"] = time.perf_counter() - start

  start = time.perf_counter()
  groupings = spec.group(inputs)  # similarities are computed here, if the method uses them
  timings["grouping"] = time.perf_counter() - start
  alignments = _alignments(layers, groupings, num_workers, timings)
  layer_plans = {}
  for name, grouping in groupings.items():
    freq = None if inputs.frequencies is None else inputs.frequencies[name]
    weights = (methods_lib.merge_weights(grouping.labels, freq) if spec.merges
               else np.where(grouping.labels >= 0, 1.0, 0.0))
    layer_plans[name] = LayerPlan(
        num_experts=layers[name].num_experts,
        labels=tuple(int(x) for x in grouping.labels),
        anchors=tuple(int(x) for x in grouping.anchors),
        member_weights=tuple(float(x) for x in weights),
        frequencies=None if freq is None else tuple(float(x) for x in freq),
        alignments=alignments[name])
  return PrunePlan(method=method, router=router, layers=layer_plans, seed=seed,
                   router_init_std=float(router_init_std),
                   cluster=cluster if methods_lib.get(method).clusters else None,
                   features=features if methods_lib.get(method).takes_features else None,
                   top_k=top_k,
                   layout=layout)


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


def apply_plan(params: Mapping[str, Any], plan: PrunePlan) -> Any:
  """Returns new params with every MoE layer pruned as `plan` says.

  Pure: the inputs are not modified; leaves outside the MoE layers are shared with the
  input, pruned leaves are new. numpy leaves give numpy results; jax leaves (sharded
  too) give jax results computed on their devices. A FrozenDict input gives a FrozenDict.
  The layers of a scanned block are pruned one by one and stacked back on the scan axis
  (a plan with uneven counts in a scanned block is refused).

  Example:
    >>> small = apply_plan(params, plan)
    >>> small["layers_0"]["mlp"]["expert"]["wi"]["kernel"].shape     # [D, d, f]
  """
  if not isinstance(plan, PrunePlan):
    raise TypeError(f"plan must be a PrunePlan, got {type(plan).__name__}")
  layers = layout_lib.find_moe_layers(checks.mapping("params", params), plan.layout)
  missing, extra = sorted(set(plan.layers) - set(layers)), sorted(set(layers) - set(plan.layers))
  if missing or extra:
    raise ValueError(f"plan and params disagree on MoE layers: plan layers not in params "
                     f"{missing}, params layers not in plan {extra}")
  for name, layer_plan in plan.layers.items():
    if layer_plan.num_experts != layers[name].num_experts:
      raise ValueError(f"plan for {name!r} expects E={layer_plan.num_experts}, params have "
                       f"{layers[name].num_experts}")
    layer_plan.permutations(layers[name].d_ff)  # checks the permutations' length
  validate.equal_scanned_counts(plan.num_experts,
                                validate.scanned_blocks(layers, plan.layout), "the plan")
  validate.finite_weights(layers)
  flat = dict(layout_lib.flatten_params(params))
  stacks: dict[layout_lib.Path, Any] = {}
  for name, layer_plan in plan.layers.items():
    block, index = (layout_lib.split_scanned_name(name) if plan.layout.scan_axis is not None
                    else (name, None))
    prefix = layout_lib.split_path(block)
    for field_name, array in _pruned_layer(layers[name], layer_plan, plan, name).items():
      path = prefix + layout_lib.split_path(getattr(plan.layout, field_name))
      if index is None:
        flat[path] = _placed_like(array, flat[path])
      else:
        _stack_layer(stacks, path, index, array, flat[path].shape[plan.layout.scan_axis],
                     plan.layout.scan_axis)
  for path, stack in stacks.items():  # scanned blocks: the pruned layers, re-stacked
    stacked = stack if isinstance(stack, np.ndarray) else jnp.stack(stack, plan.layout.scan_axis)
    flat[path] = _placed_like(stacked, flat[path])
  pruned = flax.traverse_util.unflatten_dict(flat)
  return flax.core.freeze(pruned) if isinstance(params, flax.core.FrozenDict) else pruned


def _stack_layer(stacks: dict[layout_lib.Path, Any], path: layout_lib.Path, index: int,
                 array: Any, num_layers: int, axis: int) -> None:
  """Puts a pruned layer of a scanned weight at `index` of its stack on `axis`: numpy
  layers straight into one preallocated array (no second copy), jax layers in a list."""
  if path not in stacks:
    if isinstance(array, np.ndarray):
      shape = array.shape[:axis] + (num_layers,) + array.shape[axis:]
      stacks[path] = np.empty(shape, array.dtype)
    else:
      stacks[path] = [None] * num_layers
  if isinstance(stacks[path], np.ndarray):
    stacks[path][(slice(None),) * axis + (index,)] = np.asarray(array)
  else:
    stacks[path][index] = array


def _placed_like(new: Any, old: Any) -> Any:
  """`new` on the devices of `old`: its sharding if the new shape allows, else replicated
  over the same mesh (numpy stays numpy)."""
  if not isinstance(old, jax.Array) or not isinstance(new, jax.Array):
    return new
  sharding = old.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    try:
      sharding.shard_shape(new.shape)
    except ValueError:  # e.g. D experts not divisible by the expert axis
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  elif len(sharding.device_set) > 1 or new.ndim != old.ndim:
    return new
  return jax.device_put(new, sharding)


def _pruned_layer(weights: layout_lib.MoeLayerWeights, layer_plan: LayerPlan,
                  plan: PrunePlan, name: str) -> dict[str, Any]:
  merge = layer_plan.merge_matrix()
  permutations = layer_plan.permutations(weights.d_ff)
  new = {"wi_kernel": merge_lib.merge_experts(weights.wi_kernel, merge, permutations, 2),
         "wo_kernel": merge_lib.merge_experts(weights.wo_kernel, merge, permutations, 1)}
  if weights.wi_bias is not None:
    new["wi_bias"] = merge_lib.merge_experts(weights.wi_bias, merge, permutations, 1)
  if weights.gate_kernel is not None:  # gated experts: the gate's hidden units move along
    new["gate_kernel"] = merge_lib.merge_experts(weights.gate_kernel, merge, permutations, 2)
  if weights.gate_bias is not None:
    new["gate_bias"] = merge_lib.merge_experts(weights.gate_bias, merge, permutations, 1)
  if weights.wo_bias is not None:
    new["wo_bias"] = merge_lib.merge_experts(weights.wo_bias, merge)
  if methods_lib.get(plan.method).zero_outputs:  # a floor: the experts compute nothing
    for field_name in ("wo_kernel", "wo_bias"):
      if field_name in new:
        new[field_name] = new[field_name] * 0
  key = jax.random.fold_in(jax.random.key(plan.seed), methods_lib.layer_seed(name))
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
  """The model config for params pruned by `plan` (`configs.with_expert_counts`).

  A plan that keeps the same D in every layer gives `num_experts=D`; one that keeps
  different counts (MC-SMoE, per-layer targets) gives `layer_num_experts`. A plan with
  router "bind" keeps every router column, bound to its expert's cluster
  (`layer_router_maps`).

  Example:
    >>> pruned_config(configs.get("354m", num_experts=32), plan).num_experts
    8
  """
  if not isinstance(config, configs.ModelConfig):
    raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
  if not isinstance(plan, PrunePlan):
    raise TypeError(f"plan must be a PrunePlan, got {type(plan).__name__}")
  pruned = configs.with_expert_counts(config, plan.num_experts)
  if plan.router != "bind":
    return pruned
  by_block = {int(name.split("/")[0].removeprefix("layers_")): layer.labels
              for name, layer in plan.layers.items()}
  return dataclasses.replace(pruned, layer_router_maps=tuple(
      by_block[i] for i in pruned.moe_layers))
