"""Tests of uncurl_jax.pruning.features and .clustering against hand computations."""

import numpy as np
import pytest

from uncurl_jax.pruning import clustering
from uncurl_jax.pruning import features


def _grouped_logits(group_of_expert, tokens=300, noise=0.05, seed=0):
  """Logits whose columns are noisy copies of one profile per group."""
  rng = np.random.default_rng(seed)
  profiles = rng.normal(size=(tokens, max(group_of_expert) + 1))
  columns = [profiles[:, g] + noise * rng.normal(size=tokens) for g in group_of_expert]
  return np.stack(columns, axis=1).astype(np.float32)


def test_similarity_matches_hand_cosine():
  h = np.random.default_rng(1).normal(size=(50, 5)).astype(np.float32)
  s = features.router_similarity(h)
  for i in range(5):
    for j in range(5):
      a, b = h[:, i].astype(np.float64), h[:, j].astype(np.float64)
      expected = (1 + a @ b / np.linalg.norm(a) / np.linalg.norm(b)) / 2
      np.testing.assert_allclose(s[i, j], expected, rtol=1e-6)
  assert s.shape == (5, 5) and np.all(s >= 0) and np.all(s <= 1)


def test_similarity_of_zero_column_is_one_half():
  h = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0]])
  s = features.router_similarity(h)
  np.testing.assert_allclose(s, [[1, .5, 0], [.5, 1, .5], [0, .5, 1]], atol=1e-12)


def test_frequencies_top1_and_top2_by_hand():
  h = np.array([[3., 2., 1.], [0., 5., 4.], [1., 1., 0.], [0., 0., 9.]])
  # Top-1: 0, 1, 0 (tie goes to the lower index), 2.
  np.testing.assert_array_equal(features.selection_counts(h, 1), [2, 1, 1])
  np.testing.assert_allclose(features.selection_frequencies(h, 1), [.5, .25, .25])
  # Top-2: {0,1}, {1,2}, {0,1}, {2,0} (tie 0 vs 1 at 0: lower index).
  np.testing.assert_array_equal(features.selection_counts(h, 2), [3, 3, 2])
  with pytest.raises(ValueError, match="top_k"):
    features.selection_counts(h, 4)


@pytest.mark.parametrize("method", clustering.CLUSTER_METHODS)
def test_clusters_recover_groups_and_partition(method):
  groups = [0, 1, 0, 2, 1, 2, 0, 3]
  s = features.router_similarity(_grouped_logits(groups))
  labels = clustering.cluster_experts(s, 4, method=method, seed=0)
  assert sorted(set(labels.tolist())) == [0, 1, 2, 3]  # exactly D non-empty clusters
  for a in range(8):
    for b in range(8):
      assert (labels[a] == labels[b]) == (groups[a] == groups[b])
  # Canonical numbering: cluster ids appear in order of their smallest member.
  first = [labels.tolist().index(c) for c in range(4)]
  assert first == sorted(first)


@pytest.mark.parametrize("method", clustering.CLUSTER_METHODS)
def test_degenerate_profiles_still_give_exactly_d_clusters(method):
  # Six identical profiles: the libraries cannot separate them.
  h = np.tile(np.random.default_rng(0).normal(size=(40, 1)), (1, 6))
  s = features.router_similarity(h)
  for d in (1, 3, 5, 6):
    labels = clustering.cluster_experts(s, d, method=method, seed=0)
    assert sorted(set(labels.tolist())) == list(range(d))
    np.testing.assert_array_equal(labels, clustering.cluster_experts(s, d, method=method, seed=0))


def test_complete_clusters_splits_largest_deterministically():
  s = np.full((4, 4), 0.9)
  s[3, :3] = s[:3, 3] = 0.1  # expert 3 is the odd one out of the only cluster
  np.fill_diagonal(s, 1)
  np.testing.assert_array_equal(clustering.complete_clusters(np.array([7, 7, 7, 7]), 2, s),
                                [0, 0, 0, 1])


def test_spectral_is_seeded():
  s = features.router_similarity(np.random.default_rng(3).normal(size=(100, 16)))
  a = clustering.cluster_experts(s, 4, method="spectral", seed=5)
  b = clustering.cluster_experts(s, 4, method="spectral", seed=5)
  np.testing.assert_array_equal(a, b)


def test_anchors_are_most_frequent_members():
  labels = np.array([0, 1, 0, 1, 2])
  freq = np.array([.1, .3, .3, .2, 0.])
  np.testing.assert_array_equal(clustering.cluster_anchors(labels, freq), [2, 1, 4])
  # Ties go to the lower index.
  np.testing.assert_array_equal(clustering.cluster_anchors(np.array([0, 0]), np.array([.5, .5])),
                                [0])


def test_top_experts_and_nearest_anchor():
  np.testing.assert_array_equal(clustering.top_experts(np.array([.1, .4, .4, .1]), 2), [1, 2])
  np.testing.assert_array_equal(clustering.top_experts(np.array([.1, .4, .2, .1]), 3), [0, 1, 2])
  s = np.array([[1., .9, .2], [.9, 1., .3], [.2, .3, 1.]])
  np.testing.assert_array_equal(clustering.nearest_anchor_labels(s, np.array([0, 2])), [0, 0, 1])


def test_global_dominant_experts_by_hand():
  freq = {"a": np.array([.5, .3, .2, 0.]), "b": np.array([.1, .1, .05, .75])}
  # Each layer's most used first (a:0, b:3), then .3 (a:1), then .2 (a:2), then .1 (b:0).
  kept = clustering.global_dominant_experts(freq, 5)
  np.testing.assert_array_equal(kept["a"], [0, 1, 2])
  np.testing.assert_array_equal(kept["b"], [0, 3])
  # The most used expert of a layer is kept even when its frequency is globally low.
  kept = clustering.global_dominant_experts({"a": np.array([.9, .8]), "b": np.array([.1, 0.])}, 2)
  np.testing.assert_array_equal(kept["b"], [0])
  with pytest.raises(ValueError, match="total kept"):
    clustering.global_dominant_experts(freq, 1)
