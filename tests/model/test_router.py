"""Router math against plain numpy references and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncurl_jax.model import router

LN3 = float(np.log(3.0))


def numpy_routing(logits, top_k, capacity):
  """Loop-based reference: probs, choices, priority-order positions, kept."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  groups, tokens, num_experts = logits.shape
  expert_index = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
  position = np.zeros((groups, tokens, top_k), np.int64)
  for g in range(groups):
    filled = np.zeros(num_experts, np.int64)
    for choice in range(top_k):  # all first choices, then all second choices
      for s in range(tokens):
        e = expert_index[g, s, choice]
        position[g, s, choice] = filled[e]
        filled[e] += 1
  gate = np.take_along_axis(probs, expert_index, axis=-1)
  return probs, expert_index, gate, position, position < capacity


def test_router_logits_are_float32_matmul():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 6)).astype(np.float32)
  kernel = rng.normal(size=(6, 4)).astype(np.float32)
  logits = jax.jit(router.router_logits)(jnp.asarray(x, jnp.bfloat16), kernel)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 5, 4)
  x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(logits, x_rounded @ kernel, rtol=1e-5, atol=1e-5)


def test_router_logits_rejects_width_mismatch():
  with pytest.raises(ValueError, match="does not match input width"):
    router.router_logits(jnp.zeros((1, 2, 6)), jnp.zeros((5, 4)))


@pytest.mark.parametrize("top_k,capacity", [(1, 3), (2, 3), (2, 100)])
def test_route_tokens_matches_numpy(top_k, capacity):
  logits = np.random.default_rng(1).normal(size=(3, 16, 8)).astype(np.float32)
  routing = jax.jit(router.route_tokens, static_argnames=("top_k", "capacity"))(
      logits, top_k=top_k, capacity=capacity)
  probs, expert_index, gate, position, kept = numpy_routing(logits, top_k, capacity)
  np.testing.assert_allclose(routing.probs, probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(routing.expert_index, expert_index)
  np.testing.assert_allclose(routing.gate, gate, rtol=1e-5)
  np.testing.assert_array_equal(routing.kept, kept)
  np.testing.assert_array_equal(routing.slot, np.where(kept, position, capacity))
  if capacity == 3:
    assert not kept.all()  # the case exercises dropping


def test_capacity_positions_top1_hand_example():
  # Five tokens, two experts, capacity 2: tokens choose experts 0, 0, 1, 0, 0.
  logits = jnp.array([[[1., 0.], [1., 0.], [0., 1.], [1., 0.], [1., 0.]]])
  routing = router.route_tokens(logits, top_k=1, capacity=2)
  np.testing.assert_array_equal(routing.expert_index[0, :, 0], [0, 0, 1, 0, 0])
  np.testing.assert_array_equal(
      router.capacity_positions(routing.expert_index, 2)[0, :, 0], [0, 1, 0, 2, 3])
  np.testing.assert_array_equal(routing.kept[0, :, 0], [True, True, True, False, False])
  np.testing.assert_array_equal(routing.slot[0, :, 0], [0, 1, 0, 2, 2])
  stats = router.routing_diagnostics(routing, 2)
  np.testing.assert_allclose(stats["fraction_tokens_left_behind"], 2 / 5)
  np.testing.assert_allclose(stats["expert_usage"], 3 / 4)
  p = np.exp(1) / (1 + np.exp(1))  # gate of every token's first choice
  # flaxformer's router_confidence: mean gate over the 3 dispatched choices.
  np.testing.assert_allclose(stats["router_confidence"], p, rtol=1e-6)
  np.testing.assert_allclose(stats["routed_probability"], 3 * p / 5, rtol=1e-6)


def test_capacity_positions_top2_priority_order():
  # Choices (first, second): t0 (0, 1), t1 (0, 2), t2 (1, 0). Capacity 2.
  # First choices fill e0 slots 0, 1 and e1 slot 0; second choices then give t0 -> e1
  # slot 1, t1 -> e2 slot 0, and t2 -> e0 position 2, which is dropped.
  logits = jnp.array([[[3., 2., 0.], [3., 0., 2.], [2., 3., 0.]]])
  routing = router.route_tokens(logits, top_k=2, capacity=2)
  np.testing.assert_array_equal(routing.expert_index[0], [[0, 1], [0, 2], [1, 0]])
  np.testing.assert_array_equal(
      router.capacity_positions(routing.expert_index, 3)[0], [[0, 1], [1, 0], [0, 2]])
  np.testing.assert_array_equal(routing.kept[0], [[True, True], [True, True], [True, False]])
  stats = router.routing_diagnostics(routing, 2)
  np.testing.assert_allclose(stats["fraction_tokens_left_behind"], 0.0)
  np.testing.assert_allclose(stats["expert_usage"], 5 / 6)
  probs = np.asarray(routing.probs[0])
  kept_gates = probs[0, 0] + probs[0, 1] + probs[1, 0] + probs[1, 2] + probs[2, 1]
  # Five dispatched choices (t2's second choice dropped), three tokens.
  np.testing.assert_allclose(stats["router_confidence"], kept_gates / 5, rtol=1e-6)
  np.testing.assert_allclose(stats["routed_probability"], kept_gates / 3, rtol=1e-6)


def test_dispatch_and_combine_masks_match_routing():
  logits = np.random.default_rng(2).normal(size=(2, 12, 4)).astype(np.float32)
  capacity = 3
  routing = router.route_tokens(jnp.asarray(logits), top_k=2, capacity=capacity)
  dispatch, combine = jax.jit(router.dispatch_and_combine_masks, static_argnums=1)(
      routing, capacity)
  _, expert_index, gate, position, kept = numpy_routing(logits, 2, capacity)
  want_dispatch = np.zeros((2, 12, 4, capacity))
  want_combine = np.zeros((2, 12, 4, capacity))
  for g, s, k in zip(*np.nonzero(kept)):
    want_dispatch[g, s, expert_index[g, s, k], position[g, s, k]] = 1.0
    want_combine[g, s, expert_index[g, s, k], position[g, s, k]] = gate[g, s, k]
  np.testing.assert_array_equal(dispatch, want_dispatch)
  np.testing.assert_allclose(combine, want_combine, rtol=1e-6)
  # Each (group, expert, slot) holds at most one token.
  assert np.asarray(dispatch).sum(axis=1).max() == 1.0


def test_load_balancing_loss_hand_values():
  # Uniform router, every token picks expert 0 (lowest index on ties): E * 1 * (1/E) = 1.
  uniform = router.route_tokens(jnp.zeros((1, 4, 8)), top_k=1, capacity=4)
  np.testing.assert_allclose(
      router.load_balancing_loss(uniform.probs, uniform.expert_index), 1.0, rtol=1e-6)
  # Two tokens with probs [0.75, 0.25], both choosing expert 0: 2 * (1 * 0.75) = 1.5.
  skewed = router.route_tokens(jnp.array([[[LN3, 0.], [LN3, 0.]]]), top_k=1, capacity=4)
  np.testing.assert_allclose(
      router.load_balancing_loss(skewed.probs, skewed.expert_index), 1.5, rtol=1e-6)
  # Balanced group [0.75, 0.25] / [0.25, 0.75]: 2 * (0.5 * 0.5 + 0.5 * 0.5) = 1.0, and
  # averaging it with the skewed group gives 1.25.
  two_groups = jnp.array([[[LN3, 0.], [LN3, 0.]], [[LN3, 0.], [0., LN3]]])
  routing = router.route_tokens(two_groups, top_k=1, capacity=4)
  np.testing.assert_allclose(
      router.load_balancing_loss(routing.probs, routing.expert_index), 1.25, rtol=1e-6)


def test_load_balancing_loss_top2_counts_any_choice():
  # Three experts, top-2 of [0.5, 0.3, 0.2]-like probs picks experts 0 and 1 for every
  # token: f = [1, 1, 0], so the loss is 3 * (P_0 + P_1).
  logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]]))
  routing = router.route_tokens(logits, top_k=2, capacity=4)
  np.testing.assert_allclose(
      router.load_balancing_loss(routing.probs, routing.expert_index), 3 * 0.8, rtol=1e-6)


def test_router_z_loss_hand_values():
  np.testing.assert_allclose(router.router_z_loss(jnp.zeros((2, 3, 8))), np.log(8) ** 2,
                             rtol=1e-6)
  # logsumexp([ln 3, 0]) = ln 4 and logsumexp([0, 0]) = ln 2, averaged after squaring.
  logits = jnp.array([[[LN3, 0.], [0., 0.]]])
  np.testing.assert_allclose(router.router_z_loss(logits),
                             (np.log(4) ** 2 + np.log(2) ** 2) / 2, rtol=1e-6)


def test_route_tokens_rejects_bad_arguments():
  with pytest.raises(ValueError, match="top_k=3"):
    router.route_tokens(jnp.zeros((1, 4, 2)), top_k=3, capacity=2)
  with pytest.raises(ValueError, match="capacity must be >= 1"):
    router.route_tokens(jnp.zeros((1, 4, 2)), top_k=1, capacity=0)
  with pytest.raises(ValueError, match=r"\[groups, tokens, experts\]"):
    router.route_tokens(jnp.zeros((4, 2)), top_k=1, capacity=2)
