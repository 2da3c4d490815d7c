"""Losses of the SMoE LM: token cross-entropy plus the MoE auxiliary losses.

Example:
  >>> logits, state = model.apply(variables, inputs, targets, mutable=["intermediates"])
  >>> loss, metrics = losses.lm_loss(logits, targets, weights, state["intermediates"],
  ...                                aux_loss_coef=0.01, z_loss_coef=1e-3)
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp

from uncurl_jax.model import moe

# Names the MoE layer sows into 'intermediates' (the names t5x's MoeDecoderOnlyModel reads).
MOE_METRIC_NAMES = moe.INTERMEDIATE_NAMES


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy and the summed weights.

  Args:
    logits: [batch, length, vocab] (any float dtype; computed in float32).
    targets: [batch, length] integer token ids.
    weights: [batch, length] loss weights (0 masks padding); None weighs all tokens 1.

  Returns:
    (sum_t w_t * CE_t, sum_t w_t) as float32 scalars.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree: "
                     "expected logits [batch, length, vocab] and targets [batch, length]")
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
  token_loss = log_z - target_logit
  if weights is None:
    weights = jnp.ones_like(token_loss)
  weights = weights.astype(jnp.float32)
  return jnp.sum(token_loss * weights), jnp.sum(weights)


def moe_metrics(intermediates: Mapping[str, Any] | None) -> dict[str, jax.Array]:
  """Averages each MoE diagnostic sown into 'intermediates' over the MoE layers.

  Returns an empty dict for a dense model (nothing sown).
  """
  if not intermediates:
    return {}
  flat = traverse_util.flatten_dict(dict(intermediates))
  values: dict[str, list[jax.Array]] = {name: [] for name in MOE_METRIC_NAMES}
  for path, leaf in flat.items():
    if path[-1] in values:
      # sow stores a tuple of values (one per call); average a layer's calls.
      values[path[-1]].append(jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32)
                                                  for v in leaf])))
  return {name: jnp.mean(jnp.stack(v)) for name, v in values.items() if v}


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None,
            intermediates: Mapping[str, Any] | None, *, aux_loss_coef: float,
            z_loss_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean token cross-entropy + aux_loss_coef * aux + z_loss_coef * router z-loss.

  The MoE losses are averaged over MoE layers (as t5x's MoeDecoderOnlyModel does).

  Returns:
    (total loss, metrics) where metrics holds 'cross_entropy', 'loss', 'num_tokens',
    'accuracy' and the MoE diagnostics of `moe_metrics`.
  """
  ce_sum, weight_sum = cross_entropy(logits, targets, weights)
  denom = jnp.maximum(weight_sum, 1.0)
  ce = ce_sum / denom
  metrics = moe_metrics(intermediates)
  total = ce
  if "auxiliary_loss" in metrics:
    total = total + aux_loss_coef * metrics["auxiliary_loss"]
  if "router_z_loss" in metrics:
    total = total + z_loss_coef * metrics["router_z_loss"]
  w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  metrics.update(cross_entropy=ce, loss=total, num_tokens=weight_sum,
                 accuracy=jnp.sum(correct * w) / denom)
  return total, metrics
