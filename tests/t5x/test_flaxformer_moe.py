"""This project's MoE layer against flaxformer's `MoeLayer`, and pruning flaxformer trees.

Identical weights and inputs; tokens-choose top-1 and top-2, with and without dropping,
einsum and gather dispatch; `capacity_formula="t5x"` so both layers have the same
capacity. Gated (GeGLU) flaxformer experts are pruned with `T5X_GATED_LAYOUT` and the
pruned tree runs in a flaxformer layer with fewer experts.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.model import configs
from uncurl_jax.model import moe

pytestmark = pytest.mark.t5x

BATCH, LENGTH, D_MODEL, D_FF, EXPERTS = 4, 16, 16, 32, 4
METRICS = ("auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind",
           "router_confidence", "expert_usage")


def flaxformer_layer(num_experts, top_k, capacity_factor, activations=("gelu",),
                     use_bias=True):
  """flaxformer's MoeLayer with one routing group per sequence of 16 tokens.

  flaxformer makes the group count a multiple of E x the expert replicas (devices over
  expert x model partitions); with E expert partitions and the remaining devices on
  'model' there is one replica, so 16-token groups are the sequences, as ours.
  """
  from flaxformer.architectures.moe import moe_layers, routing  # pylint: disable=import-outside-toplevel
  from flaxformer.components import dense  # pylint: disable=import-outside-toplevel
  expert = dense.MlpBlock(use_bias=use_bias, intermediate_dim=D_FF, activations=activations,
                          intermediate_dropout_rate=0.0, final_dropout_rate=0.0,
                          intermediate_axis_name="expert_mlp", dtype=jnp.float32)
  router = routing.TokensChooseMaskedRouter(
      router_weights=routing.RouterWeights(use_bias=False, dtype=jnp.float32),
      num_selected_experts=top_k, jitter_noise=0.0, dtype=jnp.float32,
      ignore_padding_tokens=False, batch_prioritized_routing=False)
  return moe_layers.MoeLayer(
      num_experts=num_experts, max_group_size=LENGTH, train_capacity_factor=capacity_factor,
      eval_capacity_factor=capacity_factor, min_expert_capacity=1, expert=expert,
      router=router, num_expert_partitions=num_experts,
      num_model_partitions=max(1, jax.device_count() // num_experts), dtype=jnp.float32,
      dropout_rate=0.0)


def run_flaxformer(layer, params, x):
  y, state = layer.apply({"params": params}, x, enable_dropout=False, mutable=["intermediates"])
  return y, {name: float(np.asarray(state["intermediates"][name][0]).reshape(()))
             for name in METRICS}


def to_flaxformer(ours):
  """This project's MoE params -> flaxformer MoeLayer params (same arrays)."""
  return {"router": {"router_weights": {"w": {"kernel": ours["router"]["kernel"]}}},
          "expert": ours["expert"]}


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
@pytest.mark.parametrize("capacity_factor", [0.5, 4.0])      # drops / nothing dropped
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_equals_flaxformer(top_k, capacity_factor, dispatch):
  config = configs.get("tiny", num_experts=EXPERTS, d_model=D_MODEL, d_ff=D_FF, num_heads=4,
                       top_k=top_k, eval_capacity_factor=capacity_factor, min_capacity=1,
                       capacity_formula="t5x", dispatch=dispatch)
  rng = np.random.default_rng(top_k)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
  shapes = jax.eval_shape(lambda: moe.MoeLayer(config=config).init(
      jax.random.key(0), x, deterministic=True))["params"]
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), jnp.float32),
                        shapes)
  y, state = moe.MoeLayer(config=config).apply({"params": params}, x, deterministic=True,
                                                mutable=["intermediates"])
  ours = {name: float(state["intermediates"][name][0]) for name in METRICS}
  want_y, want = run_flaxformer(flaxformer_layer(EXPERTS, top_k, capacity_factor),
                                to_flaxformer(params), x)
  np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
  for name in METRICS:
    assert ours[name] == pytest.approx(want[name], rel=1e-6, abs=1e-7), name
  assert (want["fraction_tokens_left_behind"] > 0) == (capacity_factor < 1)
  assert (want["expert_usage"] < 1) == (capacity_factor > 1)


def geglu_tree(layer, num_experts, seed):
  x = jnp.zeros((BATCH, LENGTH, D_MODEL))
  variables = layer.init(jax.random.key(seed), x, enable_dropout=False)
  return flax.core.unfreeze(variables["params"]), variables


def test_pruned_flaxformer_geglu_tree_runs_in_the_smaller_flaxformer_layer():
  geglu = dict(activations=("gelu", "linear"), use_bias=False)
  big = flaxformer_layer(8, 2, 4.0, **geglu)
  params, _ = geglu_tree(big, 8, seed=0)
  tree = {"decoder": {"layers_0": {"mlp": params}}}
  layout = model_lib.detect_layout(tree)
  assert layout == model_lib.T5X_GATED_LAYOUT
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2 * 8, LENGTH, D_MODEL)), jnp.float32)
  h = np.asarray(x).reshape(-1, D_MODEL) @ np.asarray(
      params["router"]["router_weights"]["w"]["kernel"])
  logits = {"decoder/layers_0/mlp": h}

  # Keeping all 8 experts is the identity: the same flaxformer layer, the same outputs.
  same = pruning.prune_params(tree, logits, 8, layout=layout, router="anchor")
  y_same, _ = run_flaxformer(big, same["decoder"]["layers_0"]["mlp"], x)
  y_big, _ = run_flaxformer(big, params, x)
  np.testing.assert_array_equal(y_same, y_big)

  # 8 -> 4 experts: the pruned tree is exactly what a 4-expert flaxformer layer takes, and
  # that layer computes with it what a numpy GeGLU MoE computes (top-2 of the softmax over
  # the pruned router's columns, gates not renormalized; a capacity nothing exceeds).
  plan = pruning.plan_pruning(tree, logits, 4, layout=layout, router="merge")
  small = pruning.apply_plan(tree, plan)["decoder"]["layers_0"]["mlp"]
  small_layer = flaxformer_layer(4, 2, 16.0, **geglu)
  _, template = geglu_tree(small_layer, 4, seed=0)
  assert (jax.tree.map(np.shape, small)
          == jax.tree.map(np.shape, flax.core.unfreeze(template["params"])))
  y_small, _ = run_flaxformer(small_layer, small, x)
  np.testing.assert_allclose(y_small, geglu_moe_reference(small, np.asarray(x), top_k=2),
                             rtol=1e-5, atol=1e-5)
  # The reference is flaxformer's own computation: it reproduces the unpruned layer too.
  y_big16, _ = run_flaxformer(flaxformer_layer(8, 2, 16.0, **geglu), params, x)
  np.testing.assert_allclose(y_big16, geglu_moe_reference(params, np.asarray(x), top_k=2),
                             rtol=1e-5, atol=1e-5)
  assert all(a.score_after >= a.score_before for a in plan.layers["decoder/layers_0/mlp"].alignments)


def geglu_moe_reference(params, x, top_k):
  """numpy: each token's top-k experts by router softmax, summed with their probabilities,
  expert = (gelu(x wi_0) * (x wi_1)) wo."""
  router = np.asarray(params["router"]["router_weights"]["w"]["kernel"], np.float64)
  wi_0, wi_1, wo = (np.asarray(params["expert"][name]["kernel"], np.float64)
                    for name in ("wi_0", "wi_1", "wo"))
  tokens = x.reshape(-1, x.shape[-1]).astype(np.float64)
  logits = tokens @ router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  gelu = lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  out = np.zeros_like(tokens)
  for i, token in enumerate(tokens):
    for e in np.argsort(-probs[i])[:top_k]:
      out[i] += probs[i, e] * ((gelu(token @ wi_0[e]) * (token @ wi_1[e])) @ wo[e])
  return out.reshape(x.shape)
