"""Pure, jittable train and eval steps for the SMoE LM.

Batches are dicts of [batch, length] arrays with t5x's decoder feature names:
'decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights' and, for packed
data, 'decoder_segment_ids' and 'decoder_positions'.

Example:
  >>> model = SMoEDecoder(cfg)
  >>> state = step.create_state(model, params, optim.make_optimizer(total_steps=100))
  >>> train_step = step.compile_train_step(cfg)            # jitted, params donated
  >>> state, metrics = train_step(state, batch, jax.random.key(1))
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
from flax.training import train_state
import jax
from jax.sharding import Mesh
import optax

from uncurl_jax.model import configs
from uncurl_jax.model import inputs as inputs_lib
from uncurl_jax.train import losses

TrainState = train_state.TrainState
Batch = Mapping[str, jax.Array]


def create_state(model: nn.Module, params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A TrainState (step, params, optimizer state) for `model.apply`."""
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def apply_model(params: Any, apply_fn, batch: Batch, config: configs.ModelConfig, *,
                enable_dropout: bool = False, rngs: Mapping[str, jax.Array] | None = None,
                mutable: Any = ("intermediates",)):
  """The training and evaluation forward: `apply_fn` on `batch` as `model.inputs` builds
  the call (config.inputs_bidirectional_attention decides whether the prefix-LM marker
  reaches the module). Returns `(logits, mutated collections)`.

  Example:
    >>> logits, state = apply_model(params, model.apply, batch, cfg, mutable=["router_logits"])
  """
  module_inputs = inputs_lib.module_inputs(
      batch, inputs_bidirectional_attention=config.inputs_bidirectional_attention)
  return apply_fn({"params": params}, **module_inputs, enable_dropout=enable_dropout,
                  rngs=dict(rngs or {}), mutable=list(mutable))


def _forward_loss(params: Any, apply_fn, batch: Batch, config: configs.ModelConfig, *,
                  enable_dropout: bool, dropout_rng: jax.Array | None):
  rngs = {"dropout": dropout_rng} if enable_dropout else {}
  logits, state = apply_model(params, apply_fn, batch, config, enable_dropout=enable_dropout,
                              rngs=rngs)
  return losses.lm_loss(logits, batch["decoder_target_tokens"],
                        batch.get("decoder_loss_weights"), state.get("intermediates"),
                        aux_loss_coef=config.aux_loss_coef, z_loss_coef=config.z_loss_coef)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               config: configs.ModelConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on `batch`; returns the new state and scalar metrics."""
  dropout_rng = jax.random.fold_in(rng, state.step)
  loss_fn = functools.partial(_forward_loss, apply_fn=state.apply_fn, batch=batch,
                              config=config, enable_dropout=True, dropout_rng=dropout_rng)
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads), metrics


def eval_step(params: Any, batch: Batch, *, apply_fn,
              config: configs.ModelConfig) -> dict[str, jax.Array]:
  """Loss metrics without dropout and with the evaluation capacity factor."""
  _, metrics = _forward_loss(params, apply_fn, batch, config, enable_dropout=False,
                             dropout_rng=None)
  return metrics


def _under_mesh(fn, mesh: Mesh | None):
  """Runs (and so traces) `fn` with `mesh` as the current mesh, so MoE layers can see
  an 'expert' axis and take the expert-parallel path."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return wrapped


def compile_train_step(config: configs.ModelConfig, *, mesh: Mesh | None = None,
                       state_shardings: Any = None, batch_sharding: Any = None):
  """`train_step` jitted with the state donated, optionally with explicit shardings."""
  kwargs = {}
  if state_shardings is not None:
    kwargs = dict(in_shardings=(state_shardings, batch_sharding, None),
                  out_shardings=(state_shardings, None))
  step = jax.jit(functools.partial(train_step, config=config), donate_argnums=0, **kwargs)
  return _under_mesh(step, mesh)


def compile_eval_step(config: configs.ModelConfig, apply_fn, *, mesh: Mesh | None = None):
  """`eval_step` jitted for fixed `apply_fn`: call as `step(params, batch)`."""
  step = jax.jit(functools.partial(eval_step, apply_fn=apply_fn, config=config))
  return _under_mesh(step, mesh)
