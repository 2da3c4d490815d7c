"""Means, standard errors and paired differences of the study's scores; the paper's findings.

Every compared arm runs once per seed on the same data, so two models are compared by
their paired difference per seed (the seed's shared variation cancels); its standard
error is std(differences) / sqrt(seeds). With a single seed the standard error comes
from the scored items instead (each model answers the same items; per-item differences),
which measures only the evaluation's sampling noise, and the report says so. A difference
is called (+ / -, "holds") only when it exceeds two standard errors.

Example:
  >>> summary = summarize(rows)                      # {(task, model): Estimate}
  >>> paired_difference(rows, "32->8 uncurl (merge)", "+8e", task="facts")
  Estimate(mean=3.1, se=0.9, n=5, unit='seeds')
  >>> [f.verdict for f in findings(rows, pairs=[(32, 8)])]
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # the rows' type only; report.py imports this module
  from uncurl_jax.study.report import ResultRow

CALL_AT = 2.0  # a difference is called when |mean| > CALL_AT * standard error


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean with its standard error over `n` seeds (or, with one seed, over items)."""

  mean: float
  se: float
  n: int
  unit: str = "seeds"

  @property
  def called(self) -> str:
    """'+' / '-' when the mean exceeds CALL_AT standard errors, else ''."""
    if not math.isfinite(self.se) or abs(self.mean) <= CALL_AT * self.se:
      return ""
    return "+" if self.mean > 0 else "-"

  def text(self, digits: int = 2) -> str:
    if not math.isfinite(self.se):
      return f"{self.mean:+.{digits}f} (n={self.n})"
    return f"{self.mean:+.{digits}f} ± {self.se:.{digits}f} ({self.unit} {self.n})"


def mean_se(values: Sequence[float], unit: str = "seeds") -> Estimate:
  """Mean and standard error (sample std / sqrt(n)); the error is NaN for one value."""
  values = np.asarray(values, np.float64)
  se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
  return Estimate(float(values.mean()), se, len(values), unit)


def summarize(rows: Sequence[ResultRow], *, before_finetune: bool = False
              ) -> dict[tuple[str, str], Estimate]:
  """{(task, model label): mean ± SE of its score over seeds}."""
  values: dict[tuple[str, str], list[float]] = {}
  for row in rows:
    score = row.score_before_finetune if before_finetune else row.score
    if score is not None:
      values.setdefault((row.task, row.model), []).append(score)
  return {key: mean_se(v) for key, v in values.items()}


def paired_difference(rows: Sequence[ResultRow], model: str, reference: str, *, task: str,
                      items: Mapping[tuple[str, str, int], np.ndarray] | None = None
                      ) -> Estimate | None:
  """`model` minus `reference` on `task`, paired by seed (None if they share no seed).

  With one shared seed and `items` ({(task, model, seed): per-item scores in the unit of
  the scores, e.g. 0 or 100 for an accuracy in %}), the standard error is that of the
  mean per-item difference; items whose mean difference is not the scores' difference
  (another unit, other items) are not used.
  """
  by_seed = {(r.model, r.seed): r.score for r in rows if r.task == task}
  seeds = sorted({s for (m, s) in by_seed if m == model} & {s for (m, s) in by_seed
                                                            if m == reference})
  if not seeds:
    return None
  differences = [by_seed[(model, s)] - by_seed[(reference, s)] for s in seeds]
  if len(seeds) > 1 or items is None:
    return mean_se(differences)
  a, b = items.get((task, model, seeds[0])), items.get((task, reference, seeds[0]))
  if a is None or b is None or len(a) != len(b):
    return mean_se(differences)
  item_estimate = mean_se(np.asarray(a, np.float64) - np.asarray(b, np.float64), "items")
  if abs(item_estimate.mean - differences[0]) > 1e-3 * max(1.0, abs(differences[0])):
    return mean_se(differences)
  return dataclasses.replace(item_estimate, mean=differences[0], n=len(a))


@dataclasses.dataclass(frozen=True)
class Finding:
  """One of the paper's findings and what this study's numbers say about it."""

  claim: str
  verdict: str  # "holds", "does not hold" or "cannot tell"
  evidence: str


def _verdict(estimates: Sequence[Estimate | None], expected: str = "+") -> str:
  """'holds' if every comparison is called in the expected direction, 'does not hold' if
  one is called against it, else 'cannot tell'."""
  calls = [e.called for e in estimates if e is not None]
  if not calls:
    return "cannot tell"
  if all(c == expected for c in calls):
    return "holds"
  if any(c and c != expected for c in calls):
    return "does not hold"
  return "cannot tell"


def findings(rows: Sequence[ResultRow], *, pairs: Sequence[tuple[int, int]],
             items: Mapping[tuple[str, str, int], np.ndarray] | None = None
             ) -> list[Finding]:
  """The paper's four findings (docs/paper.md), judged on `rows` task by task."""
  out = []
  for task in dict.fromkeys(r.task for r in rows):
    diff: Callable[[str, str], Estimate | None] = (
        lambda a, b, task=task: paired_difference(rows, a, b, task=task, items=items))
    uncurl = sorted({r.model.split(" ", 1)[1] for r in rows if r.task == task
                     and r.method == "uncurl"})
    first = pairs[0] if pairs else None

    def evidence(comparisons):
      return "; ".join(f"{a} - {b}: {e.text()}" for a, b, e in comparisons if e is not None)

    more = [(f"+{e}e", f"+{d}e" if d else "dense", diff(f"+{e}e", f"+{d}e" if d else "dense"))
            for e, d in pairs]
    out.append(Finding(f"[{task}] more experts help on the task (the source beats the "
                       "same-size model from scratch)", _verdict([c[2] for c in more]),
                       evidence(more)))
    if first:
      e, d = first
      keeps = [(f"{e}->{d} {m}", f"+{d}e", diff(f"{e}->{d} {m}", f"+{d}e")) for m in uncurl]
      out.append(Finding(f"[{task}] UNCURL {e}->{d} keeps the benefit (beats +{d}e from "
                         "scratch)", _verdict([c[2] for c in keeps]), evidence(keeps)))
      beats = [(f"{e}->{d} {m}", f"{e}->{d} {other}", diff(f"{e}->{d} {m}",
                                                          f"{e}->{d} {other}"))
               for m in uncurl for other in ("frequency", "frequency_merge")]
      out.append(Finding(f"[{task}] UNCURL {e}->{d} beats frequency pruning and "
                         "frequency-based merging", _verdict([c[2] for c in beats]),
                         evidence(beats)))
    out.append(_threshold(rows, task, pairs, diff))
  return out


def _threshold(rows, task, pairs, diff) -> Finding:
  """Whether merging stops paying beyond some pruning factor (a sweep of D for one E)."""
  claim = (f"[{task}] beyond a threshold pruning factor, UNCURL falls below the same-size "
           "model from scratch")
  model = next((r.model.split(" ", 1)[1] for r in rows if r.task == task
                and r.method == "uncurl"), None)
  sweep = sorted((e // d, diff(f"{e}->{d} {model}", f"+{d}e")) for e, d in pairs
                 if d and e % d == 0)
  sweep = [(factor, est) for factor, est in sweep if est is not None]
  if model is None or len(sweep) < 2:
    return Finding(claim, "cannot tell", "needs a sweep of at least two pruning factors")
  calls = [est.called for _, est in sweep]
  evidence = "; ".join(f"{factor}x: {est.text()}" for factor, est in sweep)
  worse = [i for i, c in enumerate(calls) if c == "-"]
  if worse and all(c != "-" for c in calls[:worse[0]]) and worse[0] > 0:
    return Finding(claim, "holds", f"first called below at {sweep[worse[0]][0]}x; {evidence}")
  if worse and worse[0] == 0:
    return Finding(claim, "does not hold", f"below from the smallest factor on; {evidence}")
  return Finding(claim, "cannot tell" if "" in calls else "does not hold", evidence)
