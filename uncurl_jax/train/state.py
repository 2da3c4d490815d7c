"""The train state laid out on a mesh: abstract shapes, shardings, creation from params.

Parameter shardings come from the model's 'params_axes' and the partitioning rules;
optimizer-state leaves that mirror a parameter (Adam's mu and nu) take that parameter's
sharding, every other leaf (step counters) is replicated. The same shardings serve the
jitted train step, orbax restores (into any mesh) and state creation.

Example:
  >>> layout = state.state_layout(model, tx, batch_shape=(8, 128), mesh=mesh)
  >>> train_state = state.init_state(model, tx, rng=key, batch_shape=(8, 128), layout=layout)
  >>> step_fn = step.compile_train_step(cfg, mesh=mesh, state_shardings=layout.shardings,
  ...                                    batch_sharding=partitioning.batch_sharding(mesh))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from uncurl_jax.model import partitioning
from uncurl_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Shapes and shardings of a TrainState on a mesh.

  Attributes:
    abstract: TrainState of `jax.ShapeDtypeStruct`s with `sharding` set (an orbax
      restore target).
    shardings: TrainState of `NamedSharding`s (jit in/out shardings).
    mesh: The mesh.
  """

  abstract: step_lib.TrainState
  shardings: step_lib.TrainState
  mesh: Mesh


def _params_shardings(abstract_variables: Any, mesh: Mesh) -> Any:
  if "params_axes" not in abstract_variables:
    raise ValueError("the model declares no 'params_axes'; declare params with "
                     "flax.linen.partitioning.param_with_axes")
  return partitioning.mesh_shardings(abstract_variables["params_axes"], mesh)


def abstract_params(model: nn.Module, *, batch_shape: tuple[int, int], mesh: Mesh) -> Any:
  """The model's params as `jax.ShapeDtypeStruct`s carrying their shardings on `mesh`.

  Example:
    >>> target = abstract_params(model, batch_shape=(8, 128), mesh=mesh)
    >>> params = checkpoints.restore_params(ckpt_dir, abstract_params=target)
  """
  variables = partitioning.abstract_variables(model, batch_shape)
  return _with_shardings(variables["params"], _params_shardings(variables, mesh))


def _trailing_dict_keys(path) -> tuple[str, ...]:
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(str(entry.key))
  return tuple(reversed(keys))


def opt_state_shardings(abstract_opt_state: Any, params_shardings_tree: Any,
                        abstract_params: Any, mesh: Mesh) -> Any:
  """Shardings for an optax state: parameter-shaped leaves follow their parameter.

  A leaf mirrors a parameter when the dict keys ending its path are that parameter's
  path and the shapes agree (optax keeps mu/nu as copies of the params tree).
  """
  flat_shardings = flax.traverse_util.flatten_dict(params_shardings_tree)
  flat_shapes = {k: v.shape for k, v in flax.traverse_util.flatten_dict(abstract_params).items()}
  replicated = NamedSharding(mesh, PartitionSpec())

  def sharding_of(path, leaf):
    keys = _trailing_dict_keys(path)
    for start in range(len(keys)):
      suffix = keys[start:]
      if suffix in flat_shardings and flat_shapes[suffix] == leaf.shape:
        return flat_shardings[suffix]
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt_state)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def state_layout(model: nn.Module, tx: optax.GradientTransformation, *,
                 batch_shape: tuple[int, int], mesh: Mesh) -> StateLayout:
  """Abstract TrainState and its shardings for `model` trained with `tx` on `mesh`.

  Example:
    >>> layout = state_layout(model, tx, batch_shape=(8, 128), mesh=mesh)
    >>> layout.shardings.params["layers_0"]["mlp"]["expert"]["wi"]["kernel"].spec
    PartitionSpec('expert',)
  """
  variables = partitioning.abstract_variables(model, batch_shape)
  p_shardings = _params_shardings(variables, mesh)
  abstract = jax.eval_shape(functools.partial(step_lib.create_state, model, tx=tx),
                            variables["params"])
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = abstract.replace(
      step=replicated, params=p_shardings,
      opt_state=opt_state_shardings(abstract.opt_state, p_shardings, variables["params"], mesh))
  return StateLayout(abstract=_with_shardings(abstract, shardings), shardings=shardings,
                     mesh=mesh)


def state_from_params_fn(model: nn.Module, tx: optax.GradientTransformation, *,
                         layout: StateLayout) -> Callable[..., step_lib.TrainState]:
  """`state_from_params` for one (model, optimizer, layout), traced once.

  Example: `make = state_from_params_fn(model, tx, layout=layout)`, then
  `make(params, step=0)` for every run that starts from params of these shapes.
  """
  create = jax.jit(lambda p: step_lib.create_state(model, p, tx),
                   out_shardings=layout.shardings)

  def make(params: Any, step: int = 0) -> step_lib.TrainState:
    state = create(jax.device_put(params, layout.shardings.params))
    return state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32),
                                             layout.shardings.step))
  return make


def state_from_params(model: nn.Module, tx: optax.GradientTransformation, params: Any, *,
                      layout: StateLayout, step: int = 0) -> step_lib.TrainState:
  """A fresh TrainState (new optimizer state) around `params`, laid out as `layout`.

  Used to start finetuning from loaded params and to start a new training phase
  (router warm-up -> full training; after experts are dropped). Repeated calls retrace;
  `state_from_params_fn` traces once.
  """
  return state_from_params_fn(model, tx, layout=layout)(params, step=step)


def init_state_fn(model: nn.Module, tx: optax.GradientTransformation, *,
                  batch_shape: tuple[int, int], layout: StateLayout
                  ) -> Callable[[jax.Array], step_lib.TrainState]:
  """`init_state` for one (model, optimizer, layout) as a jitted function of the key.

  Example: `init = init_state_fn(model, tx, batch_shape=(8, 128), layout=layout)`, then
  `init(jax.random.key(seed))` for every run of these shapes (traced once).
  """
  def create(key):
    tokens = jnp.ones(batch_shape, jnp.float32)
    params = model.init(key, tokens, tokens, enable_dropout=False)["params"]
    return step_lib.create_state(model, params, tx)
  return jax.jit(create, out_shardings=layout.shardings)


def init_state(model: nn.Module, tx: optax.GradientTransformation, *, rng: jax.Array,
               batch_shape: tuple[int, int], layout: StateLayout) -> step_lib.TrainState:
  """A TrainState with freshly initialized params, created directly in its shardings."""
  return init_state_fn(model, tx, batch_shape=batch_shape, layout=layout)(rng)
