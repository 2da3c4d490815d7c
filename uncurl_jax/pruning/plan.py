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

from uncurl_jax import checks
from uncurl_jax.pruning import clustering
from uncurl_jax.model import layout as layout_lib
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

  def __post_init__(self):
    checks.integer("ExpertAlignment.member", self.member, low=0)
    checks.integer("ExpertAlignment.reference", self.reference, low=0)
    permutation = _int_tuple("ExpertAlignment.permutation", self.permutation)
    if sorted(permutation) != list(range(len(permutation))):
      raise ValueError(f"ExpertAlignment.permutation of expert {self.member} is not a "
                       f"permutation of 0..{len(permutation) - 1}")
    object.__setattr__(self, "permutation", permutation)
    for name in ("score_before", "score_after"):
      object.__setattr__(self, name, checks.real(f"ExpertAlignment.{name}",
                                                   getattr(self, name)))


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
    e = checks.integer("LayerPlan.num_experts", self.num_experts, low=1)
    labels = _int_tuple("LayerPlan.labels", self.labels, length=e)
    anchors = _int_tuple("LayerPlan.anchors", self.anchors)
    d = len(anchors)
    if not 1 <= d <= e or min(labels) < -1 or max(labels) >= d:
      raise ValueError(f"LayerPlan needs 1 <= D={d} <= E={e} and labels in [-1, D), got "
                       f"labels {list(labels)}")
    weights = _float_tuple("LayerPlan.member_weights", self.member_weights, length=e)
    object.__setattr__(self, "labels", labels)
    object.__setattr__(self, "anchors", anchors)
    object.__setattr__(self, "member_weights", weights)
    if self.frequencies is not None:
      frequencies = _float_tuple("LayerPlan.frequencies", self.frequencies, length=e)
      if min(frequencies) < 0:
        raise ValueError(f"LayerPlan.frequencies must be >= 0, got {list(frequencies)}")
      object.__setattr__(self, "frequencies", frequencies)
    self._check_clusters(np.asarray(labels), np.asarray(weights, np.float64))
    self._check_alignments(np.asarray(labels))

  def _check_clusters(self, labels: np.ndarray, weights: np.ndarray) -> None:
    e = len(labels)
    if len(set(self.anchors)) != len(self.anchors):
      raise ValueError(f"LayerPlan.anchors {list(self.anchors)} repeat an expert")
    for c, anchor in enumerate(self.anchors):
      if not 0 <= anchor < e:
        raise ValueError(f"anchor {anchor} of new expert {c} is not an expert in [0, E={e})")
      if labels[anchor] != c:
        raise ValueError(f"anchor {anchor} of new expert {c} has label {labels[anchor]}")
      if not np.isclose(weights[labels == c].sum(), 1.0, atol=1e-6):
        raise ValueError(f"member weights of new expert {c} sum to "
                         f"{weights[labels == c].sum()}, expected 1")
    if np.any(weights < 0) or np.any(weights[labels < 0] != 0):
      raise ValueError("member weights must be >= 0, and 0 for dropped experts")

  def _check_alignments(self, labels: np.ndarray) -> None:
    e, seen, lengths = len(labels), set(), set()
    for alignment in self.alignments:
      if not isinstance(alignment, ExpertAlignment):
        raise TypeError(f"LayerPlan.alignments must hold ExpertAlignments, got "
                        f"{type(alignment).__name__}")
      for role in ("member", "reference"):
        index = getattr(alignment, role)
        if index >= e:
          raise ValueError(f"alignment {role} {index} is not an expert in [0, E={e})")
      if labels[alignment.member] < 0:
        raise ValueError(f"expert {alignment.member} is dropped but has an alignment")
      if alignment.member in seen:
        raise ValueError(f"expert {alignment.member} is aligned twice")
      seen.add(alignment.member)
      lengths.add(len(alignment.permutation))
    if len(lengths) > 1:
      raise ValueError(f"alignments permute different numbers of hidden units {sorted(lengths)}")

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
    table = np.tile(np.arange(d_ff), (self.num_experts, 1))
    for alignment in self.alignments:
      if len(alignment.permutation) != d_ff:
        raise ValueError(f"alignment of expert {alignment.member} permutes "
                         f"{len(alignment.permutation)} hidden units, the layer has d_ff={d_ff}")
      table[alignment.member] = alignment.permutation
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
    features: What "uncurl" clustered on ("router_logits" or "expert_outputs"), else None.
    top_k: Router choices counted per token in the selection frequencies.
    layout: Where the MoE layers keep their weights.
  """

  method: str
  router: str
  layers: dict[str, LayerPlan]
  seed: int = 0
  router_init_std: float = 0.02
  cluster: str | None = None
  features: str | None = None
  top_k: int = 1
  layout: layout_lib.MoeLayout = layout_lib.DEFAULT_LAYOUT

  def __post_init__(self):
    checks.choice("PrunePlan.method", self.method, methods_lib.names())
    checks.choice("PrunePlan.router", self.router, merge_lib.ROUTER_MODES)
    if checks.integer("PrunePlan.seed", self.seed, low=0) > 2**32 - 1:
      raise ValueError(f"PrunePlan.seed must be at most {2**32 - 1} (a 32-bit seed), got "
                       f"{self.seed}")
    object.__setattr__(self, "router_init_std", checks.real(
        "PrunePlan.router_init_std", self.router_init_std, positive=True))
    if self.cluster is not None:
      checks.choice("PrunePlan.cluster", self.cluster, clustering.CLUSTER_METHODS)
    if self.features is not None:
      checks.choice("PrunePlan.features", self.features, methods_lib.FEATURES)
    checks.integer("PrunePlan.top_k", self.top_k, low=1)
    if not isinstance(self.layout, layout_lib.MoeLayout):
      raise TypeError(f"PrunePlan.layout must be a MoeLayout, got {type(self.layout).__name__}")
    if not isinstance(self.layers, dict) or not self.layers:
      raise ValueError("PrunePlan.layers must be a non-empty {layer path: LayerPlan} dict")
    for name, layer in self.layers.items():
      if not isinstance(name, str) or not isinstance(layer, LayerPlan):
        raise TypeError(f"PrunePlan.layers must map layer paths to LayerPlans, got "
                        f"{name!r}: {type(layer).__name__}")

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
    """Reads `to_json`'s output back, validating it against the plan's schema.

    Raises:
      TypeError, ValueError: Text that is not JSON, a missing or unknown field, a value of
        the wrong type or range (see the dataclasses' checks).
    """
    if not isinstance(text, (str, bytes)):
      raise TypeError(f"PrunePlan.from_json needs JSON text, got {type(text).__name__}")
    try:
      data = json.loads(text)
    except json.JSONDecodeError as error:
      raise ValueError(f"PrunePlan.from_json: the text is not JSON ({error})") from None
    data = _fields(data, cls, "PrunePlan")
    layers = checks.mapping("PrunePlan.layers", data.pop("layers"))
    layers = {name: _layer_from_dict(layer, name) for name, layer in layers.items()}
    layout = layout_lib.MoeLayout(**_fields(data.pop("layout"), layout_lib.MoeLayout,
                                            "PrunePlan.layout"))
    return cls(layers=layers, layout=layout, **data)


def _to_jsonable(plan: PrunePlan) -> dict[str, Any]:
  data = dataclasses.asdict(plan)  # recursive: nested dataclasses become dicts
  data["layout"] = plan.layout.to_dict()
  return data


def _fields(data: Any, cls: type, where: str) -> dict[str, Any]:
  """`data` as a dict with the fields of dataclass `cls`: none unknown, none required missing."""
  if not isinstance(data, dict):
    raise TypeError(f"{where} must be a JSON object, got {type(data).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  required = {name for name, f in fields.items()
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
  missing = sorted(required - set(data))
  if unknown or missing:
    raise ValueError(f"{where}: missing fields {missing}, unknown fields {unknown}")
  return dict(data)


def _int_tuple(name: str, values: Any, *, length: int | None = None) -> tuple[int, ...]:
  if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, np.ndarray)):
    raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
  ints = tuple(checks.integer(f"{name}[{i}]", v) for i, v in enumerate(values))
  if length is not None and len(ints) != length:
    raise ValueError(f"{name} has {len(ints)} entries, expected E={length}")
  return ints


def _float_tuple(name: str, values: Any, *, length: int) -> tuple[float, ...]:
  if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, np.ndarray)):
    raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
  if len(values) != length:
    raise ValueError(f"{name} has {len(values)} entries, expected E={length}")
  return tuple(checks.real(f"{name}[{i}]", v) for i, v in enumerate(values))


def _layer_from_dict(data: Any, name: str) -> LayerPlan:
  data = _fields(data, LayerPlan, f"PrunePlan.layers[{name!r}]")
  alignments = data.pop("alignments", ())
  if not isinstance(alignments, list):
    raise TypeError(f"PrunePlan.layers[{name!r}].alignments must be a list")
  data["alignments"] = tuple(
      ExpertAlignment(**_fields(a, ExpertAlignment, f"an alignment of {name!r}"))
      for a in alignments)
  return LayerPlan(**data)


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
