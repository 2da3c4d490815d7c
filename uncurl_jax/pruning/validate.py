"""Checks of the pruning API's arguments: everything is refused before any work.

Each check names the argument, what was expected and what was given, and raises a
TypeError (wrong kind of value) or a ValueError (right kind, wrong value). The argument
checks of `plan_pruning` return the argument in the form the pipeline uses (numpy
float32 logits, {layer: int} targets, ...); the scalar checks are the package's own
(`uncurl_jax.checks`).

Example:
  >>> layers = layout.find_moe_layers(params)
  >>> targets = validate.targets(8, layers)                 # {'layers_0/mlp': 8, ...}
  >>> logits = validate.router_logits(logits, layers)       # {'layers_0/mlp': [T, E] f32}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uncurl_jax.checks import choice
from uncurl_jax.checks import integer
from uncurl_jax.checks import mapping
from uncurl_jax.checks import real
from uncurl_jax.pruning import clustering
from uncurl_jax.pruning import features
from uncurl_jax.model import layout as layout_lib
from uncurl_jax.pruning import merge as merge_lib
from uncurl_jax.pruning import methods as methods_lib


# The largest seed: scikit-learn's random_state and jax's keys take 32-bit seeds.
MAX_SEED = 2**32 - 1


# ------------------------------------------------------------------------------------------
# Arrays.


def float_matrix(name: str, value: Any, *, columns: int | None = None) -> np.ndarray:
  """A finite, non-empty [rows, columns] array of real numbers, as float32 numpy.

  Integers are numbers and are converted. Refuses ragged nesting, bool/complex/string
  dtypes, other ranks, no rows, NaN or infinite entries, and values beyond float32's range
  (pruning computes in float32: they would become infinite there).
  """
  try:
    array = np.asarray(value)
  except ValueError as error:  # ragged nesting
    raise ValueError(f"{name} must be a [tokens, E] array, got a ragged sequence") from error
  if array.dtype == object or array.dtype == bool or not (
      np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
  expected = "[tokens, E]" if columns is None else f"[tokens, E={columns}]"
  if array.ndim != 2 or (columns is not None and array.shape[1] != columns):
    raise ValueError(f"{name} must be {expected}, got shape {array.shape}")
  if array.shape[0] == 0:
    raise ValueError(f"{name} has no tokens")
  if np.issubdtype(array.dtype, np.integer):
    array = array.astype(np.float64)
  bad = int(np.sum(~np.isfinite(array)))
  if bad:
    raise ValueError(f"{name} has {bad} NaN or infinite values")
  limit = float(np.finfo(np.float32).max)
  # Only wider floats can exceed float32 (comparing float16 with the limit would overflow).
  beyond = int(np.sum(np.abs(array) > limit)) if float(np.finfo(array.dtype).max) > limit else 0
  if beyond:
    raise ValueError(f"{name} has {beyond} values beyond float32's range (|x| > {limit:.3g}); "
                     "router logits are used as float32")
  return array.astype(np.float32, copy=False)


def _all_finite(array: Any) -> bool:
  if isinstance(array, np.ndarray) and array.ndim > 1:
    # Host arrays one expert at a time: no device copy of a layer (whose isfinite would
    # take as much again), for checkpoints pruned layer by layer.
    return all(bool(jnp.all(jnp.isfinite(jnp.asarray(expert)))) for expert in array)
  return bool(jax.device_get(jnp.all(jnp.isfinite(jnp.asarray(array)))))


def finite_weights(layers: Mapping[str, layout_lib.MoeLayerWeights], what: str = "params"
                   ) -> None:
  """Raises ValueError naming the first MoE weight with NaN or infinite entries."""
  for name, weights in layers.items():
    for field in dataclasses.fields(weights):
      array = getattr(weights, field.name)
      if array is None:
        continue
      if not _all_finite(array):
        raise ValueError(f"{what}: {field.name} of MoE layer {name!r} has NaN or infinite "
                         "values")


# ------------------------------------------------------------------------------------------
# The arguments of plan_pruning.


def default_num_experts(num_experts: int) -> int:
  """The paper's threshold finding: reduce 4x up to 32 experts, 2x above.

  Example:
    >>> [default_num_experts(e) for e in (8, 32, 64, 128)]
    [2, 8, 32, 64]
  """
  num_experts = integer("num_experts", num_experts, low=1)
  return max(1, num_experts // 4) if num_experts <= 32 else num_experts // 2


def options(method: Any, cluster: Any, router: Any, *, has_logits: bool, has_stats: bool,
            has_pretrained: bool, features_from: Any = "router_logits",
            has_selection: bool = False) -> tuple[methods_lib.Method, str]:
  """The registered method and the router option (its default when `router` is None)."""
  spec = methods_lib.get(method)
  choice("cluster", cluster, clustering.CLUSTER_METHODS)
  choice("features", features_from, methods_lib.FEATURES)
  if (spec.needs_stats or features_from == "expert_outputs") and not has_stats:
    raise ValueError(f"method {method!r} (features={features_from!r}) needs expert statistics: "
                     "pass the ExpertStats of `collect_expert_stats` instead of router logits")
  if router is not None:
    choice("router", router, merge_lib.ROUTER_MODES)
  if spec.needs_pretrained and not has_pretrained:
    raise ValueError(f"method {method!r} needs pretrained_params= (the router before "
                     "finetuning) to measure the change of router-column norms")
  if not spec.needs_pretrained and has_pretrained:
    raise ValueError(f"pretrained_params is only used by methods that need it, not {method!r}")
  if spec.needs_selection != has_selection:
    raise ValueError(f"selection= (the experts to keep per layer) is given with method "
                     f"'selection' and only with it; got method {method!r} "
                     f"{'with' if has_selection else 'without'} a selection")
  if spec.needs_logits and not has_logits:
    free = [m for m in methods_lib.names() if not methods_lib.get(m).needs_logits]
    raise ValueError(f"method {method!r} needs router logits; only {free} accept logits=None")
  return spec, router or spec.default_router


def per_layer_mapping(name: str, value: Any, layers: Mapping[str, Any], what: str) -> None:
  """Raises unless `value` is a mapping with one entry per MoE layer of `layers`."""
  if not isinstance(value, Mapping):
    raise TypeError(f"{name} must be a mapping {{layer path: {what}}}, got "
                    f"{type(value).__name__}")
  missing, extra = sorted(set(layers) - set(value)), sorted(set(value) - set(layers))
  if missing or extra:
    raise ValueError(f"{name} must have one entry per MoE layer {sorted(layers)}: missing "
                     f"{missing}, extra {extra}")


def selection(kept: Any, layers: Mapping[str, layout_lib.MoeLayerWeights]
              ) -> dict[str, tuple[int, ...]] | None:
  """{layer: sorted distinct expert indices in [0, E)}, one non-empty entry per MoE layer."""
  if kept is None:
    return None
  per_layer_mapping("selection", kept, layers, "expert indices")
  out = {}
  for name, weights in layers.items():
    experts = np.asarray(kept[name])
    if (experts.ndim != 1 or not experts.size or not np.issubdtype(experts.dtype, np.integer)
        or len(set(experts.tolist())) != experts.size or experts.min() < 0
        or experts.max() >= weights.num_experts):
      raise ValueError(f"selection[{name!r}] must be distinct expert indices in [0, "
                       f"{weights.num_experts}), at least one; got {kept[name]!r}")
    out[name] = tuple(sorted(int(e) for e in experts))
  return out


def router_logits(logits: Any, layers: Mapping[str, layout_lib.MoeLayerWeights]
                  ) -> dict[str, np.ndarray] | None:
  """{layer: [tokens, E] float32} with one finite, non-empty entry per MoE layer.

  The entries may be `ExpertStats` (their `logits` are taken).
  """
  if logits is None:
    return None
  per_layer_mapping("logits", logits, layers, "[tokens, E] array or ExpertStats")
  return {name: float_matrix(f"logits[{name!r}]", _logits_of(logits[name]),
                             columns=weights.num_experts)
          for name, weights in layers.items()}


def _logits_of(value: Any) -> Any:
  return value.logits if isinstance(value, features.ExpertStats) else value


def expert_stats(logits: Any, layers: Mapping[str, layout_lib.MoeLayerWeights]
                 ) -> dict[str, features.ExpertStats] | None:
  """{layer: ExpertStats} when `logits` holds statistics (checked), else None."""
  if not isinstance(logits, Mapping) or not any(
      isinstance(v, features.ExpertStats) for v in logits.values()):
    return None
  checked = {}
  for name, weights in layers.items():
    stats = logits[name]
    if not isinstance(stats, features.ExpertStats):
      raise TypeError(f"logits[{name!r}] must be ExpertStats like the other layers', got "
                      f"{type(stats).__name__}")
    e = weights.num_experts
    shapes = {"top1_counts": (e,), "topk_counts": (e,), "reap": (e,),
              "mean_output": (e, weights.wi_kernel.shape[1])}
    for field, shape in shapes.items():
      value = np.asarray(getattr(stats, field))
      if value.shape != shape or not np.all(np.isfinite(value)):
        raise ValueError(f"logits[{name!r}].{field} must be finite with shape {shape}, got "
                         f"shape {value.shape}")
    checked[name] = stats
  return checked


def targets(num_experts: Any, layers: Mapping[str, layout_lib.MoeLayerWeights]
            ) -> dict[str, int]:
  """{layer: D} from an int, a {layer: int} mapping or None (the paper's default)."""
  if num_experts is None:
    chosen = {name: default_num_experts(w.num_experts) for name, w in layers.items()}
  elif isinstance(num_experts, Mapping):
    missing = sorted(set(layers) - set(num_experts))
    extra = sorted(set(num_experts) - set(layers))
    if missing or extra:
      raise ValueError(f"num_experts must have one entry per MoE layer: missing {missing}, "
                       f"extra {extra}")
    chosen = {name: num_experts[name] for name in layers}
  else:
    chosen = {name: num_experts for name in layers}
  checked = {}
  for name, target in chosen.items():
    target, e = integer(f"num_experts for layer {name!r}", target), layers[name].num_experts
    if not 1 <= target <= e:
      raise ValueError(f"num_experts for layer {name!r} must be in [1, E={e}], got {target}")
    checked[name] = target
  return checked


# ------------------------------------------------------------------------------------------
# Scanned blocks (a layout with a scan axis): one array per weight for all of a block's layers.


def scanned_blocks(layers: Mapping[str, Any], layout: layout_lib.MoeLayout
                   ) -> dict[str, list[str]]:
  """{scanned block path: its layers' keys 'P[0]', 'P[1]', ...}; empty without a scan axis."""
  if layout.scan_axis is None:
    return {}
  blocks: dict[str, list[str]] = {}
  for name in layers:
    block, index = layout_lib.split_scanned_name(name)
    if index is not None:
      blocks.setdefault(block, []).append(name)
  return blocks


def scanned_logits(logits: Any, blocks: Mapping[str, list[str]]) -> Any:
  """`logits` with each scanned block's one [L, tokens, E] array (keyed by the block's
  path) split into its layers' [tokens, E] entries; other entries are left as they are."""
  if not blocks or not isinstance(logits, Mapping) or not set(blocks) & set(logits):
    return logits
  out = {}
  for key, value in logits.items():
    if key not in blocks:
      out[key] = value
      continue
    names = blocks[key]
    both = [name for name in names if name in logits]
    if both:
      raise ValueError(f"logits has the scanned block {key!r} ([L, tokens, E]) and also its "
                       f"layers {both}; give one or the other")
    if isinstance(value, features.ExpertStats):
      raise TypeError(f"logits[{key!r}]: a scanned block takes one [L={len(names)}, tokens, "
                      f"E] array; give ExpertStats per layer ({names[0]!r}, ...)")
    try:
      array = np.asarray(value)
    except ValueError as error:  # ragged nesting
      raise ValueError(f"logits[{key!r}] must be an [L={len(names)}, tokens, E] array, got a "
                       "ragged sequence") from error
    if array.ndim != 3 or array.shape[0] != len(names):
      raise ValueError(f"logits[{key!r}] of the scanned block must be [L={len(names)}, "
                       f"tokens, E] (the router logits of its layers in order), got shape "
                       f"{array.shape}")
    out.update(zip(names, array))
  return out


def scanned_targets(num_experts: Any, blocks: Mapping[str, list[str]]) -> Any:
  """`num_experts` with a scanned block's path standing for each of its layers."""
  if not blocks or not isinstance(num_experts, Mapping) or not set(blocks) & set(num_experts):
    return num_experts
  out = {}
  for key, value in num_experts.items():
    if key not in blocks:
      out[key] = value
      continue
    both = [name for name in blocks[key] if name in num_experts]
    if both:
      raise ValueError(f"num_experts has the scanned block {key!r} and also its layers "
                       f"{both}; give one or the other")
    out.update({name: value for name in blocks[key]})
  return out


def equal_scanned_counts(counts: Mapping[str, int], blocks: Mapping[str, list[str]],
                         what: str) -> None:
  """Raises ValueError unless every scanned block keeps one expert count in all its layers."""
  for block, names in blocks.items():
    kept = {name: counts[name] for name in names if name in counts}
    if len(set(kept.values())) > 1:
      raise ValueError(
          f"{what} keeps uneven expert counts in the scanned block {block!r}: {kept}; its "
          "layers are stacked in one array per weight, which holds one count for all of "
          "them: give every layer of the block the same count")


def scanned_method(spec: methods_lib.Method, blocks: Mapping[str, list[str]]) -> None:
  """Refuses a method that allocates different counts per layer when a block is scanned."""
  stacked = sorted(block for block, names in blocks.items() if len(names) > 1)
  if spec.uneven_counts and stacked:
    raise ValueError(
        f"method {spec.name!r} keeps a different number of experts in each layer, which the "
        f"scanned blocks {stacked} cannot hold (one array per weight for all their layers); "
        "choose a method that keeps the count you give")


def top_k(value: Any, layers: Mapping[str, layout_lib.MoeLayerWeights]) -> int:
  """The router choices counted per token, in [1, E] for every layer."""
  value, e = integer("top_k", value), min(w.num_experts for w in layers.values())
  if not 1 <= value <= e:
    raise ValueError(f"top_k must be in [1, E={e}], got {value}")
  return value


def pretrained_router(pretrained_params: Any, layers: Mapping[str, layout_lib.MoeLayerWeights],
                      layout: layout_lib.MoeLayout) -> dict[str, np.ndarray] | None:
  """{layer: [d, E] pretrained router kernel}, shaped like the finetuned one."""
  if pretrained_params is None:
    return None
  pretrained = layout_lib.find_moe_layers(mapping("pretrained_params", pretrained_params),
                                          layout)
  if set(pretrained) != set(layers):
    raise ValueError(f"pretrained_params has MoE layers {sorted(pretrained)}, params have "
                     f"{sorted(layers)}")
  kernels = {}
  for name, weights in layers.items():
    kernel = np.asarray(pretrained[name].router_kernel)
    if kernel.shape != tuple(weights.router_kernel.shape):
      raise ValueError(f"pretrained router of {name!r} has shape {kernel.shape}, finetuned "
                       f"{tuple(weights.router_kernel.shape)}")
    if not np.all(np.isfinite(kernel)):
      raise ValueError(f"pretrained_params: the router of {name!r} has NaN or infinite values")
    kernels[name] = kernel
  return kernels


def scalars(*, seed: Any, router_init_std: Any, num_workers: Any, layout: Any,
            timings: Any) -> None:
  """The scalar keyword arguments of `plan_pruning`."""
  if integer("seed", seed, low=0) > MAX_SEED:
    raise ValueError(f"seed must be at most {MAX_SEED} (a 32-bit seed), got {seed}")
  real("router_init_std", router_init_std, positive=True)
  if num_workers is not None:
    integer("num_workers", num_workers, low=0)
  if not isinstance(layout, layout_lib.MoeLayout):
    raise TypeError(f"layout must be a MoeLayout, got {type(layout).__name__}")
  if timings is not None and not isinstance(timings, dict):
    raise TypeError(f"timings must be None or a dict, got {type(timings).__name__}")
