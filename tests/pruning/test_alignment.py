"""Tests of uncurl_jax.pruning.alignment and .merge against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncurl_jax.pruning import alignment
from uncurl_jax.model import layout as layout_lib
from uncurl_jax.pruning import merge

D_MODEL, D_FF = 6, 12


def _expert(rng):
  return (rng.normal(size=(D_MODEL, D_FF)), rng.normal(size=(D_FF,)),
          rng.normal(size=(D_FF, D_MODEL)), rng.normal(size=(D_MODEL,)))


def _permuted(expert, perm):
  """The same function with hidden units reordered: new unit j is old unit perm[j]."""
  wi, bi, wo, bo = expert
  return wi[:, perm], bi[perm], wo[perm], bo


def _stack(experts, with_bias=True):
  wi, bi, wo, bo = (np.stack(parts).astype(np.float32) for parts in zip(*experts))
  router = np.zeros((D_MODEL, len(experts)), np.float32)
  return layout_lib.MoeLayerWeights(router, None, wi, bi if with_bias else None, wo,
                                    bo if with_bias else None)


def _ffn(expert, x):
  wi, bi, wo, bo = expert
  return np.maximum(x @ wi + bi, 0) @ wo + bo


def test_cost_matrix_matches_numpy():
  rng = np.random.default_rng(0)
  layer = _stack([_expert(rng), _expert(rng)])
  cost, norm_a, norm_m = alignment.matching_cost(layer, 0, 1)
  wi, bi, wo = (x.astype(np.float64) for x in (layer.wi_kernel, layer.wi_bias, layer.wo_kernel))
  expected = wi[0].T @ wi[1] + np.outer(bi[0], bi[1]) + wo[0] @ wo[1].T
  np.testing.assert_allclose(cost, expected, rtol=1e-5, atol=1e-5)
  flat = lambda e: np.concatenate([wi[e].ravel(), bi[e], wo[e].ravel()])
  np.testing.assert_allclose([norm_a, norm_m], [np.linalg.norm(flat(0)), np.linalg.norm(flat(1))],
                             rtol=1e-6)


@pytest.mark.parametrize("with_bias", [True, False])
def test_alignment_recovers_a_hidden_unit_permutation(with_bias):
  rng = np.random.default_rng(1)
  base = _expert(rng)
  perm = rng.permutation(D_FF)
  layer = _stack([base, _permuted(base, perm)], with_bias)
  [result] = alignment.align_experts({"l": layer}, [alignment.AlignmentTask("l", 0, 1)],
                                     num_workers=0)
  # Aligned unit j of the member is its unit result.permutation[j] == base unit j.
  np.testing.assert_array_equal(perm[result.permutation], np.arange(D_FF))
  assert result.score_after == pytest.approx(1.0, abs=1e-5)
  assert result.score_before < 0.9
  aligned = merge.permute_hidden(layer.wi_kernel, np.stack([np.arange(D_FF),
                                                           result.permutation]), 2)
  np.testing.assert_array_equal(aligned[1], layer.wi_kernel[0])


def test_parallel_equals_sequential():
  rng = np.random.default_rng(2)
  layers = {"a": _stack([_expert(rng) for _ in range(4)]),
            "b": _stack([_expert(rng) for _ in range(4)])}
  tasks = [alignment.AlignmentTask(name, 0, m) for name in layers for m in (1, 2, 3)]
  tasks.append(alignment.AlignmentTask("b", 2, 3))
  timings = {}
  sequential = alignment.align_experts(layers, tasks, num_workers=0, timings=timings)
  assert set(timings) == {"cost_matrices", "assignments"}
  # One worker: batches of 4 cost matrices, so 7 tasks span two batches.
  for num_workers, overlap in [(1, False), (1, True), (3, None)]:
    parallel = alignment.align_experts(layers, tasks, num_workers=num_workers, overlap=overlap)
    assert len(parallel) == len(tasks)
    for s, p in zip(sequential, parallel):
      np.testing.assert_array_equal(s.permutation, p.permutation)
      assert s.score_after == p.score_after and s.score_after >= s.score_before
  with pytest.raises(ValueError, match="unknown layer"):
    alignment.align_experts(layers, [alignment.AlignmentTask("c", 0, 1)])


def test_permuting_hidden_units_preserves_the_function():
  rng = np.random.default_rng(3)
  expert = _expert(rng)
  perm = rng.permutation(D_FF)
  layer = _stack([expert])
  perms = perm[None]
  permuted = (merge.permute_hidden(layer.wi_kernel, perms, 2)[0],
              merge.permute_hidden(layer.wi_bias, perms, 1)[0],
              merge.permute_hidden(layer.wo_kernel, perms, 1)[0], layer.wo_bias[0])
  x = rng.normal(size=(5, D_MODEL))
  np.testing.assert_allclose(_ffn(permuted, x), _ffn(expert, x), rtol=1e-5, atol=1e-5)


def test_weighted_merge_matches_hand_computation():
  x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
  m = merge.merge_matrix(np.array([1, 0, 1, -1]), np.array([.25, 1., .75, 0.]))
  np.testing.assert_array_equal(m, [[0, 1, 0, 0], [.25, 0, .75, 0]])
  expected = np.stack([x[1], .25 * x[0] + .75 * x[2]])
  np.testing.assert_allclose(merge.merge_experts(x, m), expected, rtol=1e-7)
  # jax arrays give jax results with the same values.
  out = merge.merge_experts(jnp.asarray(x), m)
  assert isinstance(out, jax.Array)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-7)


def test_pure_selection_is_an_exact_gather():
  x = np.random.default_rng(4).normal(size=(5, 2, 3)).astype(np.float32)
  m = merge.merge_matrix(np.array([-1, 0, -1, 1, -1]), np.array([0., 1., 0., 1., 0.]))
  for array in (x, jnp.asarray(x), jnp.asarray(x, jnp.bfloat16)):
    out = merge.merge_experts(array, m)
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(array)[[1, 3]])


def test_router_reindex_modes():
  rng = np.random.default_rng(5)
  kernel = rng.normal(size=(4, 3)).astype(np.float32)
  bias = rng.normal(size=(3,)).astype(np.float32)
  m = merge.merge_matrix(np.array([0, 1, 0]), np.array([.5, 1., .5]))
  k, b = merge.reindex_router(kernel, bias, mode="anchor", merge=m, anchors=np.array([2, 1]))
  np.testing.assert_array_equal(k, kernel[:, [2, 1]])
  np.testing.assert_array_equal(b, bias[[2, 1]])
  k, b = merge.reindex_router(kernel, bias, mode="merge", merge=m)
  np.testing.assert_allclose(k, np.stack([(kernel[:, 0] + kernel[:, 2]) / 2, kernel[:, 1]], 1),
                             rtol=1e-6)
  np.testing.assert_allclose(b, [(bias[0] + bias[2]) / 2, bias[1]], rtol=1e-6)
  key = jax.random.key(0)
  k1, b1 = merge.reindex_router(kernel, bias, mode="reinit", merge=m, key=key, init_std=0.5)
  k2, _ = merge.reindex_router(jnp.asarray(kernel), None, mode="reinit", merge=m, key=key,
                               init_std=0.5)
  assert k1.shape == (4, 2) and isinstance(k1, np.ndarray) and isinstance(k2, jax.Array)
  np.testing.assert_array_equal(k1, np.asarray(k2))
  np.testing.assert_array_equal(b1, [0, 0])
  with pytest.raises(ValueError, match="router mode"):
    merge.reindex_router(kernel, None, mode="bogus", merge=m)
