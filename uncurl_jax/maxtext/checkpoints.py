"""MaxText orbax checkpoints as parameter pytrees: read a checkpoint's params, write params.

MaxText saves with an orbax `CheckpointManager` (`maxtext/common/checkpointing.py:
create_orbax_checkpoint_manager`): `<dir>/<step>/items` holds the train state as a
PyTree item, `{'step', 'params': {'params': <the params collection>}, 'opt_state'}`
(ocdbt and zarr3 by default). A params-only checkpoint (`utils/
generate_param_only_checkpoint.py`, the checkpoint converters' `save_weights_to_checkpoint`)
is the same with `opt_state={}`; MaxText restores one through
`load_parameters_path=<dir>/<step>/items` (`checkpointing.load_params_from_path`, which
reads the item's `params` only).

`load_params` reads the params collection of such a checkpoint (not the optimizer state);
`save_params` writes a params collection as a params-only checkpoint, first into a
temporary directory beside the output which is renamed into place when complete, so a
failure leaves nothing half-written.

Example:
  >>> params, step = load_params("/tmp/mt_example/checkpoint")     # newest step
  >>> params["decoder"]["layers"]["MoeBlock_0"]["wi_0"].shape       # [E, L, emb, mlp]
  >>> items = save_params("/tmp/mt_pruned/checkpoint", small_params, step=step)
  >>> items                                  # MaxText: load_parameters_path=<items>
  '/tmp/mt_pruned/checkpoint/0/items'
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from uncurl_jax import staging

ITEM = "items"  # MaxText's item name
_METADATA = "_METADATA"  # written by orbax's PyTree handler into every item directory
_STEP = re.compile(r"^\d+$")


def resolve_items(path: str) -> tuple[str, int | None]:
  """(item directory, step) of a MaxText checkpoint path.

  Args:
    path: The item directory `<dir>/<step>/items` (what MaxText's `load_parameters_path`
      names), a step directory `<dir>/<step>`, or a checkpoint directory `<dir>` (its
      newest step).

  Raises:
    ValueError: No MaxText checkpoint there, naming what was expected.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(path):
    raise ValueError(f"no MaxText checkpoint at {path!r}: not a directory")
  if os.path.isfile(os.path.join(path, _METADATA)):
    parent = os.path.basename(os.path.dirname(path))
    return path, int(parent) if _STEP.match(parent) else None
  if os.path.isfile(os.path.join(path, ITEM, _METADATA)):
    name = os.path.basename(path)
    return os.path.join(path, ITEM), int(name) if _STEP.match(name) else None
  steps = sorted(int(name) for name in os.listdir(path)
                 if _STEP.match(name) and os.path.isfile(os.path.join(path, name, ITEM,
                                                                      _METADATA)))
  if not steps:
    raise ValueError(f"no MaxText checkpoint at {path!r}: expected <step>/{ITEM} (an orbax "
                     f"CheckpointManager directory), <step>/{ITEM}, or an item directory "
                     f"holding {_METADATA}")
  return os.path.join(path, str(steps[-1]), ITEM), steps[-1]


def load_params(path: str) -> tuple[dict[str, Any], int]:
  """(the params collection as nested dicts of numpy arrays, step) of a MaxText checkpoint.

  Reads only `params/params` of the item (not the optimizer state), on the host, whatever
  devices wrote it. A checkpoint without a step in its path reports step 0.

  Args:
    path: See `resolve_items`.
  """
  items, step = resolve_items(path)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(items).item_metadata.tree
  if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict) or not isinstance(
      tree["params"].get("params"), dict):
    keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise ValueError(f"{items!r} is not a MaxText train state: expected params/params/..., "
                     f"the item has {keys}")
  wanted = {"params": {"params": tree["params"]["params"]}}
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(items, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=as_numpy, partial_restore=True))
  return restored["params"]["params"], 0 if step is None else step


def save_params(directory: str, params: Any, *, step: int = 0) -> str:
  """Writes a params collection as the params-only MaxText checkpoint `<directory>/<step>`.

  The train state is `{'step': step, 'params': {'params': params}, 'opt_state': {}}`,
  as MaxText's params-only checkpoints hold it, written with ocdbt and zarr3 (MaxText's
  defaults). `directory` must not exist yet: everything is written into a temporary
  directory beside it, renamed to `directory` when complete.

  Returns:
    The item directory `<directory>/<step>/items`, MaxText's `load_parameters_path`.

  Raises:
    ValueError: `directory` exists.
  """
  directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  if os.path.exists(directory):
    raise ValueError(f"{directory!r} exists; give a new directory for the checkpoint")
  with staging.staged_directory(directory) as staged:
    manager = ocp.CheckpointManager(
        staged, item_names=(ITEM,),
        item_handlers={ITEM: ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)},
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
    state = {"step": int(step), "params": {"params": params}, "opt_state": {}}
    manager.save(int(step), args=ocp.args.Composite(**{ITEM: ocp.args.PyTreeSave(item=state)}))
    manager.wait_until_finished()
    manager.close()
  return os.path.join(directory, str(int(step)), ITEM)
