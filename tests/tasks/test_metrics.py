"""Metrics and postprocessors of the prompt tasks against hand-computed values."""

import pytest

from uncurl_jax.tasks import metrics


def test_accuracy():
  assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, -1]) == {"accuracy": 50.0}


def test_cb_accuracy_and_macro_f1():
  # class 0: tp 2 fp 0 fn 0 -> f1 1; class 1: tp 1 fp 1 fn 1 -> 1/2;
  # class 2: tp 0 fp 1 fn 2 (the unmatched -1 is a miss) -> 0.
  result = metrics.accuracy_and_macro_f1([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 1, -1])
  assert result["accuracy"] == pytest.approx(100 * 3 / 6)
  assert result["f1_macro"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)


def test_multirc_f1a_and_exact_match():
  groups = [(0, 0), (0, 0), (0, 1), (0, 1), (1, 2)]
  targets = [{"group": g, "value": v} for g, v in zip(groups, [1, 0, 1, 1, 0])]
  predictions = [{"value": v} for v in [1, 0, 1, -1, 1]]
  # Over all options: tp 2, fp 1 (last), fn 1 (the unmatched answer) -> f1 2/3.
  # Questions: (0,0) all right, (0,1) one wrong, (1,2) wrong -> 1/3.
  result = metrics.multirc_f1a_and_em(targets, predictions)
  assert result["f1a"] == pytest.approx(100 * 2 / 3)
  assert result["exact_match"] == pytest.approx(100 / 3)


def test_record_takes_the_max_over_gold_answers():
  targets = [["Barack Obama", "Obama"], ["the United States"], ["Paris"]]
  predictions = ["Obama", "United States of America", "London"]
  # 1: exact "Obama" -> f1 1, em 1. 2: gold [united, states], guess [united, states,
  # of, america]: p 1/2, r 1 -> f1 2/3, em 0. 3: nothing in common -> 0.
  result = metrics.record_max_f1_em(targets, predictions)
  assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
  assert result["exact_match"] == pytest.approx(100 / 3)


def test_normalize_answer():
  assert metrics.normalize_answer("  The Quick, brown fox!") == "quick brown fox"


def test_option_index_maps_text_to_labels():
  example = {"options": [b"no", b"yes"], "label": 0}
  assert metrics.option_index(" YES\n", example) == 1
  assert metrics.option_index("maybe", example) == -1
  assert metrics.option_index("yes", example, is_target=True) == 0
  with pytest.raises(ValueError, match="needs the example"):
    metrics.option_index("yes")


def test_multirc_and_record_postprocessors():
  example = {"options": [b"no", b"yes"], "label": 1, "group": [4, 9]}
  assert metrics.multirc_answer("no", example) == {"group": (4, 9), "value": 0}
  assert metrics.multirc_answer("", example, is_target=True) == {"group": (4, 9), "value": 1}
  record = {"answers": [b"Paris", b"the capital"]}
  assert metrics.record_answer(" Rome ", record) == "Rome"
  assert metrics.record_answer("x", record, is_target=True) == ["Paris", "the capital"]


def rank_targets(options_per_example, correct, groups=None):
  """What `rank_target` produces for expanded examples, in dataset order."""
  targets = []
  for i, options in enumerate(options_per_example):
    for j, text in enumerate(options):
      example = {"idx": [i, j], "is_correct": j in correct[i], "targets_pretokenized": text}
      if groups:
        example["group"] = groups[i]
      targets.append(metrics.rank_target(None, example, is_target=True))
  return targets


def test_rank_accuracy_picks_the_highest_score():
  targets = rank_targets([["a", "b"], ["a", "b", "c"], ["x", "y"]], [{0}, {2}, {0, 1}])
  scores = [-1.0, -2.0, -5.0, -1.0, -3.0, -9.0, -8.0]
  # example 0 picks a (right), 1 picks b (wrong), 2 picks y (one of two right ones).
  assert metrics.rank_accuracy(targets, scores) == pytest.approx({"accuracy": 100 * 2 / 3})
  assert metrics.rank_target(-1.5, {}, is_target=False) == -1.5
  with pytest.raises(ValueError, match="2 targets but 1 scores"):
    metrics.rank_accuracy(targets[:2], scores[:1])


def test_rank_metrics_reuse_the_task_definitions():
  classes = ["true", "false", "neither"]
  targets = rank_targets([classes] * 3, [{0}, {1}, {2}])
  scores = [0, -1, -2, -3, -1, -2, -1, -2, -3]  # predicts 0, 1, 0
  assert metrics.rank_accuracy_and_macro_f1(targets, scores) == pytest.approx(
      metrics.accuracy_and_macro_f1([0, 1, 2], [0, 1, 0]))
  targets = rank_targets([["no", "yes"]] * 3, [{1}, {0}, {1}], groups=[(0, 0), (0, 0), (0, 1)])
  scores = [-2, -1, -1, -2, -1, -2]  # predicts 1, 0, 0
  assert metrics.rank_multirc(targets, scores) == pytest.approx(metrics.multirc_f1a_and_em(
      [{"group": (0, 0), "value": 1}, {"group": (0, 0), "value": 0},
       {"group": (0, 1), "value": 1}], [{"value": 1}, {"value": 0}, {"value": 0}]))
  targets = rank_targets([["Obama", "Biden", "Obama's team"]], [{0, 2}])
  assert metrics.rank_record(targets, [-3, -1, -2]) == {"f1": 0.0, "exact_match": 0.0}
  assert metrics.rank_record(targets, [-3, -4, -2]) == {"f1": 100.0, "exact_match": 100.0}
