"""The study report: results.csv, the paper-style markdown table, PNG plots."""

import csv
import dataclasses
import math
import pathlib
import re
import shlex

import numpy as np
import pytest

from uncurl_jax.study import plots
from uncurl_jax.study import report
from uncurl_jax.study import statistics
from uncurl_jax.study.rows import ResultRow

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


def _seeds(rows, shifts):
  """Copies of `rows` for seeds 1, 2, ...: every score moved by `shifts[seed][model]`."""
  out = list(rows)
  for seed, shift in enumerate(shifts, start=1):
    out += [dataclasses.replace(r, seed=seed, score=r.score + shift.get(r.model, 0.0))
            for r in rows]
  return out


def test_markdown_table_gives_mean_and_standard_error_and_calls_only_clear_differences():
  # Three seeds; uncurl's lead over +8e on rte is steady (called +), frequency's
  # deficit on rte is steady (called -); on copa the differences swing with the seed.
  rows = _seeds(_rows(), [{"32->8 frequency": 0.5, "+8e": 0.2, "32->8 random": 3.0},
                          {"32->8 uncurl (reinit)": 0.4, "+8e": 0.1, "32->8 random": -4.0}])
  lines = report.markdown_table(rows).splitlines()
  assert lines[0] == "| model | rte | copa |" and lines[1] == "|---|---|---|"
  assert lines[2] == "| dense | 60.00 ± 0.00 | 55.00 ± 0.00 |"
  # rte: 63.5, 63.5, 63.9 against 62.0, 62.2, 62.1 -> +1.53 ± 0.15: called.
  assert lines[5].startswith("| 32->8 uncurl (reinit) | 63.63 ± 0.13+ | 57.13 ± 0.13-")
  assert lines[6].startswith("| 32->8 frequency | 61.17 ± 0.17- |")
  # random on rte: 0.0, +2.8, -4.1 against +8e -> no call.
  assert lines[7].startswith("| 32->8 random | 61.67 ± 2.03 |")


def test_one_seed_gets_no_marks_without_items_and_item_level_marks_with_them():
  rows = _rows()
  assert report.markdown_table(rows).splitlines()[5] == "| 32->8 uncurl (reinit) | 63.50 | 57.00 |"
  # Item scores in the unit of the scores (accuracy in %: 0 or 100), means 62.0 and 63.5.
  base = np.zeros(2000)
  base[np.random.default_rng(0).permutation(2000)[:1240]] = 100.0
  better = base.copy()
  better[np.flatnonzero(base == 0)[:30]] = 100.0        # 30 more items right
  items = {("rte", "+8e", 0): base, ("rte", "32->8 uncurl (reinit)", 0): better}
  line = report.markdown_table(rows, items=items).splitlines()[5]
  assert line.startswith("| 32->8 uncurl (reinit) | 63.50+ |")
  difference = statistics.paired_difference(rows, "32->8 uncurl (reinit)", "+8e", task="rte",
                                            items=items)
  d = better - base
  assert difference.unit == "items" and difference.n == 2000 and difference.mean == 1.5
  np.testing.assert_allclose(difference.se, d.std(ddof=1) / np.sqrt(2000))  # ~0.27 points
  # Items in another unit (0/1 for a score in %) do not give a standard error.
  fractions = {key: value / 100.0 for key, value in items.items()}
  assert statistics.paired_difference(rows, "32->8 uncurl (reinit)", "+8e", task="rte",
                                      items=fractions).unit != "items"


def test_csv_reads_back_with_the_secondary_score(tmp_path):
  rows = [dataclasses.replace(r, secondary=r.score - 3.0) for r in _rows()]
  report.write_csv(rows, tmp_path / "results.csv")
  assert report.read_csv(tmp_path / "results.csv") == rows


def test_marks_flip_for_losses_and_before_finetune_has_no_marks():
  rows = _seeds([ResultRow("lm", "scratch", 8, score=1.5),
                 ResultRow("lm", "pruned", 8, source_experts=32, method="uncurl", score=1.2,
                           score_before_finetune=2.0)],
                [{"+8e": 0.01}, {"+8e": -0.02}])
  assert report.markdown_table(rows, lower_is_better=True).splitlines()[-1].endswith("+ |")
  assert report.markdown_table(rows).splitlines()[-1].endswith("- |")
  before = report.markdown_table(rows, before_finetune=True, digits=1).splitlines()
  assert before[2:] == ["| 32->8 uncurl | 2.0 ± 0.0 |"]  # references have no before-score


def test_pruned_rows_without_a_same_size_reference_get_no_mark():
  rows = _seeds([ResultRow("t", "scratch", 8, score=1.0),
                 ResultRow("t", "pruned", 16, source_experts=32, method="frequency",
                           score=2.0)], [{}])
  assert report.markdown_table(rows).splitlines()[-1] == "| 32->16 frequency | 2.00 ± 0.00 |"


def test_standard_error_and_paired_differences_against_numpy():
  estimate = statistics.mean_se([1.0, 2.0, 4.0])
  assert estimate.mean == pytest.approx(7 / 3)
  assert estimate.se == pytest.approx(np.std([1, 2, 4], ddof=1) / np.sqrt(3))
  assert math.isnan(statistics.mean_se([3.0]).se) and statistics.mean_se([3.0]).called == ""
  rows = _seeds(_rows(), [{"+8e": 1.0}, {"+8e": 2.0}])
  difference = statistics.paired_difference(rows, "32->8 frequency", "+8e", task="rte")
  np.testing.assert_allclose(difference.mean, np.mean([-1.0, -2.0, -3.0]))
  np.testing.assert_allclose(difference.se, 1.0 / np.sqrt(3))
  # t = 2 / 0.577 = 3.46 < t(0.975, 2) = 4.30: the 95% interval -2 ± 2.48 includes 0.
  np.testing.assert_allclose(difference.half_width(), 4.302653 / np.sqrt(3), rtol=1e-6)
  assert difference.called == "" and difference.text() == "-2.00 ± 2.48 (95% CI, seeds 3)"
  rows = _seeds(_rows(), [{"+8e": 1.0}, {"+8e": 2.0}, {"+8e": 1.0}, {"+8e": 2.0}])
  difference = statistics.paired_difference(rows, "32->8 frequency", "+8e", task="rte")
  assert difference.n == 5 and difference.called == "-"  # -2.2 ± 1.04 with 5 seeds
  assert statistics.paired_difference(rows, "32->8 frequency", "+64e", task="rte") is None


def test_findings_say_holds_does_not_hold_or_cannot_tell():
  rows = _seeds(_rows(), [{"+32e": 0.5, "32->8 uncurl (reinit)": 0.3},
                          {"+32e": -0.4, "32->8 uncurl (reinit)": 0.1}])
  found = statistics.findings(rows, pairs=[(32, 8)])
  rte = [f for f in found if f.claim.startswith("[rte, after finetuning]")]
  # more experts help (66 vs 62, steady); UNCURL keeps the benefit (63.5 vs 62); it beats
  # frequency (61.0; frequency_merge is absent) -- for the paper's variant (reinit) and the
  # best (also reinit, the only one); the threshold needs a sweep.
  assert [f.verdict for f in rte] == ["holds"] * 5 + ["cannot tell"]
  assert [f.variant for f in rte] == ["", "paper", "paper", "best", "best", ""]
  copa = [f for f in found if f.task == "copa" and f.phase == "finetuned"]
  assert copa[1].verdict == "does not hold"                         # 57 vs 58, steady
  # -1, -0.7, -0.9: SE 0.088, t(0.975, 2) = 4.303 -> half-width 0.38.
  assert copa[1].evidence.startswith("one comparison, no correction: 32->8 uncurl (reinit) "
                                     "- +8e: -0.87 ± 0.38 (95% CI, seeds 3), p = 0.01")
  # +32e - +8e on copa: +1.03 ± 1.12, called at 2 SE (SE 0.26) but not by the t interval.
  assert copa[0].verdict == "cannot tell"
  # One-shot: references have no score before finetuning here; frequency is 2.5 below.
  one_shot = [f for f in found if f.task == "rte" and f.phase == "one_shot"]
  assert [f.verdict for f in one_shot] == ["cannot tell", "cannot tell", "holds",
                                           "cannot tell", "holds", "cannot tell"]
  assert all(f.claim.startswith("[rte, one-shot]") for f in one_shot)


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


def test_pruning_factor_plot_has_one_legend_and_one_style_per_method(tmp_path):
  rows = [ResultRow(task, "pruned", d, source_experts=32, method=method, router="bind",
                    score=50.0 + d)
          for task in ("a", "b") for d in (16, 8) for method in ("frequency", "uncurl")]
  rows += [ResultRow("b", "pruned", d, source_experts=32, method="reap", router="bind",
                     score=40.0) for d in (16, 8)]
  rows += [ResultRow(task, "scratch", d, score=60.0) for task in ("a", "b") for d in (16, 8)]
  figure = plots.plot_pruning_factor(rows, tmp_path / "factor.png")
  _assert_png(tmp_path / "factor.png")
  assert [len(axis.get_legend_handles_labels()[1]) for axis in figure.axes] == [3, 4]
  assert all(axis.get_legend() is None for axis in figure.axes)
  (legend,) = figure.legends
  assert [t.get_text() for t in legend.get_texts()] == [
      "frequency (bind)", "uncurl (bind)", "from scratch, 32 / x experts", "reap (bind)"]
  styles = [{label: (handle.lines[0].get_color(), handle.lines[0].get_marker())
             for handle, label in zip(*axis.get_legend_handles_labels())}
            for axis in figure.axes]
  for label, style in styles[0].items():
    assert styles[1][label] == style
  assert len({styles[1][label] for label in styles[1]}) == 4


def test_scores_plot_names_shared_models_once(tmp_path):
  rows = [ResultRow(task, "scratch", d, score=60.0 + d) for task in ("a", "b") for d in (8, 16)]
  figure = plots.plot_scores(rows, tmp_path / "scores.png")
  _assert_png(tmp_path / "scores.png")
  names = [[t.get_text() for t in axis.get_yticklabels() if t.get_text()]
           for axis in figure.axes]  # from the bottom up
  assert names == [["+8e", "+16e"], []]
  figure = plots.plot_scores(rows[:3], tmp_path / "scores.png")  # b lacks +16e
  names = [[t.get_text() for t in axis.get_yticklabels() if t.get_text()]
           for axis in figure.axes]
  assert names == [["+8e", "+16e"], ["+8e"]]


def test_differences_table_gives_95_percent_intervals_and_finds_frequency_by_method():
  rows = _seeds(_rows(), [{"+8e": 0.2}, {"+8e": 0.1}])
  rows += [dataclasses.replace(r, router="bind", score=r.score + 2.0)
           for r in rows if r.method == "frequency"]
  lines = report.differences_table(rows).splitlines()
  assert lines[0] == "| task | model | - same size from scratch | - source | - frequency |"
  # rte: 63.5 against 62.0, 62.2, 62.1: -> +1.40 ± 4.303 * 0.058 = 0.25, called.
  assert lines[2] == ("| rte | 32->8 uncurl (reinit) | +1.40 ± 0.25 (95% CI, seeds 3)+ | "
                      "-2.50 ± 0.00 (95% CI, seeds 3)- | +2.50 ± 0.00 (95% CI, seeds 3)+ |")
  # The plain frequency row has no frequency column; its bind variant is against it.
  assert lines[3].endswith("| -5.00 ± 0.00 (95% CI, seeds 3)- |  |")
  assert lines[5] == ("| rte | 32->8 frequency (bind) | +0.90 ± 0.25 (95% CI, seeds 3)+ | "
                      "-3.00 ± 0.00 (95% CI, seeds 3)- | +2.00 ± 0.00 (95% CI, seeds 3)+ |")


def _split_runs(tmp_path):
  """Five seeds written as two runs that share their references (seeds 0-4 of rte at
  32 -> 8, then seeds 0-4 at 32 -> 16 with the same dense and 32-expert models)."""
  shifts = [{"dense": 1.0, "+32e": -0.5, "32->8 uncurl (reinit)": 2.0},
            {"+8e": 1.5}, {"32->8 frequency (anchor)": -1.0}, {"+32e": 0.5}]
  rows = [r for r in _seeds(_rows(), shifts) if r.task == "rte"]
  at_16 = [ResultRow("rte", "scratch", 16, score=64.0 + s, seed=s) for s in range(5)]
  at_16 += [ResultRow("rte", "pruned", 16, source_experts=32, method="uncurl",
                      router="reinit", score=65.0 - s, seed=s) for s in range(5)]
  shared = [r for r in rows if r.model in ("dense", "+32e")]
  first, second = tmp_path / "a" / "results.csv", tmp_path / "b" / "results.csv"
  for path, part in ((first, rows), (second, shared + at_16)):
    path.parent.mkdir()
    report.write_csv(part, path)
  return rows + at_16, first, second


def test_combine_keeps_each_shared_reference_once(tmp_path):
  rows, first, second = _split_runs(tmp_path)
  combined = report.combine([report.read_csv(first), report.read_csv(second)])
  assert len(combined) == len(rows)  # dense and +32e (5 seeds each) counted once
  assert sorted((r.model, r.seed) for r in combined) == sorted((r.model, r.seed) for r in rows)
  dense = statistics.mean_se([r.score for r in combined if r.model == "dense"])
  assert dense.n == 5
  assert dense.mean == pytest.approx(np.mean([60.0, 61.0, 60.0, 60.0, 60.0]))


def test_combine_refuses_runs_that_disagree_on_a_shared_row(tmp_path):
  _, first, second = _split_runs(tmp_path)
  other = [dataclasses.replace(r, score=r.score + 0.25) if (r.model, r.seed) == ("dense", 3)
           else r for r in report.read_csv(second)]
  with pytest.raises(ValueError, match=r"rte / dense / seed 3 \(score: \[60.0\] vs \[60.25\]\)"):
    report.combine([report.read_csv(first), other])


def test_report_command_combines_runs_and_writes_the_report(tmp_path, capsys):
  rows, first, second = _split_runs(tmp_path)
  out = tmp_path / "combined"
  report.main(["report", f"--output_dir={out}", str(first), str(second)])
  printed = capsys.readouterr().out
  assert printed.startswith(f"{len(rows)} results from 2 files; seeds [0, 1, 2, 3, 4].")
  written = report.read_csv(out / "results.csv")
  assert sorted((r.model, r.seed, r.score) for r in written) == sorted(
      (r.model, r.seed, r.score) for r in rows)
  text = (out / "results.md").read_text()
  for section in ("## After finetuning", "## Scores by phase", "## Paired differences",
                  "## The paper's findings", "## Right after pruning"):
    assert section in text
  assert str(first) in text and str(second) in text
  assert "| 32->16 uncurl (reinit) | 63.00 ± 0.71" in text  # 65 - seed, seeds 0-4
  for name in ("scores.png", "pruning_factor.png"):
    _assert_png(out / name)


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: [str(tmp / "missing.csv")], "cannot read .*missing.csv"),
    (lambda tmp: ["--relative_to=+32e", str(tmp / "a" / "results.csv")],
     "unrecognized arguments: --relative_to"),
    (lambda tmp: [], "the following arguments are required: RESULTS_CSV"),
])
def test_report_command_bad_input_exits_2_with_a_message(tmp_path, capsys, make_args,
                                                         message):
  _split_runs(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    report.main(["report", *make_args(tmp_path)])
  assert exit_info.value.code == 2
  assert re.search(message, capsys.readouterr().err)


def test_every_documented_report_command_parses():
  """The README and docs name the report command's flags; a flag that does not exist
  (as `--relative_to` once did) fails here."""
  root = pathlib.Path(__file__).resolve().parents[2]
  commands = []
  for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
    text = path.read_text().replace("\\\n", " ")
    commands += [(path.name, match.group(1)) for match in re.finditer(
        r"python -m uncurl_jax\.study\.report\s+([^`#\n]*--[^`#\n]*)", text)]
  assert commands, "no documented report command with flags"
  for name, arguments in commands:
    arguments = arguments.split(")")[0].strip()
    report.command_parser().parse_args(shlex.split(arguments))  # exits 2 if it is wrong


def test_the_committed_full_report_is_its_parts_combined():
  """docs/study.md: docs/results/full/results.csv is `combine` over full.gin's parts (the
  facts_task part, the property tasks at 2x-4x, their 8x-16x parts seed by seed), which
  agree on every shared reference: 990 results, seeds 0-4, three tasks, four factors."""
  root = pathlib.Path(__file__).resolve().parents[2] / "docs" / "results"
  parts = [root / "full" / "facts_task.csv", root / "property_2x_4x" / "results.csv",
           *sorted((root / "property_8x_16x").glob("*.csv"))]
  combined = report.combine([report.read_csv(path) for path in parts])
  committed = report.read_csv(root / "full" / "results.csv")
  key = lambda row: (row.task, row.model, row.seed)  # noqa: E731
  assert sorted(combined, key=key) == sorted(committed, key=key)
  assert len(committed) == 990 and {r.seed for r in committed} == set(range(5))
  assert {r.task for r in committed} == {"facts_task", "facts_property", "facts_property_b"}
  assert {r.source_experts // r.num_experts for r in committed if r.kind == "pruned"} == {
      2, 4, 8, 16}
