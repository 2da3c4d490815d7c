"""`PrunePlan`: what pruning does to every MoE layer, as plain, JSON-serializable data.

A plan says, per MoE layer, which experts form each of the D new experts (cluster
labels), which member anchors each cluster, with what weights members are averaged,
how each aligned member's hidden units are permuted, and the selection frequencies and
alignment scores behind those decisions. `plan_pruning` makes one, `apply_plan` executes
it; in between it can be saved, read and edited.

Example:
  >>> plan = plan_pruning(params, logits, 8)
  >>> print(plan.summary())
  >>> text = plan.to_json()
  >>> assert PrunePlan.from_json(text) == plan
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from uncurl_jax.pruning import layout as layout_lib
from uncurl_jax.pruning import merge as merge_lib
from uncurl_jax.pruning import methods as methods_lib


@dataclasses.dataclass(frozen=True)
class ExpertAlignment:
  """Hidden-unit permutation of one expert, aligned to `reference` before merging.

  Attributes:
    member: The permuted expert.
    reference: The expert it was aligned to (its anchor; expert 0 for MC-SMoE).
    permutation: Hidden unit j of the aligned member is the member's unit permutation[j].
    score_before: Cosine similarity of member and reference weights before alignment.
    score_after: The same after alignment.
  """

  member: int
  reference: int
  permutation: tuple[int, ...]
  score_before: float
  score_after: float


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Pruning of one MoE layer from E to D experts.

  Attributes:
    num_experts: E, the layer's experts before pruning.
    labels: [E] new expert (cluster) of each old expert, in [0, D); -1 drops it.
    anchors: [D] old expert anchoring each new expert (anchors[c] has label c).
    member_weights: [E] weight of each old expert in its cluster's average (the weights
      of a cluster sum to 1; dropped experts have 0).
    frequencies: [E] selection frequencies on the task's tokens, or None when the method
      did not use router logits.
    alignments: Permutations of the aligned members (experts not listed are used as
      they are).
  """

  num_experts: int
  labels: tuple[int, ...]
  anchors: tuple[int, ...]
  member_weights: tuple[float, ...]
  frequencies: tuple[float, ...] | None = None
  alignments: tuple[ExpertAlignment, ...] = ()

  def __post_init__(self):
    e, d = self.num_experts, len(self.anchors)
    lengths = {"labels": len(self.labels), "member_weights": len(self.member_weights)}
    if self.frequencies is not None:
      lengths["frequencies"] = len(self.frequencies)
    for name, length in lengths.items():
      if length != e:
        raise ValueError(f"LayerPlan.{name} has {length} entries, expected E={e}")
    labels = np.asarray(self.labels, np.int64)
    if not 1 <= d <= e or labels.min() < -1 or labels.max() >= d:
      raise ValueError(f"LayerPlan needs 1 <= D={d} <= E={e} and labels in [-1, D), got "
                       f"labels {list(self.labels)}")
    weights = np.asarray(self.member_weights, np.float64)
    for c, anchor in enumerate(self.anchors):
      if self.labels[anchor] != c:
        raise ValueError(f"anchor {anchor} of new expert {c} has label {self.labels[anchor]}")
      if not np.isclose(weights[labels == c].sum(), 1.0, atol=1e-6):
        raise ValueError(f"member weights of new expert {c} sum to "
                         f"{weights[labels == c].sum()}, expected 1")
    if np.any(weights < 0) or np.any(weights[labels < 0] != 0):
      raise ValueError("member weights must be >= 0, and 0 for dropped experts")
    for alignment in self.alignments:
      if labels[alignment.member] < 0:
        raise ValueError(f"expert {alignment.member} is dropped but has an alignment")

  @property
  def num_kept(self) -> int:
    """D, the layer's experts after pruning."""
    return len(self.anchors)

  def clusters(self) -> list[list[int]]:
    """Members of each new expert, by old index."""
    return [[e for e, label in enumerate(self.labels) if label == c]
            for c in range(self.num_kept)]

  def merge_matrix(self) -> np.ndarray:
    """[D, E] weights: new expert c = sum_e M[c, e] * aligned old expert e."""
    return merge_lib.merge_matrix(np.asarray(self.labels), np.asarray(self.member_weights))

  def permutations(self, d_ff: int) -> np.ndarray | None:
    """[E, d_ff] hidden-unit permutation of every old expert (identity if not aligned)."""
    if not self.alignments:
      return None
    identity = np.arange(d_ff)
    table = np.tile(identity, (self.num_experts, 1))
    for alignment in self.alignments:
      permutation = np.asarray(alignment.permutation)
      if not np.array_equal(np.sort(permutation), identity):
        raise ValueError(f"alignment of expert {alignment.member} is not a permutation of "
                         f"the layer's d_ff={d_ff} hidden units")
      table[alignment.member] = permutation
    return table


@dataclasses.dataclass(frozen=True)
class PrunePlan:
  """How to prune every MoE layer of a parameter pytree (see `plan_pruning`).

  Attributes:
    method: A registered method (`methods.names()`).
    router: How the pruned router is made: "reinit", "anchor" or "merge".
    layers: {MoE layer path: LayerPlan}.
    seed: Seed of the random decisions and of a re-initialized router.
    router_init_std: Standard deviation of a re-initialized router kernel.
    cluster: Clustering algorithm (method "uncurl"), else None.
    top_k: Router choices counted per token in the selection frequencies.
    layout: Where the MoE layers keep their weights.
  """

  method: str
  router: str
  layers: dict[str, LayerPlan]
  seed: int = 0
  router_init_std: float = 0.02
  cluster: str | None = None
  top_k: int = 1
  layout: layout_lib.MoeLayout = layout_lib.DEFAULT_LAYOUT

  def __post_init__(self):
    if self.method not in methods_lib.names():
      raise ValueError(f"PrunePlan.method must be one of {methods_lib.names()}, got "
                       f"{self.method!r}")
    if self.router not in merge_lib.ROUTER_MODES:
      raise ValueError(f"PrunePlan.router must be one of {merge_lib.ROUTER_MODES}, got "
                       f"{self.router!r}")
    for name, layer in self.layers.items():
      if not isinstance(layer, LayerPlan):
        raise TypeError(f"PrunePlan.layers[{name!r}] must be a LayerPlan, got "
                        f"{type(layer).__name__}")

  @property
  def num_experts(self) -> dict[str, int]:
    """{layer: D}, the experts each layer keeps."""
    return {name: layer.num_kept for name, layer in self.layers.items()}

  def summary(self) -> str:
    """A few readable lines per layer: sizes, clusters and mean alignment scores."""
    lines = [f"PrunePlan(method={self.method}, router={self.router}, cluster={self.cluster}, "
             f"seed={self.seed})"]
    for name, layer in self.layers.items():
      lines.append(f"{name}: {layer.num_experts} -> {layer.num_kept} experts")
      for c, members in enumerate(layer.clusters()):
        lines.append(f"  new {c}: anchor {layer.anchors[c]}, members {members}")
      if layer.alignments:
        before = np.mean([a.score_before for a in layer.alignments])
        after = np.mean([a.score_after for a in layer.alignments])
        lines.append(f"  mean alignment cosine {before:.4f} -> {after:.4f} "
                     f"({len(layer.alignments)} experts aligned)")
    return "\n".join(lines)

  def to_json(self) -> str:
    """JSON text: indented structure, each list of numbers on one line."""
    return _format_json(_to_jsonable(self)) + "\n"

  @classmethod
  def from_json(cls, text: str) -> PrunePlan:
    """Reads `to_json`'s output back (validating every layer)."""
    data = json.loads(text)
    layers = {name: _layer_from_dict(layer) for name, layer in data.pop("layers").items()}
    layout = layout_lib.MoeLayout(**data.pop("layout"))
    return cls(layers=layers, layout=layout, **data)


def _to_jsonable(plan: PrunePlan) -> dict[str, Any]:
  data = dataclasses.asdict(plan)  # recursive: nested dataclasses become dicts
  data["layout"] = plan.layout.to_dict()
  return data


def _layer_from_dict(data: dict[str, Any]) -> LayerPlan:
  alignments = tuple(ExpertAlignment(**{**a, "permutation": tuple(a["permutation"])})
                     for a in data.pop("alignments"))
  frequencies = data.pop("frequencies")
  return LayerPlan(
      num_experts=data["num_experts"], labels=tuple(data["labels"]),
      anchors=tuple(data["anchors"]), member_weights=tuple(data["member_weights"]),
      frequencies=None if frequencies is None else tuple(frequencies),
      alignments=alignments)


def _format_json(value: Any, indent: int = 0) -> str:
  pad = " " * indent
  if isinstance(value, dict):
    if not value:
      return "{}"
    items = [f'{pad}  {json.dumps(str(k))}: {_format_json(v, indent + 2)}'
             for k, v in value.items()]
    return "{\n" + ",\n".join(items) + f"\n{pad}}}"
  if isinstance(value, (list, tuple)):
    if all(not isinstance(v, (dict, list, tuple)) for v in value):
      return json.dumps(list(value))
    items = [f"{pad}  {_format_json(v, indent + 2)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]"
  return json.dumps(value)
