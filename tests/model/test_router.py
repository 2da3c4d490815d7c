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


# ----------------------------------------------------------------------------------------
# Bound routers (`expert_map`): losses over the bound columns only, diagnostics per expert.

# Eight columns bound to three distinct experts; columns 1, 3, 4, 6 and 7 are dead.
BOUND_MAP = (2, -1, 0, -1, -1, 1, -1, -1)
BOUND_COLUMNS = [0, 2, 5]
# The same router sliced to its bound columns, column e holding expert e's column.
SLICED_COLUMNS = [2, 5, 0]


def old_load_balancing_loss(probs, expert_index):
  """The loss as it was before bound routers had their own (kept to check bit-identity)."""
  num_experts = probs.shape[-1]
  chosen = jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)
  token_share = jnp.mean(chosen, axis=-2)
  prob_share = jnp.mean(probs.astype(jnp.float32), axis=-2)
  return jnp.mean(num_experts * jnp.sum(token_share * prob_share, axis=-1))


def old_router_z_loss(logits):
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def numpy_bound_routing(logits, top_k, capacity, expert_map):
  """Loop reference of bound routing: (probs, columns, experts, gate, position, kept)."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expert_map = np.asarray(expert_map)
  masked = np.where(expert_map >= 0, probs, -1.0)
  columns = np.argsort(-masked, axis=-1, kind="stable")[..., :top_k]
  experts = expert_map[columns]
  groups, tokens, _ = logits.shape
  position = np.zeros((groups, tokens, top_k), np.int64)
  for g in range(groups):
    filled = np.zeros(expert_map.max() + 1, np.int64)  # capacity is counted per expert
    for choice in range(top_k):
      for s in range(tokens):
        position[g, s, choice] = filled[experts[g, s, choice]]
        filled[experts[g, s, choice]] += 1
  gate = np.take_along_axis(probs, columns, axis=-1)
  return probs, columns, experts, gate, position, position < capacity


def numpy_losses(logits, columns, expert_map=None):
  """(load-balancing loss, z loss) over the bound columns B (all columns without a map).

  LB: |B| * sum_{c in B} f_c * P_c per group, P from the softmax over B's logits.
  """
  logits = np.asarray(logits, np.float64)
  bound = np.ones(logits.shape[-1], bool) if expert_map is None else np.asarray(expert_map) >= 0
  shifted = np.where(bound, logits - logits.max(-1, keepdims=True), -np.inf)
  log_z = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
  probs = np.exp(np.where(bound, logits, -np.inf) - log_z[..., None])
  chosen = np.zeros_like(probs)
  np.put_along_axis(chosen, np.asarray(columns), 1.0, axis=-1)
  token_share, prob_share = chosen.mean(1), probs.mean(1)
  assert np.all(token_share[:, ~bound] == 0)
  lb = np.mean(bound.sum() * np.sum(token_share * prob_share, -1))
  return lb, np.mean(log_z ** 2)


def bound_losses(logits, top_k, expert_map):
  """The losses as `moe_forward` computes them for a (possibly bound) router."""
  routing = router.route_tokens(logits, top_k=top_k, capacity=4, expert_map=expert_map)
  probs = router.bound_softmax(logits, expert_map)
  return (router.load_balancing_loss(probs, routing.column_index, expert_map),
          router.router_z_loss(logits, expert_map))


@pytest.mark.parametrize("top_k", [1, 2])
def test_unbound_losses_are_bit_identical_to_the_old_formulas(top_k):
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, 16, 8)), jnp.float32)
  routing = router.route_tokens(logits, top_k=top_k, capacity=4)
  assert routing.probs.dtype == jnp.float32
  new_lb = jax.jit(router.load_balancing_loss)(routing.probs, routing.expert_index)
  new_z = jax.jit(router.router_z_loss)(logits)
  np.testing.assert_array_equal(
      new_lb, jax.jit(old_load_balancing_loss)(routing.probs, routing.expert_index))
  np.testing.assert_array_equal(new_z, jax.jit(old_router_z_loss)(logits))
  # bound_softmax without a map is the routing's own softmax, bit for bit.
  np.testing.assert_array_equal(router.bound_softmax(logits), routing.probs)
  # And the old formulas are Switch's and ST-MoE's (numpy, float64).
  want_lb, want_z = numpy_losses(logits, routing.expert_index)
  np.testing.assert_allclose(new_lb, want_lb, rtol=1e-5)
  np.testing.assert_allclose(new_z, want_z, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_bound_losses_count_only_bound_columns(top_k):
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)
  routing = router.route_tokens(logits, top_k=top_k, capacity=4, expert_map=BOUND_MAP)
  lb, z = jax.jit(bound_losses, static_argnums=(1, 2))(logits, top_k, BOUND_MAP)
  want_lb, want_z = numpy_losses(logits, routing.column_index, BOUND_MAP)
  np.testing.assert_allclose(lb, want_lb, rtol=1e-5)
  np.testing.assert_allclose(z, want_z, rtol=1e-5)
  # Over all eight columns (the former behaviour) both are different numbers.
  all_lb, all_z = numpy_losses(logits, routing.column_index)
  assert abs(all_lb - want_lb) > 0.01 and abs(all_z - want_z) > 0.1
  # The full softmax (routing.probs) is renormalised over the bound columns: same loss.
  np.testing.assert_allclose(
      router.load_balancing_loss(routing.probs, routing.column_index, BOUND_MAP), lb,
      rtol=1e-6)
  # A router holding only the bound columns (map: a permutation onto distinct experts)
  # has the same losses without any map, and routes to the same experts.
  sliced = logits[..., SLICED_COLUMNS]
  sliced_routing = router.route_tokens(sliced, top_k=top_k, capacity=4)
  np.testing.assert_array_equal(sliced_routing.expert_index, routing.expert_index)
  sliced_lb, sliced_z = bound_losses(sliced, top_k, None)
  np.testing.assert_allclose(lb, sliced_lb, rtol=1e-6)
  np.testing.assert_allclose(z, sliced_z, rtol=1e-6)


def test_bound_losses_hand_values_and_dead_logits():
  # Map (0, -1, 1): logits [ln 3, x, 0] give bound probabilities [0.75, 0, 0.25] whatever
  # the dead column's logit x. Both tokens choose column 0: LB = 2 * (1 * 0.75) = 1.5,
  # z = logsumexp([ln 3, 0])^2 = ln(4)^2.
  expert_map = (0, -1, 1)
  for dead in (-5.0, 0.0, 7.0):
    logits = jnp.array([[[LN3, dead, 0.], [LN3, dead, 0.]]])
    np.testing.assert_allclose(router.bound_softmax(logits, expert_map)[0, 0],
                               [0.75, 0.0, 0.25], rtol=1e-6)
    lb, z = bound_losses(logits, 1, expert_map)
    np.testing.assert_allclose(lb, 1.5, rtol=1e-6)
    np.testing.assert_allclose(z, np.log(4) ** 2, rtol=1e-6)
  # A router uniform over its bound columns scores k, as the unbound loss does.
  for top_k in (1, 2):
    lb, z = bound_losses(jnp.zeros((2, 6, 8)), top_k, BOUND_MAP)
    np.testing.assert_allclose(lb, top_k, rtol=1e-6)
    np.testing.assert_allclose(z, np.log(3) ** 2, rtol=1e-6)


def test_bound_losses_leave_dead_columns_without_gradient():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 16, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)

  def losses(kernel):
    lb, z = bound_losses(router.router_logits(x, kernel), 2, BOUND_MAP)
    return lb + z

  grad = np.asarray(jax.jit(jax.grad(losses))(kernel))
  dead = [c for c, e in enumerate(BOUND_MAP) if e < 0]
  np.testing.assert_array_equal(grad[:, dead], 0.0)
  assert np.all(np.abs(grad[:, BOUND_COLUMNS]).max(0) > 1e-3)


def test_routing_diagnostics_of_bound_router_count_experts():
  # Map (0, -1, 0, 1): columns 0 and 2 share expert 0, column 1 is dead. R = 4 columns,
  # E = 2 experts. Four tokens choose columns 0, 2, 0, 3 -> experts 0, 0, 0, 1; with
  # capacity 2 per expert the third token to expert 0 is dropped (per column nothing
  # would be). Usage: 3 dispatched / (1 group * 2 experts * 2 slots) = 0.75 (with the
  # 4 columns as experts it would read 3/8; with column capacity, 4/4 or 4/8).
  expert_map = (0, -1, 0, 1)
  logits = jnp.array([[[2., 9., 0., 0.], [0., 9., 2., 0.], [2., 9., 0., 0.],
                       [0., 9., 0., 2.]]])
  routing = router.route_tokens(logits, top_k=1, capacity=2, expert_map=expert_map)
  np.testing.assert_array_equal(routing.column_index[0, :, 0], [0, 2, 0, 3])
  np.testing.assert_array_equal(routing.expert_index[0, :, 0], [0, 0, 0, 1])
  np.testing.assert_array_equal(routing.kept[0, :, 0], [True, True, False, True])
  stats = router.routing_diagnostics(routing, 2, num_experts=2)
  np.testing.assert_allclose(stats["expert_usage"], 3 / 4)
  np.testing.assert_allclose(stats["fraction_tokens_left_behind"], 1 / 4)
  # Gates are the full 4-way probabilities (the dead column's logit 9 makes them small).
  p = np.exp(2.) / (np.exp(2.) + np.exp(9.) + 2.)
  np.testing.assert_allclose(stats["router_confidence"], p, rtol=1e-5)
  np.testing.assert_allclose(stats["routed_probability"], 3 * p / 4, rtol=1e-5)
  # The default counts one expert per column, which is only right for unbound routers.
  np.testing.assert_allclose(router.routing_diagnostics(routing, 2)["expert_usage"], 3 / 8)
  # Against the loop reference on random logits, top-2 (two choices may share an expert).
  logits = np.random.default_rng(6).normal(size=(3, 16, 8)).astype(np.float32)
  routing = router.route_tokens(jnp.asarray(logits), top_k=2, capacity=3,
                                expert_map=BOUND_MAP)
  _, columns, experts, gate, position, kept = numpy_bound_routing(logits, 2, 3, BOUND_MAP)
  np.testing.assert_array_equal(routing.column_index, columns)
  np.testing.assert_array_equal(routing.expert_index, experts)
  np.testing.assert_array_equal(routing.kept, kept)
  assert 0 < kept.sum() < kept.size
  stats = router.routing_diagnostics(routing, 3, num_experts=3)
  np.testing.assert_allclose(stats["expert_usage"], kept.sum() / (3 * 3 * 3), rtol=1e-6)
  np.testing.assert_allclose(stats["fraction_tokens_left_behind"], 1 - kept.any(-1).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(stats["router_confidence"],
                             np.where(kept, gate, 0).sum() / kept.sum(), rtol=1e-5)


def test_bound_losses_reject_bad_maps():
  with pytest.raises(ValueError, match="3 entries for 4 router columns"):
    router.router_z_loss(jnp.zeros((1, 2, 4)), (0, 1, -1))
  with pytest.raises(ValueError, match="binds no column"):
    router.load_balancing_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 1), jnp.int32),
                               (-1, -1, -1))
