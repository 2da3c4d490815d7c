"""Finetuning schedules: router-only warm-up phases and progressive expert dropping.

Router-only warm-up (UNCURL paper, docs/paper.md): a pruned model first trains only its
routers for `router_warmup_steps` steps, every other parameter frozen (no update, no
weight decay, no optimizer state), its learning rate starting at the peak and decaying
linearly over the warm-up; then everything trains with a fresh optimizer whose schedule
(warm-up, decay) starts at the warm-up's end.

Progressive expert dropping (Chen et al. 2022, arXiv 2206.00277). The exact
schedule is not public; this module's choice, all of it configurable:

* Drop events at steps `first_drop_step + k * drop_every_steps` (k = 0, 1, ...). At each
  event every MoE layer keeps `max(target, ceil(keep_fraction * current))` experts
  (halving by default: 32 -> 16 -> 8 -> ... -> target), until `target_experts` are left.
* Which experts: the highest "proficiency" on the task, measured at the event on a fixed
  set of training batches (the probe). Proficiency mixes the two signals the paper names,
  the share of tokens routed to an expert and the router's gate weight on them:
  proficiency_e = (1 / T) * sum over tokens t routed (top-1) to e of softmax(h_t)_e.
  A fixed probe makes the decision a function of the parameters at the event step only,
  so a resumed run drops exactly the experts the uninterrupted run dropped.
* Dropping slices the experts and the router columns of the parameters and of the
  optimizer state (Adam moments stay attached to their experts); the optimizer schedule
  continues.

Example:
  >>> phases = schedules.training_phases(train_steps=1000, router_warmup_steps=50)
  >>> [(p.name, p.start_step, p.end_step) for p in phases]
  [('router_warmup', 0, 50), ('full', 50, 1000)]
  >>> dropping = schedules.ProgressiveDropping(first_drop_step=100, drop_every_steps=100)
  >>> dropping.schedule(num_experts=8)
  [(100, 4), (200, 2), (300, 1)]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uncurl_jax.model import layout as layout_lib


def _expert_axes() -> dict[tuple[str, ...], int]:
  """{path suffix: expert axis} of an MoE layer's leaves in this project's layout."""
  layout = layout_lib.DEFAULT_LAYOUT
  return {layout_lib.split_path(path): -1 if field.startswith("router") else 0
          for field, path in layout.named_paths().items()}


def router_only(params: Any) -> Any:
  """Pytree of bools shaped like `params`: True for router weights only.

  Pass as `optim.make_optimizer(trainable=router_only)` to freeze everything else.

  Example:
    >>> router_only({"mlp": {"router": {"kernel": w}, "expert": {"wi": {"kernel": v}}}})
    {'mlp': {'router': {'kernel': True}, 'expert': {'wi': {'kernel': False}}}}
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "router" for k in path), params)


@dataclasses.dataclass(frozen=True)
class TrainingPhase:
  """Steps [start_step, end_step) trained with one optimizer.

  Attributes:
    name: 'router_warmup' or 'full'.
    start_step, end_step: The phase's steps.
    trainable: params -> pytree of bools for `make_optimizer(trainable=...)`; None
      trains everything.
  """

  name: str
  start_step: int
  end_step: int
  trainable: Callable[[Any], Any] | None = None

  @property
  def num_steps(self) -> int:
    return self.end_step - self.start_step


def training_phases(*, train_steps: int, router_warmup_steps: int = 0) -> tuple[TrainingPhase, ...]:
  """The router-only warm-up (if any) followed by full training up to `train_steps`
  (none when the warm-up takes every step: a router-only run).

  Example:
    >>> [p.name for p in training_phases(train_steps=10)]
    ['full']
    >>> [p.name for p in training_phases(train_steps=10, router_warmup_steps=10)]
    ['router_warmup']
  """
  if train_steps < 1:
    raise ValueError(f"train_steps must be >= 1, got {train_steps}")
  if not 0 <= router_warmup_steps <= train_steps:
    raise ValueError(f"router_warmup_steps must be in [0, train_steps={train_steps}], "
                     f"got {router_warmup_steps}")
  full = TrainingPhase("full", router_warmup_steps, train_steps)
  if router_warmup_steps == 0:
    return (full,)
  warmup = TrainingPhase("router_warmup", 0, router_warmup_steps, router_only)
  return (warmup,) if router_warmup_steps == train_steps else (warmup, full)


def phase_index(phases: Sequence[TrainingPhase], step: int) -> int:
  """Index of the phase that trains the step after `step` (start_step <= step < end_step).

  `step` = the last phase's end (training is over) maps to the last phase.
  """
  for index, phase in enumerate(phases):
    if phase.start_step <= step < phase.end_step:
      return index
  if step == phases[-1].end_step:
    return len(phases) - 1
  raise ValueError(f"step {step} is outside the phases [{phases[0].start_step}, "
                   f"{phases[-1].end_step}]")


def checkpoint_phase_index(phases: Sequence[TrainingPhase], step: int) -> int:
  """Index of the phase whose optimizer state a checkpoint of `step` carries.

  A checkpoint at a phase boundary (step == end_step) was written by the phase that
  ended there; resuming from it starts the next phase with a fresh optimizer.
  """
  for index, phase in enumerate(phases):
    if phase.start_step < step <= phase.end_step:
      return index
  if step == phases[0].start_step:
    return 0
  raise ValueError(f"step {step} is outside the phases [{phases[0].start_step}, "
                   f"{phases[-1].end_step}]")


@dataclasses.dataclass(frozen=True)
class ProgressiveDropping:
  """Progressive expert dropping during finetuning (see the module docstring).

  Attributes:
    first_drop_step: Step of the first drop event (after that many updates).
    drop_every_steps: Steps between drop events.
    target_experts: Experts per MoE layer left at the end (Chen et al.: 1).
    keep_fraction: Fraction of the current experts kept at each event, in (0, 1).
    probe_batches: Training batches on which proficiency is measured at each event.
  """

  first_drop_step: int
  drop_every_steps: int
  target_experts: int = 1
  keep_fraction: float = 0.5
  probe_batches: int = 4

  def __post_init__(self):
    if self.first_drop_step < 0 or self.drop_every_steps < 1:
      raise ValueError(f"need first_drop_step >= 0 and drop_every_steps >= 1, got "
                       f"{self.first_drop_step} and {self.drop_every_steps}")
    if self.target_experts < 1:
      raise ValueError(f"target_experts must be >= 1, got {self.target_experts}")
    if not 0.0 < self.keep_fraction < 1.0:
      raise ValueError(f"keep_fraction must be in (0, 1), got {self.keep_fraction}")
    if self.probe_batches < 1:
      raise ValueError(f"probe_batches must be >= 1, got {self.probe_batches}")

  def schedule(self, *, num_experts: int) -> list[tuple[int, int]]:
    """[(step, experts kept from that step on), ...] starting from `num_experts`."""
    if num_experts < self.target_experts:
      raise ValueError(f"the model has {num_experts} experts, fewer than "
                       f"target_experts={self.target_experts}")
    events, count, step = [], num_experts, self.first_drop_step
    while count > self.target_experts:
      count = max(self.target_experts, math.ceil(self.keep_fraction * count))
      events.append((step, count))
      step += self.drop_every_steps
    return events

  def experts_at(self, step: int, *, num_experts: int) -> int:
    """Experts per layer once the drop events up to and including `step` happened."""
    kept = [count for event_step, count in self.schedule(num_experts=num_experts)
            if event_step <= step]
    return kept[-1] if kept else num_experts


def expert_proficiency(router_logits: np.ndarray) -> np.ndarray:
  """[E] gate-weighted share of the tokens routed (top-1) to each expert.

  Args:
    router_logits: [tokens, E] raw router logits of one MoE layer (padding excluded).

  Example (token 0 goes to expert 0 with gate 0.88, token 1 ties and goes to expert 0
  with gate 0.5):
    >>> expert_proficiency(np.array([[2., 0.], [0., 0.]]))
    array([0.69, 0.  ])
  """
  logits = np.asarray(router_logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] == 0:
    raise ValueError(f"router_logits must be [tokens > 0, E], got shape {logits.shape}")
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  chosen = probs.argmax(axis=1)
  gate = probs[np.arange(len(chosen)), chosen]
  return np.bincount(chosen, weights=gate, minlength=logits.shape[1]) / len(chosen)


def experts_to_keep(router_logits: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
  """{layer path: sorted indices of its `count` most proficient experts}.

  Ties go to the lower index, so the choice is deterministic.
  """
  keep = {}
  for layer, logits in router_logits.items():
    proficiency = expert_proficiency(logits)
    if not 1 <= count <= len(proficiency):
      raise ValueError(f"cannot keep {count} of the {len(proficiency)} experts of {layer}")
    order = np.lexsort((np.arange(len(proficiency)), -proficiency))
    keep[layer] = np.sort(order[:count])
  return keep


def keep_experts(tree: Any, keep: Mapping[str, np.ndarray]) -> Any:
  """Slices the experts of each MoE layer named in `keep` out of a params-like pytree.

  Works on params and on optimizer states (Adam's mu/nu repeat the params' dict paths):
  a leaf whose dict-key path ends with '<layer>/router/kernel' loses router columns,
  one ending with '<layer>/expert/...' loses experts along axis 0. Other leaves pass.

  Example:
    >>> small = keep_experts(params, {"layers_0/mlp": np.array([1, 3])})
  """
  prefixes = {tuple(layer.split("/")): np.asarray(indices) for layer, indices in keep.items()}
  expert_axes = _expert_axes()

  def slice_leaf(path, leaf):
    keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    for prefix, indices in prefixes.items():
      for suffix, axis in expert_axes.items():
        if keys[-len(prefix) - len(suffix):] == prefix + suffix:
          take = np.take if isinstance(leaf, np.ndarray) else jnp.take  # numpy stays numpy
          return take(leaf, indices, axis=axis)
    return leaf

  return jax.tree_util.tree_map_with_path(slice_leaf, tree)
