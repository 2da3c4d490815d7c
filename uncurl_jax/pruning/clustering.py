"""Grouping the experts of an MoE layer: clusters, anchors, dominant experts.

Every clustering function returns exactly `num_clusters` non-empty clusters as labels in
canonical order (cluster ids numbered by their smallest member), whatever the clustering
library did with degenerate inputs (duplicate profiles, disconnected affinity graphs).

Example:
  >>> s = features.router_similarity(logits)                 # [E, E]
  >>> labels = spectral_clusters(s, 4, seed=0)               # [E] ints in [0, 4)
  >>> anchors = cluster_anchors(labels, features.selection_frequencies(logits))
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from absl import logging
from sklearn import cluster as sk_cluster

CLUSTER_METHODS = ("spectral", "kmeans", "agglomerative")


def cluster_experts(similarity: np.ndarray, num_clusters: int, *, method: str = "spectral",
                    seed: int = 0) -> np.ndarray:
  """Clusters the experts of one layer from their router-logit similarity.

  Args:
    similarity: [E, E] affinity in [0, 1] (`features.router_similarity`).
    num_clusters: D, in [1, E].
    method: "spectral" (the paper: Ng-Jordan-Weiss spectral clustering on the
      affinity), "kmeans" (k-means on the experts' unit-normalized logit profiles,
      embedded exactly through their Gram matrix) or "agglomerative" (average linkage
      on the distance 1 - S).
    seed: Seed of the randomized steps (spectral's and k-means' k-means).

  Returns:
    [E] int labels in [0, D), every cluster non-empty, numbered by smallest member.

  Example:
    >>> cluster_experts(np.eye(4) * 0.5 + 0.5, 2, method="agglomerative")
  """
  num_experts = similarity.shape[0]
  if similarity.shape != (num_experts, num_experts):
    raise ValueError(f"similarity must be [E, E], got shape {similarity.shape}")
  if not 1 <= num_clusters <= num_experts:
    raise ValueError(f"num_clusters must be in [1, E={num_experts}], got {num_clusters}")
  if method not in CLUSTER_METHODS:
    raise ValueError(f"cluster method must be one of {CLUSTER_METHODS}, got {method!r}")
  if num_clusters == num_experts:
    return np.arange(num_experts)
  if num_clusters == 1:
    return np.zeros(num_experts, np.int64)
  with warnings.catch_warnings():
    # Degenerate inputs (identical profiles, disconnected graphs) make sklearn warn and
    # return fewer clusters; `complete_clusters` repairs that deterministically.
    warnings.simplefilter("ignore")
    if method == "spectral":
      labels = sk_cluster.SpectralClustering(
          n_clusters=num_clusters, affinity="precomputed", assign_labels="kmeans",
          random_state=seed).fit_predict(similarity)
    elif method == "kmeans":
      labels = sk_cluster.KMeans(n_clusters=num_clusters, n_init=10, random_state=seed
                                 ).fit_predict(_profile_embedding(similarity))
    else:
      labels = sk_cluster.AgglomerativeClustering(
          n_clusters=num_clusters, metric="precomputed", linkage="average"
      ).fit_predict(1.0 - similarity)
  return complete_clusters(labels, num_clusters, similarity)


def _profile_embedding(similarity: np.ndarray) -> np.ndarray:
  """Points in R^E whose pairwise distances are those of the unit logit columns.

  k-means only sees Euclidean geometry, so clustering these E-dimensional points is
  clustering the [tokens]-dimensional unit profiles, at O(E^3) instead of O(E * tokens).
  """
  cosine = 2.0 * similarity - 1.0
  eigenvalues, eigenvectors = np.linalg.eigh(cosine)
  return eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))


def complete_clusters(labels: np.ndarray, num_clusters: int,
                      similarity: np.ndarray) -> np.ndarray:
  """Canonical labels with exactly `num_clusters` non-empty clusters.

  While there are too few clusters, the largest one (lowest id on ties) gives up its
  member least similar to the rest of it (lowest index on ties) as a new cluster. Ids
  are then renumbered in order of each cluster's smallest member.

  Example:
    >>> complete_clusters(np.array([5, 5, 5]), 2, np.ones((3, 3)))   # expert 0 split off
    array([0, 1, 1])
  """
  labels = canonical_labels(labels)
  if labels.max() + 1 > num_clusters:
    raise ValueError(f"labels have {labels.max() + 1} clusters, more than {num_clusters}")
  count = int(labels.max()) + 1
  if count < num_clusters:
    logging.info("clustering found %d of %d clusters; splitting the largest", count,
                 num_clusters)
  while count < num_clusters:
    sizes = np.bincount(labels, minlength=count)
    largest = int(np.argmax(sizes))
    members = np.flatnonzero(labels == largest)
    within = similarity[np.ix_(members, members)]
    mean_to_others = (within.sum(axis=1) - np.diag(within)) / (len(members) - 1)
    labels[members[int(np.argmin(mean_to_others))]] = count
    count += 1
  return canonical_labels(labels)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
  """Renumbers cluster ids 0, 1, ... in order of each cluster's smallest member."""
  labels = np.asarray(labels)
  _, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
  rank = np.empty(len(first_index), np.int64)
  rank[np.argsort(first_index)] = np.arange(len(first_index))
  return rank[inverse.reshape(-1)]


def cluster_anchors(labels: np.ndarray, frequencies: np.ndarray) -> np.ndarray:
  """The most frequently selected member of each cluster (lowest index on ties).

  Args:
    labels: [E] cluster ids in [0, D), every cluster non-empty.
    frequencies: [E] selection frequencies.

  Returns:
    [D] expert indices; anchors[c] belongs to cluster c.

  Example:
    >>> cluster_anchors(np.array([0, 1, 0, 1]), np.array([.1, .2, .3, .4]))
    array([2, 3])
  """
  num_clusters = int(labels.max()) + 1
  anchors = np.empty(num_clusters, np.int64)
  for c in range(num_clusters):
    members = np.flatnonzero(labels == c)
    if members.size == 0:
      raise ValueError(f"cluster {c} is empty (labels {labels.tolist()})")
    anchors[c] = members[int(np.argmax(frequencies[members]))]
  return anchors


def hierarchical_clusters(points: np.ndarray, num_clusters: int) -> np.ndarray:
  """Average-linkage agglomerative clustering of `points` [E, k] by Euclidean distance.

  Returns [E] labels in [0, D), every cluster non-empty, numbered by smallest member.

  Example:
    >>> hierarchical_clusters(np.array([[0.], [0.1], [5.]]), 2)
    array([0, 0, 1])
  """
  points = np.asarray(points, np.float64)
  num_experts = points.shape[0]
  if not 1 <= num_clusters <= num_experts:
    raise ValueError(f"num_clusters must be in [1, E={num_experts}], got {num_clusters}")
  if num_clusters in (1, num_experts):
    return np.arange(num_experts) if num_clusters == num_experts else np.zeros(num_experts,
                                                                                np.int64)
  labels = sk_cluster.AgglomerativeClustering(
      n_clusters=num_clusters, metric="euclidean", linkage="average").fit_predict(points)
  distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
  return complete_clusters(labels, num_clusters, 1.0 / (1.0 + distances))


def top_experts(scores: np.ndarray, count: int) -> np.ndarray:
  """Indices of the `count` highest scores (lowest index on ties), ascending."""
  order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
  return np.sort(order[:count])


def nearest_anchor_labels(similarity: np.ndarray, anchors: np.ndarray) -> np.ndarray:
  """Labels joining every expert to the anchor it is most similar to.

  Anchors label themselves; other experts go to argmax_c S[e, anchors[c]] (lowest c on
  ties). Frequency-based merging and MC-SMoE group experts this way.

  Example:
    >>> nearest_anchor_labels(s, np.array([0, 3]))      # [E] labels in [0, 2)
  """
  anchors = np.asarray(anchors)
  labels = np.argmax(similarity[:, anchors], axis=1)
  labels[anchors] = np.arange(len(anchors))
  return labels


def global_dominant_experts(frequencies: Mapping[str, np.ndarray],
                            total: int) -> dict[str, np.ndarray]:
  """MC-SMoE's dominant experts: the `total` most used experts across all layers.

  Every layer keeps its most used expert; the remaining `total - layers` slots go to the
  highest selection frequencies over all layers (frequencies are shares of the same
  tokens in every layer, so they compare across layers). Ties go to the earlier layer,
  then the lower expert index.

  Args:
    frequencies: {layer: [E_layer] selection frequencies}, in layer order.
    total: Number of experts kept in all layers together.

  Returns:
    {layer: ascending indices of its dominant experts}.

  Example:
    >>> global_dominant_experts({"a": np.array([.5, .4, .1]), "b": np.array([.9, .1, 0.])}, 3)
    {'a': array([0, 1]), 'b': array([0])}
  """
  names = list(frequencies)
  capacity = sum(len(f) for f in frequencies.values())
  if not len(names) <= total <= capacity:
    raise ValueError(f"total kept experts must be in [{len(names)}, {capacity}] (one per "
                     f"layer up to all), got {total}")
  kept = {name: [int(np.argmax(frequencies[name]))] for name in names}
  candidates = [(-float(f), layer_index, e) for layer_index, name in enumerate(names)
                for e, f in enumerate(frequencies[name]) if e != kept[name][0]]
  for _, layer_index, e in sorted(candidates)[:total - len(names)]:
    kept[names[layer_index]].append(e)
  return {name: np.sort(np.asarray(experts, np.int64)) for name, experts in kept.items()}
