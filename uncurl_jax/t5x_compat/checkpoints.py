"""t5x checkpoints as parameter pytrees: read a checkpoint's params, write params back.

t5x (with its default orbax format) writes `MODEL_DIR/checkpoint_<step>/` holding an
item 'state': `{'target': params, 'state': {'step': ..., 'param_states': ...}}`.
`load_params` reads the params and the step of such a directory; `save_params` writes
params as a checkpoint without optimizer state (t5x's `InferenceState`), which
gin/t5x/runs/finetune.gin restores (it reads params and step only) and `t5x.eval` /
`t5x.infer` read as any checkpoint.

Example:
  >>> params, step = load_params("/tmp/t5x_tiny/checkpoint_40")
  >>> path = save_params("/tmp/t5x_pruned", small_params, params_axes=axes, step=step)
  >>> path
  '/tmp/t5x_pruned/checkpoint_40'
"""

from __future__ import annotations

import os
import re
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from t5x import checkpoints as t5x_checkpoints
from t5x import partitioning as t5x_partitioning
from t5x import train_state as t5x_train_state

_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def resolve_checkpoint(path: str) -> str:
  """`path` if it is a `checkpoint_<step>` directory, else the newest one inside it.

  Example: `resolve_checkpoint("/tmp/t5x_tiny")` -> '/tmp/t5x_tiny/checkpoint_40'.
  """
  path = os.path.abspath(os.fspath(path))
  if _STEP_DIR.match(os.path.basename(path)):
    if not os.path.isdir(os.path.join(path, "state")):
      raise ValueError(f"{path!r} is not a t5x checkpoint: it has no 'state' item")
    return path
  if not os.path.isdir(path):
    raise ValueError(f"no t5x checkpoint at {path!r}: not a directory")
  steps = sorted((int(m.group(1)), name) for name in os.listdir(path)
                 if (m := _STEP_DIR.match(name)) and os.path.isdir(os.path.join(path, name,
                                                                                "state")))
  if not steps:
    raise ValueError(f"no t5x checkpoint in {path!r}: expected checkpoint_<step>/state")
  return os.path.join(path, steps[-1][1])


def load_params(path: str) -> tuple[dict[str, Any], int]:
  """(params as nested dicts of numpy arrays, step) of a t5x checkpoint.

  Reads on the host whatever devices wrote the checkpoint.

  Args:
    path: A `checkpoint_<step>` directory, or a model directory (its newest checkpoint).
  """
  state_dir = os.path.join(resolve_checkpoint(path), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  # Host numpy arrays: the checkpoint may come from another device count or mesh.
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return state["target"], int(np.asarray(state["state"]["step"]))


def save_params(model_dir: str, params: Any, *, params_axes: Any, step: int) -> str:
  """Writes `params` as the t5x checkpoint `model_dir/checkpoint_<step>`.

  Args:
    model_dir: Directory of the checkpoint (created if missing).
    params: Parameter pytree.
    params_axes: The model's 'params_axes' collection (logical axis names of every
      parameter, as `module.init` returns it), as t5x's partitioner needs.
    step: The step the checkpoint records (t5x continues counting from it).

  Returns:
    The checkpoint directory.
  """
  os.makedirs(model_dir, exist_ok=True)
  state = t5x_train_state.InferenceState.create(flax.core.freeze(
      {"params": params, "params_axes": params_axes})).replace_step(np.int32(step))
  manager = t5x_checkpoints.OrbaxCheckpointManagerInterface(
      os.path.abspath(model_dir), train_state=state,
      partitioner=t5x_partitioning.PjitPartitioner(num_partitions=1))
  manager.save(state)
  manager.wait_until_finished()
  manager.close()
  return os.path.join(os.path.abspath(model_dir), f"checkpoint_{step}")
