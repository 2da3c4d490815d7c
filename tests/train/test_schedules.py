"""Finetuning: router-only warm-up from a pruned checkpoint, progressive expert dropping."""

import dataclasses
import functools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from uncurl_jax import model as model_lib
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import forward
from uncurl_jax.model import partitioning
from uncurl_jax.train import __main__ as train_main
from uncurl_jax.train import checkpoints
from uncurl_jax.train import optim
from uncurl_jax.train import schedules
from uncurl_jax.train import state as state_lib
from uncurl_jax.train import trainer

# Compile each distinct program once across this module's runs (fixture in conftest.py).

FINETUNE_FILES = ["gin/models/tiny.gin", "gin/runs/finetune.gin", "gin/runs/synthetic_finetune.gin"]
LENGTHS = {"inputs": 96, "targets": 16}


# ------------------------------------------------------------------------------------------
# Pure functions.


def test_router_only_marks_router_weights():
  params = {"layers_0": {"mlp": {"router": {"kernel": 1}, "expert": {"wi": {"kernel": 2}}},
                         "attention": {"query": {"kernel": 3}}}}
  assert schedules.router_only(params) == {
      "layers_0": {"mlp": {"router": {"kernel": True}, "expert": {"wi": {"kernel": False}}},
                   "attention": {"query": {"kernel": False}}}}


def test_training_phases_and_phase_lookup():
  phases = schedules.training_phases(train_steps=10, router_warmup_steps=3)
  assert [(p.name, p.start_step, p.end_step) for p in phases] == [
      ("router_warmup", 0, 3), ("full", 3, 10)]
  assert phases[0].trainable is schedules.router_only and phases[1].trainable is None
  assert [schedules.phase_index(phases, s) for s in (0, 2, 3, 9, 10)] == [0, 0, 1, 1, 1]
  assert [schedules.checkpoint_phase_index(phases, s) for s in (0, 3, 4, 10)] == [0, 0, 1, 1]
  assert [p.name for p in schedules.training_phases(train_steps=5)] == ["full"]
  only = schedules.training_phases(train_steps=5, router_warmup_steps=5)  # router-only run
  assert [(p.name, p.start_step, p.end_step) for p in only] == [("router_warmup", 0, 5)]
  with pytest.raises(ValueError, match="router_warmup_steps must be in"):
    schedules.training_phases(train_steps=5, router_warmup_steps=6)
  with pytest.raises(ValueError, match="outside the phases"):
    schedules.phase_index(phases, 11)


def test_dropping_schedule_halves_down_to_the_target():
  dropping = schedules.ProgressiveDropping(first_drop_step=100, drop_every_steps=50,
                                          target_experts=3)
  assert dropping.schedule(num_experts=32) == [(100, 16), (150, 8), (200, 4), (250, 3)]
  assert [dropping.experts_at(s, num_experts=32) for s in (99, 100, 199, 1000)] == [32, 16, 8, 3]
  assert schedules.ProgressiveDropping(first_drop_step=0, drop_every_steps=1).schedule(
      num_experts=4) == [(0, 2), (1, 1)]
  with pytest.raises(ValueError, match="keep_fraction must be in"):
    schedules.ProgressiveDropping(first_drop_step=0, drop_every_steps=1, keep_fraction=1.0)
  with pytest.raises(ValueError, match="fewer than target_experts=3"):
    dropping.schedule(num_experts=2)


def test_expert_proficiency_is_the_gate_weighted_share_of_routed_tokens():
  logits = np.log(np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8],
                            [0.2, 0.5, 0.3]]))
  # Expert 0 gets tokens 0, 1 with gates 0.7, 0.6; expert 2 token 2 (0.8); expert 1 token 3.
  np.testing.assert_allclose(schedules.expert_proficiency(logits), [1.3 / 4, 0.5 / 4, 0.8 / 4])
  keep = schedules.experts_to_keep({"layers_0/mlp": logits}, 2)
  np.testing.assert_array_equal(keep["layers_0/mlp"], [0, 2])
  tie = schedules.experts_to_keep({"l": np.zeros((3, 4))}, 1)  # all tokens pick expert 0
  np.testing.assert_array_equal(tie["l"], [0])
  with pytest.raises(ValueError, match="cannot keep 5 of the 3 experts"):
    schedules.experts_to_keep({"l": logits}, 5)


def test_keep_experts_slices_params_and_adam_moments():
  rng = np.random.default_rng(0)
  params = {"layers_0": {"mlp": {"router": {"kernel": rng.normal(size=(4, 6))},
                                 "expert": {"wi": {"kernel": rng.normal(size=(6, 4, 5)),
                                                   "bias": rng.normal(size=(6, 5))},
                                            "wo": {"kernel": rng.normal(size=(6, 5, 4)),
                                                   "bias": rng.normal(size=(6, 4))}}}},
            "layers_1": {"mlp": {"wi": {"kernel": rng.normal(size=(4, 5))}}}}
  keep = {"layers_0/mlp": np.array([1, 4])}
  small = schedules.keep_experts(params, keep)
  moe, small_moe = params["layers_0"]["mlp"], small["layers_0"]["mlp"]
  np.testing.assert_array_equal(small_moe["router"]["kernel"], moe["router"]["kernel"][:, [1, 4]])
  for name in ("wi", "wo"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(small_moe["expert"][name][leaf],
                                    moe["expert"][name][leaf][[1, 4]])
  np.testing.assert_array_equal(small["layers_1"]["mlp"]["wi"]["kernel"],
                                params["layers_1"]["mlp"]["wi"]["kernel"])
  opt_state = optim.make_optimizer(total_steps=4, warmup_steps=1).init(params)
  small_state = schedules.keep_experts(opt_state, keep)
  assert jax.tree.structure(small_state) == jax.tree.structure(opt_state)
  mu = small_state[1][0].mu["layers_0"]["mlp"]
  assert mu["router"]["kernel"].shape == (4, 2) and mu["expert"]["wo"]["bias"].shape == (2, 4)
  assert model_lib.expert_counts(small) == {"layers_0/mlp": 2}


def _router_shapes(**counts):
  return {layer: {"mlp": {"router": {"kernel": jax.ShapeDtypeStruct((64, e), jnp.float32)}}}
          for layer, e in counts.items()}


def test_config_follows_the_checkpoint_expert_counts():
  config = configs.get("tiny", num_experts=8, num_layers=4)  # MoE blocks 0 and 2
  assert trainer.config_for_params(config, _router_shapes(layers_0=8, layers_2=8),
                                   adapt=False) is config
  assert trainer.config_for_params(config, _router_shapes(layers_0=4, layers_2=4),
                                   adapt=True) == dataclasses.replace(config, num_experts=4)
  uneven = trainer.config_for_params(config, _router_shapes(layers_0=6, layers_2=2), adapt=True)
  assert (uneven.num_experts, uneven.layer_num_experts) == (6, (6, 2))
  with pytest.raises(ValueError, match=r"the checkpoint has \(4, 4\) experts .* num_experts=8"):
    trainer.config_for_params(config, _router_shapes(layers_0=4, layers_2=4), adapt=False)
  with pytest.raises(ValueError, match=r"no MoE layer, the model config has MoE layers at "
                                       r"blocks \[0, 2\]"):
    trainer.config_for_params(config, {"layers_0": {}}, adapt=True)
  with pytest.raises(ValueError, match=r"name MoE blocks \[0, 4\], the model config places "
                                       r"them at \[0, 2\]"):
    trainer.config_for_params(config, _router_shapes(layers_0=4, layers_4=4), adapt=True)
  assert model_lib.expert_counts({"mlp": {"wi": {"kernel": np.zeros((2, 2))}}}) == {}


def test_trainer_rejects_impossible_finetuning_setups(tmp_path):
  manager = checkpoints.make_manager(tmp_path)
  common = dict(batch_shape=(8, 32), make_optimizer=optim.make_optimizer)
  dense = trainer.Trainer(config=configs.get("tiny", num_experts=0), mesh=partitioning.make_mesh(),
                          phases=schedules.training_phases(train_steps=4, router_warmup_steps=2),
                          **common)
  with pytest.raises(ValueError, match="router-only warm-up needs an MoE model"):
    dense.initial_state(manager, init_checkpoint=None, rng=jax.random.key(0))
  dropping = schedules.ProgressiveDropping(first_drop_step=1, drop_every_steps=1)
  sharded = trainer.Trainer(config=configs.get("tiny", num_experts=8),
                            mesh=partitioning.make_mesh(expert=4),
                            phases=schedules.training_phases(train_steps=4), dropping=dropping,
                            **common)
  with pytest.raises(ValueError, match=r"goes through \[4, 2, 1\] experts.*expert axis \(4\)"):
    sharded.initial_state(manager, init_checkpoint=None, rng=jax.random.key(0))


def _trainer(config, **kwargs):
  return trainer.Trainer(config=config, mesh=partitioning.make_mesh(), batch_shape=(8, 32),
                         make_optimizer=functools.partial(optim.make_optimizer, warmup_steps=0),
                         phases=schedules.training_phases(train_steps=4), **kwargs)


def test_initial_params_of_another_model_are_refused(pruned_checkpoint, tmp_path):
  init_dir, pruned = pruned_checkpoint                   # 4 experts, params only
  config = configs.get("tiny", num_experts=8)
  manager = checkpoints.make_manager(tmp_path / "run")
  with pytest.raises(ValueError, match=r"the init checkpoint .* has 4 experts per MoE layer, "
                                       r"the model config 8; set NUM_EXPERTS to match, or "
                                       r"adapt_experts_to_checkpoint=True"):
    _trainer(config).initial_state(manager, rng=jax.random.key(0), init_checkpoint=init_dir)
  adapted = _trainer(config, adapt_experts_to_checkpoint=True)
  state = adapted.initial_state(manager, rng=jax.random.key(0), init_checkpoint=init_dir)
  assert adapted.config.num_experts == 4 and int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), pruned)
  # Other architecture fields are never adapted: the params-only checkpoint has no saved
  # config, so the differing shapes are named.
  wider = configs.get("tiny", num_experts=4, d_ff=64)
  with pytest.raises(ValueError, match=r"and the model differ: \d+ parameters, e.g. "
                                       r"layers_0/mlp/expert/wi/bias \(4, 128\) \(model: "
                                       r"\(4, 64\)\)"):
    _trainer(wider, adapt_experts_to_checkpoint=True).initial_state(
        manager, rng=jax.random.key(0), init_checkpoint=init_dir)
  with pytest.raises(ValueError, match="give init_checkpoint or init_params, not both"):
    _trainer(config).initial_state(manager, rng=jax.random.key(0), init_checkpoint=init_dir,
                                   init_params=pruned)


# ------------------------------------------------------------------------------------------
# Runs through the gin entry point.


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
  """A tiny 8-expert model pruned to experts [1, 3, 4, 6] (as a pruning method would)."""
  model = decoder.SMoEDecoder(configs.get("tiny", num_experts=8))
  tokens = jnp.ones((1, 8))
  params = jax.jit(lambda key: model.init(key, tokens, tokens, enable_dropout=False))(
      jax.random.key(0))["params"]
  keep = {layer: np.array([1, 3, 4, 6]) for layer in model_lib.expert_counts(params)}
  pruned = jax.device_get(schedules.keep_experts(params, keep))
  directory = tmp_path_factory.mktemp("pruned")
  checkpoints.save_params(directory, pruned, metadata={"pruned_from": 8})
  return directory, pruned


def _finetune_bindings(model_dir, init_dir, **overrides):
  bindings = dict(MODEL_DIR=repr(str(model_dir)), INITIAL_CHECKPOINT_PATH=repr(str(init_dir)),
                  NUM_EXPERTS=8, TRAIN_STEPS=4, BATCH_SIZE=8, ROUTER_WARMUP_STEPS=2,
                  CHECKPOINT_EVERY=2, KEEP_CHECKPOINTS=None, LOG_EVERY=1)
  bindings.update(overrides)
  return [f"{k} = {v}" for k, v in bindings.items()] + [
      "optim.make_optimizer.warmup_steps = 1", "uncurl_jax.train.train.eval_split = None"]


@pytest.fixture(scope="module")
def warmup_run(pruned_checkpoint, tmp_path_factory):
  """Finetuning from the pruned checkpoint: 2 router-only steps, then 2 full steps."""
  init_dir, _ = pruned_checkpoint
  model_dir = tmp_path_factory.mktemp("finetune")
  return model_dir, train_main.run_with_gin(gin_files=FINETUNE_FILES,
                                           gin_bindings=_finetune_bindings(model_dir, init_dir))


def test_finetune_from_pruned_checkpoint_freezes_all_but_routers_during_warmup(
    pruned_checkpoint, warmup_run):
  _, pruned = pruned_checkpoint
  model_dir, result = warmup_run
  assert result.config.num_experts == 4  # from the checkpoint, not NUM_EXPERTS = 8
  assert [m["num_experts"] for _, m in result.train_metrics] == [4.0] * 4
  ckpt_dir = model_dir / "checkpoints"
  assert checkpoints.read_metadata(ckpt_dir, step=2)["phase"] == "router_warmup"
  assert checkpoints.read_metadata(ckpt_dir, step=4)["phase"] == "full"
  flat_init = flax.traverse_util.flatten_dict(pruned, sep="/")
  shapes = checkpoints.params_shapes(ckpt_dir)
  after_warmup, after_full = (flax.traverse_util.flatten_dict(jax.device_get(
      checkpoints.restore_params(ckpt_dir, abstract_params=shapes, step=step)), sep="/")
      for step in (2, 4))
  for path, initial in flat_init.items():
    if "router" in path:
      assert not np.array_equal(after_warmup[path], initial), path
    else:
      np.testing.assert_array_equal(after_warmup[path], initial, err_msg=path)
  moved = [p for p in flat_init if not np.array_equal(after_full[p], after_warmup[p])]
  assert "layers_0/mlp/expert/wi/kernel" in moved and "token_embed/embedding" in moved


def test_finetune_resumed_at_the_warmup_boundary_matches_the_straight_run(
    pruned_checkpoint, warmup_run, tmp_path, monkeypatch):
  init_dir, _ = pruned_checkpoint
  _, straight = warmup_run
  real_train_dataset = pipeline.train_dataset
  monkeypatch.setattr(pipeline, "train_dataset",
                      lambda **kwargs: real_train_dataset(**kwargs).take(2))
  with pytest.raises(StopIteration):  # the data runs out after the warm-up's 2 steps
    train_main.run_with_gin(gin_files=FINETUNE_FILES,
                           gin_bindings=_finetune_bindings(tmp_path, init_dir))
  monkeypatch.setattr(pipeline, "train_dataset", real_train_dataset)
  resumed = train_main.run_with_gin(gin_files=FINETUNE_FILES,
                                   gin_bindings=_finetune_bindings(tmp_path, init_dir))
  assert [s for s, _ in resumed.train_metrics] == [3, 4]
  assert ([m["loss"] for _, m in resumed.train_metrics]
          == [m["loss"] for s, m in straight.train_metrics if s > 2])


def _router_logits_reference(model, params, batches):
  """{layer: [tokens, E]} of real tokens, from the model's 'router_logits' collection."""
  forward = jax.jit(lambda p, b: model.apply(
      {"params": p}, b["decoder_input_tokens"], b["decoder_target_tokens"],
      decoder_causal_attention=b["decoder_causal_attention"], enable_dropout=False,
      mutable=["router_logits"])[1]["router_logits"])
  out = {}
  for batch in batches:
    real = (batch["decoder_loss_weights"] > 0) | (batch["decoder_causal_attention"] > 0)
    collection = flax.traverse_util.flatten_dict(jax.device_get(forward(params, batch)), sep="/")
    for path, values in collection.items():  # the MoE layer stores [B, L, E] as is
      out.setdefault(path.rsplit("/", 1)[0], []).append(np.asarray(values)[real])
  return {layer: np.concatenate(parts) for layer, parts in out.items()}


DROPPING_FILES = FINETUNE_FILES + ["gin/runs/progressive_dropping.gin"]


def _dropping_bindings(model_dir, init_dir):
  # Two full-training steps (the same program as the warm-up run's full phase): 4 experts
  # for step 1, then the drop to 2.
  return _finetune_bindings(model_dir, init_dir, TRAIN_STEPS=2, CHECKPOINT_EVERY=1,
                            ROUTER_WARMUP_STEPS=0, DROP_FIRST_STEP=1, DROP_EVERY=1,
                            DROP_TARGET_EXPERTS=2, PROBE_BATCHES=1)


@pytest.fixture(scope="module")
def dropping_run(pruned_checkpoint, tmp_path_factory):
  """(result, model dir) of a progressive-dropping finetuning run, uninterrupted."""
  model_dir = tmp_path_factory.mktemp("dropping")
  result = train_main.run_with_gin(gin_files=DROPPING_FILES, gin_bindings=_dropping_bindings(
      model_dir, pruned_checkpoint[0]))
  return result, model_dir


def test_progressive_dropping_drops_the_least_proficient_experts_on_schedule(dropping_run):
  result, model_dir = dropping_run
  assert [m["num_experts"] for _, m in result.train_metrics] == [4.0, 2.0]
  ckpt_dir = model_dir / "checkpoints"
  assert [set(model_lib.expert_counts(checkpoints.params_shapes(ckpt_dir, step=s)).values())
          for s in (1, 2)] == [{4}, {2}]

  # Replay the drop at step 1 from the step-1 checkpoint and check it against a reference.
  dropping = schedules.ProgressiveDropping(first_drop_step=1, drop_every_steps=1,
                                          target_experts=2, probe_batches=1)
  run = trainer.Trainer(
      config=configs.get("tiny", num_experts=4), mesh=partitioning.make_mesh(),
      batch_shape=(8, 112), phases=schedules.training_phases(train_steps=2),
      make_optimizer=functools.partial(optim.make_optimizer, warmup_steps=1), dropping=dropping)
  before = checkpoints.restore_state(checkpoints.make_manager(ckpt_dir, read_only=True),
                                     abstract_state=run.variant(run.config, 0).layout.abstract,
                                     step=1)
  probe = list(pipeline.eval_batches(mixture_or_task_name="synthetic_city_country",
                                 task_feature_lengths=LENGTHS, batch_size=8, split="train",
                                 pack=False, max_batches=1))
  after = run.advance(before, probe_batches=lambda: probe)

  logits = _router_logits_reference(run.variant(run.config, 0).model, before.params, probe)
  assert sorted(logits) == ["layers_0/mlp"]
  probs = scipy.special.softmax(logits["layers_0/mlp"].astype(np.float64), axis=-1)
  chosen = probs.argmax(-1)
  proficiency = np.array([probs[chosen == e, e].sum() for e in range(4)])
  kept = np.sort(np.argsort(-proficiency, kind="stable")[:2])
  old = jax.device_get(before.params["layers_0"]["mlp"])
  new = jax.device_get(after.params["layers_0"]["mlp"])
  np.testing.assert_array_equal(new["router"]["kernel"], old["router"]["kernel"][:, kept])
  np.testing.assert_array_equal(new["expert"]["wo"]["kernel"], old["expert"]["wo"]["kernel"][kept])
  old_mu = jax.device_get(before.opt_state[1][0].mu["layers_0"]["mlp"])
  new_mu = jax.device_get(after.opt_state[1][0].mu["layers_0"]["mlp"])
  np.testing.assert_array_equal(new_mu["expert"]["wi"]["kernel"],
                                old_mu["expert"]["wi"]["kernel"][kept])
  assert run.variant_of(after).config.num_experts == 2 and int(after.step) == 1


class _Killed(Exception):
  pass


def test_run_killed_at_a_drop_step_resumes_before_the_drop_like_the_straight_run(
    pruned_checkpoint, dropping_run, tmp_path, monkeypatch):
  """The checkpoint of a drop step is written before that step's drop (the drop comes with
  the next step), so a resumed run expects the experts of the step before (4, not 2) and
  replays the drop; the run then continues exactly as the uninterrupted one."""
  straight, _ = dropping_run
  bindings = _dropping_bindings(tmp_path, pruned_checkpoint[0])
  real_save = checkpoints.save

  def save_then_die(manager, state, **kwargs):
    real_save(manager, state, **kwargs)
    if int(state.step) == 1:  # killed right after the checkpoint of the drop step 1
      raise _Killed

  monkeypatch.setattr(checkpoints, "save", save_then_die)
  with pytest.raises(_Killed):
    train_main.run_with_gin(gin_files=DROPPING_FILES, gin_bindings=bindings)
  monkeypatch.setattr(checkpoints, "save", real_save)
  ckpt_dir = tmp_path / "checkpoints"
  assert checkpoints.latest_step(checkpoints.make_manager(ckpt_dir, read_only=True)) == 1
  assert set(model_lib.expert_counts(checkpoints.params_shapes(ckpt_dir, step=1)).values()) == {4}

  resumed = train_main.run_with_gin(gin_files=DROPPING_FILES, gin_bindings=bindings)
  assert [s for s, _ in resumed.train_metrics] == [2]
  assert [m["num_experts"] for _, m in resumed.train_metrics] == [2.0]
  assert ([m["loss"] for _, m in resumed.train_metrics]
          == [m["loss"] for s, m in straight.train_metrics if s > 1])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
               jax.device_get(straight.state.params))


def test_a_bound_router_checkpoints_saved_config_is_the_same_architecture():
  """The saved config comes back from JSON with nested lists (`layer_router_maps`); it must
  compare equal to the config it was written from."""
  config = configs.get("tiny", num_layers=2, moe_every=1, d_model=16, d_ff=32, num_heads=2,
                       num_experts=2, layer_router_maps=((0, -1, 1, 0), (1, 0, -1, -1)))
  saved = json.loads(json.dumps(dataclasses.asdict(config)))
  assert saved["layer_router_maps"] == [[0, -1, 1, 0], [1, 0, -1, -1]]
  shapes = forward.param_shapes(decoder.SMoEDecoder(config))
  params = {k: np.zeros(v) for k, v in shapes.items()}
  forward.check_params(decoder.SMoEDecoder(config), flax.traverse_util.unflatten_dict(params),
                       "ckpt", saved_config=saved)
  assert trainer.config_for_params(config, flax.traverse_util.unflatten_dict(params),
                                       adapt=False, saved_config=saved) == config


def test_states_of_one_variant_are_traced_once_and_equal_the_free_functions(tmp_path,
                                                                             monkeypatch):
  """Stages of one shape (the study's seeds, its finetunings) reuse the variant's jitted
  state constructors: the model is traced once, and the states equal init_state's and
  state_from_params'."""
  config = configs.get("tiny", num_experts=4, num_layers=2, d_model=16, d_ff=32)
  run = _trainer(config)
  traces = []
  original = decoder.SMoEDecoder.init
  monkeypatch.setattr(decoder.SMoEDecoder, "init",
                      lambda self, *a, **k: traces.append(1) or original(self, *a, **k))
  states, traced = [], []
  for seed in (0, 1):
    states.append(run.initial_state(checkpoints.make_manager(tmp_path / str(seed)),
                                    rng=jax.random.key(seed)))
    traced.append(len(traces))
  assert traced[0] >= 1 and traced[1] == traced[0]  # the second state: no new trace
  variant = run.variant(run.config, 0)
  expected = state_lib.init_state(variant.model, variant.tx, rng=jax.random.key(1),
                                  batch_shape=(8, 32), layout=variant.layout)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(states[1]),
               jax.device_get(expected))
  assert not np.array_equal(states[0].params["layers_0"]["mlp"]["router"]["kernel"],
                            states[1].params["layers_0"]["mlp"]["router"]["kernel"])
  around = variant.state_from_params(states[0].params, step=3)
  expected = state_lib.state_from_params(variant.model, variant.tx, states[0].params,
                                         layout=variant.layout, step=3)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(around), jax.device_get(expected))
  assert int(around.step) == 3
  assert all(jax.tree.leaves(jax.tree.map(lambda leaf, sharding: leaf.sharding == sharding,
                                           around, variant.layout.shardings)))
