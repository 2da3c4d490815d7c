"""Orbax checkpoints of train states: round trips, retention, re-sharding, params-only."""

import logging
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import pytest

from uncurl_jax.train import checkpoints
from uncurl_jax import model as model_lib
from uncurl_jax.train import schedules
from uncurl_jax.train import optim
from uncurl_jax.model import partitioning
from uncurl_jax.train import state as state_lib
from uncurl_jax.train import step as train_step


def _params():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  experts = {"wi": {"kernel": normal(8, 4, 6), "bias": normal(8, 6)}}
  return {"layers_0": {"mlp": {"router": {"kernel": normal(4, 8)}, "expert": experts}},
          "final_layer_norm": {"scale": normal(4)}}


def _shardings(params, mesh):
  expert = NamedSharding(mesh, PartitionSpec("expert"))
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map_with_path(
      lambda path, _: expert if "expert" in jax.tree_util.keystr(path) else replicated, params)


def _state(mesh, trainable=None):
  """A TrainState laid out on `mesh` after two AdamW steps (non-zero moments)."""
  params = _params()
  tx = optim.make_optimizer(total_steps=10, warmup_steps=1, peak_learning_rate=0.1,
                            trainable=trainable)
  state = train_step.TrainState.create(apply_fn=None, params=params, tx=tx)
  for _ in range(2):
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
  shardings = _state_shardings(state, mesh)
  return jax.device_put(state, shardings), shardings


def _state_shardings(state, mesh):
  p_shardings = _shardings(state.params, mesh)
  return state.replace(
      step=NamedSharding(mesh, PartitionSpec()), params=p_shardings,
      opt_state=state_lib.opt_state_shardings(state.opt_state, p_shardings, state.params,
                                                  mesh))


def _abstract(state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state, shardings)


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(actual), jax.device_get(expected))


def test_optimizer_state_shards_like_its_parameters():
  mesh = partitioning.make_mesh(data=2, expert=4)
  state, shardings = _state(mesh)
  mu = state.opt_state[1][0].mu
  assert mu["layers_0"]["mlp"]["expert"]["wi"]["kernel"].sharding.spec == PartitionSpec("expert")
  assert mu["layers_0"]["mlp"]["router"]["kernel"].sharding.spec == PartitionSpec()
  assert state.opt_state[1][0].count.sharding.spec == PartitionSpec()
  # Frozen parameters (router-only training) have no optimizer state to shard.
  frozen, _ = _state(mesh, trainable=schedules.router_only)
  assert len(jax.tree.leaves(frozen.opt_state)) < len(jax.tree.leaves(state.opt_state))


def test_round_trip_restores_values_steps_and_optimizer_types(tmp_path):
  mesh = partitioning.make_mesh(data=2, expert=4)
  state, shardings = _state(mesh)
  manager = checkpoints.make_manager(tmp_path, keep=None)
  checkpoints.save(manager, state, metadata={"note": "hi"})
  manager.wait_until_finished()
  restored = checkpoints.restore_state(manager, abstract_state=_abstract(state, shardings))
  _assert_trees_equal(restored, state)
  assert type(restored.opt_state[1][0]).__name__ == "ScaleByAdamState"
  assert int(restored.step) == 2
  assert checkpoints.read_metadata(tmp_path) == {"step": 2, "note": "hi"}


def test_restore_into_another_mesh_takes_the_target_shardings(tmp_path):
  state, _ = _state(partitioning.make_mesh(data=2, expert=4))
  manager = checkpoints.make_manager(tmp_path)
  checkpoints.save(manager, state)
  manager.wait_until_finished()
  other_shardings = _state_shardings(state, partitioning.make_mesh(data=1, expert=8))
  restored = checkpoints.restore_state(manager, abstract_state=_abstract(state, other_shardings))
  kernel = restored.params["layers_0"]["mlp"]["expert"]["wi"]["kernel"]
  assert kernel.sharding.mesh.shape["expert"] == 8
  assert len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (1, 4, 6)
  _assert_trees_equal(restored, state)


def test_keeps_the_newest_checkpoints_and_ignores_unfinished_ones(tmp_path):
  state, _ = _state(partitioning.make_mesh())
  manager = checkpoints.make_manager(tmp_path, keep=2, async_save=False)
  for step in range(1, 5):
    checkpoints.save(manager, state.replace(step=step))
  manager.close()
  # A save killed mid-way leaves orbax's temporary directory behind.
  os.makedirs(tmp_path / "7.orbax-checkpoint-tmp-1234" / "params")
  reopened = checkpoints.make_manager(tmp_path, read_only=True)
  assert sorted(reopened.all_steps()) == [3, 4]
  assert checkpoints.latest_step(reopened) == 4
  assert checkpoints.latest_step(checkpoints.make_manager(tmp_path / "empty")) is None


def test_a_read_only_manager_asks_orbax_for_nothing_it_must_change(tmp_path, caplog):
  """orbax warns once per manager when read-only options ask for saving or keeping
  (every finished stage the study reads opened one: 51 lines in one full run)."""
  checkpoints.make_manager(tmp_path, keep=2, async_save=False).close()
  # Only the read-only manager's records count; orbax's INFO lines (which mention
  # CheckpointManagerOptions too) appear when an earlier test turned absl logging up.
  caplog.clear()
  with caplog.at_level("WARNING"):
    manager = checkpoints.make_manager(tmp_path, keep=2, read_only=True)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not [m for m in warnings if "read_only=True" in m], warnings
  assert manager.all_steps() == []


def test_params_only_checkpoint_shapes_and_restore(tmp_path):
  params = _params()
  checkpoints.save_params(tmp_path, params, step=3, metadata={"pruned_from": 16})
  shapes = checkpoints.params_shapes(tmp_path)
  assert shapes["layers_0"]["mlp"]["router"]["kernel"] == jax.ShapeDtypeStruct((4, 8), jnp.float32)
  assert set(model_lib.expert_counts(shapes).values()) == {8}
  assert checkpoints.read_metadata(tmp_path) == {"step": 3, "pruned_from": 16}
  mesh = partitioning.make_mesh(data=2, expert=4)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, _shardings(shapes, mesh))
  restored = checkpoints.restore_params(tmp_path, abstract_params=target)
  _assert_trees_equal(restored, params)
  kernel = restored["layers_0"]["mlp"]["expert"]["wi"]["kernel"]
  assert kernel.sharding.spec == PartitionSpec("expert")


def test_bad_requests_raise(tmp_path):
  with pytest.raises(ValueError, match="keep must be None or >= 1"):
    checkpoints.make_manager(tmp_path, keep=0)
  with pytest.raises(ValueError, match="no checkpoint in"):
    checkpoints.params_shapes(tmp_path)
  checkpoints.save_params(tmp_path, _params(), step=1)
  with pytest.raises(ValueError, match=r"no checkpoint of step 5 .* has \[1\]"):
    checkpoints.read_metadata(tmp_path, step=5)


def test_unfinished_temporary_checkpoints_are_removed_when_a_run_opens_the_directory(tmp_path):
  (tmp_path / "40.orbax-checkpoint-tmp-1718").mkdir()
  (tmp_path / "40.orbax-checkpoint-tmp-1718" / "params").mkdir()
  (tmp_path / "notes").mkdir()
  checkpoints.make_manager(tmp_path, read_only=True).close()        # reading changes nothing
  assert (tmp_path / "40.orbax-checkpoint-tmp-1718").exists()
  checkpoints.make_manager(tmp_path).close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
