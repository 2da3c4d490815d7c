"""AdamW with linear warm-up, linear decay and global-norm clipping (UNCURL paper values).

Example:
  >>> tx = optim.make_optimizer(total_steps=10_000)             # pretraining defaults
  >>> tx = optim.make_optimizer(total_steps=5_000, peak_learning_rate=1e-6,
  ...                           warmup_steps=500, weight_decay=0.001)  # finetuning
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax


def learning_rate_schedule(*, peak_learning_rate: float, warmup_steps: int,
                           total_steps: int, end_learning_rate: float = 0.0) -> optax.Schedule:
  """0 -> peak linearly over `warmup_steps`, then linearly down to `end_learning_rate`."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
  warmup = optax.linear_schedule(0.0, peak_learning_rate, max(warmup_steps, 1))
  decay = optax.linear_schedule(peak_learning_rate, end_learning_rate,
                                max(total_steps - warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and embeddings only (not on biases or LayerNorm)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(*, total_steps: int, peak_learning_rate: float = 5e-5,
                   warmup_steps: int = 1000, end_learning_rate: float = 0.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float = 1.0,
                   trainable: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
  """AdamW with the UNCURL paper's pretraining values as defaults (docs/paper.md).

  Args:
    total_steps: Length of the schedule (warm-up included).
    peak_learning_rate, warmup_steps, end_learning_rate: The schedule.
    b1, b2, eps, weight_decay: AdamW hyperparameters (decay on matrices only).
    clip_norm: Global gradient-norm clip; 0 disables.
    trainable: Optional function params -> pytree of bools; parameters marked False get
      zero updates and no optimizer state (used for the router-only warm-up).
  """
  schedule = learning_rate_schedule(peak_learning_rate=peak_learning_rate,
                                    warmup_steps=warmup_steps, total_steps=total_steps,
                                    end_learning_rate=end_learning_rate)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  tx = optax.chain(*parts)
  if trainable is None:
    return tx
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "freeze", trainable(params))
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
