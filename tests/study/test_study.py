"""The study end to end on a miniature configuration, its caching and resuming, its config.

One miniature study (2 MoE blocks of width 16, 4 experts pruned to 2, 4 training steps per
stage) runs once per module through a sequence: its first training stage is interrupted
after a checkpoint, the study is rerun (that stage resumes), rerun again (everything
cached), and rerun with one more method (only that method's stages run).
"""

import collections
import dataclasses
import io
import logging
import os
import re

import gin
import jax
import numpy as np
import pytest

import uncurl_jax.tasks  # noqa: F401  (registers the seqio tasks)
from uncurl_jax.train import checkpoints
from uncurl_jax.model import configs
from uncurl_jax.model import partitioning
from uncurl_jax.study import __main__ as study_main
from uncurl_jax.study import run as study_run
from uncurl_jax.train import schedules
from uncurl_jax import pruning
from uncurl_jax.pruning import methods as methods_lib
from uncurl_jax.study import runner as study_lib
from uncurl_jax.study import config as study_config
from uncurl_jax.study import progress as study_progress
from uncurl_jax.study import report as study_report
from uncurl_jax.study import cache as study_cache
from uncurl_jax.study import stages as study_stages
from uncurl_jax.study import training as study_training
from uncurl_jax.study.cache import Status
from uncurl_jax.study.config import Runtime, TrainSettings

TASK = "synthetic_lm_dna"
DEV_TASK = "synthetic_lm_code"


def _config(output_dir, **overrides):
  fields = dict(
      name="mini", output_dir=str(output_dir),
      model=configs.get("tiny", num_layers=2, moe_every=1, d_model=16, d_ff=32, num_heads=2,
                        max_length=32),
      tasks=[TASK],
      pretrain=TrainSettings(task_feature_lengths={"targets": 32}, steps=4, batch_size=8,
                             learning_rate=1e-2, warmup_steps=1,
                             mixture_or_task_name="synthetic_lm"),
      finetune=TrainSettings(task_feature_lengths={"targets": 32}, steps=4, batch_size=8,
                             learning_rate=1e-2, warmup_steps=1, router_warmup_steps=1,
                             router_warmup_learning_rate=1e-2),
      source_experts=[4], pruned_experts=[2], methods=["uncurl:reinit", "frequency"],
      dense_reference=False, eval_batches=1, eval_batch_size=8, logits_max_tokens=64,
      usage_max_tokens=64, runtime=Runtime(checkpoint_every_steps=2, log_every_steps=1))
  fields.update(overrides)
  return study_config.StudyConfig(**fields)


class _Interrupted(Exception):
  pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The study interrupted, resumed, rerun cached, and rerun with one more method."""
  output_dir = tmp_path_factory.mktemp("study")
  real_save = checkpoints.save

  def save_then_die(manager, state, **kwargs):
    real_save(manager, state, **kwargs)
    if int(state.step) == 2:  # the first stage is killed right after its step-2 checkpoint
      raise _Interrupted

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoints, "save", save_then_die)
    with pytest.raises(_Interrupted):
      study_run.run_study(_config(output_dir))
  resumed = study_run.run_study(_config(output_dir))
  cached_output = io.StringIO()
  cached = study_run.run_study(_config(output_dir), stream=cached_output)
  cached["output"] = cached_output.getvalue()
  # Another report directory over the same stages.
  extended = study_run.run_study(_config(
      tmp_path_factory.mktemp("extended"), stages_dir=str(output_dir / "stages"),
      methods=["uncurl:reinit", "frequency", "random"]))
  # The floor and the ceiling, the ceiling choosing on another task's validation split. The
  # oracle reads the pretrained source back from its checkpoint, and that read fails once,
  # as a damaged checkpoint would: the stage is reported and run again.
  real_restore, failed, warnings = study_stages.restore_params, [], []

  def damaged_once(path, **kwargs):
    if not failed and "pretrain-e4" in path:
      failed.append(path)
      raise ValueError("NOT_FOUND: Error reading OCDBT database")
    return real_restore(path, **kwargs)

  handler = logging.Handler()
  handler.emit = lambda record: warnings.append(record.getMessage())
  logging.getLogger(study_cache.__name__).addHandler(handler)
  try:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(study_stages, "restore_params", damaged_once)
      framed = study_run.run_study(_config(
          tmp_path_factory.mktemp("framed"), stages_dir=str(output_dir / "stages"),
          methods=["frequency", "experts_off", "oracle"], dev_tasks={TASK: DEV_TASK}))
  finally:
    logging.getLogger(study_cache.__name__).removeHandler(handler)
  framed["damaged"], framed["warnings"] = failed, warnings
  return dict(output_dir=output_dir, resumed=resumed, cached=cached, extended=extended,
              framed=framed)


def test_interrupted_stage_resumes_from_its_checkpoint(runs):
  events = runs["resumed"]["events"]
  assert events[0] == ("pretrain-e2", Status.RESUMED)
  assert all(status == Status.RAN for _, status in events[1:])
  study = study_lib.Study(_config(runs["output_dir"]))
  stage = study.finished(study.graph.pretrained(2, seed=0))
  # Training continued at step 3 from the step-2 checkpoint and ran to the end.
  assert stage.result["first_step"] == 3 and stage.result["steps"] == 4


def test_rows_table_and_files(runs):
  rows = runs["resumed"]["rows"]
  assert [(r.kind, r.num_experts, r.method) for r in rows] == [
      ("scratch", 2, ""), ("scratch", 4, ""), ("pruned", 2, "uncurl"), ("pruned", 2, "frequency")]
  for row in rows:
    assert 0.0 <= row.score <= 100.0 and row.task == TASK and row.seed == 0
    assert row.score_before_finetune is not None          # every arm, references too
    assert (row.score_after_warmup is not None) == (row.kind == "pruned")
    assert row.recipe.startswith("router warm-up 1 steps" if row.kind == "pruned" else "4 steps")
  files = runs["resumed"]["files"]
  with open(files["csv"]) as f:
    assert len(f.read().strip().splitlines()) == 1 + len(rows)
  with open(files["markdown"]) as f:
    markdown = f.read()
  assert files["table"] in markdown and "| 4->2 uncurl (reinit) |" in files["table"]
  for name in ("scores", "pruning_factor", f"similarity_{TASK}", f"expert_usage_{TASK}"):
    with open(files[name], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(files[name]) > 2000


def test_rerun_skips_every_stage_and_gives_the_same_rows(runs):
  assert all(status == Status.SKIPPED for _, status in runs["cached"]["events"])
  assert runs["cached"]["rows"] == runs["resumed"]["rows"]
  # What it prints: the plan first, no progress bar (nothing to run), then the tables.
  output = runs["cached"]["output"]
  assert output.startswith("Study 'mini': seeds [0]")
  assert "to run, " in output.splitlines()[1] and " 0 to run" in output.splitlines()[1]
  assert "%|" not in output and "After finetuning" in output
  # The plan lists every arm's recipe before anything runs (docs/study.md says so).
  plan, _ = output.split("After finetuning", 1)
  assert "Arms and their finetuning" in plan
  assert re.search(r"4->2 uncurl \(reinit\) +router warm-up 1 steps @ 0.01 router only", plan)
  assert re.search(r"\+4e +4 steps @ 0.01 all params", plan)


def test_added_method_runs_only_its_stages(runs):
  ran = [name for name, status in runs["extended"]["events"] if status != Status.SKIPPED]
  suffix = f"random-e4to2-{TASK}"
  assert ran == [f"prune-{suffix}", f"score-prune-{suffix}", f"warmup-{suffix}",
                 f"score-warmup-{suffix}", f"finetune-{suffix}", f"score-finetune-{suffix}"]
  assert runs["extended"]["rows"][:4] == runs["resumed"]["rows"]


def test_a_checkpoint_that_does_not_restore_is_reported_and_its_stage_run_again(runs):
  framed = runs["framed"]
  assert framed["damaged"]
  assert any(line.startswith("stage pretrain-e4 is damaged: its checkpoint does not restore "
                             "(ValueError: NOT_FOUND") for line in framed["warnings"])
  assert ("pretrain-e4", Status.REPAIRED) in framed["events"]
  # Run again from scratch, it is the same model: the frequency arm's row is unchanged.
  frequency = lambda rows: [r for r in rows if r.method == "frequency"]
  assert frequency(framed["rows"]) == frequency(runs["resumed"]["rows"])


def test_the_floor_and_the_ceiling_arms(runs):
  """experts_off: the source with every expert's output zeroed, scored one-shot as the
  library computes it; oracle: the experts greedily chosen on the development task (2 per
  layer), its model the bound selection of them; both warmed up and finetuned like every
  pruned arm; the report frames the methods with them."""
  rows = {r.method: r for r in runs["framed"]["rows"] if r.kind == "pruned"}
  assert set(rows) == {"frequency", "experts_off", "oracle"}
  assert rows["oracle"].model == "4->2 oracle (bind)"
  assert rows["experts_off"].model == "4->2 experts_off (anchor)"
  study = study_lib.Study(_config(runs["output_dir"], methods=["experts_off", "oracle"],
                                  dev_tasks={TASK: DEV_TASK}))
  study.plan()
  task = study_config.StudyTask(TASK)
  base = study.graph.pretrained(4, seed=0)
  selected = study.finished(study.graph.oracle_selected(task, base, (4, 2)))
  assert selected.status == Status.SKIPPED
  selection = selected.result["selection"]
  assert sorted(selection) == ["layers_0/mlp", "layers_1/mlp"]
  assert all(len(experts) == 2 for experts in selection.values())
  assert len(selected.result["trace"]) == 4 and selected.result["dev_items"] > 0
  scorer = study_stages.LossScorer(task=TASK, task_feature_lengths={"targets": 32}, pack=True,
                                   batch_size=8, max_batches=1, mesh=study.config.runtime.mesh)
  off = pruning.prune_params(study.params(base), None, 2, method="experts_off")
  np.testing.assert_allclose(
      rows["experts_off"].score_before_finetune,
      scorer(dataclasses.replace(study.config.model, num_experts=2), off)["accuracy"],
      rtol=1e-6)
  plan = pruning.plan_pruning(jax.device_get(study.params(base)), None, method="selection",
                              selection=selection)
  oracle_config = pruning.pruned_config(dataclasses.replace(study.config.model,
                                                            num_experts=4), plan)
  np.testing.assert_allclose(
      rows["oracle"].score_before_finetune,
      scorer(oracle_config, pruning.apply_plan(jax.device_get(study.params(base)), plan))[
          "accuracy"], rtol=1e-6)
  for row in rows.values():
    assert row.score_after_warmup is not None and "router warm-up" in row.recipe
  with open(runs["framed"]["files"]["markdown"]) as f:
    markdown = f.read()
  assert "## Scores by phase" in markdown and "| 4->2 oracle (bind) |" in markdown


def test_a_new_method_is_one_registration(runs, monkeypatch):
  """A method registered in a test (keep each layer's least selected experts) is planned
  as a pruned arm (router warm-up, then finetuning), costs what its flags say, and its
  pruning stage keeps the experts its grouping chose; nothing else names it."""
  monkeypatch.setattr(methods_lib, "_REGISTRY", dict(methods_lib._REGISTRY))
  pruning.register_method(methods_lib.Method(
      "least_used", merges=False, default_router="anchor",
      description="keep the least selected experts (a test's method)",
      group=methods_lib.per_layer(lambda i, name: methods_lib.selection_grouping(
          np.argsort(i.frequencies[name], kind="stable")[:i.targets[name]],
          i.layers[name].num_experts))))
  study = study_lib.Study(_config(runs["output_dir"], methods=["least_used"]))
  study.plan()
  (row,) = [r for r in study.row_specs if r.kind == "pruned"]
  assert row.method == study_config.MethodSpec("least_used")
  assert row.warmed is not None and row.recipe.startswith("router warm-up 1 steps")
  prune = row.before.inputs[0]
  assert prune.name == f"prune-least_used-e4to2-{TASK}" and prune.cost == 5.0  # no alignment
  stage = study.finished(prune)
  stats = study_stages.load_stats(os.path.join(prune.inputs[1].directory,
                                               study_stages.STATS_FILE))
  for name, layer in stats.items():
    counts = np.bincount(np.argmax(layer.logits, axis=-1), minlength=4)
    assert sorted(stage.result["anchors"][name]) == sorted(
        np.argsort(counts, kind="stable")[:2].tolist())


def test_score_before_finetuning_equals_pruning_the_source_directly(runs):
  """The 'frequency' row's pre-finetuning score, recomputed from the library functions."""
  study = study_lib.Study(_config(runs["output_dir"]))
  base = study.graph.pretrained(4, seed=0)
  stats = study.graph.task_stats(study_config.StudyTask(TASK), base, 4, seed=0)
  assert study.finished(stats).status == Status.SKIPPED
  stats = study_stages.load_stats(os.path.join(stats.directory, study_stages.STATS_FILE))
  small = pruning.prune_params(study.params(base), stats, 2, method="frequency", seed=0)
  config = dataclasses.replace(study.config.model, num_experts=2)
  scorer = study_stages.LossScorer(task=TASK, task_feature_lengths={"targets": 32}, pack=True,
                                   batch_size=8, max_batches=1, mesh=study.config.runtime.mesh)
  expected = scorer(config, small)["accuracy"]
  row = next(r for r in runs["resumed"]["rows"] if r.method == "frequency")
  np.testing.assert_allclose(row.score_before_finetune, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Configuration (no training).


@pytest.mark.parametrize("overrides, match", [
    (dict(pruned_experts=[4]), "not below any source_experts"),
    (dict(pruned_experts=[0]), ">= 1"),
    (dict(pruned_experts=[]), "non-empty"),
    (dict(finetune_steps={"other_task": 3}), "not in tasks"),
    (dict(methods=[]), "methods is empty"),
    (dict(methods=["pruning_by_magic"]), "unknown method"),
    (dict(finetune=TrainSettings(task_feature_lengths={"targets": 32}, steps=4, batch_size=8,
                                 learning_rate=1e-2, router_warmup_steps=3)),
     "leaves 1 full-parameter"),
    (dict(methods=["oracle"]), "dev_tasks"),
    (dict(dev_tasks={"other_task": "synthetic_lm_code"}), "not in tasks"),
    (dict(methods=["uncurl:sideways"]), "router option"),
    (dict(methods=["progressive_dropping:anchor"]), "router option"),
    (dict(methods=["progressive_dropping"]), "needs StudyConfig.dropping"),
    (dict(methods=["progressive_dropping"],
          dropping=schedules.ProgressiveDropping(first_drop_step=4, drop_every_steps=1)),
     "not before the finetuning"),
    (dict(tasks=[]), "empty"),
    (dict(tasks=[":x_rank"]), "expected 'task'"),
    (dict(tasks=["a:b:c:d"]), "expected 'task'"),
])
def test_bad_study_configs_raise(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    _config(tmp_path, **overrides)


def test_bad_training_settings_raise(tmp_path):
  with pytest.raises(ValueError, match="mixture_or_task_name"):
    _config(tmp_path, finetune=TrainSettings(task_feature_lengths={"targets": 32}, steps=4,
                                             batch_size=4, learning_rate=1.0,
                                             mixture_or_task_name="synthetic_lm"))
  with pytest.raises(ValueError, match="max_length"):
    _config(tmp_path, pretrain=TrainSettings(task_feature_lengths={"targets": 64}, steps=4,
                                             batch_size=4, learning_rate=1.0,
                                             mixture_or_task_name="synthetic_lm"))
  with pytest.raises(ValueError, match="router_warmup_steps"):
    TrainSettings(task_feature_lengths={"targets": 8}, steps=4, batch_size=1,
                  learning_rate=1.0, router_warmup_steps=5)
  # All steps router-only (the study's warm-up stage) is allowed, with no LR warm-up left.
  TrainSettings(task_feature_lengths={"targets": 8}, steps=4, batch_size=1, learning_rate=1.0,
                router_warmup_steps=4)
  with pytest.raises(ValueError, match="warmup_steps"):
    TrainSettings(task_feature_lengths={"targets": 8}, steps=4, batch_size=1,
                  learning_rate=1.0, warmup_steps=4, router_warmup_steps=1)


def test_progress_counts_one_compilation_per_new_shape(tmp_path):
  """The ETA's estimate: a step or scorer compiles once per shape in a run; a bound
  router or uneven counts (mc_smoe) give each pruned model shapes of its own."""
  config = _config(tmp_path, seeds=[0, 1],
                   methods=["frequency", "uncurl:merge", "frequency:bind", "mc_smoe"])
  specs = study_lib.Study(config).plan()
  costs = study_progress.estimated_costs(specs)
  charged = [s for s in specs if costs[s.key] > s.cost]
  assert all(costs[s.key] == s.cost + s.compile_cost for s in charged)
  assert len({s.compile_key for s in charged}) == len(charged)
  assert sum(costs.values()) == pytest.approx(sum(s.cost + (s in charged) * s.compile_cost
                                                  for s in specs))

  def charges(fragment):
    return sum(1 for s in charged if fragment in s.name and s.kind in ("train", "score"))
  # Own shapes: per seed its router-only warm-up step, its finetuning step and one scorer
  # (shared by its three scores).
  assert charges("frequency-bind-e4to2") == 2 * 3
  assert charges("mc_smoe-e4to2") == 2 * 3
  # The uniform arms reuse the scorer of the 2-expert model from scratch; their router-only
  # step and their (shorter) finetuning step compile once, for the first of them (seed 0),
  # as the pretraining and the references' finetuning do.
  assert charges("-frequency-e4to2") == 2 and charges("uncurl-merge") == 0
  assert [s.name for s in charged if s.kind == "train" and "to2" not in s.name] == [
      "pretrain-e2", f"finetune-e2-{TASK}", "pretrain-e4", f"finetune-e4-{TASK}"]
  assert [s.name for s in charged if s.kind == "train" and "-frequency-e4to2" in s.name] == [
      f"warmup-frequency-e4to2-{TASK}", f"finetune-frequency-e4to2-{TASK}"]


def test_specs_parse():
  assert study_config.MethodSpec.parse("uncurl:merge") == study_config.MethodSpec("uncurl", "merge")
  assert study_config.MethodSpec.parse("random").slug == "random"
  assert study_config.StudyTask.parse("a:a_rank") == study_config.StudyTask("a", "a_rank")
  assert study_config.StudyTask.parse("a::f1") == study_config.StudyTask("a", None, "f1")


def test_pairs_and_per_task_finetuning_steps(tmp_path):
  finetune_settings = TrainSettings(task_feature_lengths={"targets": 32}, steps=4,
                                    batch_size=4, learning_rate=1.0, warmup_steps=3,
                                    router_warmup_steps=1)
  config = _config(tmp_path, source_experts=[32, 64, 128], pruned_experts=[8, 32, 64],
                   finetune=finetune_settings, finetune_steps={TASK: 3})
  # The paper's six pairs.
  assert config.pairs == ((32, 8), (64, 8), (64, 32), (128, 8), (128, 32), (128, 64))
  settings = config.finetune_settings(config.tasks[0])
  assert settings.steps == 3 and settings.warmup_steps == 2  # capped to 3 - 1 router step
  assert _config(tmp_path).finetune_settings(config.tasks[0]).steps == 4


def test_per_task_finetuning_replaces_finetune_for_that_task_only(tmp_path):
  own = TrainSettings(task_feature_lengths={"targets": 32}, steps=6, batch_size=8,
                      learning_rate=3e-3, warmup_steps=1, router_warmup_steps=1,
                      router_warmup_learning_rate=1e-2)
  config = _config(tmp_path, tasks=[TASK, DEV_TASK], task_finetune={DEV_TASK: own},
                   finetune_steps={DEV_TASK: 5})
  assert config.finetune_settings(config.tasks[0]) == config.finetune
  assert config.finetune_settings(config.tasks[1]) == dataclasses.replace(own, steps=5)
  with pytest.raises(ValueError, match="task_finetune names tasks"):
    _config(tmp_path, task_finetune={"other_task": own})
  with pytest.raises(TypeError, match="must be a TrainSettings"):
    _config(tmp_path, task_finetune={TASK: {"steps": 3}})
  with pytest.raises(ValueError, match="must keep finetune's task_feature_lengths"):
    _config(tmp_path, task_finetune={TASK: dataclasses.replace(
        own, task_feature_lengths={"targets": 16})})
  # The finetuning stages of that task carry its settings (and only its).
  study = study_lib.Study(config)
  study.plan()
  steps = {row.task.name: row.score.inputs[0].config["train"]["steps"]
           for row in study.row_specs if row.kind == "scratch"}
  assert steps == {TASK: 4, DEV_TASK: 5}


@pytest.mark.parametrize("gin_file", ["synthetic.gin", "full.gin", "paper_354m.gin",
                                      "truth_search.gin", "property.gin"])
def test_experiment_gin_files_make_valid_study_configs(gin_file):
  try:
    study_main.parse_gin(gin_files=[os.path.join("gin", "experiments", gin_file)])
    config = study_main.register_configurables()["StudyConfig"]()
  finally:
    gin.clear_config()
  assert isinstance(config, study_config.StudyConfig)
  assert config.pairs
  names = {m.method for m in config.methods}
  if gin_file == "truth_search.gin":  # scored on a development split, references decide
    assert config.tasks[0].eval_task == "facts_truth_dev_rank" and "oracle" not in names
  elif gin_file in ("property.gin", "full.gin"):  # docs/study.md, "The property tasks"
    property_tasks = [("facts_property", "facts_property_recall_judge"),
                      ("facts_property_b", "facts_property_b_recall_judge")]
    if gin_file == "full.gin":  # every task, 2x-16x, every method of the default but mc_smoe
      assert [(t.name, t.eval_task) for t in config.tasks] == [("facts_task", None),
                                                               *property_tasks]
      assert config.pairs == ((32, 16), (32, 8), (32, 4), (32, 2))
      assert config.seeds == (0, 1, 2, 3, 4)
      facts_task = config.tasks[0]
      assert config.finetune_settings(facts_task) == config.finetune
      assert config.finetune.steps == 110 and config.dev_tasks["facts_task"] == "facts_task_dev"
      assert len(config.methods) == 15
    else:
      assert [(t.name, t.eval_task) for t in config.tasks] == property_tasks
    for task in config.tasks[-2:]:
      settings = config.finetune_settings(task)
      assert settings.mixture_or_task_name == f"{task.name}_replay"
      assert (settings.steps, settings.learning_rate, settings.router_warmup_steps) == (
          1000, 1e-3, 30)
      assert config.dev_tasks[task.name] == f"{task.name}_facts_dev"
    assert {"uncurl", "frequency", "oracle", "router_norm", "progressive_dropping"} <= names
  else:
    assert {"uncurl", "frequency"} <= names


def test_top_choices_route_as_the_model_bound_or_not():
  """The usage diagnostics' first choices: among a bound router's columns only, gate = the
  E-way softmax probability, the expert = the column's binding (numpy reference)."""
  rng = np.random.default_rng(0)
  logits = {"layers_0/mlp": rng.normal(size=(50, 4)), "layers_2/mlp": rng.normal(size=(50, 4))}
  config = configs.get("tiny", num_layers=4, num_experts=4, layer_num_experts=(2, 2),
                       layer_router_maps=((0, -1, 1, -1), (1, 0, -1, -1)))
  for name, bound in zip(logits, ((0, -1, 1, -1), (1, 0, -1, -1))):
    h = logits[name]
    probs = np.exp(h) / np.exp(h).sum(-1, keepdims=True)
    column = np.argmax(np.where(np.asarray(bound) >= 0, probs, -1), -1)
    experts, gates = study_stages.top_choices(logits, config)[name]
    np.testing.assert_array_equal(experts, np.asarray(bound)[column])
    np.testing.assert_allclose(gates, probs[np.arange(50), column], rtol=1e-5)
  plain = configs.get("tiny", num_layers=4, num_experts=4)
  experts, _ = study_stages.top_choices(logits, plain)["layers_2/mlp"]
  np.testing.assert_array_equal(experts, np.argmax(logits["layers_2/mlp"], -1))


def test_pruned_params_are_placed_like_restored_ones(tmp_path):
  """A pruned model's host params get the shardings restored and trained params have, so
  its scores reuse the scorer compiled for them."""
  config = configs.get("tiny", num_layers=2, moe_every=1, d_model=16, d_ff=32, num_heads=2,
                       max_length=32, num_experts=4)
  mesh = partitioning.make_mesh()
  model = study_stages.decoder.SMoEDecoder(config)
  tokens = np.ones((2, 8), np.int32)
  host = jax.device_get(model.init(jax.random.key(0), tokens, tokens,
                                   enable_dropout=False)["params"])
  placed = study_stages.place_params(host, config=config, mesh=mesh)
  checkpoints.save_params(str(tmp_path / "p"), host)
  restored = study_stages.restore_params(str(tmp_path / "p"), config=config, mesh=mesh)
  for got, want, value in zip(jax.tree.leaves(placed), jax.tree.leaves(restored),
                              jax.tree.leaves(host)):
    assert isinstance(got, jax.Array) and got.sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(got), value)


def test_stage_batches_are_read_as_training_reaches_them_and_shared():
  """A seed's stream is read lazily (the first model trains while seqio reads) and once:
  a later stage of the same stream reads only the batches no stage has read yet."""
  reads = []

  def stream():
    for index in range(10**6):
      reads.append(index)
      yield {"index": index}
  cached, source = [], stream()
  read = study_training.StageTrainer._read_through
  first = read(cached, source, 0, 4)
  assert reads == []
  assert next(first) == {"index": 0} and reads == [0]
  assert [b["index"] for b in first] == [1, 2, 3] and reads == [0, 1, 2, 3]
  assert [b["index"] for b in read(cached, source, 2, 6)] == [2, 3, 4, 5]
  assert reads == list(range(6))
  # A resumed stage starts at its checkpoint's step.
  assert [b["index"] for b in read(cached, source, 5, 7)] == [5, 6]
  assert reads == list(range(7))


def _default_study(tmp_path, gin_file="synthetic.gin"):
  try:
    study_main.parse_gin(gin_files=[os.path.join("gin", "experiments", gin_file)],
                         gin_bindings=[f"STAGES_DIR = '{tmp_path}'"])
    config = study_main.register_configurables()["StudyConfig"]()
  finally:
    gin.clear_config()
  return study_lib.Study(config)


def _recipes_in_docs(heading: str = "#### The arms' recipes") -> str:
  """The fenced block under `heading` in docs/study.md."""
  text = open(os.path.join("docs", "study.md")).read()
  section = text.split(heading, 1)[1]
  return section.split("```", 2)[1].strip("\n")


def test_the_property_plan_is_the_recipe_docs_study_md_states(tmp_path):
  """The docs are claims: property.gin's plan (per task) prints the block docs/study.md
  shows under "The property tasks' recipes", and it finetunes on the replay mixture."""
  study = _default_study(tmp_path, "property.gin")
  specs = study.plan()
  assert study_report.recipes_text(study.recipes()).strip("\n") == _recipes_in_docs(
      "#### The property tasks' recipes")
  for spec in specs:
    if spec.name.startswith(("finetune-", "warmup-")):
      task = spec.config["task"]
      assert spec.config["train"]["mixture_or_task_name"] == f"{task}_replay", spec.name
      assert spec.config["mixture"] == {task: 1.0, "facts_pretrain": 1.0}


def _recipe_lines(block: str) -> dict[str, str]:
  return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in block.splitlines())


def test_the_full_plan_gives_each_task_its_documented_recipe(tmp_path):
  """The docs are claims: full.gin runs facts_task with the default's recipes and the
  property tasks with theirs (docs/study.md's two recipe blocks, every arm of them that
  full.gin runs, at 32 -> 8), and its printed plan lists every task's arms."""
  study = _default_study(tmp_path, "full.gin")
  study.plan()
  recipes = study.recipes()
  documented = {"facts_task": _recipe_lines(_recipes_in_docs()),
                "facts_property": _recipe_lines(_recipes_in_docs(
                    "#### The property tasks' recipes"))}
  documented["facts_property_b"] = documented["facts_property"]
  for task, block in documented.items():
    arms = {label.split(": ", 1)[1]: recipe for label, recipe in recipes.items()
            if label.startswith(f"{task}: ")}
    at_4x = {arm for arm in arms if not arm.startswith("32->") or arm.startswith("32->8 ")}
    assert len(at_4x) == 6 + 15, sorted(at_4x)   # dense, +2e ... +32e; 15 methods at 4x
    for arm in at_4x & set(block):
      assert arms[arm] == block[arm], (task, arm)
    assert {"dense", "+8e", "+32e", "32->8 uncurl (reinit)", "32->8 oracle (bind)",
            "32->8 progressive_dropping", "32->8 router_norm (anchor)"} <= at_4x & set(block)


def test_the_default_plan_is_the_recipe_docs_study_md_states(tmp_path):
  """The docs are claims: the recipe of every arm of the default study, as planned, is the
  block docs/study.md shows; references have no warm-up stage and train every parameter
  for all finetuning steps; every pruned arm but progressive dropping has a router-only
  warm-up stage of router_warmup_steps, scored, then full steps that make up the budget;
  every arm is scored before finetuning (progressive dropping: the intact source it starts
  from)."""
  study = _default_study(tmp_path)
  specs = study.plan()
  assert len({s.key for s in specs}) == len(specs)     # every stage planned once
  assert study_report.recipes_text(study.recipes()).strip("\n") == _recipes_in_docs()
  settings = study.config.finetune_settings(study.config.tasks[0])
  warmup = settings.router_warmup_steps
  assert warmup > 0
  kinds = collections.Counter()
  for row in study.row_specs:
    trained = row.score.inputs[0]
    kinds[row.kind] += 1
    chain = []  # the training stages from the pretrained model to the scored one
    spec = trained
    while spec.kind in ("train", "prune"):
      chain.append(spec)
      spec = spec.inputs[0] if spec.inputs else None
      if spec is None:
        break
    names = [s.name.split("-")[0] for s in chain]
    if row.kind != "pruned" or row.method.method == "progressive_dropping":
      assert names[:2] == ["finetune", "pretrain"], names
      assert row.warmed is None
      assert trained.config["train"]["steps"] == settings.steps
      assert trained.config["router_warmup"] is False
      assert "warm-up" not in row.recipe
      if row.kind == "pruned":  # progressive dropping starts from the intact source
        assert trained.config["dropping"] is not None
      assert row.before.inputs[0].name.startswith("pretrain-")
      continue
    assert names[:3] == ["finetune", "warmup", "prune"], names
    full, warm = chain[0], chain[1]
    assert warm.config["router_warmup"] is True
    assert warm.config["train"]["steps"] == warm.config["train"]["router_warmup_steps"] == warmup
    assert full.config["router_warmup"] is False
    probe = 0
    if row.method.method == "router_norm":
      probe = chain[3].config["train"]["steps"]
      assert chain[3].name.endswith(f"probe-{row.task.name}")
    assert warmup + full.config["train"]["steps"] + probe == settings.steps
    assert full.config["data_offset"] == probe + warmup and warm.config["data_offset"] == probe
    assert row.before.inputs[0] is chain[2] and row.warmed.inputs[0] is warm
    assert f"router warm-up {warmup} steps" in row.recipe
  assert kinds == {"dense": 1, "scratch": 2, "pruned": len(study.config.methods)}
