"""MoeLayer against a loop-based numpy reference; einsum and gather dispatch agree."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.model.test_router import (BOUND_MAP, SLICED_COLUMNS, numpy_bound_routing,
                                     numpy_losses, numpy_routing)
from uncurl_jax.model import configs, moe, router

BATCH, LENGTH = 2, 16
# Capacity regimes: "drop" forces overflow (capacity 1 per expert for top-1, 2 for
# top-2), "default" is the paper's eval factor 1.0 with minimum 4, "dropless" keeps all.
REGIMES = {
    "drop": dict(eval_capacity_factor=0.5, train_capacity_factor=0.5, min_capacity=1),
    "default": dict(),
    "dropless": dict(dropless=True),
}


def make_config(top_k=1, regime="default", **overrides):
  return configs.get("tiny", num_experts=8, d_model=16, d_ff=32, num_heads=4, top_k=top_k,
                     init_std=0.3, **{**REGIMES[regime], **overrides})


def random_params(config, seed=0):
  """Parameters with every leaf random (biases included, so their use is checked)."""
  x = jnp.zeros((BATCH, LENGTH, config.d_model))
  shapes = jax.eval_shape(
      lambda: moe.MoeLayer(config=config).init(jax.random.key(0), x, deterministic=True))
  leaves, treedef = jax.tree.flatten(shapes["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(0.5 * rng.normal(size=leaf.shape), jnp.float32) for leaf in leaves])


def random_input(config, seed=1, batch=BATCH, length=LENGTH):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, config.d_model)),
                     jnp.float32)


def numpy_gelu(h):
  return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))


def numpy_moe(params, x_grouped, top_k, capacity):
  """Per-token loop: y[t] = sum over kept choices of gate * expert_e(x[t])."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x_grouped, np.float64)
  logits = x @ p["router"]["kernel"]
  _, expert_index, gate, _, kept = numpy_routing(logits, top_k, capacity)
  wi, wo = p["expert"]["wi"], p["expert"]["wo"]
  y = np.zeros_like(x)
  for g, s, k in zip(*np.nonzero(kept)):
    e = expert_index[g, s, k]
    hidden = numpy_gelu(x[g, s] @ wi["kernel"][e] + wi["bias"][e])
    y[g, s] += gate[g, s, k] * (hidden @ wo["kernel"][e] + wo["bias"][e])
  return y, logits, kept


def apply_layer(config, params, x, deterministic=True, mutable=("intermediates",)):
  return moe.MoeLayer(config=config).apply(
      {"params": params}, x, deterministic=deterministic, mutable=list(mutable))


def loss_and_grads(config, params, x):
  """Gradients of a scalar that touches the output, the aux loss and the z-loss."""
  cotangent = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)

  def loss(params, x):
    y, state = apply_layer(config, params, x)
    inter = state["intermediates"]
    return (jnp.sum(y * cotangent) + inter["auxiliary_loss"][0]
            + inter["router_z_loss"][0]), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


def test_parameter_layout_and_logical_axes():
  config = make_config()
  variables = moe.MoeLayer(config=config).init(
      jax.random.key(0), random_input(config), deterministic=True)
  shapes = flax.traverse_util.flatten_dict(jax.tree.map(jnp.shape, variables["params"]),
                                           sep="/")
  assert shapes == {
      "router/kernel": (16, 8),
      "expert/wi/kernel": (8, 16, 32), "expert/wi/bias": (8, 32),
      "expert/wo/kernel": (8, 32, 16), "expert/wo/bias": (8, 16),
  }
  axes = flax.traverse_util.flatten_dict(variables["params_axes"], sep="/")
  assert {k: v.names for k, v in axes.items()} == {
      "router/kernel_axes": ("embed", "unmodeled"),
      "expert/wi/kernel_axes": ("expert", "embed", "expert_mlp"),
      "expert/wi/bias_axes": ("expert", "expert_mlp"),
      "expert/wo/kernel_axes": ("expert", "expert_mlp", "embed"),
      "expert/wo/bias_axes": ("expert", "embed"),
  }
  # init makes every collection mutable; router logits are only written on request.
  assert "router_logits" not in variables


@pytest.mark.parametrize("capacity_formula", ["top_k", "t5x"])
@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_matches_numpy_reference(dispatch, top_k, capacity_formula):
  config = make_config(top_k, "drop", dispatch=dispatch, capacity_formula=capacity_formula)
  params, x = random_params(config), random_input(config)
  y, state = jax.jit(lambda p, x: apply_layer(config, p, x))(params, x)
  capacity = config.capacity(LENGTH, train=False)
  want, logits, kept = numpy_moe(params, x, top_k, capacity)
  assert not kept.all()
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  inter = {k: v[0] for k, v in state["intermediates"].items()}
  assert set(inter) == set(moe.INTERMEDIATE_NAMES)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(inter["router_z_loss"], np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(inter["expert_usage"],
                             kept.sum() / (BATCH * config.num_experts * capacity), rtol=1e-6)
  np.testing.assert_allclose(inter["fraction_tokens_left_behind"],
                             1 - kept.any(-1).mean(), rtol=1e-6)
  probs = np.exp(logits - lse[..., None])
  kept_gates = np.where(kept, -np.sort(-probs, -1)[..., :top_k], 0.0)
  np.testing.assert_allclose(inter["router_confidence"], kept_gates.sum() / kept.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(inter["routed_probability"], kept_gates.sum(-1).mean(), rtol=1e-5)
  chosen = np.zeros_like(probs)
  np.put_along_axis(chosen, np.argsort(-probs, -1)[..., :top_k], 1.0, axis=-1)
  aux = 8 * np.mean(np.sum(chosen.mean(1) * probs.mean(1), -1))
  np.testing.assert_allclose(inter["auxiliary_loss"], aux, rtol=1e-5)


def test_overflow_tokens_output_zero():
  config = make_config(1, "drop")
  params, x = random_params(config), random_input(config)
  y, _ = jax.jit(lambda p, x: apply_layer(config, p, x))(params, x)
  _, _, kept = numpy_moe(params, x, 1, config.capacity(LENGTH, train=False))
  dropped = ~kept[..., 0]
  assert 0 < dropped.sum() < dropped.size
  np.testing.assert_array_equal(np.asarray(y)[dropped], 0.0)
  assert np.all(np.abs(np.asarray(y)[~dropped]).max(-1) > 0)


@pytest.mark.parametrize("regime", ["drop", "default", "dropless"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_einsum_and_gather_dispatch_agree(top_k, regime):
  config = make_config(top_k, regime)
  params, x = random_params(config), random_input(config)
  (loss_e, y_e), grads_e = loss_and_grads(config, params, x)
  gather_config = dataclasses.replace(config, dispatch="gather")
  (loss_g, y_g), grads_g = loss_and_grads(gather_config, params, x)
  np.testing.assert_allclose(y_g, y_e, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_g, loss_e, rtol=1e-5)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6),
               grads_g, grads_e)
  assert np.abs(grads_e[0]["router"]["kernel"]).max() > 0


def test_router_logits_collection_only_when_mutable():
  config = make_config()
  params, x = random_params(config), random_input(config)
  _, state = apply_layer(config, params, x)
  assert "router_logits" not in state
  _, state = apply_layer(config, params, x, mutable=["router_logits"])
  logits = state["router_logits"]["logits"]
  assert logits.dtype == jnp.float32 and logits.shape == (BATCH, LENGTH, 8)
  np.testing.assert_allclose(logits, np.asarray(x) @ np.asarray(params["router"]["kernel"]),
                             rtol=1e-5, atol=1e-5)


def test_training_capacity_factor_applies_when_not_deterministic():
  config = make_config(1, "default", train_capacity_factor=4.0, eval_capacity_factor=2.0)
  params, x = random_params(config), random_input(config)
  for deterministic, capacity in ((False, 8), (True, 4)):
    assert config.capacity(LENGTH, train=not deterministic) == capacity
    _, state = apply_layer(config, params, x, deterministic=deterministic)
    _, _, kept = numpy_moe(params, x, 1, capacity)
    np.testing.assert_allclose(state["intermediates"]["expert_usage"][0],
                               kept.sum() / (BATCH * 8 * capacity), rtol=1e-6)


def test_group_size_routes_across_sequences():
  # Groups of 8 tokens: each 16-token sequence is two groups of its own.
  config = make_config(2, "drop", group_size=8)
  params, x = random_params(config), random_input(config)
  y, _ = apply_layer(config, params, x)
  capacity = config.capacity(8, train=False)
  want, _, _ = numpy_moe(params, np.asarray(x).reshape(4, 8, 16), 2, capacity)
  np.testing.assert_allclose(y, want.reshape(BATCH, LENGTH, 16), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="group_size=5"):
    apply_layer(dataclasses.replace(config, group_size=5), params, x)


def test_bfloat16_compute_keeps_router_in_float32():
  config = make_config(2, "default", dtype="bfloat16")
  params, x = random_params(config), random_input(config)
  y, state = apply_layer(config, params, x, mutable=["intermediates", "router_logits"])
  assert y.dtype == jnp.bfloat16
  assert state["router_logits"]["logits"].dtype == jnp.float32
  want, _ = apply_layer(dataclasses.replace(config, dtype="float32"), params, x)
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0.05, atol=0.05)


def test_bad_inputs_raise():
  config = make_config()
  params = random_params(config)
  with pytest.raises(ValueError, match=r"expected input \[batch, length, 16\]"):
    apply_layer(config, params, jnp.zeros((2, 4, 12)))
  with pytest.raises(ValueError, match="num_experts >= 1"):
    moe.MoeLayer(config=dataclasses.replace(config, num_experts=0)).init(
        jax.random.key(0), jnp.zeros((2, 4, 16)), deterministic=True)
  routing = router.route_tokens(jnp.zeros((1, 4, 8)), top_k=1, capacity=4)
  with pytest.raises(ValueError, match="dispatch mode"):
    moe.dispatch_tokens(jnp.zeros((1, 4, 16)), routing, capacity=4, mode="sort")


def bound_config(top_k, **overrides):
  """Eight router columns bound to three experts (`BOUND_MAP`, five dead columns)."""
  return dataclasses.replace(make_config(top_k, "drop", **overrides), num_experts=3,
                             router_map=BOUND_MAP)


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_bound_router_losses_and_usage(top_k, dispatch):
  config = bound_config(top_k, dispatch=dispatch)
  params, x = random_params(config), random_input(config)
  assert params["router"]["kernel"].shape == (16, 8)
  _, state = jax.jit(lambda p, x: apply_layer(config, p, x))(params, x)
  inter = {k: v[0] for k, v in state["intermediates"].items()}
  capacity = config.capacity(LENGTH, train=False)
  logits = np.asarray(x, np.float64) @ np.asarray(params["router"]["kernel"], np.float64)
  _, columns, _, gate, _, kept = numpy_bound_routing(logits, top_k, capacity, BOUND_MAP)
  assert 0 < kept.sum() < kept.size
  # Losses over the bound columns only; usage over the 3 experts' slots, not 8 columns'.
  want_lb, want_z = numpy_losses(logits, columns, BOUND_MAP)
  np.testing.assert_allclose(inter["auxiliary_loss"], want_lb, rtol=1e-5)
  np.testing.assert_allclose(inter["router_z_loss"], want_z, rtol=1e-5)
  np.testing.assert_allclose(inter["expert_usage"], kept.sum() / (BATCH * 3 * capacity),
                             rtol=1e-6)
  np.testing.assert_allclose(inter["fraction_tokens_left_behind"], 1 - kept.any(-1).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(inter["router_confidence"],
                             np.where(kept, gate, 0).sum() / kept.sum(), rtol=1e-5)

  # The router sliced to its bound columns (expert e's column at e) routes the same tokens
  # to the same experts and has the same losses; only the gates (E-way vs 3-way softmax)
  # differ.
  sliced_config = dataclasses.replace(config, router_map=None)
  sliced = {**params, "router": {"kernel": params["router"]["kernel"][:, SLICED_COLUMNS]}}
  _, sliced_state = apply_layer(sliced_config, sliced, x)
  sliced_inter = {k: v[0] for k, v in sliced_state["intermediates"].items()}
  for name in ("auxiliary_loss", "router_z_loss", "expert_usage",
               "fraction_tokens_left_behind"):
    np.testing.assert_allclose(inter[name], sliced_inter[name], rtol=1e-5, err_msg=name)
  assert inter["router_confidence"] < 0.9 * sliced_inter["router_confidence"]


def test_bound_router_losses_do_not_train_dead_columns():
  config = bound_config(2)
  params, x = random_params(config), random_input(config)

  def router_losses(params):
    _, state = apply_layer(config, params, x)
    inter = state["intermediates"]
    return inter["auxiliary_loss"][0] + inter["router_z_loss"][0]

  grad = np.asarray(jax.jit(jax.grad(router_losses))(params)["router"]["kernel"])
  dead = [c for c, e in enumerate(BOUND_MAP) if e < 0]
  bound = [c for c, e in enumerate(BOUND_MAP) if e >= 0]
  np.testing.assert_array_equal(grad[:, dead], 0.0)
  assert np.all(np.abs(grad[:, bound]).max(0) > 1e-3)
  # The task loss still reaches them: the gate is the E-way softmax probability.
  (_, _), grads = loss_and_grads(config, params, x)
  assert np.all(np.abs(np.asarray(grads[0]["router"]["kernel"])[:, dead]).max(0) > 0)


def test_bound_router_hand_example_balances_columns_and_counts_usage_per_expert():
  # Map (0, 1, 0, 1): four router columns, two experts (columns 0 and 2 -> expert 0).
  # The kernel is ln(3) on the diagonal of the first four input dims and token t is the
  # unit vector of column [0, 2, 0, 1][t], so its probabilities are 1/2 on that column
  # and 1/6 on the others. Columns chosen: 0, 2, 0, 1 -> experts 0, 0, 0, 1.
  # Load balancing counts columns: f = [1/2, 1/4, 1/4, 0], P = [1/3, 1/4, 1/4, 1/6],
  # LB = 4 * (1/6 + 1/16 + 1/16) = 7/6 (counting experts, f = [3/4, 1/4, 0, 0]: 5/4).
  # Capacity counts experts: 2 slots each, so token 2 (expert 0's third) is dropped:
  # usage 3 / (1 group * 2 experts * 2 slots) = 3/4 (per column nothing is dropped: 1;
  # over the 4 columns' slots it would be 3/8), left behind 1/4.
  config = dataclasses.replace(
      make_config(1, eval_capacity_factor=1.0, min_capacity=1), num_experts=2,
      router_map=(0, 1, 0, 1))
  assert config.capacity(4, train=False) == 2
  params = random_params(config)
  kernel = np.zeros((config.d_model, 4), np.float32)
  kernel[np.arange(4), np.arange(4)] = np.log(3.0)
  params = {**params, "router": {"kernel": jnp.asarray(kernel)}}
  x = np.zeros((1, 4, config.d_model), np.float32)
  x[0, np.arange(4), [0, 2, 0, 1]] = 1.0
  y, state = apply_layer(config, params, jnp.asarray(x))
  inter = {k: float(v[0]) for k, v in state["intermediates"].items()}
  np.testing.assert_allclose(inter["auxiliary_loss"], 7 / 6, rtol=1e-6)
  np.testing.assert_allclose(inter["router_z_loss"], np.log(6.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(inter["expert_usage"], 3 / 4, rtol=1e-6)
  np.testing.assert_allclose(inter["fraction_tokens_left_behind"], 1 / 4, rtol=1e-6)
  np.testing.assert_allclose(inter["router_confidence"], 1 / 2, rtol=1e-6)
  np.testing.assert_allclose(inter["routed_probability"], 3 / 8, rtol=1e-6)
  # The dropped token outputs zero; the others reach their expert.
  norms = np.linalg.norm(np.asarray(y)[0], axis=-1)
  assert norms[2] == 0 and np.all(norms[[0, 1, 3]] > 0)
