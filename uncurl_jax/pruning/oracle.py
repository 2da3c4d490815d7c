"""Oracle expert selection: the experts that score best, found greedily with a black-box score.

Not a pruning method (it needs the task's labels and a model to score) but an
approximation of what a selection could at best achieve: the study's ceiling arm (greedy
forward selection is not the optimum, and a small scoring split adds noise). Per MoE layer
in order, the
kept set grows from empty one expert at a time, each time by the expert whose addition
scores highest; the layers not visited yet keep every expert, the visited ones their
selection. The score sees 0/1 masks over each layer's router columns; evaluated with the
gates bound (the model's `routing`/`column_mask`, `router.route_tokens`) and without
dropping tokens, a mask is exactly the pruned model that keeps those experts with its
router bound (method "selection", router "bind").

Example:
  >>> kept, trace = greedy_selection(dev_score, {"layers_0/mlp": 32, "layers_2/mlp": 32},
  ...                                {"layers_0/mlp": 8, "layers_2/mlp": 8})
  >>> plan = plan_pruning(params, None, method="selection", selection=kept)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from uncurl_jax import checks


def greedy_selection(score: Callable[[dict[str, np.ndarray]], Any],
                     num_experts: Mapping[str, int], targets: Mapping[str, int]
                     ) -> tuple[dict[str, tuple[int, ...]], list[tuple[str, int, Any]]]:
  """Greedy forward selection of `targets[layer]` experts per layer (module docstring).

  Args:
    score: {layer: [E] float32 0/1 mask} -> a comparable value, higher is better (e.g.
      (accuracy, mean log-likelihood) on a development split: ties in the first broken by
      the second). Called sum_d (E - d + 1) times per layer.
    num_experts: {layer: E}, in the order the layers are visited.
    targets: {layer: D} with 1 <= D <= E.

  Returns:
    ({layer: the kept experts, ascending}, [(layer, expert added, its score)] in order).
    Ties go to the lower expert index.
  """
  if not callable(score):
    raise TypeError(f"score must be callable, got {type(score).__name__}")
  if not isinstance(num_experts, Mapping):
    raise TypeError(f"num_experts must be a mapping {{layer: E}}, got "
                    f"{type(num_experts).__name__}")
  if not isinstance(targets, Mapping):
    raise TypeError(f"targets must be a mapping {{layer: D}}, got {type(targets).__name__}")
  if set(targets) != set(num_experts):
    raise ValueError(f"targets {sorted(targets)} and num_experts {sorted(num_experts)} must "
                     "name the same layers")
  num_experts = {name: checks.integer(f"num_experts for {name!r}", count, low=1)
                 for name, count in num_experts.items()}
  targets = {name: checks.integer(f"target for {name!r}", targets[name], low=1,
                                  high=num_experts[name]) for name in num_experts}
  masks = {name: np.ones(count, np.float32) for name, count in num_experts.items()}
  kept: dict[str, tuple[int, ...]] = {}
  trace: list[tuple[str, int, Any]] = []
  for name, count in num_experts.items():
    chosen: list[int] = []
    for _ in range(int(targets[name])):
      best, best_value = None, None
      for candidate in range(count):
        if candidate in chosen:
          continue
        mask = np.zeros(count, np.float32)
        mask[chosen + [candidate]] = 1.0
        value = score({**masks, name: mask})
        if best_value is None or value > best_value:
          best, best_value = candidate, value
      chosen.append(best)
      trace.append((name, best, best_value))
    kept[name] = tuple(sorted(chosen))
    masks[name] = np.zeros(count, np.float32)
    masks[name][list(chosen)] = 1.0
  return kept, trace
