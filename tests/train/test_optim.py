"""Optimizer: schedule values, composite against its parts, freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uncurl_jax.train import optim


def test_schedule_warmup_then_linear_decay():
  sched = optim.learning_rate_schedule(peak_learning_rate=1e-3, warmup_steps=10,
                                       total_steps=110)
  np.testing.assert_allclose(sched(0), 0.0)
  np.testing.assert_allclose(sched(5), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(sched(60), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(sched(110), 0.0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(total_steps=0), dict(total_steps=5, warmup_steps=6)])
def test_schedule_rejects_bad_lengths(kwargs):
  with pytest.raises(ValueError):
    optim.make_optimizer(**kwargs)


def _params():
  return {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
          "router": {"kernel": jnp.full((3, 2), 0.5)}}


def test_make_optimizer_equals_clip_then_masked_adamw():
  params = _params()
  tx = optim.make_optimizer(total_steps=20, peak_learning_rate=1e-2, warmup_steps=2)
  sched = optim.learning_rate_schedule(peak_learning_rate=1e-2, warmup_steps=2, total_steps=20)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                mask=optim.decay_mask))
  state, ref_state = tx.init(params), ref.init(params)
  p, q = params, params
  for scale in (1.0, 30.0, 0.01):
    grads = jax.tree.map(lambda x: scale * jnp.sin(jnp.arange(x.size, dtype=jnp.float32)
                                                   ).reshape(x.shape), params)
    u, state = tx.update(grads, state, p)
    v, ref_state = ref.update(grads, ref_state, q)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p, q)
  assert optim.decay_mask(params) == {"dense": {"kernel": True, "bias": False},
                                      "router": {"kernel": True}}


def test_frozen_parameters_do_not_move():
  params = _params()
  trainable = lambda ps: {"dense": jax.tree.map(lambda _: False, ps["dense"]),
                          "router": jax.tree.map(lambda _: True, ps["router"])}
  tx = optim.make_optimizer(total_steps=10, peak_learning_rate=1e-1, warmup_steps=0,
                            trainable=trainable)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["dense"]["kernel"], params["dense"]["kernel"])
  np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])
  assert not np.allclose(new["router"]["kernel"], params["router"]["kernel"])
