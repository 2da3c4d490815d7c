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

import csv
import dataclasses
import math
import os
import sys
from typing import Mapping, Sequence

import numpy as np

KINDS = ("dense", "scratch", "pruned")
CSV_COLUMNS = ("task", "model", "kind", "method", "router", "source_experts", "num_experts",
               "pruning_factor", "seed", "metric", "score", "score_before_finetune",
               "reference_score", "delta")


@dataclasses.dataclass(frozen=True)
class ResultRow:
  """One model's score on one task.

  Attributes:
    task: Task name (a column of the table).
    kind: "dense", "scratch" (trained from scratch with `num_experts` experts, also the
      unpruned source models) or "pruned".
    num_experts: Experts per MoE layer of the evaluated model (0 for dense).
    source_experts: E, for pruned models (0 otherwise).
    method: Pruning method of a pruned model ("uncurl", "frequency", ...).
    router: Router option of a pruned model ("reinit", "anchor", "merge"), or "".
    score: The task metric after finetuning.
    score_before_finetune: The metric right after pruning, or None.
    metric: Name of the metric.
    seed: The study's seed.
  """

  task: str
  kind: str
  num_experts: int
  source_experts: int = 0
  method: str = ""
  router: str = ""
  score: float = math.nan
  score_before_finetune: float | None = None
  metric: str = "accuracy"
  seed: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"ResultRow.kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "pruned" and (not self.method or self.source_experts < self.num_experts):
      raise ValueError(f"a pruned row needs a method and source_experts >= num_experts, got "
                       f"method={self.method!r}, {self.source_experts} -> {self.num_experts}")

  @property
  def model(self) -> str:
    """Row label: 'dense', '+8e', '32->8 uncurl (reinit)'."""
    if self.kind == "dense":
      return "dense"
    if self.kind == "scratch":
      return f"+{self.num_experts}e"
    router = f" ({self.router})" if self.router else ""
    return f"{self.source_experts}->{self.num_experts} {self.method}{router}"

  @property
  def pruning_factor(self) -> float | None:
    if self.kind != "pruned":
      return None
    return self.source_experts / self.num_experts


def reference_scores(rows: Sequence[ResultRow]) -> dict[tuple[str, int], float]:
  """{(task, D): score of the D-expert model from scratch} (0 experts: dense)."""
  references = {}
  for row in rows:
    if row.kind in ("scratch", "dense"):
      references.setdefault((row.task, row.num_experts), row.score)
  return references


def reference_score(row: ResultRow, references: Mapping[tuple[str, int], float]) -> float | None:
  """The same-size model's score for a pruned row (None if absent or not pruned)."""
  if row.kind != "pruned":
    return None
  return references.get((row.task, row.num_experts))


def comparison_mark(score: float, reference: float | None, *,
                    lower_is_better: bool = False) -> str:
  """'+' better, '-' worse than the reference, '=' equal, '' without one.

  Example:
    >>> comparison_mark(66.5, 66.0), comparison_mark(64.0, 66.0), comparison_mark(1.0, None)
    ('+', '-', '')
    >>> comparison_mark(1.2, 1.5, lower_is_better=True)      # a loss
    '+'
  """
  if reference is None or math.isnan(score) or math.isnan(reference):
    return ""
  if math.isclose(score, reference, rel_tol=0.0, abs_tol=1e-9):
    return "="
  return "+" if (score > reference) != lower_is_better else "-"


def write_csv(rows: Sequence[ResultRow], path: str | os.PathLike) -> None:
  """Writes `rows` with the columns `CSV_COLUMNS` (reference/delta for pruned rows).

  The file is written next to `path` and renamed into place, so a killed run never
  leaves a half-written results.csv.

  Example:
    >>> write_csv(rows, "outputs/synthetic/results.csv")
  """
  references = reference_scores(rows)
  temporary = f"{os.fspath(path)}.tmp"
  with open(temporary, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
      reference = reference_score(row, references)
      factor = row.pruning_factor
      writer.writerow({
          "task": row.task, "model": row.model, "kind": row.kind, "method": row.method,
          "router": row.router, "source_experts": row.source_experts or "",
          "num_experts": row.num_experts, "pruning_factor": "" if factor is None else factor,
          "seed": row.seed, "metric": row.metric, "score": row.score,
          "score_before_finetune": ("" if row.score_before_finetune is None
                                    else row.score_before_finetune),
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
    before = r["score_before_finetune"]
    rows.append(ResultRow(
        task=r["task"], kind=r["kind"], num_experts=int(r["num_experts"]),
        source_experts=int(r["source_experts"] or 0), method=r["method"], router=r["router"],
        score=float(r["score"]), score_before_finetune=float(before) if before else None,
        metric=r["metric"], seed=int(r["seed"])))
  return rows


def spread_table(rows: Sequence[ResultRow], *, before_finetune: bool = False,
                 relative_to: str | None = None, digits: int = 2) -> str:
  """Mean ± standard deviation (over seeds) of each model's score, per task.

  Args:
    rows: Results of several runs that differ by seed (e.g. `read_csv` of each).
    before_finetune: Summarize `score_before_finetune` instead.
    relative_to: A row label (e.g. '+8e'): summarize each score minus that model's
      score of the same seed and task (paired differences, free of the seed-to-seed
      variation both share). Runs without that model are left out.
    digits: Decimals shown.

  Example:
    >>> rows = [r for path in paths for r in read_csv(path)]
    >>> print(spread_table(rows))      # | 32->8 uncurl (reinit) | 51.2 ± 0.8 (3) |
    >>> print(spread_table(rows, relative_to="32->8 random"))
  """
  if not rows:
    raise ValueError("spread_table needs at least one ResultRow")
  tasks = list(dict.fromkeys(row.task for row in rows))
  value = lambda row: row.score_before_finetune if before_finetune else row.score
  baseline = {(row.task, row.seed): value(row) for row in rows if row.model == relative_to}
  if relative_to is not None and not baseline:
    raise ValueError(f"relative_to={relative_to!r} is not a model of the rows; models: "
                     f"{ordered_models(rows)}")
  scores: dict[tuple[str, str], list[float]] = {}
  for row in rows:
    score = value(row)
    if relative_to is not None:
      reference = baseline.get((row.task, row.seed))
      score = None if score is None or reference is None else score - reference
    if score is not None:
      scores.setdefault((row.model, row.task), []).append(score)
  models = [m for m in ordered_models(rows) if any((m, t) in scores for t in tasks)]

  def cell(values):
    # ddof=1: the sample standard deviation over seeds (0 for a single run).
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {std:.{digits}f} ({len(values)})"
  lines = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
  for model in models:
    lines.append(f"| {model} | " + " | ".join(
        cell(scores[(model, t)]) if (model, t) in scores else "" for t in tasks) + " |")
  return "\n".join(lines)


def _row_order(row: ResultRow) -> tuple:
  """References by size (dense first), then pruned rows by source, size, as listed."""
  if row.kind != "pruned":
    return (0, row.num_experts, 0)
  return (1, row.source_experts, row.num_experts)


def ordered_models(rows: Sequence[ResultRow]) -> list[str]:
  first_index = {}
  for index, row in enumerate(rows):
    first_index.setdefault(row.model, (_row_order(row), index))
  return sorted(first_index, key=first_index.get)


def markdown_table(rows: Sequence[ResultRow], *, before_finetune: bool = False,
                   lower_is_better: bool = False, digits: int = 2) -> str:
  """The paper-style table: models as rows, tasks as columns, +/- on pruned rows.

  Args:
    rows: Results (several tasks and models).
    before_finetune: Tabulate `score_before_finetune` (pruned rows only, no marks).
    lower_is_better: The metric is a loss: '+' marks a lower score.
    digits: Decimals shown.

  Example:
    >>> print(markdown_table(rows))
  """
  if not rows:
    raise ValueError("markdown_table needs at least one ResultRow")
  tasks = list(dict.fromkeys(row.task for row in rows))
  references = reference_scores(rows)
  cells: dict[tuple[str, str], str] = {}
  for row in rows:
    score = row.score_before_finetune if before_finetune else row.score
    if score is None:
      continue
    mark = "" if before_finetune else comparison_mark(
        score, reference_score(row, references), lower_is_better=lower_is_better)
    cells[(row.model, row.task)] = f"{score:.{digits}f}{mark}"
  models = [m for m in ordered_models(rows) if any((m, t) in cells for t in tasks)]
  lines = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
  for model in models:
    lines.append(f"| {model} | " + " | ".join(cells.get((model, t), "") for t in tasks) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  """`python -m uncurl_jax.study.report [--relative_to=MODEL] results.csv ...`: seed spreads.

  Prints mean ± std over the files (runs with different seeds) of every model's score
  after finetuning and right after pruning; with --relative_to (a row label such as
  '+32e', the source), also the paired differences to that model's same-seed score.
  """
  prefix = "--relative_to="
  relative = [a[len(prefix):] for a in argv[1:] if a.startswith(prefix)]
  paths = [a for a in argv[1:] if not a.startswith(prefix)]
  if not paths:
    raise SystemExit("usage: python -m uncurl_jax.study.report [--relative_to=MODEL] "
                     "RESULTS_CSV [RESULTS_CSV ...]")
  rows = [row for path in paths for row in read_csv(path)]
  print(f"Mean ± std (runs) over {len(paths)} result files, after finetuning:\n")
  print(spread_table(rows))
  print("\nRight after pruning:\n")
  print(spread_table(rows, before_finetune=True))
  for model in relative:
    print(f"\nAfter finetuning, minus the same run's {model}:\n")
    print(spread_table(rows, relative_to=model))


if __name__ == "__main__":
  main(sys.argv)
