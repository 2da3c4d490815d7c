"""Train step: learning on a fixed batch, and the expert-parallel step equals the plain one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uncurl_jax.model import configs, partitioning
from uncurl_jax.train import optim
from uncurl_jax.train import step as train_step
from uncurl_jax.model.decoder import SMoEDecoder

CFG = configs.get("tiny", num_experts=8, d_model=32, d_ff=64, max_length=16)


def _batch(batch=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, size=(batch, length)).astype(np.int32)
  weights = np.ones((batch, length), np.float32)
  weights[:, -3:] = 0
  return {"decoder_input_tokens": np.pad(tokens[:, :-1], ((0, 0), (1, 0))),
          "decoder_target_tokens": tokens, "decoder_loss_weights": weights}


def _state(cfg, mesh=None, batch_shape=(8, 16), tx=None):
  model = SMoEDecoder(cfg)
  if tx is None:
    tx = optim.make_optimizer(total_steps=100, peak_learning_rate=1e-2, warmup_steps=0)
  if mesh is None:
    params = model.init(jax.random.key(0), jnp.ones(batch_shape), jnp.ones(batch_shape),
                        enable_dropout=False)["params"]
    return train_step.create_state(model, params, tx), None
  params, shardings = partitioning.init_params(model, jax.random.key(0), batch_shape, mesh)
  state = train_step.create_state(model, params, tx)
  return state, shardings


def test_train_step_fits_a_fixed_batch():
  state, _ = _state(CFG)
  step = train_step.compile_train_step(CFG)
  batch = _batch()
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  assert int(state.step) == 15
  for name in ("auxiliary_loss", "router_z_loss", "expert_usage", "grad_norm", "accuracy"):
    assert np.isfinite(metrics[name]), name


def test_eval_step_uses_loss_weights():
  state, _ = _state(CFG)
  evaluate = train_step.compile_eval_step(CFG, state.apply_fn)
  batch = _batch()
  metrics = evaluate(state.params, batch)
  assert float(metrics["num_tokens"]) == batch["decoder_loss_weights"].sum()
  # The cross-entropy is the loss-weighted mean over tokens (numpy reference).
  logits = np.asarray(state.apply_fn({"params": state.params}, batch["decoder_input_tokens"],
                                     batch["decoder_target_tokens"], enable_dropout=False),
                      np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  token_ce = log_z - np.take_along_axis(logits, batch["decoder_target_tokens"][..., None],
                                        -1)[..., 0]
  weights = batch["decoder_loss_weights"]
  np.testing.assert_allclose(metrics["cross_entropy"], (token_ce * weights).sum() / weights.sum(),
                             rtol=1e-5)
  # Weight 0 on a token removes it: changing its target does not change the loss.
  changed = dict(batch, decoder_target_tokens=batch["decoder_target_tokens"].copy())
  changed["decoder_target_tokens"][:, -1] = (changed["decoder_target_tokens"][:, -1] + 1) % 64
  np.testing.assert_allclose(evaluate(state.params, changed)["cross_entropy"],
                             metrics["cross_entropy"], rtol=1e-6)
  with pytest.raises(ValueError, match="decoder_target_tokens"):
    train_step.eval_step(state.params, {"decoder_input_tokens": batch["decoder_input_tokens"]},
                         apply_fn=state.apply_fn, config=CFG)


def test_init_params_shards_experts_over_expert_axis():
  mesh = partitioning.make_mesh(data=2, expert=4)
  state, shardings = _state(CFG, mesh)
  wi = state.params["layers_0"]["mlp"]["expert"]["wi"]["kernel"]
  assert wi.sharding.spec[0] == "expert"
  assert wi.addressable_shards[0].data.shape[0] == CFG.num_experts // 4
  router_kernel = state.params["layers_0"]["mlp"]["router"]["kernel"]
  assert all(axis is None for axis in router_kernel.sharding.spec)
  assert shardings["layers_0"]["mlp"]["expert"]["wo"]["kernel"].spec[0] == "expert"


def test_expert_parallel_train_step_equals_single_device():
  # Top-2 with dropping; tests/test_expert_parallel.py covers the layer case by case.
  cfg = dataclasses.replace(CFG, top_k=2, train_capacity_factor=0.8)
  batch = _batch()
  # Plain SGD with rate 1: the parameter change is the gradient itself (Adam's first step
  # would normalize away the gradient scale and amplify rounding near zero gradients).
  sgd = optax.sgd(1.0)
  ref_state, _ = _state(cfg, tx=sgd)
  ref_state, ref_metrics = train_step.compile_train_step(cfg)(ref_state, batch,
                                                               jax.random.key(1))
  mesh = partitioning.make_mesh(data=2, expert=4)
  state, _ = _state(cfg, mesh, tx=sgd)
  batch_sharding = partitioning.batch_sharding(mesh)
  step = train_step.compile_train_step(cfg, mesh=mesh)
  state, metrics = step(state, jax.device_put(batch, batch_sharding), jax.random.key(1))
  for name in ("loss", "auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind"):
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
  assert float(metrics["fraction_tokens_left_behind"]) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-4, atol=1e-7),
               state.params, ref_state.params)
