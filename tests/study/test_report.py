"""The study report: results.csv, the paper-style markdown table, PNG plots."""

import csv
import dataclasses

import numpy as np
import pytest

from uncurl_jax.study import plots
from uncurl_jax.study import report
from uncurl_jax.study.report import ResultRow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows():
  """Two tasks, references at 0/8/32 experts and three pruned models per task."""
  rows = []
  scores = {"rte": dict(dense=60.0, s8=62.0, s32=66.0, uncurl=63.5, frequency=61.0,
                        random=62.0),
            "copa": dict(dense=55.0, s8=58.0, s32=59.0, uncurl=57.0, frequency=58.5,
                         random=50.0)}
  for task, s in scores.items():
    rows += [ResultRow(task, "dense", 0, score=s["dense"]),
             ResultRow(task, "scratch", 8, score=s["s8"]),
             ResultRow(task, "scratch", 32, score=s["s32"])]
    rows += [ResultRow(task, "pruned", 8, source_experts=32, method=m,
                       router="reinit" if m == "uncurl" else "", score=s[m],
                       score_before_finetune=s[m] - 10.0)
             for m in ("uncurl", "frequency", "random")]
  return rows


def test_csv_has_the_columns_and_the_comparison_with_the_same_size_model(tmp_path):
  path = tmp_path / "results.csv"
  report.write_csv(_rows(), path)
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == report.CSV_COLUMNS
    records = list(reader)
  assert len(records) == 12
  uncurl = next(r for r in records if r["task"] == "rte" and r["method"] == "uncurl")
  assert uncurl["model"] == "32->8 uncurl (reinit)"
  assert float(uncurl["pruning_factor"]) == 4.0
  assert float(uncurl["reference_score"]) == 62.0  # the 8-expert model from scratch
  assert float(uncurl["delta"]) == pytest.approx(1.5)
  assert float(uncurl["score_before_finetune"]) == 53.5
  dense = next(r for r in records if r["task"] == "copa" and r["kind"] == "dense")
  assert dense["reference_score"] == dense["delta"] == dense["pruning_factor"] == ""


def test_markdown_table_is_shaped_like_the_papers_with_marks():
  table = report.markdown_table(_rows())
  lines = table.splitlines()
  assert lines[0] == "| model | rte | copa |"
  assert lines[1] == "|---|---|---|"
  assert lines[2:] == [
      "| dense | 60.00 | 55.00 |",
      "| +8e | 62.00 | 58.00 |",
      "| +32e | 66.00 | 59.00 |",
      "| 32->8 uncurl (reinit) | 63.50+ | 57.00- |",
      "| 32->8 frequency | 61.00- | 58.50+ |",
      "| 32->8 random | 62.00= | 50.00- |",
  ]


def test_csv_reads_back_and_seed_spread_is_mean_and_sample_std(tmp_path):
  rows = _rows()
  report.write_csv(rows, tmp_path / "seed0.csv")
  assert report.read_csv(tmp_path / "seed0.csv") == rows
  other = [dataclasses.replace(r, score=r.score + 2.0, seed=1) for r in rows]
  table = report.spread_table(rows + other).splitlines()
  assert table[0] == "| model | rte | copa |"
  # rte: 63.5 and 65.5 -> mean 64.5, sample std sqrt(2) = 1.41.
  assert table[5] == "| 32->8 uncurl (reinit) | 64.50 ± 1.41 (2) | 58.00 ± 1.41 (2) |"
  before = report.spread_table(rows, before_finetune=True).splitlines()
  assert before[2] == "| 32->8 uncurl (reinit) | 53.50 ± 0.00 (1) | 47.00 ± 0.00 (1) |"
  # Paired: both seeds are 2 points higher, so differences to +8e have no spread.
  paired = report.spread_table(rows + other, relative_to="+8e").splitlines()
  assert paired[3] == "| +8e | 0.00 ± 0.00 (2) | 0.00 ± 0.00 (2) |"
  assert paired[5] == "| 32->8 uncurl (reinit) | 1.50 ± 0.00 (2) | -1.00 ± 0.00 (2) |"
  with pytest.raises(ValueError, match="not a model"):
    report.spread_table(rows, relative_to="+64e")


def test_markdown_marks_flip_for_losses_and_before_finetune_has_no_marks():
  rows = [ResultRow("lm", "scratch", 8, score=1.5),
          ResultRow("lm", "pruned", 8, source_experts=32, method="uncurl", score=1.2,
                    score_before_finetune=2.0)]
  assert report.markdown_table(rows, lower_is_better=True).splitlines()[-1] == (
      "| 32->8 uncurl | 1.20+ |")
  assert report.markdown_table(rows).splitlines()[-1] == "| 32->8 uncurl | 1.20- |"
  before = report.markdown_table(rows, before_finetune=True, digits=1).splitlines()
  assert before[2:] == ["| 32->8 uncurl | 2.0 |"]  # references have no before-score


def test_pruned_rows_without_a_same_size_reference_get_no_mark():
  rows = [ResultRow("t", "scratch", 8, score=1.0),
          ResultRow("t", "pruned", 16, source_experts=32, method="frequency", score=2.0)]
  assert report.markdown_table(rows).splitlines()[-1] == "| 32->16 frequency | 2.00 |"


def test_result_row_validation():
  with pytest.raises(ValueError, match="kind"):
    ResultRow("t", "pretrained", 8)
  with pytest.raises(ValueError, match="method"):
    ResultRow("t", "pruned", 8, source_experts=32)
  with pytest.raises(ValueError, match="source_experts"):
    ResultRow("t", "pruned", 8, source_experts=4, method="uncurl")
  with pytest.raises(ValueError, match="at least one"):
    report.markdown_table([])


def test_cluster_order_groups_experts_and_puts_dropped_last():
  assert plots.cluster_order([1, 0, 1, -1, 0]).tolist() == [1, 4, 0, 2, 3]


def _assert_png(path):
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE and len(data) > 2000


def test_plots_are_written(tmp_path):
  rows = _rows() + [ResultRow("rte", "pruned", 16, source_experts=32, method="uncurl",
                              router="reinit", score=65.0),
                    ResultRow("rte", "scratch", 16, score=64.0)]
  plots.plot_scores(rows, tmp_path / "scores.png")
  plots.plot_pruning_factor(rows, tmp_path / "factor.png")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(200, 8))
  similarity = (1 + np.corrcoef(logits.T)) / 2
  labels = [0, 0, 1, 1, 2, 2, -1, 1]
  plots.plot_similarity({"layers_0/mlp": (similarity, labels, [0, 2, 4]),
                          "layers_1/mlp": (similarity, labels, [1, 3, 5])},
                         tmp_path / "similarity.png", title="test")
  usage = {"layers_0/mlp": np.full(8, 1 / 8), "layers_1/mlp": np.linspace(0, 0.25, 8)}
  plots.plot_expert_usage(usage, {"32->8 uncurl": {k: v[:3] for k, v in usage.items()}},
                           tmp_path / "usage.png", labels={"layers_0/mlp": labels})
  for name in ("scores.png", "factor.png", "similarity.png", "usage.png"):
    _assert_png(tmp_path / name)
