"""Miniature studies of the tasks learned in finetuning: a truth task scored by rank
classification and a property task scored by recall then judgement.

In their own file (not test_study.py) so that pytest-xdist's loadfile scheduling can run
them beside test_study.py's module study, the suite's longest fixture.
"""

import dataclasses

import numpy as np
import pytest

import uncurl_jax.tasks
from uncurl_jax.study import runner as study_lib
from uncurl_jax.study.config import TrainSettings
from uncurl_jax.model import configs
from tests.study.test_study import TASK
from tests.study.test_study import _config


def test_a_truth_task_runs_in_a_miniature_study(tmp_path):
  """A task learned in finetuning, scored by rank classification: every arm gets per-item
  scores (one per judgement), the score is their mean, and the oracle selects on the
  task's development facts."""
  from uncurl_jax.data import facts as facts_data  # pylint: disable=import-outside-toplevel
  from uncurl_jax.tasks import facts as fact_tasks  # pylint: disable=import-outside-toplevel
  world = facts_data.FactWorld(num_topics=4, num_values=8, typed_answers=True,
                               subjects_per_topic=24, task_topics=(1, 2),
                               finetune_fraction=0.25, dev_fraction=0.25, seed=5)
  fact_tasks.register_world("mini_truth_world", world)
  fact_tasks.register_truth_task("mini_truth", world)
  lengths = {"inputs": 8, "targets": 4}
  settings = dict(task_feature_lengths=lengths, batch_size=8, learning_rate=1e-2,
                  warmup_steps=1)
  config = _config(
      tmp_path, model=configs.get("tiny", num_layers=2, moe_every=1, d_model=16, d_ff=32,
                                  num_heads=2, max_length=32, vocab_size=world.vocab_size),
      tasks=["mini_truth:mini_truth_rank"], dev_tasks={"mini_truth": "mini_truth_facts_dev"},
      pretrain=TrainSettings(steps=4, mixture_or_task_name="mini_truth_world_pretrain",
                             **settings),
      finetune=TrainSettings(steps=4, router_warmup_steps=1, router_warmup_learning_rate=1e-2,
                             **settings),
      methods=["oracle"], eval_batch_size=8)
  study = study_lib.Study(config)
  rows = study.run()
  items = study.items()
  judgements = 2 * world.num_task_items
  assert {row.model for row in rows} == {"+2e", "+4e", "4->2 oracle (bind)"}
  for row in rows:
    scores = items[("mini_truth", row.model, 0)]
    assert scores.shape == (judgements,) and set(np.unique(scores)) <= {0.0, 100.0}
    assert row.score == pytest.approx(scores.mean())


def test_a_property_task_runs_in_a_miniature_study(tmp_path):
  """A property task: finetuned on its replay mixture, pruned on the statistics of its own
  judgements, scored by recall then judgement: per-item scores (one per scored fact), the
  score is their mean, and the recall and the judgement with the true value are reported."""
  from uncurl_jax.data import facts as facts_data  # pylint: disable=import-outside-toplevel
  from uncurl_jax.tasks import facts as fact_tasks  # pylint: disable=import-outside-toplevel
  world = facts_data.FactWorld(num_topics=4, num_values=8, typed_answers=True,
                               subjects_per_topic=24, task_topics=(1, 2),
                               finetune_fraction=0.25, dev_fraction=0.25, seed=5)
  fact_tasks.register_world("mini_property_world", world)
  fact_tasks.register_property_task("mini_property", world,
                                    replay="mini_property_world_pretrain")
  lengths = {"inputs": 8, "targets": 4}
  settings = dict(task_feature_lengths=lengths, batch_size=8, learning_rate=1e-2,
                  warmup_steps=1)
  finetune = TrainSettings(steps=4, router_warmup_steps=1, router_warmup_learning_rate=1e-2,
                           **settings)
  config = _config(
      tmp_path, model=configs.get("tiny", num_layers=2, moe_every=1, d_model=16, d_ff=32,
                                  num_heads=2, max_length=32, vocab_size=world.vocab_size),
      tasks=["mini_property:mini_property_recall_judge"],
      pretrain=TrainSettings(steps=4, mixture_or_task_name="mini_property_world_pretrain",
                             **settings),
      finetune=finetune, task_finetune={"mini_property": dataclasses.replace(
          finetune, steps=5, mixture_or_task_name="mini_property_replay")},
      methods=["frequency"], eval_batch_size=8)
  study = study_lib.Study(config)
  rows = study.run()
  items = study.items()
  assert {row.model for row in rows} == {"+2e", "+4e", "4->2 frequency (anchor)"}
  stages = {spec.name: spec for spec in study.plan()}
  assert stages["stats-e4-mini_property"].config["task"] == "mini_property"
  trained = [spec for name, spec in stages.items() if name.startswith("finetune-")]
  assert trained and all(spec.config["train"]["mixture_or_task_name"] == "mini_property_replay"
                         for spec in trained)
  for row in rows:
    scores = items[("mini_property", row.model, 0)]
    assert scores.shape == (world.num_task_items,) and set(np.unique(scores)) <= {0.0, 100.0}
    assert row.score == pytest.approx(scores.mean())
    assert 0.0 <= row.recall <= 100.0 and 0.0 <= row.score_true_value <= 100.0
  # A mixture re-registered under its name with other rates trains other models: its
  # composition is in the finetuning stages' keys (pretraining on a task keeps its key).
  keys = {spec.name: spec.key for spec in study_lib.Study(config).plan()}
  uncurl_jax.tasks.vocab.add_mixture("mini_property_replay", [
      ("mini_property", 2.0), ("mini_property_world_pretrain", 1.0)])
  try:
    changed = {spec.name for spec in study_lib.Study(config).plan()
               if keys[spec.name] != spec.key}
  finally:
    fact_tasks.register_property_task("mini_property", world,
                                      replay="mini_property_world_pretrain")
  assert {name.split("-")[0] for name in changed} >= {"finetune", "warmup", "score"}
  assert not any(name.startswith("pretrain-") for name in changed)
  with pytest.raises(ValueError, match="'no_such_mixture'"):
    _config(tmp_path, task_finetune={TASK: dataclasses.replace(
        _config(tmp_path).finetune, mixture_or_task_name="no_such_mixture")}).check_runnable()
