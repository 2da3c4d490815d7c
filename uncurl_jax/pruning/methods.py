"""The pruning methods: a registry of per-layer decisions (which old experts form each new one).

A method is one `Method` entry: its name, whether it needs task statistics (router
logits) or the pretrained router, whether it merges experts or only selects them, the
router option it defaults to, and its `group` function. `group` sees every MoE layer at
once (a `MethodInputs`) and returns a `Grouping` per layer: labels, anchors, and which
members to align to which reference. Merge weights then follow from the selection
frequencies (`merge_weights`). New experts are numbered by ascending anchor index, so a
plan that keeps every expert keeps them in their original order.

Adding a method is one `register(Method(...))` call; `plan_pruning(method=name)` then
runs it like the built-in ones.

Example:
  >>> method = methods.get("uncurl")
  >>> groupings = method.group(MethodInputs(layers=layers, targets={"layers_0/mlp": 4}, ...))
  >>> weights = merge_weights(groupings["layers_0/mlp"].labels, frequencies)
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping

import numpy as np

from uncurl_jax.pruning import clustering
from uncurl_jax.pruning import features
from uncurl_jax.model import layout as layout_lib

@dataclasses.dataclass(frozen=True)
class Grouping:
  """Which old experts make up each new expert of one layer.

  Attributes:
    labels: [E] new expert of each old one, in [0, D); -1 drops it.
    anchors: [D] ascending; anchors[c] has label c.
    references: {member: expert it is aligned to} for the members to permute.
  """

  labels: np.ndarray
  anchors: np.ndarray
  references: dict[int, int]


def _ordered(labels: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Renumbers clusters by ascending anchor."""
  order = np.argsort(anchors, kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  new_labels = np.where(labels >= 0, rank[np.maximum(labels, 0)], -1)
  return new_labels.astype(np.int64), np.asarray(anchors)[order].astype(np.int64)


def _align_to_anchors(labels: np.ndarray, anchors: np.ndarray) -> dict[int, int]:
  return {int(e): int(anchors[label]) for e, label in enumerate(labels)
          if label >= 0 and e != anchors[label]}


def selection_grouping(kept: np.ndarray, num_experts: int) -> Grouping:
  """Keeps the experts `kept` as they are and drops the rest (no merging)."""
  kept = np.sort(np.asarray(kept, np.int64))
  labels = np.full(num_experts, -1, np.int64)
  labels[kept] = np.arange(len(kept))
  return Grouping(labels, kept, {})


def uncurl_grouping(similarity: np.ndarray, frequencies: np.ndarray, num_kept: int, *,
                    cluster: str, seed: int) -> Grouping:
  """UNCURL: cluster on router-logit similarity, anchor = most selected member."""
  labels = clustering.cluster_experts(similarity, num_kept, method=cluster, seed=seed)
  anchors = clustering.cluster_anchors(labels, frequencies)
  labels, anchors = _ordered(labels, anchors)
  return Grouping(labels, anchors, _align_to_anchors(labels, anchors))


def frequency_grouping(frequencies: np.ndarray, num_kept: int) -> Grouping:
  """Frequency pruning: keep the `num_kept` most selected experts."""
  return selection_grouping(clustering.top_experts(frequencies, num_kept), len(frequencies))


def frequency_merge_grouping(similarity: np.ndarray, frequencies: np.ndarray,
                             num_kept: int) -> Grouping:
  """Frequency-based merging: top experts anchor, every other joins the most similar."""
  anchors = clustering.top_experts(frequencies, num_kept)
  labels = clustering.nearest_anchor_labels(similarity, anchors)
  return Grouping(labels, anchors, _align_to_anchors(labels, anchors))


def mc_smoe_grouping(similarity: np.ndarray, dominant: np.ndarray) -> Grouping:
  """MC-SMoE: non-dominant experts join the most similar dominant expert.

  As in MC-SMoE's weight matching, every expert of a merged group is aligned to expert 0
  of the layer (so all members share expert 0's hidden-unit order), not to its anchor.
  Experts alone in their group are left as they are (a permutation would not change
  their function).
  """
  anchors = np.sort(np.asarray(dominant, np.int64))
  labels = clustering.nearest_anchor_labels(similarity, anchors)
  sizes = np.bincount(labels, minlength=len(anchors))
  references = {int(e): 0 for e, label in enumerate(labels) if e != 0 and sizes[label] > 1}
  return Grouping(labels, anchors, references)


def router_norm_grouping(finetuned_kernel: np.ndarray, pretrained_kernel: np.ndarray,
                         num_kept: int) -> Grouping:
  """Router-norm change (Chowdhury et al. 2024): drop the smallest signed norm change.

  delta_s = ||W_finetuned[:, s]||_2 - ||W_pretrained[:, s]||_2; the `num_kept` experts
  with the largest delta are kept.
  """
  delta = router_norm_change(finetuned_kernel, pretrained_kernel)
  return selection_grouping(clustering.top_experts(delta, num_kept), len(delta))


def router_norm_change(finetuned_kernel: np.ndarray, pretrained_kernel: np.ndarray) -> np.ndarray:
  """[E] signed change of the router columns' L2 norms from pretrained to finetuned."""
  norm = lambda k: np.linalg.norm(np.asarray(k, np.float64), axis=0)
  return norm(finetuned_kernel) - norm(pretrained_kernel)


def random_grouping(num_experts: int, num_kept: int, rng: np.random.Generator) -> Grouping:
  """Random pruning: keep `num_kept` experts drawn uniformly without replacement."""
  return selection_grouping(rng.choice(num_experts, num_kept, replace=False), num_experts)


def merge_weights(labels: np.ndarray, frequencies: np.ndarray | None) -> np.ndarray:
  """[E] frequency-weighted averaging weights: f_e / sum of f over e's cluster.

  A cluster whose members were never selected (or no frequencies) is averaged
  uniformly; dropped experts (label -1) get 0.

  Example:
    >>> merge_weights(np.array([0, 0, 1]), np.array([.1, .3, .6]))
    array([0.25, 0.75, 1.  ])
  """
  labels = np.asarray(labels)
  weights = np.zeros(len(labels), np.float64)
  for c in range(int(labels.max()) + 1):
    members = labels == c
    mass = 0.0 if frequencies is None else float(np.sum(frequencies[members]))
    if mass > 0:
      weights[members] = frequencies[members] / mass
    else:
      weights[members] = 1.0 / members.sum()
  return weights


# ----------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class MethodInputs:
  """What a method's `group` function sees: every MoE layer of the params at once.

  Attributes:
    layers: {layer path: its weights}, in the params' order.
    targets: {layer path: D, the experts it keeps}.
    logits: {layer path: [tokens, E] raw router logits on the task}, or None.
    frequencies: {layer path: [E] selection frequencies}, or None without logits.
    pretrained_router: {layer path: [d, E] router kernel before finetuning}, or None.
    stats: {layer path: ExpertStats} (`collect_expert_stats`), or None.
    cluster: Clustering algorithm for the methods that cluster.
    features: What "uncurl" clusters on: "router_logits" (the paper) or
      "expert_outputs" (the experts' mean outputs on the task, from `stats`).
    seed: Seed of the random decisions.
  """

  layers: Mapping[str, layout_lib.MoeLayerWeights]
  targets: Mapping[str, int]
  logits: Mapping[str, np.ndarray] | None = None
  frequencies: Mapping[str, np.ndarray] | None = None
  pretrained_router: Mapping[str, np.ndarray] | None = None
  stats: Mapping[str, features.ExpertStats] | None = None
  cluster: str = "spectral"
  features: str = "router_logits"
  seed: int = 0
  selection: Mapping[str, tuple[int, ...]] | None = None

  @functools.cached_property
  def similarities(self) -> dict[str, np.ndarray]:
    """{layer: [E, E] affinity of the experts}, computed on first use: of their router
    logits (the paper) or, with features="expert_outputs", of their mean outputs."""
    if self.features == "expert_outputs":
      return {name: features.output_similarity(s.mean_output) for name, s in self.stats.items()}
    return {name: features.router_similarity(h) for name, h in self.logits.items()}

  def layer_rng(self, name: str) -> np.random.Generator:
    """A generator seeded by `seed` and the layer's name (not its position)."""
    return np.random.default_rng([self.seed, layer_seed(name)])


def layer_seed(layer_name: str) -> int:
  """Per-layer seed offset that depends on the layer's name, not on the layers' order."""
  return zlib.crc32(layer_name.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class Method:
  """A pruning method of the registry.

  Attributes:
    name: What `plan_pruning(method=...)` takes.
    group: MethodInputs -> {layer path: Grouping}.
    merges: True if members are averaged into their anchor; False if experts are only
      kept or dropped (selection: merge weights are 1 for kept experts).
    needs_logits: Needs the task's router logits (else they are optional).
    needs_stats: Needs the experts' task statistics (`ExpertStats`).
    needs_pretrained: Needs the pretrained router (`pretrained_params=`).
    default_router: The router option when the caller gives none.
    description: One line for documentation and error messages.
    uneven_counts: May keep a different number of experts in each layer (the total is
      what was asked), so its pruned models have shapes of their own.
    zero_outputs: A floor, not a pruning method: the kept experts' output projections
      are zeroed, so every MoE layer adds nothing to the residual stream (what a pruned
      model that keeps none of its experts' knowledge would score).
    needs_selection: Keeps the experts the caller names (`plan_pruning(selection=...)`).
    aligns: Permutes the members of a group to their reference (Hungarian weight
      matching) before merging them: the expensive kind of pruning.
    clusters: Takes `plan_pruning(cluster=...)`, the clustering algorithm.
    takes_features: Takes `plan_pruning(features=...)`, what it clusters on.
    paper_role: "proposed" (the method the paper proposes), "baseline" (a baseline the
      paper says it beats) or "" (the other methods of the literature, the floor, ...).
    paper_router: The router the paper gives it (its findings are judged on that variant).
  """

  name: str
  group: Callable[[MethodInputs], dict[str, Grouping]]
  merges: bool
  needs_logits: bool = True
  needs_stats: bool = False
  needs_pretrained: bool = False
  default_router: str = "reinit"
  description: str = ""
  uneven_counts: bool = False
  zero_outputs: bool = False
  needs_selection: bool = False
  aligns: bool = False
  clusters: bool = False
  takes_features: bool = False
  paper_role: str = ""
  paper_router: str | None = None

  def __post_init__(self):
    if self.paper_role not in PAPER_ROLES:
      raise ValueError(f"Method.paper_role must be one of {PAPER_ROLES}, got "
                       f"{self.paper_role!r}")
    if self.paper_role and self.paper_router is None:
      raise ValueError(f"method {self.name!r} has paper_role {self.paper_role!r}: give "
                       "paper_router, the router the paper gives it")


def per_layer(fn: Callable[[MethodInputs, str], Grouping]
              ) -> Callable[[MethodInputs], dict[str, Grouping]]:
  """Lifts a per-layer decision `fn(inputs, layer_name)` to a method's `group`."""
  return lambda inputs: {name: fn(inputs, name) for name in inputs.layers}


def _mc_smoe(inputs: MethodInputs) -> dict[str, Grouping]:
  dominant = clustering.global_dominant_experts(inputs.frequencies,
                                                sum(inputs.targets.values()))
  return {name: mc_smoe_grouping(inputs.similarities[name], dominant[name])
          for name in inputs.layers}


def reap_grouping(saliency: np.ndarray, num_kept: int) -> Grouping:
  """REAP (Lasby et al. 2025): keep the `num_kept` experts of largest saliency.

  The saliency of expert j is the mean over the tokens routed to it of
  gate_j(x) * ||f_j(x)|| (`ExpertStats.reap`): an expert that is chosen often but
  contributes little to the layer's output goes first.
  """
  return selection_grouping(clustering.top_experts(saliency, num_kept), len(saliency))


def hc_smoe_grouping(mean_output: np.ndarray, frequencies: np.ndarray,
                     num_kept: int) -> Grouping:
  """HC-SMoE (Chen et al. 2025): average-linkage hierarchical clustering of the experts by
  the Euclidean distance of their mean outputs on the task; members are merged by their
  selection frequencies without aligning hidden units (as its public code's frequency
  merge does). The anchor (the expert whose router column an "anchor" router keeps) is
  each cluster's most selected member.
  """
  labels = clustering.hierarchical_clusters(mean_output, num_kept)
  anchors = clustering.cluster_anchors(labels, frequencies)
  labels, anchors = _ordered(labels, anchors)
  return Grouping(labels, anchors, {})


FEATURES = ("router_logits", "expert_outputs")
# The method that keeps the experts the caller names (the study's oracle arm prunes with it).
SELECTION = "selection"
PAPER_ROLES = ("", "proposed", "baseline")

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to the registry (its name must be new); returns it."""
  if not isinstance(method, Method):
    raise TypeError(f"register needs a Method, got {type(method).__name__}")
  if method.name in _REGISTRY:
    raise ValueError(f"a pruning method named {method.name!r} is already registered")
  if method.paper_role == "proposed" and with_role("proposed"):
    raise ValueError(f"method {method.name!r}: {with_role('proposed')[0].name!r} is already "
                     "the paper's proposed method")
  _REGISTRY[method.name] = method
  return method


def get(name: str) -> Method:
  """The registered method `name`; ValueError naming the known ones otherwise."""
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f"method must be one of {names()}, got {name!r}")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """Names of the registered methods, in registration order."""
  return tuple(_REGISTRY)


def with_role(role: str) -> tuple[Method, ...]:
  """The registered methods of `paper_role` `role`, in registration order.

  Example:
    >>> [m.name for m in with_role("baseline")]
    ['frequency', 'frequency_merge']
  """
  if role not in PAPER_ROLES:
    raise ValueError(f"role must be one of {PAPER_ROLES}, got {role!r}")
  return tuple(m for m in _REGISTRY.values() if m.paper_role == role)


def proposed() -> Method:
  """The method the paper proposes (UNCURL)."""
  (method,) = with_role("proposed")
  return method


register(Method(
    "uncurl", merges=True, aligns=True, clusters=True, takes_features=True,
    paper_role="proposed", paper_router="reinit",
    description="cluster on router-logit similarity, align, merge",
    group=per_layer(lambda i, name: uncurl_grouping(
        i.similarities[name], i.frequencies[name], i.targets[name], cluster=i.cluster,
        seed=i.seed))))
register(Method(
    "frequency", merges=False, default_router="anchor", paper_role="baseline",
    paper_router="anchor",
    description="keep the most selected experts",
    group=per_layer(lambda i, name: frequency_grouping(i.frequencies[name], i.targets[name]))))
register(Method(
    "frequency_merge", merges=True, aligns=True, paper_role="baseline",
    paper_router="reinit",
    description="most selected experts anchor, the others merge into the most similar",
    group=per_layer(lambda i, name: frequency_merge_grouping(
        i.similarities[name], i.frequencies[name], i.targets[name]))))
register(Method(
    "mc_smoe", merges=True, aligns=True, group=_mc_smoe, uneven_counts=True,
    description="MC-SMoE: dominant experts chosen across layers, the others merge"))
register(Method(
    "router_norm", merges=False, needs_logits=False, needs_pretrained=True,
    default_router="anchor", description="keep the largest change of router-column norm",
    group=per_layer(lambda i, name: router_norm_grouping(
        np.asarray(i.layers[name].router_kernel), i.pretrained_router[name], i.targets[name]))))
register(Method(
    "random", merges=False, needs_logits=False, default_router="anchor",
    description="keep experts drawn uniformly at random",
    group=per_layer(lambda i, name: random_grouping(
        i.layers[name].num_experts, i.targets[name], i.layer_rng(name)))))

register(Method(
    "reap", merges=False, needs_stats=True, default_router="anchor",
    description="REAP: keep the largest router-weighted expert activation norms",
    group=per_layer(lambda i, name: reap_grouping(i.stats[name].reap, i.targets[name]))))
register(Method(
    "hc_smoe", merges=True, needs_stats=True,
    description="HC-SMoE: hierarchical clustering on expert outputs, frequency merge",
    group=per_layer(lambda i, name: hc_smoe_grouping(
        i.stats[name].mean_output, i.frequencies[name], i.targets[name]))))

register(Method(
    SELECTION, merges=False, needs_logits=False, default_router="bind",
    needs_selection=True,
    description="keep the experts the caller names per layer (e.g. the study's oracle)",
    group=per_layer(lambda i, name: selection_grouping(
        np.asarray(i.selection[name], np.int64), i.layers[name].num_experts))))
register(Method(
    "experts_off", merges=False, needs_logits=False, default_router="anchor",
    zero_outputs=True,
    description="the floor: every MoE layer's output zeroed (the first D experts kept as "
                "shapes only)",
    group=per_layer(lambda i, name: selection_grouping(
        np.arange(i.targets[name]), i.layers[name].num_experts))))

# The built-in methods (the registry may hold more).
METHODS = names()
# plan_pruning's default: the paper's method.
DEFAULT_METHOD = proposed().name

