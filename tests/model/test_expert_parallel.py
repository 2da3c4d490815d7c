"""The expert-parallel MoE path (shard_map + all_to_all) equals the single-device layer.

Runs on the 8 simulated CPU devices that tests/conftest.py asks XLA for.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncurl_jax.model import configs, moe

BATCH, LENGTH = 8, 16
REGIMES = {
    # Capacity 1 (top-1) or 2 (top-2) slots per expert and 16-token group: overflow.
    "drop": dict(eval_capacity_factor=0.5, min_capacity=1),
    "dropless": dict(dropless=True),
}


def make_config(num_experts, top_k, regime, **overrides):
  return configs.get("tiny", num_experts=num_experts, d_model=16, d_ff=32, num_heads=4,
                     top_k=top_k, **{**REGIMES[regime], **overrides})


def make_mesh(data, expert, model=1):
  return jax.make_mesh((data, expert, model), ("data", "expert", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def inputs(config):
  """Random params (biases included), input and output cotangent, fixed per config."""
  rng = np.random.default_rng(config.num_experts * 10 + config.top_k)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, config.d_model)), jnp.float32)
  shapes = jax.eval_shape(lambda: moe.MoeLayer(config=config).init(
      jax.random.key(0), x, deterministic=True))["params"]
  leaves, treedef = jax.tree.flatten(shapes)
  params = jax.tree.unflatten(
      treedef, [jnp.asarray(0.5 * rng.normal(size=s.shape), jnp.float32) for s in leaves])
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  return params, x, cotangent


def forward_and_grads(config, params, x, cotangent):
  """(output, scalars, router logits) and gradients w.r.t. params and input, jitted."""
  layer = moe.MoeLayer(config=config)

  def loss(params, x):
    y, state = layer.apply({"params": params}, x, deterministic=True,
                           mutable=["intermediates", "router_logits"])
    scalars = {k: v[0] for k, v in state["intermediates"].items()}
    total = jnp.sum(y * cotangent) + scalars["auxiliary_loss"] + scalars["router_z_loss"]
    return total, (y, scalars, state["router_logits"]["logits"])

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, outputs), grads = grad_fn(params, x)
  return jax.device_get((outputs, grads))


@functools.lru_cache(maxsize=None)
def single_device_result(config):
  return forward_and_grads(config, *inputs(config))


def expert_parallel_result(config, mesh):
  with jax.set_mesh(mesh):
    return forward_and_grads(config, *inputs(config))


def assert_same(got, want):
  """Equal up to float32 summation order (sharded sums add in a different order)."""
  def check(g, w):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))
  jax.tree.map(check, got, want)


@pytest.mark.parametrize("regime", ["drop", "dropless"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("expert_shards", [2, 4, 8])
@pytest.mark.parametrize("num_experts", [8, 32])
def test_expert_parallel_equals_single_device(num_experts, expert_shards, top_k, regime):
  config = make_config(num_experts, top_k, regime)
  want = single_device_result(config)
  got = expert_parallel_result(config, make_mesh(8 // expert_shards, expert_shards))
  assert_same(got, want)
  dispatched_share = want[0][1]["expert_usage"] * num_experts * config.capacity(
      LENGTH, train=False) / (LENGTH * top_k)
  assert (dispatched_share < 1) == (regime == "drop")


@pytest.mark.parametrize("num_experts,mesh_shape,dispatch,group_size", [
    (8, (1, 4, 2), "einsum", None),    # d_ff split over 'model' too
    (32, (2, 2, 2), "gather", None),
    (32, (2, 4, 1), "gather", 8),      # routing groups of 8 tokens
])
def test_expert_parallel_variants_equal_single_device(num_experts, mesh_shape, dispatch,
                                                      group_size):
  config = make_config(num_experts, 2, "drop", dispatch=dispatch, group_size=group_size)
  want = single_device_result(config)
  assert_same(expert_parallel_result(config, make_mesh(*mesh_shape)), want)


@pytest.mark.parametrize("expert_parallel,uses_all_to_all", [("auto", True),
                                                             ("never", False)])
def test_expert_parallel_mode_selects_path(expert_parallel, uses_all_to_all):
  config = make_config(8, 1, "drop", expert_parallel=expert_parallel)
  params, x, _ = inputs(config)
  apply = lambda p, x: moe.MoeLayer(config=config).apply({"params": p}, x,
                                                         deterministic=True)
  with jax.set_mesh(make_mesh(4, 2)):
    assert ("all_to_all" in str(jax.make_jaxpr(apply)(params, x))) == uses_all_to_all
  # A mesh whose 'expert' axis has size one keeps the single-device path.
  with jax.set_mesh(make_mesh(8, 1)):
    assert "all_to_all" not in str(jax.make_jaxpr(apply)(params, x))


def test_expert_parallel_rejects_indivisible_shapes():
  config = make_config(12, 1, "drop")
  params, x, _ = inputs(config)
  apply = lambda config, x: moe.MoeLayer(config=config).apply({"params": params}, x,
                                                              deterministic=True)
  with jax.set_mesh(make_mesh(1, 8)):
    with pytest.raises(ValueError, match="num_experts=12 must be divisible"):
      apply(config, x)
  config = dataclasses.replace(config, num_experts=8)
  params, x, _ = inputs(config)
  with jax.set_mesh(make_mesh(2, 4)):
    with pytest.raises(ValueError, match="batch size 4 must be divisible by the 8"):
      apply(config, x[:4])
