"""Means, 95% intervals and paired differences of the study's scores; the paper's findings.

Every compared arm runs once per seed on the same data, so two models are compared by
their paired difference per seed (the seed's shared variation cancels): its mean, its
standard error SE = std(differences) / sqrt(seeds) and its Student-t 95% interval
mean ± t(0.975, seeds - 1) * SE (`scipy.stats.t`; t(0.975, 4) = 2.7764 for 5 seeds). With a
single seed the standard error comes from the scored items instead (each model answers the
same items; per-item differences, n = items, so t is ~1.96), which measures only the
evaluation's sampling noise, and the report says so. A difference is called + / - when its
95% interval excludes 0, i.e. when the two-sided t test of "no difference" has p < 0.05.

Verdicts. Each finding rests on a family of comparisons (paired differences), each
expected to come out in one direction ('+' for "better"; '-' when `lower_is_better`). The
family's calls are corrected with Holm's method: sort the m p-values; the i-th smallest
(i = 1..m) is rejected while p < alpha / (m - i + 1) (equivalently: its interval at level
1 - alpha / (m - i + 1) excludes 0) and the first that is not stops the rest. Then
  - "holds": every comparison of the family is called in the expected direction;
  - "does not hold": at least one is called against it;
  - "cannot tell": anything else (some not called, none against; or no comparison).
The threshold finding (4) is judged per source (E) on its sweep of pruning factors E/D,
sorted by factor, with Holm over the sweep: "holds" when the smallest factor is not called
below the same-size model from scratch, a larger one is, and no factor beyond the first one
called below is called above; "does not hold" when it is called below from the smallest
factor on, above after falling below, or above at every factor; else "cannot tell".

Phases and variants. Each finding is judged twice: one-shot (`score_before_finetune`, right
after pruning, against the references' `score_before_finetune`) and after finetuning
(`score`). Rows without the phase's score are skipped. The UNCURL findings are judged for
the paper's variant (method "uncurl", router "reinit": the paper re-initializes the router)
and, separately, for the best variant (the UNCURL row label with the highest mean score at
that pair and phase; the lowest for a loss).

Example:
  >>> summary = summarize(rows)                      # {(task, model): Estimate}
  >>> d = paired_difference(rows, "32->8 uncurl (merge)", "+8e", task="facts")
  >>> d
  Estimate(mean=3.1, se=0.9, n=5, unit='seeds')
  >>> d.text(), d.called                             # t(0.975, 4) * 0.9 = 2.50
  ('+3.10 ± 2.50 (95% CI, seeds 5)', '+')
  >>> holm([0.01, 0.04, 0.03])                       # 0.03 >= 0.05 / 2 stops
  [True, False, False]
  >>> [(f.claim, f.verdict) for f in findings(rows, pairs=[(32, 8)])]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.stats

from uncurl_jax.pruning import methods as pruning_methods
from uncurl_jax.study import arms
from uncurl_jax.study.rows import ResultRow

ALPHA = 0.05  # two-sided level of the intervals and tests: 95% intervals
PHASES = ("one_shot", "finetuned")  # findings() judges both, in this order
PHASE_NAMES = {"one_shot": "one-shot", "finetuned": "after finetuning"}


def paper_baselines() -> dict[str, str]:
  """{method: the router the paper gives it} of the baselines finding 3 says UNCURL beats
  (frequency pruning slices the router to the kept experts, frequency-based merging
  re-initializes it). Where a study has those rows, finding 3 is judged against them
  (stronger variants, e.g. frequency with its router bound, are other baselines than the
  paper's); otherwise against every row of the method."""
  return {m.name: m.paper_router for m in pruning_methods.with_role("baseline")}


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean with its standard error over `n` seeds (or, with one seed, over `n` items) and
  its Student-t interval with n - 1 degrees of freedom.

  Example:
    >>> e = Estimate(mean=3.1, se=0.9, n=5)
    >>> round(e.half_width(), 3), e.p_value < 0.05   # t(0.975, 4) = 2.7764
    (2.499, True)
    >>> e.interval()
    (0.6012..., 5.5987...)
    >>> e.called, e.call(alpha=0.01), e.text()
    ('+', '', '+3.10 ± 2.50 (95% CI, seeds 5)')
  """

  mean: float
  se: float
  n: int
  unit: str = "seeds"

  def half_width(self, alpha: float = ALPHA) -> float:
    """t(1 - alpha / 2, n - 1) * se: the interval's half-width at level 1 - alpha; NaN
    without an error (one value, or se NaN)."""
    if self.n < 2 or not math.isfinite(self.se):
      return math.nan
    return float(scipy.stats.t.ppf(1.0 - alpha / 2.0, self.n - 1)) * self.se

  def interval(self, alpha: float = ALPHA) -> tuple[float, float]:
    """(low, high) of the interval at level 1 - alpha (95% by default)."""
    width = self.half_width(alpha)
    return self.mean - width, self.mean + width

  @property
  def p_value(self) -> float:
    """Two-sided p of the t test of mean == 0 (n - 1 degrees of freedom); NaN without an
    error."""
    if self.n < 2 or not math.isfinite(self.se) or not math.isfinite(self.mean):
      return math.nan
    if self.se == 0:
      return 0.0 if self.mean != 0 else 1.0
    return float(2.0 * scipy.stats.t.sf(abs(self.mean) / self.se, self.n - 1))

  def call(self, alpha: float = ALPHA) -> str:
    """'+' / '-' when the interval at level 1 - alpha excludes 0, else ''."""
    width = self.half_width(alpha)
    if not math.isfinite(width) or not abs(self.mean) > width:
      return ""
    return "+" if self.mean > 0 else "-"

  @property
  def called(self) -> str:
    """'+' / '-' when the 95% interval excludes 0 (no correction), else ''."""
    return self.call(ALPHA)

  def text(self, digits: int = 2) -> str:
    """'+3.10 ± 2.50 (95% CI, seeds 5)': the mean and the 95% interval's half-width."""
    width = self.half_width()
    if not math.isfinite(width):
      return f"{self.mean:+.{digits}f} ({self.unit} {self.n}, no interval)"
    return f"{self.mean:+.{digits}f} ± {width:.{digits}f} (95% CI, {self.unit} {self.n})"


def mean_se(values: Sequence[float], unit: str = "seeds") -> Estimate:
  """Mean and standard error (sample std / sqrt(n)); the error is NaN for one value.

  Example:
    >>> mean_se([1.0, 2.0, 4.0])        # std 1.53 / sqrt(3)
    Estimate(mean=2.333..., se=0.881..., n=3, unit='seeds')
  """
  values = np.asarray(values, np.float64)
  se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
  return Estimate(float(values.mean()), se, len(values), unit)


def holm(p_values: Sequence[float], alpha: float = ALPHA) -> list[bool]:
  """Holm's step-down correction: which of a family's m hypotheses are rejected.

  The p-values are sorted; the i-th smallest (i = 1..m) is rejected while
  p < alpha / (m - i + 1), and the first that is not stops the rest. A NaN p-value counts
  as 1 (never rejected).

  Example:
    >>> holm([0.01, 0.04, 0.03])        # 0.01 < 0.05 / 3; 0.03 >= 0.05 / 2 stops
    [True, False, False]
  """
  p = [float(x) if math.isfinite(x) else 1.0 for x in p_values]
  rejected = [False] * len(p)
  for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
    if not p[i] < alpha / (len(p) - rank):
      break
    rejected[i] = True
  return rejected


def corrected_calls(estimates: Sequence[Estimate], alpha: float = ALPHA) -> list[str]:
  """'+' / '-' / '' per comparison of a family, after Holm's correction (`holm`).

  Taken in the order of their p-values, the i-th of m comparisons is called when its
  interval at level 1 - alpha / (m - i + 1) excludes 0, until one is not.

  Example:
    >>> corrected_calls([Estimate(4.0, 0.9, 5), Estimate(-2.6, 0.9, 5)])
    ['+', '-']                 # p 0.011 < 0.05 / 2, then p 0.045 < 0.05 / 1
    >>> corrected_calls([Estimate(3.1, 0.9, 5), Estimate(-2.6, 0.9, 5)])
    ['', '']                   # each is called alone, but p 0.026 >= 0.05 / 2 stops
  """
  p = [e.p_value if math.isfinite(e.p_value) else 1.0 for e in estimates]
  calls = [""] * len(estimates)
  for rank, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
    call = estimates[i].call(alpha / (len(p) - rank))
    if not call:
      break
    calls[i] = call
  return calls


def verdict_of(calls: Sequence[str], expected: str = "+") -> str:
  """'holds' if every (corrected) call is `expected`, 'does not hold' if one is called
  against it, else 'cannot tell' (also for no calls at all).

  Example:
    >>> verdict_of(["+", "-"]), verdict_of(["+", ""]), verdict_of(["+", "+"])
    ('does not hold', 'cannot tell', 'holds')
  """
  if calls and all(c == expected for c in calls):
    return "holds"
  if any(c and c != expected for c in calls):
    return "does not hold"
  return "cannot tell"


def _phase_score(row: ResultRow, phase: str) -> float | None:
  """The row's score in `phase` ('finetuned': `score`; 'one_shot': before finetuning)."""
  if phase == "finetuned":
    return row.score
  if phase == "one_shot":
    return row.score_before_finetune
  raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def summarize(rows: Sequence[ResultRow], *, before_finetune: bool = False
              ) -> dict[tuple[str, str], Estimate]:
  """{(task, model label): mean ± SE of its score over seeds}."""
  values: dict[tuple[str, str], list[float]] = {}
  for row in rows:
    score = row.score_before_finetune if before_finetune else row.score
    if score is not None:
      values.setdefault((row.task, row.model), []).append(score)
  return {key: mean_se(v) for key, v in values.items()}


def paired_contrast(rows: Sequence[ResultRow], weights: Mapping[str, float], *, task: str,
                    items: Mapping[tuple[str, str, int], np.ndarray] | None = None,
                    phase: str = "finetuned", offset: float = 0.0) -> Estimate | None:
  """sum(weight * score of model) + offset on `task`, paired by seed (None if the models
  share no seed); `paired_difference` is the contrast {model: 1, reference: -1}. With one
  shared seed and per-item scores of every model, the standard error is that of the
  per-item contrast (unit 'items'), as in `paired_difference`.

  Example (progressive dropping against 99.3 % of the source's benefit over dense):
    >>> paired_contrast(rows, {"32->8 progressive_dropping": 1.0, "+32e": -0.993,
    ...                        "dense": -0.007}, task="facts_property")
    Estimate(mean=-2.1, se=0.6, n=5, unit='seeds')
  """
  by_seed = {}
  for r in rows:
    score = _phase_score(r, phase)
    if r.task == task and score is not None:
      by_seed[(r.model, r.seed)] = score
  seeds = sorted(set.intersection(*[{s for (m, s) in by_seed if m == model}
                                    for model in weights]))
  if not seeds:
    return None
  values = [sum(w * by_seed[(m, s)] for m, w in weights.items()) + offset for s in seeds]
  if len(seeds) > 1 or items is None:
    return mean_se(values)
  arrays = [items.get((task, model, seeds[0])) for model in weights]
  if any(a is None for a in arrays) or len({len(a) for a in arrays}) != 1:
    return mean_se(values)
  per_item = sum(w * np.asarray(a, np.float64) for w, a in zip(weights.values(), arrays))
  item_estimate = mean_se(per_item + offset, "items")
  if abs(item_estimate.mean - values[0]) > 1e-3 * max(1.0, abs(values[0])):
    return mean_se(values)
  return dataclasses.replace(item_estimate, mean=values[0], n=len(per_item))


def paired_difference(rows: Sequence[ResultRow], model: str, reference: str, *, task: str,
                      items: Mapping[tuple[str, str, int], np.ndarray] | None = None,
                      phase: str = "finetuned") -> Estimate | None:
  """`model` minus `reference` on `task`, paired by seed (None if they share no seed).

  Args:
    rows: Results; rows whose `phase` score is None are skipped.
    model, reference: Row labels ('32->8 uncurl (reinit)', '+8e').
    task: The task compared on.
    items: {(task, model, seed): per-item scores of the `phase` score, in the unit of the
      scores (e.g. 0 or 100 for an accuracy in %)}. With one shared seed, the standard
      error is that of the mean per-item difference (unit 'items', n = items); items whose
      mean difference is not the scores' difference (another unit, other items) are not
      used.
    phase: 'finetuned' (`score`) or 'one_shot' (`score_before_finetune`).

  Example:
    >>> paired_difference(rows, "32->8 uncurl (reinit)", "+8e", task="rte", phase="one_shot")
    Estimate(mean=-8.2, se=1.1, n=5, unit='seeds')
  """
  weights = {model: 1.0}
  weights[reference] = weights.get(reference, 0.0) - 1.0  # a model against itself: 0
  return paired_contrast(rows, weights, task=task, items=items, phase=phase)


@dataclasses.dataclass(frozen=True)
class Finding:
  """One of the paper's findings and what this study's numbers say about it.

  Attributes:
    claim: '[task, phase] claim (variant)'.
    verdict: "holds", "does not hold" or "cannot tell" (module docstring).
    evidence: The correction, then each comparison: mean ± 95% half-width, p, its call.
    task: The task judged on.
    phase: 'one_shot' or 'finetuned'.
    variant: 'paper' or 'best' for the UNCURL findings, '' otherwise.
  """

  claim: str
  verdict: str  # "holds", "does not hold" or "cannot tell"
  evidence: str
  task: str = ""
  phase: str = ""
  variant: str = ""


Comparison = tuple[str, str, Estimate]  # (model, reference, model - reference)


def _correction(count: int, alpha: float) -> str:
  if count == 1:
    return "one comparison, no correction"
  return f"Holm over {count} comparisons (alpha {alpha:g})"


def _evidence(comparisons: Sequence[Comparison], calls: Sequence[str],
              prefixes: Sequence[str] | None = None) -> str:
  parts = []
  for index, ((a, b, estimate), call) in enumerate(zip(comparisons, calls)):
    p = estimate.p_value
    text = f"{a} - {b}: {estimate.text()}" + (f", p = {p:.2g}" if math.isfinite(p) else "")
    text += f", called {call}" if call else ""
    parts.append((prefixes[index] if prefixes else "") + text)
  return "; ".join(parts)


def _judge(claim: str, comparisons: Sequence[Comparison | None], expected: str,
           alpha: float, **fields) -> Finding:
  """A Finding from a family of comparisons (None: no shared seeds, left out)."""
  comparisons = [c for c in comparisons if c is not None]
  if not comparisons:
    return Finding(claim, "cannot tell", "no comparison has scores in this phase", **fields)
  calls = corrected_calls([e for _, _, e in comparisons], alpha)
  return Finding(claim, verdict_of(calls, expected),
                 f"{_correction(len(comparisons), alpha)}: {_evidence(comparisons, calls)}",
                 **fields)


def _variants(rows: Sequence[ResultRow], task: str, phase: str, pair: tuple[int, int],
              lower_is_better: bool) -> dict[str, str | None]:
  """{'paper': label, 'best': label} of the UNCURL rows at `pair` (None where absent).

  The paper's variant: the paper's method with its router (`pruning.methods.proposed()`: 'uncurl',
  'reinit'; exactly: no other features). The best: the UNCURL label with the highest mean `phase` score over seeds (lowest for a
  loss); on a tie, the first in the rows' order.
  """
  scores: dict[str, list[float]] = {}
  paper, method = None, pruning_methods.proposed()
  for r in rows:
    score = _phase_score(r, phase)
    if (r.task != task or r.kind != "pruned" or r.method != method.name or score is None
        or (r.source_experts, r.num_experts) != tuple(pair)):
      continue
    scores.setdefault(r.model, []).append(score)
    if r.router == method.paper_router and paper is None:
      paper = r.model
  sign = -1.0 if lower_is_better else 1.0

  def rank(label):
    value = sign * float(np.mean(scores[label]))
    return value if math.isfinite(value) else -math.inf

  return {"paper": paper, "best": max(scores, key=rank, default=None)}


def _variant_text(kind: str, label: str | None) -> str:
  if kind == "paper":
    method = pruning_methods.proposed()
    return (f"paper's variant: {method.name} ({method.paper_router})" if label is None
            else f"paper's variant: {label.split(' ', 1)[1]}")
  return "best variant" if label is None else f"best variant: {label.split(' ', 1)[1]}"


def _reference(experts: int) -> str:
  """The label of the model trained from scratch with `experts` experts ('dense' for 0)."""
  return f"+{experts}e" if experts else "dense"


def findings(rows: Sequence[ResultRow], *, pairs: Sequence[tuple[int, int]],
             items: Mapping[tuple[str, str, int], np.ndarray] | None = None,
             items_one_shot: Mapping[tuple[str, str, int], np.ndarray] | None = None,
             phases: Sequence[str] = PHASES, lower_is_better: bool = False,
             alpha: float = ALPHA) -> list[Finding]:
  """The paper's four findings (docs/paper.md), judged on `rows` task by task, for each
  phase, and the UNCURL ones for the paper's and the best UNCURL variant.

  Per task and phase (one-shot first; a phase no row of the task has a score for is left
  out): 1. more experts help (+E e beats +D e, every pair; Holm over the pairs); 2. UNCURL
  E->D keeps the benefit (beats +D e; the first pair); 3. UNCURL E->D beats every
  frequency and frequency_merge row of that pair (any router; Holm over them); 4. the
  threshold, one finding per source E whose pairs sweep at least two factors (one
  'cannot tell' when none does). 2-4 come once for the paper's variant and once for the
  best. After finetuning, where the study ran them, the claims of the two methods built
  around finetuning (`_literature`): 5. progressive dropping keeps 99.3 % of the source's
  benefit over dense; 6. router-norm pruning preserves the finetuned source's accuracy
  (within 1 point). The verdict rules are in the module docstring.

  Args:
    rows: Results (several tasks, models, seeds).
    pairs: The (E, D) pruning pairs; the first is the one findings 2 and 3 are about.
    items: Per-item scores of the finetuned score ({(task, model, seed): scores}), for
      standard errors with one seed (`paired_difference`).
    items_one_shot: The same for the one-shot score (without it, one-shot comparisons of
      a single seed have no interval).
    phases: Which phases to judge ('one_shot', 'finetuned').
    lower_is_better: The score is a loss: "better" is a negative difference.
    alpha: The family-wise level (Holm).

  Example:
    >>> for f in findings(rows, pairs=[(32, 8), (32, 16)]):
    ...   print(f.verdict, f.claim)
    holds [rte, one-shot] more experts help on the task (...)
    ...
  """
  better, worse = ("-", "+") if lower_is_better else ("+", "-")
  out = []
  for task in dict.fromkeys(r.task for r in rows):
    for phase in phases:
      if all(_phase_score(r, phase) is None for r in rows if r.task == task):
        continue
      phase_items = items if phase == "finetuned" else items_one_shot

      def diff(a: str, b: str, task=task, phase=phase, phase_items=phase_items
               ) -> Comparison | None:
        estimate = paired_difference(rows, a, b, task=task, items=phase_items, phase=phase)
        return None if estimate is None else (a, b, estimate)

      tag = f"[{task}, {PHASE_NAMES[phase]}]"
      fields = dict(task=task, phase=phase)
      more = [diff(_reference(e), _reference(d))
              for e, d in dict.fromkeys((e, d) for e, d in pairs)]
      out.append(_judge(f"{tag} more experts help on the task (the source beats the "
                        "same-size model from scratch)", more, better, alpha, **fields))
      if pairs:
        e, d = pairs[0]
        variants = _variants(rows, task, phase, (e, d), lower_is_better)
        routers = paper_baselines()
        candidates = [r for r in rows if r.task == task and r.kind == "pruned"
                      and r.method in routers and (r.source_experts, r.num_experts) == (e, d)
                      and _phase_score(r, phase) is not None]
        papers = {r.method for r in candidates if r.router == routers[r.method]}
        baselines = list(dict.fromkeys(
            r.model for r in candidates
            if r.method not in papers or r.router == routers[r.method]))
        for kind, label in variants.items():
          suffix = f" ({_variant_text(kind, label)})"
          claims = (f"{tag} UNCURL {e}->{d} keeps the benefit (beats {_reference(d)} from "
                    f"scratch){suffix}",
                    f"{tag} UNCURL {e}->{d} beats frequency pruning and frequency-based "
                    f"merging{suffix}")
          if label is None:
            out += [Finding(claim, "cannot tell", f"no {e}->{d} UNCURL row of this variant "
                            "has scores in this phase", variant=kind, **fields)
                    for claim in claims]
            continue
          out.append(_judge(claims[0], [diff(label, _reference(d))], better, alpha,
                            variant=kind, **fields))
          out.append(_judge(claims[1], [diff(label, b) for b in baselines], better, alpha,
                            variant=kind, **fields))
      out += _threshold(rows, task, phase, pairs, diff, better=better, worse=worse,
                        lower_is_better=lower_is_better, alpha=alpha)
      if phase == "finetuned":
        out += _literature(rows, task, pairs, phase_items, better=better, alpha=alpha)
  return out


# The headline claims of the two methods of the literature built around finetuning.
DROPPING_KEPT = 0.993  # Chen et al. 2022: dropping to one expert keeps 99.3 % of the benefit
ROUTER_NORM_MARGIN = 1.0  # points: "preserves the finetuned model's accuracy" (Chowdhury
#                           et al. 2024), taken as: within 1 point of it


def _prunes_by_router_change(method: str) -> bool:
  """Whether `method` is a registered pruning method that needs the pretrained router
  besides the finetuned one (router-norm pruning)."""
  return method in pruning_methods.names() and pruning_methods.get(method).needs_pretrained


def _literature(rows: Sequence[ResultRow], task: str, pairs: Sequence[tuple[int, int]],
                items, *, better: str, alpha: float) -> list[Finding]:
  """The claims of progressive dropping and router-norm pruning, after finetuning.

  Progressive dropping (per source E, at the smallest D it was run to; the paper drops to
  one expert): its score minus (dense + 0.993 * (+E e - dense)) is called above 0 (holds)
  or below (does not hold). Router-norm pruning (at the first pair with a router_norm row):
  its score minus (+E e - 1 point) is called above 0 (holds: it is within a point of the
  finetuned source, or better) or below (does not hold)."""
  out, tag = [], f"[{task}, {PHASE_NAMES['finetuned']}]"
  fields = dict(task=task, phase="finetuned")
  present = {r.model: r for r in rows if r.task == task and r.kind == "pruned"}
  for source in dict.fromkeys(e for e, _ in pairs):
    dropped = sorted((r.num_experts, label) for label, r in present.items()
                     if r.method == arms.PROGRESSIVE_DROPPING and r.source_experts == source)
    if not dropped:
      continue
    size, label = dropped[0]
    claim = (f"{tag} progressive dropping {source}->{size} keeps {100 * DROPPING_KEPT:.1f}% "
             f"of the {source}-expert model's benefit over dense (Chen et al. 2022, who drop "
             "to one expert)")
    target = (f"(dense + {DROPPING_KEPT:g} x ({_reference(source)} - dense))")
    estimate = paired_contrast(rows, {label: 1.0, _reference(source): -DROPPING_KEPT,
                                      "dense": -(1.0 - DROPPING_KEPT)}, task=task,
                               items=items)
    out.append(_judge(claim, [None if estimate is None else (label, target, estimate)],
                      better, alpha, **fields))
  for source, size in pairs:
    labels = [label for label, r in present.items() if _prunes_by_router_change(r.method)
              and (r.source_experts, r.num_experts) == (source, size)]
    if not labels:
      continue
    claim = (f"{tag} router-norm pruning {source}->{size} preserves the finetuned "
             f"{source}-expert model's accuracy (within {ROUTER_NORM_MARGIN:g} point; "
             "Chowdhury et al. 2024)")
    comparisons = []
    for label in labels:
      margin = ROUTER_NORM_MARGIN if better == "+" else -ROUTER_NORM_MARGIN  # a loss: +1
      estimate = paired_contrast(rows, {label: 1.0, _reference(source): -1.0}, task=task,
                                 items=items, offset=margin)
      target = f"({_reference(source)} {'-' if margin > 0 else '+'} {ROUTER_NORM_MARGIN:g})"
      comparisons.append(None if estimate is None else (label, target, estimate))
    out.append(_judge(claim, comparisons, better, alpha, **fields))
    break
  return out


def _threshold(rows: Sequence[ResultRow], task: str, phase: str,
               pairs: Sequence[tuple[int, int]],
               diff: Callable[[str, str], Comparison | None], *, better: str, worse: str,
               lower_is_better: bool, alpha: float) -> list[Finding]:
  """Whether UNCURL falls below the same-size model from scratch beyond some pruning
  factor: one finding per source E and variant, on that source's sweep of factors E/D.

  Sources are judged separately (from 128 experts the paper's threshold is 2x, from 32 it
  is above 4x), so pairs of different sources at one factor, e.g. (32, 8) and (128, 32),
  never meet in one sweep. The best variant is the best at each factor (`_variants`).
  """
  tag = f"[{task}, {PHASE_NAMES[phase]}]"
  claim = (f"{tag} from {{source}} experts, beyond a threshold pruning factor, UNCURL falls "
           "below the same-size model from scratch ({variant})")
  sweeps: dict[int, list[tuple[int, int]]] = {}
  for e, d in dict.fromkeys((e, d) for e, d in pairs):
    if d and e % d == 0:
      sweeps.setdefault(e, []).append((e // d, d))
  sweeps = {e: sorted(s, key=lambda factor_d: factor_d[0]) for e, s in sweeps.items()
            if len(s) >= 2}
  if not sweeps:
    return [Finding(f"{tag} beyond a threshold pruning factor, UNCURL falls below the "
                    "same-size model from scratch", "cannot tell",
                    "needs a sweep of at least two pruning factors from one source",
                    task=task, phase=phase)]
  out = []
  for source, sweep in sweeps.items():
    for kind in ("paper", "best"):
      text = claim.format(source=source, variant=(
          "paper's variant: uncurl (reinit)" if kind == "paper" else "best variant at each "
          "factor"))
      points = []
      for factor, d in sweep:
        label = _variants(rows, task, phase, (source, d), lower_is_better)[kind]
        comparison = None if label is None else diff(label, _reference(d))
        if comparison is not None:
          points.append((factor, comparison))
      if len(points) < 2:
        out.append(Finding(text, "cannot tell", "needs a sweep of at least two pruning "
                           "factors with scores in this phase", task=task, phase=phase,
                           variant=kind))
        continue
      comparisons = [c for _, c in points]
      calls = corrected_calls([c[2] for c in comparisons], alpha)
      factors = [factor for factor, _ in points]
      verdict, why = _threshold_verdict(calls, factors, better, worse)
      evidence = _evidence(comparisons, calls, [f"{factor}x: " for factor in factors])
      out.append(Finding(text, verdict,
                         f"{_correction(len(points), alpha)}: {why}; {evidence}",
                         task=task, phase=phase, variant=kind))
  return out


def _threshold_verdict(calls: Sequence[str], factors: Sequence[int], better: str,
                       worse: str) -> tuple[str, str]:
  """The threshold finding's verdict and reason from the corrected calls of a sweep
  sorted by factor.

  Example:
    >>> _threshold_verdict(["", "-", "-"], [2, 4, 8], "+", "-")
    ('holds', 'first called below at 4x')
  """
  below = [i for i, c in enumerate(calls) if c == worse]
  if not below:
    if all(c == better for c in calls):
      return "does not hold", "called above at every factor"
    return "cannot tell", "not called below at any factor"
  if below[0] == 0:
    return "does not hold", f"called below from the smallest factor ({factors[0]}x) on"
  above = [i for i in range(below[0], len(calls)) if calls[i] == better]
  if above:
    return "does not hold", (f"called below at {factors[below[0]]}x but above again at "
                             f"{factors[above[0]]}x")
  return "holds", f"first called below at {factors[below[0]]}x"
