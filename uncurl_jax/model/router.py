"""Router math for tokens-choose top-k mixture-of-experts layers.

Pure functions over arrays grouped as `[G, S, ...]` (G routing groups of S tokens).
Capacity is counted per group. The MoE layer (`moe.py`) composes them; they are kept
separate so each can be checked against a plain reference.

Example:
  >>> x = jnp.ones((2, 8, 16))                      # [G, S, d]
  >>> kernel = 0.02 * jax.random.normal(key, (16, 4))
  >>> logits = router_logits(x, kernel)              # [2, 8, 4] float32
  >>> routing = route_tokens(logits, top_k=1, capacity=4)
  >>> routing.kept.shape                             # [G, S, k]
  (2, 8, 1)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """Where each (token, choice) goes. All fields are `[G, S, k]`.

  Attributes:
    expert_index: Chosen expert of each choice, best first (int32).
    slot: Position of the choice in its expert's buffer; equals `capacity` (one past
      the end) for dropped choices, so an out-of-bounds scatter drops them.
    gate: Softmax probability of the chosen expert (float32, not renormalized).
    kept: Whether the choice fits within capacity.
    probs: Full router probabilities `[G, S, R]` (float32) over the router's R columns
      (R = E unless columns are bound to experts), the auxiliary loss's input when no
      column is bound (a bound router's loss uses `bound_softmax` instead).
    column_index: Chosen router column of each choice (= `expert_index` unless bound).
  """

  expert_index: jax.Array
  slot: jax.Array
  gate: jax.Array
  kept: jax.Array
  probs: jax.Array
  column_index: jax.Array


def router_logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Raw router logits `x @ kernel` in float32, whatever the input dtype.

  Example: `router_logits(x_gsd, kernel_de)` has shape `[G, S, E]`.
  """
  if x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"router kernel {kernel.shape} does not match input width {x.shape[-1]}")
  # The router stays in float32 even under bf16 compute: top-k on bf16 logits ties often.
  return jnp.einsum("...d,de->...e", x.astype(jnp.float32), kernel.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def top_k_choices(probs: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """Experts chosen by each token, best first, and their gate values.

  Example: `expert_index, gate = top_k_choices(probs, 2)` gives two `[G, S, 2]` arrays.
  """
  if not 1 <= top_k <= probs.shape[-1]:
    raise ValueError(f"top_k={top_k} must be in [1, num_experts={probs.shape[-1]}]")
  gate, expert_index = jax.lax.top_k(probs, top_k)
  return expert_index.astype(jnp.int32), gate


def capacity_positions(expert_index: jax.Array, num_experts: int) -> jax.Array:
  """Buffer position of every (token, choice) in priority order, per group.

  All tokens' first choices are placed in token order, then all second choices, ...;
  the position counts earlier choices sent to the same expert in the same group.

  Example: tokens choosing experts [[0], [1], [0]] get positions [[0], [0], [1]].

  Args:
    expert_index: `[G, S, k]` chosen experts.
    num_experts: E.

  Returns:
    `[G, S, k]` int32 positions (not yet compared with the capacity).
  """
  groups, tokens, top_k = expert_index.shape
  one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G, S, k, E]
  # Choice-major order: [G, k, S, E] flattened so that cumsum runs over priority.
  by_priority = one_hot.transpose(0, 2, 1, 3).reshape(groups, top_k * tokens, num_experts)
  position = jnp.cumsum(by_priority, axis=1) - 1
  position = jnp.sum(position * by_priority, axis=-1)  # [G, k*S]
  return position.reshape(groups, top_k, tokens).transpose(0, 2, 1).astype(jnp.int32)


def route_tokens(logits: jax.Array, *, top_k: int, capacity: int,
                 expert_map: tuple[int, ...] | None = None,
                 column_mask: jax.Array | None = None) -> Routing:
  """Tokens-choose top-k routing with per-group expert capacity.

  Example: `route_tokens(logits, top_k=2, capacity=4).slot` is `[G, S, 2]`.

  Args:
    logits: `[G, S, R]` raw router logits.
    top_k: Router choices per token.
    capacity: Slots per expert and group; choices beyond it are dropped.
    expert_map: Router columns bound to experts: column c routes to expert
      `expert_map[c]` (its gate stays column c's probability; two choices of one token
      may reach the same expert); -1: column c is never chosen. None: column c is
      expert c.
    column_mask: `[R]` traced 0/1 (or bool): columns with 0 are never chosen, as if bound
      to -1 (the gates stay the full softmax probabilities), without a static map, so
      one compiled program evaluates any subset of experts (the study's oracle
      selection). A choice left without an allowed column is dropped.
  """
  if logits.ndim != 3:
    raise ValueError(f"logits must be [groups, tokens, experts], got shape {logits.shape}")
  if capacity < 1:
    raise ValueError(f"capacity must be >= 1, got {capacity}")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  num_experts = logits.shape[-1]
  valid = None
  if column_mask is not None:
    if column_mask.shape != (logits.shape[-1],):
      raise ValueError(f"column_mask must be [{logits.shape[-1]}] (one per router column), "
                       f"got shape {column_mask.shape}")
    if expert_map is not None:
      raise ValueError("give expert_map or column_mask, not both")
    allowed = jnp.asarray(column_mask) > 0
    column_index, _ = top_k_choices(jnp.where(allowed, probs, -1.0), top_k)
    gate = jnp.take_along_axis(probs, column_index, axis=-1)
    expert_index = column_index
    valid = allowed[column_index]
  elif expert_map is None:
    column_index, gate = top_k_choices(probs, top_k)
    expert_index = column_index
  else:
    if len(expert_map) != logits.shape[-1]:
      raise ValueError(f"expert_map has {len(expert_map)} entries for {logits.shape[-1]} "
                       "router columns")
    if sum(c >= 0 for c in expert_map) < top_k:
      raise ValueError(f"expert_map binds fewer than top_k={top_k} columns: {expert_map}")
    bound = jnp.asarray(expert_map, jnp.int32)
    # Unbound columns (-1) are never chosen; the gate stays the full softmax probability.
    column_index, _ = top_k_choices(jnp.where(bound >= 0, probs, -1.0), top_k)
    gate = jnp.take_along_axis(probs, column_index, axis=-1)
    num_experts = max(expert_map) + 1
    expert_index = bound[column_index]
  position = capacity_positions(expert_index, num_experts)
  kept = position < capacity
  if valid is not None:
    kept &= valid
  slot = jnp.where(kept, position, capacity)
  return Routing(expert_index=expert_index, slot=slot, gate=gate, kept=kept, probs=probs,
                 column_index=column_index)


def dispatch_and_combine_masks(routing: Routing, capacity: int, num_experts: int | None = None
                               ) -> tuple[jax.Array, jax.Array]:
  """One-hot dispatch mask and combine weights `[G, S, E, C]` (the einsum form).

  Example: `dispatch, combine = dispatch_and_combine_masks(routing, 4)`; then
  `jnp.einsum('gsec,gsd->egcd', dispatch, x)` fills the expert buffers.

  Args:
    routing: The routing.
    capacity: Slots per expert.
    num_experts: E (default: one expert per router column).

  Returns:
    dispatch: float32 0/1 mask, one where token s of group g sits in slot c of expert e.
    combine: float32, the gate of that choice in the same place.
  """
  num_experts = routing.probs.shape[-1] if num_experts is None else num_experts
  expert_one_hot = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)
  # Dropped choices have slot == capacity, whose one-hot row is all zeros.
  slot_one_hot = jax.nn.one_hot(routing.slot, capacity, dtype=jnp.float32)
  dispatch = jnp.einsum("gske,gskc->gsec", expert_one_hot, slot_one_hot)
  combine = jnp.einsum("gske,gskc,gsk->gsec", expert_one_hot, slot_one_hot, routing.gate)
  return dispatch, combine


def _bound_columns(expert_map: tuple[int, ...], columns: int) -> jax.Array:
  """`[R]` bool mask of the columns bound to an expert (`expert_map[c] >= 0`)."""
  if len(expert_map) != columns:
    raise ValueError(f"expert_map has {len(expert_map)} entries for {columns} router columns")
  if not any(c >= 0 for c in expert_map):
    raise ValueError(f"expert_map binds no column to an expert: {expert_map}")
  return jnp.asarray(expert_map, jnp.int32) >= 0


def bound_softmax(logits: jax.Array, expert_map: tuple[int, ...] | None = None) -> jax.Array:
  """Router probabilities over the bound columns only (softmax of their logits), float32.

  Unbound columns (`expert_map[c] == -1`) get probability 0 and no gradient; without a
  map this is the plain softmax over all columns (what `route_tokens` puts in `probs`).

  Example: logits `[ln 3, 5, 0]` with map `(0, -1, 1)` give `[0.75, 0, 0.25]`.
  """
  logits = logits.astype(jnp.float32)
  if expert_map is None:
    return jax.nn.softmax(logits, axis=-1)
  bound = _bound_columns(expert_map, logits.shape[-1])
  return jax.nn.softmax(jnp.where(bound, logits, -jnp.inf), axis=-1)


def load_balancing_loss(probs: jax.Array, expert_index: jax.Array,
                        expert_map: tuple[int, ...] | None = None) -> jax.Array:
  """Switch auxiliary loss `E * sum_e f_e * P_e` per group, averaged over groups.

  f_e is the share of tokens whose top-k choices include e (before capacity), P_e the
  mean router probability of e. A uniform router scores k (1.0 for top-1).

  A bound router (`expert_map`, see `route_tokens`) is balanced over its bound columns
  B = {c : expert_map[c] >= 0} only: `|B| * sum_{c in B} f_c * P_c`, f_c the share of
  tokens choosing column c, P_c the mean of the probability renormalised over B (the
  softmax of the bound columns' logits, `bound_softmax`). It is the loss of a router
  holding only the columns of B, so a router uniform over B scores k, and an unbound
  column (never chosen, f_c = 0) can no longer lower the loss by taking probability from
  the kept experts' gates. Columns bound to one expert count separately (the loss
  balances columns, as the router was trained to, not experts).

  Example: `load_balancing_loss(routing.probs, routing.expert_index)`; bound:
  `load_balancing_loss(bound_softmax(logits, m), routing.column_index, m)`.

  Args:
    probs: `[G, S, R]` router probabilities. With `expert_map` they are renormalised over
      B, so `routing.probs` gives the same value up to rounding; prefer
      `bound_softmax(logits, expert_map)`, whose unbound columns get exactly zero
      gradient and which cannot give 0/0 when all of B's full-softmax mass underflows.
    expert_index: `[G, S, k]` chosen columns (`routing.column_index` when bound).
    expert_map: The router's column bindings (-1: unbound); None: every column counts.
  """
  num_experts = probs.shape[-1]
  chosen = jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)
  token_share = jnp.mean(chosen, axis=-2)  # [G, E]
  if expert_map is None:
    prob_share = jnp.mean(probs.astype(jnp.float32), axis=-2)  # [G, E]
    return jnp.mean(num_experts * jnp.sum(token_share * prob_share, axis=-1))
  bound = _bound_columns(expert_map, num_experts)
  bound_probs = jnp.where(bound, probs.astype(jnp.float32), 0.0)
  bound_probs = bound_probs / jnp.sum(bound_probs, axis=-1, keepdims=True)
  prob_share = jnp.mean(bound_probs, axis=-2)  # [G, R], zero off B
  token_share = jnp.where(bound, token_share, 0.0)
  num_bound = sum(c >= 0 for c in expert_map)
  return jnp.mean(num_bound * jnp.sum(token_share * prob_share, axis=-1))


def router_z_loss(logits: jax.Array, expert_map: tuple[int, ...] | None = None) -> jax.Array:
  """Mean over tokens of `logsumexp(logits)^2` (ST-MoE), which keeps logits small.

  With `expert_map` the logsumexp runs over the bound columns only (those with
  `expert_map[c] >= 0`): unbound columns are never chosen, so their logits are left
  alone (zero gradient) and do not count towards the normaliser.

  Example: zero logits over E experts give `log(E)**2`; with map `(0, -1, 1, -1)` they
  give `log(2)**2`.
  """
  logits = logits.astype(jnp.float32)
  if expert_map is not None:
    bound = _bound_columns(expert_map, logits.shape[-1])
    logits = jnp.where(bound, logits, -jnp.inf)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return jnp.mean(jnp.square(log_z))


def routing_diagnostics(routing: Routing, capacity: int,
                        num_experts: int | None = None) -> dict[str, jax.Array]:
  """Scalar routing statistics under the names t5x's MoE model reads (and one more).

  The first three are defined as flaxformer's MoE layer defines them, so a t5x user's
  dashboards mean the same here.

  Example: `routing_diagnostics(routing, capacity)['expert_usage']`; for a bound router
  pass the experts: `routing_diagnostics(routing, capacity, config.num_experts)`.

  Args:
    routing: The routing. Its `kept` counts capacity per expert (`expert_index`), so two
      columns bound to one expert share that expert's slots.
    capacity: Slots per expert and group.
    num_experts: E, the number of experts, whose slots `expert_usage` divides by
      (default: one per router column, which is wrong for a bound router: R > E).

  Returns:
    fraction_tokens_left_behind: share of tokens dispatched to no expert at all.
    expert_usage: dispatched choices over total slots (G * E * capacity).
    router_confidence: mean gate (router probability) over the dispatched (token, choice)
      pairs; dropped choices count in neither sum (0 when nothing is dispatched).
    routed_probability: mean over tokens of the summed gates of their kept choices, the
      share of router probability that reaches the output (this project's former
      `router_confidence`; dropped tokens count as 0).
  """
  groups, tokens, _ = routing.kept.shape
  num_experts = routing.probs.shape[-1] if num_experts is None else num_experts
  kept = routing.kept.astype(jnp.float32)
  dispatched_somewhere = jnp.max(kept, axis=-1)
  dispatched = jnp.sum(kept)
  kept_gates = jnp.sum(kept * routing.gate)
  return {
      "fraction_tokens_left_behind": 1.0 - jnp.mean(dispatched_somewhere),
      "expert_usage": dispatched / (groups * num_experts * capacity),
      "router_confidence": jnp.where(dispatched > 0,
                                     kept_gates / jnp.maximum(dispatched, 1.0), 0.0),
      "routed_probability": kept_gates / (groups * tokens),
  }
