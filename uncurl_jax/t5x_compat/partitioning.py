"""t5x.contrib.moe's `MoePjitPartitioner`, fixed for CPUs and for `jax.shard_map` layers.

Two differences from the original, both for expert parallelism:

- Mesh. t5x builds its ('data', 'model') base mesh on CPU with every device on 'model'
  (`t5x.partitioning.get_cpu_mesh`), and carves 'expert' out of 'data', so on CPU the
  MoE mesh is always data 1 x expert 1 x model N. Here the CPU base mesh puts
  `num_partitions` devices on 'model' and the rest on 'data', so 'expert' gets
  min(num_expert_partitions, data) devices (the largest divisor), as on accelerators.
  Other platforms keep t5x's mesh.
- Current mesh. t5x runs its pjit-ed steps under the legacy `with mesh:` context, which
  does not set jax's abstract mesh, so `jax.sharding.get_abstract_mesh()` is empty
  while the model is traced and this project's MoE layers would never take their
  all-to-all path. Every partitioned function here also runs under `jax.set_mesh`.

Bind it in gin instead of t5x's class (the gin/t5x/runs/ files do):

  from uncurl_jax.t5x_compat import partitioning as uncurl_partitioning
  train_script.train.partitioner = @uncurl_partitioning.MoePjitPartitioner()

Example:
  >>> partitioner = MoePjitPartitioner(num_expert_partitions=2, num_partitions=1)
  >>> partitioner.mesh.shape          # 2 CPU devices
  OrderedDict([('data', 1), ('expert', 2), ('model', 1)])
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import numpy as np
from t5x.contrib.moe import partitioning as moe_partitioning


def cpu_moe_mesh(num_expert_partitions: int, num_partitions: int | None,
                 devices=None) -> jax.sharding.Mesh:
  """('data', 'expert', 'model') mesh over CPU devices, 'model' innermost.

  Args:
    num_expert_partitions: Upper bound of the 'expert' axis (t5x's meaning).
    num_partitions: Devices on 'model' (None: 1); must divide the device count.
    devices: The devices (default `jax.devices()`).

  Example:
    >>> cpu_moe_mesh(4, 1).devices.shape          # 8 CPU devices
    (2, 4, 1)
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  model = num_partitions or 1
  if model < 1 or devices.size % model:
    raise ValueError(f"num_partitions={num_partitions} must divide the {devices.size} "
                     "devices")
  if num_expert_partitions < 1:
    raise ValueError(f"num_expert_partitions must be >= 1, got {num_expert_partitions}")
  data = devices.size // model
  expert = min(num_expert_partitions, data)
  while data % expert:  # t5x's rule: the largest divisor of 'data' not above the bound
    expert -= 1
  return jax.sharding.Mesh(devices.reshape(data // expert, expert, model),
                           ("data", "expert", "model"))


class _WithCurrentMesh:
  """A t5x partitioned function that also runs (and lowers) under `jax.set_mesh`."""

  def __init__(self, partitioned, mesh: jax.sharding.Mesh):
    self._partitioned = partitioned
    self._mesh = mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self._mesh):
      return self._partitioned(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self._mesh):
      return self._partitioned.lower(*args, **kwargs)


class MoePjitPartitioner(moe_partitioning.MoePjitPartitioner):
  """`t5x.contrib.moe.partitioning.MoePjitPartitioner` with the two fixes above.

  Takes the same arguments as t5x's class.
  """

  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    devices = jax.devices(self._backend)
    if devices[-1].platform != "cpu" or self._model_parallel_submesh is not None:
      return super().mesh
    mesh = cpu_moe_mesh(self._num_expert_partitions, self._num_partitions, devices)
    logging.info("uncurl_jax MoE CPU mesh: %s", dict(mesh.shape))
    return mesh

  def partition(self, fn, in_axis_resources, out_axis_resources, static_argnums=(),
                donate_argnums=()):
    partitioned = super().partition(fn, in_axis_resources, out_axis_resources,
                                    static_argnums=static_argnums,
                                    donate_argnums=donate_argnums)
    return _WithCurrentMesh(partitioned, self.mesh)
