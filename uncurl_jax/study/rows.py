"""The study's result rows: one model's score on one task, and its label.

Every part of the study that reads results (`report`, `statistics`, `plots`) takes
`ResultRow`s; this module imports none of them.

Example:
  >>> row = ResultRow("facts_task", "pruned", 8, source_experts=32, method="uncurl",
  ...                 router="reinit", score=63.5)
  >>> row.model, row.pruning_factor, reference_label(row)
  ('32->8 uncurl (reinit)', 4.0, '+8e')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

KINDS = ("dense", "scratch", "pruned")

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
    score_before_finetune: The metric before finetuning (a pruned model right after
      pruning: one-shot; a reference after pretraining), or None.
    score_after_warmup: A pruned model's metric after its router-only warm-up, or None.
    recipe: What its finetuning did (steps, learning rates, parameters, losses).
    metric: Name of the metric.
    seed: The seed of the run.
    secondary: The metric at the model's evaluation capacity (when the score is
      dropless), or None.
    recall: After finetuning, the share (%) of scored facts the model recalls (tasks
      scored by recall then judgement, `study.recall_judge`), or None.
    score_true_value: After finetuning, the metric with the true value shown instead of
      the recalled one (the finetuned judgement alone), or None.
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
  secondary: float | None = None
  score_after_warmup: float | None = None
  recipe: str = ""
  recall: float | None = None
  score_true_value: float | None = None

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


def reference_label(row: ResultRow) -> str | None:
  """The row label of a pruned row's same-size model from scratch ('+8e', 'dense')."""
  if row.kind != "pruned":
    return None
  return f"+{row.num_experts}e" if row.num_experts else "dense"


def _row_order(row: ResultRow) -> tuple:
  """References by size (dense first), then pruned rows by source, size, as listed."""
  if row.kind != "pruned":
    return (0, row.num_experts, 0)
  return (1, row.source_experts, row.num_experts)


def ordered_models(rows: Sequence[ResultRow]) -> list[str]:
  """The models of `rows` in report order: references by size (dense first), then pruned
  models by source and size, each group in the order first listed."""
  first_index = {}
  for index, row in enumerate(rows):
    first_index.setdefault(row.model, (_row_order(row), index))
  return sorted(first_index, key=first_index.get)
