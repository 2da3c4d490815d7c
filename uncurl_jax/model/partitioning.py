"""Sharding as data: a ('data', 'expert', 'model') mesh and logical-axis rules.

Layers name logical axes (docs/DESIGN.md); `LOGICAL_AXIS_RULES` maps them to mesh
axes with the same choices as t5x's MoE rules (docs/paper.md): experts over 'expert',
expert hidden units over 'model', batch over ('expert', 'data').

Example:
  >>> mesh = partitioning.make_mesh(data=2, expert=4)
  >>> params, shardings = partitioning.init_params(model, jax.random.key(0), (8, 128), mesh)
  >>> batch = jax.device_put(batch, partitioning.batch_sharding(mesh))
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("expert", "data")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("length", None),
    ("abspos_buckets", None),
    ("expert", "expert"),
    ("expert_mlp", "model"),
    ("expert_replicas", "data"),
    ("unmodeled", None),
)


def make_mesh(*, data: int = -1, expert: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes ('data', 'expert', 'model'); `data=-1` takes the remaining devices.

  Axis types are Auto (sharding propagated by the compiler, as with pjit).
  """
  devices = list(jax.devices() if devices is None else devices)
  if expert < 1 or model < 1:
    raise ValueError(f"expert and model axis sizes must be >= 1, got expert={expert}, "
                     f"model={model}")
  if data == -1:
    if len(devices) % (expert * model):
      raise ValueError(f"{len(devices)} devices are not divisible by expert*model={expert * model}")
    data = len(devices) // (expert * model)
  if data * expert * model != len(devices):
    raise ValueError(f"mesh data={data} x expert={expert} x model={model} needs "
                     f"{data * expert * model} devices, got {len(devices)}")
  return jax.make_mesh((data, expert, model), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_specs(params_axes: Any) -> Any:
  """The 'params_axes' collection -> a pytree (shaped like params) of logical PartitionSpecs."""
  return flax.core.unfreeze(nn_partitioning.get_axis_names(params_axes))


def mesh_shardings(params_axes: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for every parameter from its logical axis names."""
  return nn.logical_to_mesh_sharding(logical_specs(params_axes), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over ('expert', 'data'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _init_variables(model: nn.Module, rng: jax.Array, batch_shape: tuple[int, int]):
  tokens = jnp.ones(batch_shape, jnp.float32)
  return model.init(rng, tokens, tokens, enable_dropout=False)


def abstract_variables(model: nn.Module, batch_shape: tuple[int, int]) -> Any:
  """Shapes/dtypes of `model.init` (with 'params_axes'), without allocating."""
  return jax.eval_shape(functools.partial(_init_variables, model, batch_shape=batch_shape),
                        jax.random.key(0))


def init_params(model: nn.Module, rng: jax.Array, batch_shape: tuple[int, int],
                mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
  """Initializes params directly into their shardings on `mesh`.

  Returns:
    (params, shardings): sharded params and the NamedSharding pytree used.
  """
  abstract = abstract_variables(model, batch_shape)
  if "params_axes" not in abstract:
    raise ValueError("the model declares no 'params_axes'; declare params with "
                     "flax.linen.partitioning.param_with_axes")
  shardings = mesh_shardings(abstract["params_axes"], mesh, rules)
  init = jax.jit(lambda r: _init_variables(model, r, batch_shape)["params"],
                 out_shardings=shardings)
  return init(rng), shardings
