"""The study's report: results.csv and markdown tables like the paper's Tables 1-2.

Every number of the report comes from a list of `ResultRow`s, one per (task, model):
the references (dense, D experts and the source's E experts, trained from scratch and
finetuned) and the pruned models (E -> D by one method, then finetuned). The markdown
table has one row per model and one column per task; a pruned model's cell carries a
'+' or '-' when it is better or worse than the same-size model trained from scratch,
as the paper's Table 2 does.

The plots are in `study.plots`. `python -m uncurl_jax.study.report a/results.csv
b/results.csv ...` prints the mean ± standard deviation of each model's score over
several runs (seeds).

Example:
  >>> rows = [ResultRow("city_country", "scratch", 8, score=61.0),
  ...         ResultRow("city_country", "pruned", 8, source_experts=32, method="uncurl",
  ...                   router="reinit", score=63.5)]
  >>> print(markdown_table(rows))
  | model | city_country |
  |---|---|
  | +8e | 61.00 |
  | 32->8 uncurl (reinit) | 63.50+ |
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
from typing import Mapping, Sequence

import numpy as np

from uncurl_jax.pruning import methods as pruning_methods
from uncurl_jax.study import plots
from uncurl_jax.study import statistics
from uncurl_jax.study.rows import ResultRow
from uncurl_jax.study.rows import ordered_models
from uncurl_jax.study.rows import reference_label

CSV_COLUMNS = ("task", "model", "kind", "method", "router", "source_experts", "num_experts",
               "pruning_factor", "seed", "metric", "score", "score_before_finetune",
               "score_after_warmup", "score_at_capacity", "reference_score", "delta", "recipe",
               "recall", "score_true_value")


def _reference_scores(rows: Sequence[ResultRow]) -> dict[tuple[str, str, int], float]:
  """{(task, model, seed): score} of the models trained from scratch."""
  return {(r.task, r.model, r.seed): r.score for r in rows if r.kind != "pruned"}


def write_csv(rows: Sequence[ResultRow], path: str | os.PathLike) -> None:
  """Writes `rows` with the columns `CSV_COLUMNS` (reference/delta for pruned rows).

  The file is written next to `path` and renamed into place, so a killed run never
  leaves a half-written results.csv.

  Example:
    >>> write_csv(rows, "outputs/synthetic/results.csv")
  """
  references = _reference_scores(rows)
  temporary = f"{os.fspath(path)}.tmp"
  with open(temporary, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
      reference = references.get((row.task, reference_label(row), row.seed))
      factor = row.pruning_factor
      writer.writerow({
          "task": row.task, "model": row.model, "kind": row.kind, "method": row.method,
          "router": row.router, "source_experts": row.source_experts or "",
          "num_experts": row.num_experts, "pruning_factor": "" if factor is None else factor,
          "seed": row.seed, "metric": row.metric, "score": row.score,
          "score_before_finetune": ("" if row.score_before_finetune is None
                                    else row.score_before_finetune),
          "score_after_warmup": ("" if row.score_after_warmup is None
                                 else row.score_after_warmup),
          "recipe": row.recipe,
          "score_at_capacity": "" if row.secondary is None else row.secondary,
          "recall": "" if row.recall is None else row.recall,
          "score_true_value": "" if row.score_true_value is None else row.score_true_value,
          "reference_score": "" if reference is None else reference,
          "delta": "" if reference is None else row.score - reference})
  os.replace(temporary, path)


def read_csv(path: str | os.PathLike) -> list[ResultRow]:
  """Reads a `write_csv` file back into ResultRows.

  Example:
    >>> rows = read_csv("outputs/synthetic/results.csv")
  """
  with open(path, newline="") as f:
    records = list(csv.DictReader(f))
  rows = []
  for r in records:
    before, secondary = r["score_before_finetune"], r.get("score_at_capacity", "")
    warmed = r.get("score_after_warmup", "")
    rows.append(ResultRow(
        task=r["task"], kind=r["kind"], num_experts=int(r["num_experts"]),
        source_experts=int(r["source_experts"] or 0), method=r["method"], router=r["router"],
        score=float(r["score"]), score_before_finetune=float(before) if before else None,
        metric=r["metric"], seed=int(r["seed"]),
        secondary=float(secondary) if secondary else None,
        score_after_warmup=float(warmed) if warmed else None, recipe=r.get("recipe", ""),
        recall=float(r["recall"]) if r.get("recall") else None,
        score_true_value=float(r["score_true_value"]) if r.get("score_true_value") else None))
  return rows


def markdown_table(rows: Sequence[ResultRow], *, before_finetune: bool = False,
                   lower_is_better: bool = False, items: Mapping | None = None,
                   digits: int = 2) -> str:
  """The paper-style table: models as rows, tasks as columns; mean ± standard error over
  seeds; a pruned row is marked + / - only where the 95% t interval of its paired
  difference to the same-size model from scratch excludes 0 (`statistics`; each cell is
  its own comparison, without a multiplicity correction).

  Args:
    rows: Results (several tasks, models and seeds).
    before_finetune: Tabulate `score_before_finetune` (pruned rows only, no marks).
    lower_is_better: The metric is a loss: '+' marks a lower score.
    items: {(task, model, seed): per-item scores}: with a single seed, the marks use the
      per-item paired differences.
    digits: Decimals shown.

  Example:
    >>> print(markdown_table(rows))
  """
  if not rows:
    raise ValueError("markdown_table needs at least one ResultRow")
  tasks = list(dict.fromkeys(row.task for row in rows))
  summary = statistics.summarize(rows, before_finetune=before_finetune)
  labels = {row.model: row for row in rows}
  cells = {}
  for (task, model), estimate in summary.items():
    text = f"{estimate.mean:.{digits}f}"
    if math.isfinite(estimate.se):
      text += f" ± {estimate.se:.{digits}f}"
    reference = reference_label(labels[model])
    if not before_finetune and reference is not None:
      difference = statistics.paired_difference(rows, model, reference, task=task,
                                                items=items)
      mark = "" if difference is None else difference.called
      text += {"+": "-", "-": "+"}.get(mark, mark) if lower_is_better else mark
    cells[(model, task)] = text
  models = [m for m in ordered_models(rows) if any((m, t) in cells for t in tasks)]
  lines = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
  for model in models:
    lines.append(f"| {model} | " + " | ".join(cells.get((model, t), "") for t in tasks) + " |")
  return "\n".join(lines)


def differences_table(rows: Sequence[ResultRow], *, items: Mapping | None = None,
                      digits: int = 2) -> str:
  """Paired differences of every pruned model: to the same-size model from scratch, to its
  source, and to frequency pruning of the same pair (mean ± the 95% t interval's
  half-width, + / - when the interval excludes 0; `statistics.Estimate.text`).

  The frequency column compares with the pair's plain "frequency" row (no router option),
  else its "frequency" row of the model's router, else its first (rows are matched by
  method and router, not by label).

  Example:
    >>> print(differences_table(rows))
    | task | model | - same size from scratch | - source | - frequency |
    |---|---|---|---|---|
    | rte | 32->8 uncurl (reinit) | +1.53 ± 0.38 (95% CI, seeds 3)+ | ... |
  """
  # The paper's selection baseline (frequency pruning), with the router the paper gives it.
  selection = next(m for m in pruning_methods.with_role("baseline") if not m.merges)
  lines = [f"| task | model | - same size from scratch | - source | - {selection.name} |",
           "|---|---|---|---|---|"]
  for task in dict.fromkeys(row.task for row in rows):
    pruned = [m for m in ordered_models(rows) if any(
        r.model == m and r.task == task and r.kind == "pruned" for r in rows)]
    for model in pruned:
      row = next(r for r in rows if r.model == model)
      frequency = [r for r in rows if r.task == task and r.kind == "pruned"
                   and r.method == selection.name and (r.source_experts, r.num_experts)
                   == (row.source_experts, row.num_experts)]
      # The paper's frequency pruning (a sliced router) where the study has it.
      paper_router = selection.paper_router
      frequency.sort(key=lambda r: (r.router not in ("", paper_router), r.router != row.router))
      references = (reference_label(row), f"+{row.source_experts}e",
                    frequency[0].model if frequency else None)
      cells = []
      for reference in references:
        estimate = (None if reference in (model, None) else statistics.paired_difference(
            rows, model, reference, task=task, items=items))
        cells.append("" if estimate is None else estimate.text(digits) + estimate.called)
      lines.append(f"| {task} | {model} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def findings_text(found: Sequence[statistics.Finding]) -> str:
  """The findings as a markdown list: verdict, claim, the correction and the numbers
  (verdict rules: `statistics`).

  Example:
    >>> print(findings_text(statistics.findings(rows, pairs=[(32, 8)])))
    - **holds**: [rte, one-shot] more experts help on the task (...). Holm over ...
  """
  return "\n".join(f"- **{f.verdict}**: {f.claim}. {f.evidence}" for f in found)


def pairs_of(rows: Sequence[ResultRow]) -> list[tuple[int, int]]:
  """The (E, D) pairs the pruned rows cover, largest source first, then by D."""
  return sorted({(r.source_experts, r.num_experts) for r in rows if r.kind == "pruned"},
                key=lambda pair: (-pair[0], -pair[1]))


PHASES = (("before finetuning", "score_before_finetune"),
          ("after the router warm-up", "score_after_warmup"), ("after finetuning", "score"))


def phase_table(rows: Sequence[ResultRow], *, digits: int = 2) -> str:
  """Every model's score at each phase, side by side (mean ± SE over seeds; blank where
  an arm has no such phase): before finetuning (a reference after pretraining, a pruned
  model right after pruning), after the router-only warm-up (pruned models), after
  finetuning. One table per task.

  Example:
    >>> print(phase_table(rows))
    ### facts_task
    | model | before finetuning | after the router warm-up | after finetuning |
  """
  if not rows:
    raise ValueError("phase_table needs at least one ResultRow")
  out = []
  for task in dict.fromkeys(row.task for row in rows):
    task_rows = [row for row in rows if row.task == task]
    out += [f"### {task}", "", "| model | " + " | ".join(name for name, _ in PHASES) + " |",
            "|---|" + "---|" * len(PHASES)]
    for model in ordered_models(task_rows):
      cells = []
      for _, field in PHASES:
        values = [getattr(r, field) for r in task_rows
                  if r.model == model and getattr(r, field) is not None]
        if not values:
          cells.append("")
          continue
        estimate = statistics.mean_se(values)
        text = f"{estimate.mean:.{digits}f}"
        if len(values) > 1:
          text += f" ± {estimate.se:.{digits}f}"
        cells.append(text)
      out.append(f"| {model} | " + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out).rstrip() + "\n"


def recipes_text(recipes: Mapping[str, str]) -> str:
  """One line per arm: its label and its finetuning recipe."""
  width = max((len(arm) for arm in recipes), default=0)
  return "\n".join(f"  {arm:<{width}}  {recipe}" for arm, recipe in recipes.items())


def router_table(entries: Sequence[Mapping]) -> str:
  """The pruned arms' routers after the warm-up (`Study.router_diagnostics`) as a table."""
  if not entries:
    return "(no pruned arm with a warm-up)\n"
  lines = ["| task | model | mean top-1 gate, one-shot | after the warm-up | agrees with the "
           "merge router |", "|---|---|---|---|---|"]
  number = lambda x: "" if x is None else f"{x:.3f}"
  for entry in entries:
    agreement = entry.get("agreement")
    agrees = "" if not agreement else ", ".join(
        f"{name.split('/')[0]} {100 * value:.1f}%" for name, value in agreement.items())
    lines.append(f"| {entry['task']} | {entry['model']} | "
                 f"{number(entry.get('mean_top1_gate_before'))} | "
                 f"{number(entry.get('mean_top1_gate'))} | {agrees} |")
  return "\n".join(lines) + "\n"


def combine(runs: Sequence[Sequence[ResultRow]]) -> list[ResultRow]:
  """The rows of several runs as one list, each (task, model, seed) once.

  Runs split over seeds, factors or tasks share their references (the same dense model,
  the same source): a row found in several runs is kept once when the runs agree on every
  field, so no model counts twice in a mean. Runs that disagree on a row (another
  machine, another recipe) cannot be combined.

  Example:
    >>> rows = combine([read_csv("outputs/a/results.csv"), read_csv("outputs/b/results.csv")])

  Raises:
    ValueError: two runs give different results for the same (task, model, seed).
  """
  kept: dict[tuple[str, str, int], ResultRow] = {}
  for run, rows in enumerate(runs):
    for row in rows:
      key = (row.task, row.model, row.seed)
      first = kept.setdefault(key, row)
      if first is row:
        continue
      kept_fields, new_fields = _fields(first), _fields(row)
      differing = [name for name in kept_fields if kept_fields[name] != new_fields[name]]
      if differing:
        raise ValueError(
            f"run {run + 1} disagrees with an earlier run on {row.task} / {row.model} / "
            f"seed {row.seed} ({', '.join(differing)}: {[kept_fields[n] for n in differing]}"
            f" vs {[new_fields[n] for n in differing]}); only runs that share their "
            "references exactly (one machine, one recipe) can be combined")
  return list(kept.values())


def _fields(row: ResultRow) -> dict[str, object]:
  """A row's fields with NaN made comparable (NaN != NaN)."""
  return {name: ("nan" if isinstance(value, float) and math.isnan(value) else value)
          for name, value in dataclasses.asdict(row).items()}


def scores_note(tasks: str, lower_is_better: bool = False) -> str:
  """The sentence under a report's title: tasks, direction, how marks and findings are
  called."""
  direction = "lower" if lower_is_better else "higher"
  return (f"Tasks and scores: {tasks}; {direction} is better. Mean ± standard error over "
          "seeds; a pruned model is marked + / - where the 95% t interval of its paired "
          "difference to the model of the same size trained from scratch excludes 0 (paper "
          "Table 2; over seeds, or over the scored items with one seed). The findings correct "
          "each family of comparisons with Holm's method.")


def combined_report(rows: Sequence[ResultRow], sources: Sequence[str], *,
                    lower_is_better: bool = False) -> str:
  """The markdown report of rows combined from several runs' results.csv (`combine`):
  the study's tables, paired differences and findings, over seeds (the per-item errors
  of a one-seed study are not in results.csv)."""
  tasks = sorted({r.task for r in rows})
  metrics = {r.task: r.metric for r in rows}
  seeds = sorted({r.seed for r in rows})
  found = statistics.findings(rows, pairs=pairs_of(rows), lower_is_better=lower_is_better)
  return "\n".join([
      f"# Combined study (seeds {seeds})", "",
      scores_note(", ".join(f"{t} ({metrics[t]})" for t in tasks), lower_is_better), "",
      "Combined from " + ", ".join(f"`{s}`" for s in sources) + f": {len(rows)} results, "
      "each (task, model, seed) once.", "",
      "## After finetuning", "", markdown_table(rows, lower_is_better=lower_is_better), "",
      "## Scores by phase", "", phase_table(rows),
      "## Paired differences", "", differences_table(rows), "",
      "## The paper's findings", "", findings_text(found), "",
      "## Right after pruning (before finetuning)", "",
      markdown_table(rows, before_finetune=True), ""])


def command_parser() -> argparse.ArgumentParser:
  """The flags of `python -m uncurl_jax.study.report` (`main`)."""
  parser = argparse.ArgumentParser(
      prog="python -m uncurl_jax.study.report",
      description="Tables and findings over several runs' results.csv files.")
  parser.add_argument("results", nargs="+", metavar="RESULTS_CSV")
  parser.add_argument("--output_dir", help="also write the combined results.csv, "
                      "results.md and plots into this directory")
  parser.add_argument("--lower_is_better", action="store_true",
                      help="the scores are losses (default: accuracies)")
  return parser


def main(argv: Sequence[str]) -> None:
  """`python -m uncurl_jax.study.report [--output_dir=DIR] RESULTS_CSV ...`.

  Reads the result files of several runs (e.g. of different seeds, factors or tasks over
  one machine's stages), combines them (`combine`) and prints their report
  (`combined_report`: tables, paired differences, findings); with --output_dir it also
  writes it as results.md, with results.csv, scores.png and pruning_factor.png. Bad input
  (a missing or malformed file, runs that disagree) exits with code 2 and a message.
  """
  parser = command_parser()
  args = parser.parse_args(argv[1:])
  runs = []
  for path in args.results:
    try:
      runs.append(read_csv(path))
    except (OSError, KeyError, ValueError) as error:
      parser.error(f"cannot read {path} as a study's results.csv: {error!r}")
  try:
    rows = combine(runs)
  except ValueError as error:
    parser.error(str(error))
  if not rows:
    parser.error(f"no results in {', '.join(args.results)}")
  print(f"{len(rows)} results from {len(args.results)} files; seeds "
        f"{sorted({r.seed for r in rows})}.\n")
  text = combined_report(rows, args.results, lower_is_better=args.lower_is_better)
  print(text)
  if args.output_dir:
    output_dir = os.path.abspath(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    write_csv(rows, os.path.join(output_dir, "results.csv"))
    _write_text_atomically(os.path.join(output_dir, "results.md"), text)
    plots.plot_scores(rows, os.path.join(output_dir, "scores.png"))
    plots.plot_pruning_factor(rows, os.path.join(output_dir, "pruning_factor.png"))
    print(f"Wrote results.csv, results.md, scores.png, pruning_factor.png in {output_dir}")


def _write_text_atomically(path: str, text: str) -> None:
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    f.write(text)
  os.replace(temporary, path)


if __name__ == "__main__":
  main(sys.argv)
