"""Checks of the pruning API's arguments: everything is refused before any work.

Each function checks one argument of `plan_pruning` against the MoE layers found in the
params and returns it in the form the rest of the pipeline uses (numpy float32 logits,
{layer: int} targets, ...), or raises a ValueError/TypeError that names the argument,
what was expected and what was given.

Example:
  >>> layers = layout.find_moe_layers(params)
  >>> targets = validate.targets(8, layers)                 # {'layers_0/mlp': 8, ...}
  >>> logits = validate.router_logits(logits, layers)       # {'layers_0/mlp': [T, E] f32}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from uncurl_jax.pruning import clustering
from uncurl_jax.pruning import layout as layout_lib
from uncurl_jax.pruning import merge as merge_lib
from uncurl_jax.pruning import methods as methods_lib


def default_num_experts(num_experts: int) -> int:
  """The paper's threshold finding: reduce 4x up to 32 experts, 2x above.

  Example:
    >>> [default_num_experts(e) for e in (8, 32, 64, 128)]
    [2, 8, 32, 64]
  """
  return max(1, num_experts // 4) if num_experts <= 32 else num_experts // 2


def options(method: str, cluster: str, router: str | None, *, has_logits: bool,
            has_pretrained: bool) -> tuple[methods_lib.Method, str]:
  """The registered method and the router option (its default when `router` is None)."""
  spec = methods_lib.get(method)
  if cluster not in clustering.CLUSTER_METHODS:
    raise ValueError(f"cluster must be one of {clustering.CLUSTER_METHODS}, got {cluster!r}")
  if router is not None and router not in merge_lib.ROUTER_MODES:
    raise ValueError(f"router must be one of {merge_lib.ROUTER_MODES} or None, got {router!r}")
  if spec.needs_pretrained and not has_pretrained:
    raise ValueError(f"method {method!r} needs pretrained_params= (the router before "
                     "finetuning) to measure the change of router-column norms")
  if not spec.needs_pretrained and has_pretrained:
    raise ValueError(f"pretrained_params is only used by methods that need it, not {method!r}")
  if spec.needs_logits and not has_logits:
    free = [m for m in methods_lib.names() if not methods_lib.get(m).needs_logits]
    raise ValueError(f"method {method!r} needs router logits; only {free} accept logits=None")
  return spec, router or spec.default_router


def router_logits(logits: Any, layers: Mapping[str, layout_lib.MoeLayerWeights]
                  ) -> dict[str, np.ndarray] | None:
  """{layer: [tokens, E] float32} with one finite, non-empty entry per MoE layer."""
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
  for name, target in chosen.items():
    e = layers[name].num_experts
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
      raise TypeError(f"num_experts for layer {name!r} must be an int, got {target!r}")
    if not 1 <= target <= e:
      raise ValueError(f"num_experts for layer {name!r} must be in [1, E={e}], got {target}")
  return {name: int(target) for name, target in chosen.items()}


def top_k(value: Any, layers: Mapping[str, layout_lib.MoeLayerWeights]) -> int:
  """The router choices counted per token, in [1, E] for every layer."""
  for name, weights in layers.items():
    if not 1 <= value <= weights.num_experts:
      raise ValueError(f"top_k must be in [1, E={weights.num_experts}] (layer {name!r}), "
                       f"got {value}")
  return value


def pretrained_router(pretrained_params: Any, layers: Mapping[str, layout_lib.MoeLayerWeights],
                      layout: layout_lib.MoeLayout) -> dict[str, np.ndarray] | None:
  """{layer: [d, E] pretrained router kernel}, shaped like the finetuned one."""
  if pretrained_params is None:
    return None
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
