"""Losses against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncurl_jax.train import losses


def _np_cross_entropy(logits, targets, weights):
  logits = logits.astype(np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return float(((log_z - picked) * weights).sum()), float(weights.sum())


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  got_sum, got_w = jax.jit(losses.cross_entropy)(logits, targets, weights)
  want_sum, want_w = _np_cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
  assert got_w == want_w


def test_cross_entropy_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="disagree"):
    losses.cross_entropy(jnp.zeros((2, 5, 7)), jnp.zeros((2, 4), jnp.int32))


def _intermediates(aux_values, z_values):
  layers = {}
  for i, (aux, z) in enumerate(zip(aux_values, z_values)):
    layers[f"layers_{2 * i}"] = {"mlp": {
        "auxiliary_loss": (jnp.float32(aux),), "router_z_loss": (jnp.float32(z),),
        "fraction_tokens_left_behind": (jnp.float32(0.1 * i),),
        "expert_usage": (jnp.float32(0.5),), "router_confidence": (jnp.float32(0.9),),
        "routed_probability": (jnp.float32(0.8),)}}
  return layers


def test_moe_metrics_average_over_layers():
  metrics = losses.moe_metrics(_intermediates([1.0, 3.0], [0.5, 1.5]))
  assert set(metrics) == set(losses.MOE_METRIC_NAMES)
  np.testing.assert_allclose(metrics["auxiliary_loss"], 2.0)
  np.testing.assert_allclose(metrics["router_z_loss"], 1.0)
  np.testing.assert_allclose(metrics["fraction_tokens_left_behind"], 0.05)
  assert losses.moe_metrics({}) == {}


def test_lm_loss_adds_weighted_aux_losses():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
  targets = rng.integers(0, 6, size=(2, 4))
  weights = np.ones((2, 4), np.float32)
  weights[1, 2:] = 0
  total, metrics = losses.lm_loss(logits, targets, weights, _intermediates([1.0, 3.0], [0.5, 1.5]),
                                  aux_loss_coef=0.01, z_loss_coef=0.001)
  ce_sum, w = _np_cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(metrics["cross_entropy"], ce_sum / w, rtol=1e-5)
  np.testing.assert_allclose(total, ce_sum / w + 0.01 * 2.0 + 0.001 * 1.0, rtol=1e-5)
  accuracy = ((logits.argmax(-1) == targets) * weights).sum() / w
  np.testing.assert_allclose(metrics["accuracy"], accuracy, rtol=1e-6)
  dense_total, dense_metrics = losses.lm_loss(logits, targets, weights, None,
                                              aux_loss_coef=0.01, z_loss_coef=0.001)
  np.testing.assert_allclose(dense_total, ce_sum / w, rtol=1e-5)
  assert "auxiliary_loss" not in dense_metrics
