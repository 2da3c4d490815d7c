"""The model's inference forward with sown collections, and whether params fit a model.

Every pass that reads what the MoE layers sow (router logits for pruning and progressive
dropping, the layers' inputs for expert statistics) runs `sown_forward`: one jitted
`apply` without dropout, shared by equal modules, called with `inputs.module_inputs` (the
decoder call the model trains with). `check_params` is the one check that params (or a
checkpoint's shapes) are those of a model, used before training from them, restoring
them or collecting over them.

Example:
  >>> forward = sown_forward(model, "router_logits")
  >>> logits = forward(params, inputs.module_inputs(batch))   # {'layers_1': {'mlp': ...}}
  >>> check_params(model, params, "the pruned params")
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from uncurl_jax.model import configs


def init_batch_shape(config) -> tuple[int, int]:
  """A (batch, length) whose token count the routing groups divide (shapes-only inits).

  Example:
    >>> init_batch_shape(configs.get("tiny", group_size=512))    # max_length 128
    (4, 128)
  """
  length = config.max_length
  group = config.group_size or length
  return group // math.gcd(group, length), length


def _make_sown_forward(model: Any, collection: str) -> Callable[[Any, dict], Any]:
  def forward(params, inputs):
    _, state = model.apply({"params": params}, **inputs, enable_dropout=False,
                           mutable=[collection])
    return state.get(collection, {})
  return jax.jit(forward)


# Equal modules (same config) share one jitted forward, so that passes over several tasks
# compile once per batch shape.
_cached_sown_forward = functools.lru_cache(maxsize=16)(_make_sown_forward)


def sown_forward(model: Any, collection: str) -> Callable[[Any, dict], Any]:
  """A jitted `(params, module inputs) -> the collection the model sows` (no dropout).

  Args:
    model: A flax module with t5x's decoder call signature (`SMoEDecoder`).
    collection: The mutable collection returned: "router_logits" (the MoE layers' raw
      [B, L, E] logits) or "moe_inputs" (their [B, L, d] inputs).
  """
  try:
    return _cached_sown_forward(model, collection)
  except TypeError:  # an unhashable module
    return _make_sown_forward(model, collection)


@functools.lru_cache(maxsize=32)
def _param_shapes(model: Any, batch_shape: tuple[int, int]) -> dict[tuple[str, ...], tuple]:
  tokens = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
  expected = jax.eval_shape(functools.partial(model.init, enable_dropout=False),
                            jax.random.key(0), tokens, tokens)["params"]
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(expected).items()}


def param_shapes(model: Any, batch_shape: tuple[int, int] | None = None
                 ) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{parameter path: shape} of `model` (initialized on `batch_shape`; default: one its
  config's routing groups divide, `init_batch_shape`)."""
  if batch_shape is None:
    batch_shape = init_batch_shape(model.config)
  try:
    return _param_shapes(model, tuple(batch_shape))
  except TypeError:  # an unhashable module
    return _param_shapes.__wrapped__(model, tuple(batch_shape))


def check_params(model: Any, params: Any, what: str, *,
                 batch_shape: tuple[int, int] | None = None,
                 saved_config: Mapping[str, Any] | None = None) -> None:
  """Raises unless `params` (arrays or shapes) are `model`'s parameters.

  Args:
    model: The module (an `SMoEDecoder`, or any module with t5x's decoder call signature
      when `batch_shape` is given).
    params: The parameter tree (arrays or `jax.ShapeDtypeStruct`s, e.g. a checkpoint's).
    what: What the params are, for the message ("the init checkpoint /x (step 5)").
    batch_shape: (batch, length) to initialize the model on; default: `init_batch_shape`.
    saved_config: The ModelConfig fields saved with a checkpoint, if any: differing
      architecture fields are named first.

  Raises:
    TypeError: `params` is not a mapping.
    ValueError: "<what> and the model differ: ..." naming the differing architecture
      fields, else the number of differing parameters and the first few.
  """
  if not isinstance(params, Mapping):
    raise TypeError(f"{what} must be a mapping of arrays, got {type(params).__name__}")
  config = getattr(model, "config", None)
  if saved_config is not None and config is not None:
    differing = [f"{name} {saved_config[name]!r} (config: {getattr(config, name)!r})"
                 for name in configs.ARCHITECTURE_FIELDS if name in saved_config
                 and configs.as_tuples(saved_config[name])
                 != configs.as_tuples(getattr(config, name))]
    if differing:
      raise ValueError(f"{what} and the model differ: {', '.join(differing)}")
  want = param_shapes(model, batch_shape)
  have = {k: tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(params).items()}
  differing = [f"{'/'.join(k)} {have.get(k)} (model: {want.get(k)})"
               for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
  if differing:
    raise ValueError(f"{what} and the model differ: {len(differing)} parameters, e.g. "
                     f"{'; '.join(differing[:3])}")
