"""Orbax checkpoints of the train state: periodic, atomic, resumable, re-shardable.

A checkpoint directory is an orbax `CheckpointManager` root with one sub-directory per
saved step, each holding three items:

  <dir>/<step>/params        the parameter pytree (what finetuning and pruning read)
  <dir>/<step>/train_state   {'step', 'opt_state'}
  <dir>/<step>/metadata      JSON: the ModelConfig fields, the step, free-form extras

Orbax writes each step into a temporary directory and renames it when complete, so a
killed run never leaves a half-written checkpoint that a restore would pick up.
Restoring takes an abstract target (`jax.ShapeDtypeStruct`s carrying shardings), so a
checkpoint saved on one mesh restores into any other mesh.

Example:
  >>> manager = checkpoints.make_manager(model_dir, keep=3)
  >>> checkpoints.save(manager, state, metadata={"model_config": cfg_dict})
  >>> step = checkpoints.latest_step(manager)
  >>> state = checkpoints.restore_state(manager, abstract_state=abstract, step=step)
  >>> params = checkpoints.restore_params(pruned_dir, abstract_params=abstract_params)
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

from absl import logging
import jax
import orbax.checkpoint as ocp

from uncurl_jax.train import step as step_lib

PARAMS, TRAIN_STATE, METADATA = "params", "train_state", "metadata"
_TEMPORARY_MARK = ".orbax-checkpoint-tmp"


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  # Declared up front so that a manager can read items (metadata, shapes) it did not write.
  return {PARAMS: ocp.StandardCheckpointHandler(),
          TRAIN_STATE: ocp.StandardCheckpointHandler(),
          METADATA: ocp.JsonCheckpointHandler()}


def make_manager(directory: str | os.PathLike, *, keep: int | None = None,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `directory` keeping the newest `keep` steps.

  The caller decides when to save (`save` forces the write), so the manager's own
  interval policy is not used.

  Args:
    directory: Root directory (created unless `read_only`).
    keep: Number of newest checkpoints kept; None keeps all.
    async_save: Write in a background thread (the device-to-host copy is synchronous,
      so the caller may donate the state right after `save` returns).
    read_only: Open an existing directory without creating or deleting anything.

  Example:
    >>> manager = make_manager("/tmp/run", keep=2)
  """
  if keep is not None and keep < 1:
    raise ValueError(f"keep must be None or >= 1, got {keep}")
  if not read_only:
    remove_stale_temporaries(directory)
  # A read-only manager saves nothing: say so (orbax warns when it has to change these).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only,
      save_interval_steps=0 if read_only else 1, enable_async_checkpointing=async_save)
  # orbax needs absolute paths; the command line makes its paths absolute, library
  # callers may pass relative ones.
  return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_handlers=_item_handlers())


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
  """Removes the '<step>.orbax-checkpoint-tmp*' folders a killed save left in `directory`.

  Orbax renames a step's folder into place only when it is complete, so such a folder
  is never a checkpoint; it would stay until that step is saved again. Only process 0
  deletes. Returns the removed folders' names.

  Example:
    >>> remove_stale_temporaries("/tmp/run/checkpoints")
    ['300.orbax-checkpoint-tmp-1718']
  """
  directory = os.fspath(directory)
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return []
  stale = sorted(name for name in os.listdir(directory) if _TEMPORARY_MARK in name)
  for name in stale:
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  if stale:
    logging.info("Removed unfinished checkpoints %s from %s.", stale, directory)
  return stale


def save(manager: ocp.CheckpointManager, state: step_lib.TrainState, *,
         metadata: Mapping[str, Any] | None = None) -> None:
  """Saves `state` at step `state.step` (params, step + optimizer state, JSON metadata).

  Example:
    >>> save(manager, state, metadata={"model_config": dataclasses.asdict(cfg)})
  """
  step = int(state.step)
  meta = {"step": step, **dict(metadata or {})}
  manager.save(step, force=True, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardSave(state.params),
      TRAIN_STATE: ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
      METADATA: ocp.args.JsonSave(meta)}))


def save_params(directory: str | os.PathLike, params: Any, *, step: int = 0,
                metadata: Mapping[str, Any] | None = None) -> None:
  """Writes a params-only checkpoint (e.g. a pruned model) that finetuning can start from.

  Example:
    >>> save_params("/tmp/pruned_8e", pruned, metadata={"model_config": asdict(cfg)})
  """
  manager = make_manager(directory, async_save=False)
  manager.save(step, force=True, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardSave(params),
      METADATA: ocp.args.JsonSave({"step": step, **dict(metadata or {})})}))
  manager.wait_until_finished()
  manager.close()


def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
  """A run's MODEL_DIR (holding 'checkpoints/') or a checkpoint root, as a checkpoint root.

  Example:
    >>> resolve_checkpoint_dir("/tmp/run")          # '/tmp/run/checkpoints'
  """
  path = os.fspath(path)
  nested = os.path.join(path, "checkpoints")
  return nested if os.path.isdir(nested) else path


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest complete checkpoint's step, or None when there is none."""
  return manager.latest_step()


def _checked_step(manager: ocp.CheckpointManager, step: int | None) -> int:
  steps = manager.all_steps()
  if step is None:
    if not steps:
      raise ValueError(f"no checkpoint in {manager.directory}")
    return max(steps)
  if step not in steps:
    raise ValueError(f"no checkpoint of step {step} in {manager.directory}; it has {sorted(steps)}")
  return step


def resolve_step(directory: str | os.PathLike, *, step: int | None = None) -> int:
  """`step` if the checkpoint directory has it, else (None) its newest step; ValueError if absent.

  Example:
    >>> resolve_step("/tmp/run/checkpoints")
    2000
  """
  manager = make_manager(directory, read_only=True)
  step = _checked_step(manager, step)
  manager.close()
  return step


def restore_state(manager: ocp.CheckpointManager, *, abstract_state: step_lib.TrainState,
                  step: int | None = None) -> step_lib.TrainState:
  """Restores params, step and optimizer state into the shardings of `abstract_state`.

  Args:
    manager: The run's manager.
    abstract_state: A TrainState whose array leaves are `jax.ShapeDtypeStruct`s with
      `sharding` set (the target mesh may differ from the one that saved).
    step: The step to restore; None takes the newest.

  Returns:
    `abstract_state` with every leaf replaced by the restored, sharded array.
  """
  step = _checked_step(manager, step)
  target = {"step": abstract_state.step, "opt_state": abstract_state.opt_state}
  restored = manager.restore(step, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardRestore(abstract_state.params),
      TRAIN_STATE: ocp.args.StandardRestore(target)}))
  # Orbax returns plain containers; rebuild the exact optimizer-state pytree types.
  opt_state = jax.tree.unflatten(jax.tree.structure(abstract_state.opt_state),
                                 jax.tree.leaves(restored[TRAIN_STATE]["opt_state"]))
  return abstract_state.replace(step=restored[TRAIN_STATE]["step"],
                                params=restored[PARAMS], opt_state=opt_state)


def restore_params(directory: str | os.PathLike, *, abstract_params: Any,
                   step: int | None = None) -> Any:
  """Restores only the params item of a checkpoint directory into `abstract_params`.

  Works for full training checkpoints and for `save_params` (pruned) checkpoints.

  Example:
    >>> params = restore_params(ckpt_dir, abstract_params=params_shapes_with_shardings)
  """
  manager = make_manager(directory, read_only=True)
  step = _checked_step(manager, step)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardRestore(abstract_params)}))
  manager.close()
  return restored[PARAMS]


def read_metadata(directory: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
  """The JSON metadata item of a checkpoint (the step and what `save` was given)."""
  manager = make_manager(directory, read_only=True)
  step = _checked_step(manager, step)
  restored = manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
  manager.close()
  return dict(restored[METADATA])


def params_shapes(directory: str | os.PathLike, *, step: int | None = None) -> Any:
  """The checkpoint's params as a pytree of `jax.ShapeDtypeStruct` (nothing is loaded).

  Finetuning reads the expert count of a (pruned) checkpoint from these shapes.

  Example:
    >>> params_shapes(ckpt)["layers_0"]["mlp"]["router"]["kernel"].shape   # (d, E)
  """
  manager = make_manager(directory, read_only=True)
  step = _checked_step(manager, step)
  tree = manager.item_metadata(step)[PARAMS].tree
  manager.close()
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
