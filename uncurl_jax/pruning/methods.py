"""Per-layer decisions of each pruning method: which old experts form each new one.

Each function returns a `Grouping` (labels, anchors, which members align to which
reference); merge weights follow from the selection frequencies (`merge_weights`).
New experts are numbered by ascending anchor index, so a plan that keeps every expert
keeps them in their original order.

Example:
  >>> s, f = features.router_similarity(h), features.selection_frequencies(h)
  >>> grouping = uncurl_grouping(s, f, 4, cluster="spectral", seed=0)
  >>> weights = merge_weights(grouping.labels, f)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uncurl_jax.pruning import clustering


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
