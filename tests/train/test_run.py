"""End-to-end tests of the gin training entry point on the tiny model and synthetic corpus.

One short pretraining run (module fixture, expert-parallel mesh) is shared; the other
tests kill and resume it, restore it into another mesh, and evaluate it. Identical
programs are compiled once thanks to a persistent compilation cache for this module.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import uncurl_jax.tasks  # noqa: F401  (registers the seqio tasks)
from uncurl_jax import cli
from uncurl_jax.data import pipeline
from uncurl_jax.model import decoder
from uncurl_jax.model import partitioning
from uncurl_jax.train import __main__ as train_main
from uncurl_jax.train import checkpoints
from uncurl_jax.train import evaluation
from uncurl_jax.train import metrics
from uncurl_jax.train import state as state_lib

# Compile each distinct program once across this module's runs (fixture in conftest.py).

STEPS = 6
PRETRAIN_FILES = ["gin/models/tiny.gin", "gin/runs/pretrain.gin", "gin/runs/synthetic_pretrain.gin"]


def _pretrain_bindings(model_dir, **overrides):
  bindings = dict(MODEL_DIR=repr(str(model_dir)), TRAIN_STEPS=STEPS, BATCH_SIZE=8,
                  TASK_FEATURE_LENGTHS="{'targets': 64}", EXPERT_PARALLELISM=4,
                  CHECKPOINT_EVERY=2, KEEP_CHECKPOINTS=2, EVAL_EVERY=3, LOG_EVERY=1)
  bindings.update(overrides)
  return [f"{k} = {v}" for k, v in bindings.items()] + [
      "optim.make_optimizer.warmup_steps = 1", "uncurl_jax.train.train.eval_loss_batches = 1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("pretrain")
  result = train_main.run_with_gin(gin_files=PRETRAIN_FILES,
                                  gin_bindings=_pretrain_bindings(model_dir))
  return model_dir, result


def test_pretraining_lowers_loss_and_writes_checkpoints_and_metrics(pretrained):
  model_dir, result = pretrained
  losses = [m["loss"] for _, m in result.train_metrics]
  assert [s for s, _ in result.train_metrics] == list(range(1, STEPS + 1))
  assert losses[-1] < losses[0] - 0.2
  assert int(result.state.step) == STEPS
  # Checkpoints every 2 steps, the newest 2 kept, each holding the final params.
  manager = checkpoints.make_manager(model_dir / "checkpoints", read_only=True)
  assert sorted(manager.all_steps()) == [4, 6]
  meta = checkpoints.read_metadata(model_dir / "checkpoints")
  assert meta["step"] == STEPS and meta["model_config"]["num_experts"] == 8
  # The same losses reach TensorBoard.
  scalars = metrics.read_scalars(model_dir / "train")
  np.testing.assert_allclose([v for _, v in scalars["loss"]], losses, rtol=1e-6)
  assert [s for s, _ in scalars["steps_per_second"]] == list(range(1, STEPS + 1))
  # Evaluation at steps 3 and 6 on the validation split.
  assert [s for s, _ in result.eval_metrics] == [3, 6]
  first, last = (m["eval/loss"] for _, m in result.eval_metrics)
  assert last < first
  eval_scalars = metrics.read_scalars(model_dir / "eval")
  assert [s for s, _ in eval_scalars["eval/loss"]] == [3, 6]


class _Killed(Exception):
  pass


def test_kill_and_resume_continues_with_identical_losses(pretrained, tmp_path, monkeypatch):
  _, straight = pretrained
  real_train_dataset = pipeline.train_dataset

  def dying_train_dataset(**kwargs):
    dataset = real_train_dataset(**kwargs)

    class Dying:
      def as_numpy_iterator(self):
        for index, batch in enumerate(dataset.as_numpy_iterator()):
          if index == 3:  # killed after step 3, before the step-4 checkpoint
            raise _Killed
          yield batch
    return Dying()

  monkeypatch.setattr(pipeline, "train_dataset", dying_train_dataset)
  with pytest.raises(_Killed):
    train_main.run_with_gin(gin_files=PRETRAIN_FILES, gin_bindings=_pretrain_bindings(tmp_path))
  killed = checkpoints.make_manager(tmp_path / "checkpoints", read_only=True)
  assert checkpoints.latest_step(killed) == 2
  monkeypatch.setattr(pipeline, "train_dataset", real_train_dataset)

  resumed = train_main.run_with_gin(gin_files=PRETRAIN_FILES,
                                   gin_bindings=_pretrain_bindings(tmp_path))
  # Step 3 is redone (lost with the kill), then the run continues exactly as the straight one.
  assert [s for s, _ in resumed.train_metrics] == [3, 4, 5, 6]
  assert ([m["loss"] for _, m in resumed.train_metrics]
          == [m["loss"] for s, m in straight.train_metrics if s >= 3])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
               jax.device_get(straight.state.params))


def test_checkpoint_restores_into_another_mesh(pretrained):
  model_dir, result = pretrained
  trained_params = jax.device_get(result.state.params)
  expert_kernel = result.state.params["layers_0"]["mlp"]["expert"]["wi"]["kernel"]
  assert expert_kernel.sharding.spec[0] == "expert"
  mesh = partitioning.make_mesh(expert=1)  # 8-way data parallel
  model = decoder.SMoEDecoder(result.config)
  layout = state_lib.state_layout(model, result.state.tx, batch_shape=(8, 64), mesh=mesh)
  manager = checkpoints.make_manager(model_dir / "checkpoints", read_only=True)
  restored = checkpoints.restore_state(manager, abstract_state=layout.abstract)
  kernel = restored.params["layers_0"]["mlp"]["expert"]["wi"]["kernel"]
  assert kernel.sharding.mesh.shape["data"] == 8 and kernel.sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), trained_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state),
               jax.device_get(result.state.opt_state))
  assert int(restored.step) == STEPS


def test_eval_entry_point_on_another_mesh_matches_training_eval(pretrained, tmp_path):
  model_dir, result = pretrained
  evaluate = "--gin.uncurl_jax.train.evaluate"
  argv = ["train", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/eval.gin",
          f"--gin.CHECKPOINT_PATH={model_dir}", f"--gin.EVAL_OUTPUT_DIR={tmp_path}",
          "--gin.MIXTURE_OR_TASK_NAME=synthetic_lm", "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
          "--gin.BATCH_SIZE=8", "--gin.EXPERT_PARALLELISM=1", f"{evaluate}.loss_batches=1",
          f"{evaluate}.pack=True", f"{evaluate}.task_metrics=False"]
  train_main.main(cli.parse_flags(argv))
  with open(tmp_path / f"metrics_{STEPS}.json") as f:
    metrics = json.load(f)
  _, training_eval = result.eval_metrics[-1]
  np.testing.assert_allclose(metrics["eval/loss"], training_eval["eval/loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["eval/accuracy"], training_eval["eval/accuracy"], rtol=1e-5)


def test_rank_classification_metrics_match_a_numpy_reference(pretrained):
  _, result = pretrained
  model = decoder.SMoEDecoder(result.config)
  mesh = result.state.params["token_embed"]["embedding"].sharding.mesh
  lengths = {"inputs": 96, "targets": 16}
  evaluator = evaluation.make_evaluator(mixture_or_task_name="synthetic_city_country_rank",
                                        task_feature_lengths=lengths, num_examples=12)
  outputs = evaluation.ModelOutputs(apply_fn=model.apply, mesh=mesh, batch_size=8)
  metrics = evaluation.task_metrics(evaluator, outputs, result.state.params)

  # Reference: log-likelihoods from the logits with numpy, best option per example.
  (task_name,) = [task.name for task in evaluator.eval_tasks]
  model_rows = evaluator.cached_model_datasets[task_name].as_numpy_iterator()
  rows = [features for _, features in model_rows]
  batch = {k: np.stack([r[k] for r in rows])
           for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
  logits = np.asarray(jax.jit(lambda p, b: model.apply(
      {"params": p}, b["decoder_input_tokens"], b["decoder_target_tokens"],
      enable_dropout=False))(result.state.params, batch), np.float64)
  log_probs = scipy.special.log_softmax(logits, axis=-1)
  token = np.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  scores = (token * (batch["decoder_loss_weights"] > 0)).sum(-1)
  np.testing.assert_allclose([s for _, s in outputs.score_fn(
      evaluator.cached_model_datasets[task_name])], scores, rtol=1e-4)
  examples = list(evaluator.cached_task_datasets[task_name].as_numpy_iterator())
  best = {}
  for example, score in zip(examples, scores):
    key = int(example["idx"][0])
    if key not in best or score > best[key][0]:
      best[key] = (score, bool(example["is_correct"]))
  expected = 100.0 * np.mean([correct for _, correct in best.values()])
  assert len(best) == 3  # num_examples counts rows: 3 questions x 4 options
  assert metrics == {task_name: {"accuracy": pytest.approx(expected)}}


def test_greedy_decode_matches_step_by_step_argmax(pretrained):
  _, result = pretrained
  model = decoder.SMoEDecoder(result.config)
  params = result.state.params
  rng = np.random.default_rng(0)
  length, steps = 24, 4
  targets = rng.integers(3, 259, (2, length)).astype(np.int32)
  prompt_lengths = np.array([5, 11])
  causal = (np.arange(length)[None, :] <= prompt_lengths[:, None]).astype(np.int32)
  batch = {"decoder_target_tokens": jnp.asarray(targets),
           "decoder_causal_attention": jnp.asarray(causal)}
  decoded = np.asarray(jax.jit(lambda p, b: evaluation.greedy_decode(
      p, b, apply_fn=model.apply, num_steps=steps))(params, batch))

  forward = jax.jit(lambda p, inputs, tgt: model.apply({"params": p}, inputs, tgt,
                                                       enable_dropout=False))
  for row, prompt in enumerate(prompt_lengths):
    sequence = np.zeros((1, length), np.int32)
    sequence[0, :prompt] = targets[row, :prompt]
    for t in range(steps):
      inputs = np.concatenate([[[0]], sequence[:, :-1]], axis=1)
      logits = np.asarray(forward(params, inputs, sequence))
      sequence[0, prompt + t] = logits[0, prompt + t].argmax()
    np.testing.assert_array_equal(decoded[row], sequence[0, prompt:prompt + steps])


def test_bad_arguments_raise_before_training(tmp_path):
  with pytest.raises(ValueError, match="BATCH_SIZE=6 must be a multiple"):
    train_main.run_with_gin(gin_files=PRETRAIN_FILES,
                           gin_bindings=_pretrain_bindings(tmp_path, BATCH_SIZE=6))
  with pytest.raises(ValueError, match="more than the model's max_length=128"):
    train_main.run_with_gin(gin_files=PRETRAIN_FILES, gin_bindings=_pretrain_bindings(
        tmp_path, TASK_FEATURE_LENGTHS="{'targets': 256}"))
  with pytest.raises(ValueError, match="--process_count and --process_index"):
    cli.initialize_distributed(coordinator_address="localhost:1234", process_count=None,
                                     process_index=None)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_progress_meter_reports_steps_per_second_and_eta():
  now = [100.0]
  meter = metrics.ProgressMeter(total_steps=110, start_step=10, clock=lambda: now[0])
  first = meter.update(step=11, metrics={"loss": 2.5})  # carries the compilation time
  assert first.startswith("step 11/110 | loss 2.5 |") and first.endswith("ETA ?")
  now[0] += 20.0
  line = meter.update(step=21, metrics={"loss": 2.0})
  assert meter.rates() == {"steps_per_second": 0.5}
  assert line == "step 21/110 | loss 2 | 0.50 steps/s | ETA 0:02:58"
  with pytest.raises(ValueError, match="start_step=5 must be in"):
    metrics.ProgressMeter(total_steps=4, start_step=5)


def test_each_host_reads_its_own_shard_of_the_training_data():
  args = dict(mixture_or_task_name="synthetic_lm", task_feature_lengths={"targets": 32},
              global_batch_size=4, seed=0, shuffle=False, process_count=2)
  host_batches = [next(pipeline.train_dataset(**args, process_index=i).as_numpy_iterator())
                  for i in range(2)]
  for batch in host_batches:
    assert batch["decoder_target_tokens"].shape == (2, 32)
  assert not np.array_equal(host_batches[0]["decoder_target_tokens"],
                            host_batches[1]["decoder_target_tokens"])
  with pytest.raises(ValueError, match="global batch size 5 must be a positive multiple"):
    pipeline.train_dataset(**{**args, "global_batch_size": 5}, process_index=0)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, 2\)"):
    pipeline.train_dataset(**args, process_index=2)


def test_a_host_batch_becomes_global_arrays_split_over_the_batch_axes():
  """One process: one transfer of the whole batch, the arrays the multi-host path makes."""
  mesh = partitioning.make_mesh(data=2, expert=4)
  sharding = partitioning.batch_sharding(mesh)
  batch = {"decoder_target_tokens": np.arange(8 * 4, dtype=np.int32).reshape(8, 4),
           "decoder_loss_weights": np.ones((8, 4), np.float32)}
  got = pipeline.to_global(batch, sharding)
  for name, value in batch.items():
    expected = jax.make_array_from_process_local_data(sharding, value)
    assert got[name].sharding == expected.sharding == sharding
    assert got[name].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(got[name]), value)
    assert [s.index for s in got[name].addressable_shards] == [
        s.index for s in expected.addressable_shards]


def test_mixture_rates_say_what_a_mixture_mixes_without_reading_data():
  """A mixture's composition (the study's stage keys): numbers, nested mixtures, and rate
  functions by name (none of them is called); a task has none."""
  from uncurl_jax.tasks import vocab  # pylint: disable=import-outside-toplevel
  vocab.add_mixture("rates_test_inner", [("facts_task", 1.0), ("facts_pretrain", 3.0)])
  called = []

  def by_size(task):
    called.append(task)
    return 1.0
  vocab.add_mixture("rates_test", [("rates_test_inner", 2.0), ("facts_task_dev", by_size)])
  rates = pipeline.mixture_rates("rates_test")
  assert rates == {
      "rates_test_inner": {"rate": 2.0, "mixes": {"facts_task": 1.0, "facts_pretrain": 3.0}},
      "facts_task_dev": f"{__name__}.test_mixture_rates_say_what_a_mixture_mixes_without_"
                        "reading_data.<locals>.by_size"}
  assert not called
  assert pipeline.mixture_rates("facts_task") is None
