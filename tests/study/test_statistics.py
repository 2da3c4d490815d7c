"""The study's statistics: t intervals, Holm's correction and the findings' verdicts."""

import math

import numpy as np
import pytest
import scipy.stats

from uncurl_jax.study import report
from uncurl_jax.study import statistics
from uncurl_jax.study.rows import ResultRow
from uncurl_jax.study.statistics import Estimate

T4 = 2.7764  # t(0.975, 4): 5 seeds
# Five seeds: every model shares the seed's effect BASE; a model's own noise Z has sd
# sqrt(2.5), so a paired difference m + Z has SE sqrt(2.5 / 5) = sqrt(0.5) and its 95%
# interval excludes 0 exactly when |m| > t(0.975, 4) * sqrt(0.5) = 1.9632.
BASE = np.array([60.0, 63.0, 58.0, 61.0, 64.0])
Z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
BOUNDARY = T4 * math.sqrt(0.5)


def _row(label, seed, score, before=None, task="t"):
  """A ResultRow from its label: 'dense', '+8e', '32->8 uncurl (reinit)'."""
  if label == "dense":
    return ResultRow(task, "dense", 0, score=score, score_before_finetune=before, seed=seed)
  if label.startswith("+"):
    return ResultRow(task, "scratch", int(label[1:-1]), score=score,
                     score_before_finetune=before, seed=seed)
  pair, method = label.split(" ", 1)
  method, _, router = method.partition(" ")
  source, size = map(int, pair.split("->"))
  return ResultRow(task, "pruned", size, source_experts=source, method=method,
                   router=router.strip("()"), score=score, score_before_finetune=before,
                   seed=seed)


def _study(finetuned, one_shot=None, task="t"):
  """Rows over 5 seeds: model label -> its offset from BASE (a number or 5 numbers) after
  finetuning, and in `one_shot` before it (models missing there: no one-shot score)."""
  one_shot = one_shot or {}
  rows = []
  for label, offset in finetuned.items():
    scores = BASE + offset
    before = None if label not in one_shot else BASE + one_shot[label]
    rows += [_row(label, seed, float(scores[seed]),
                  None if before is None else float(before[seed]), task)
             for seed in range(len(BASE))]
  return rows


def _found(found, *, phase="finetuned", variant=None, contains=""):
  return [f for f in found if f.phase == phase and contains in f.claim
          and (variant is None or f.variant == variant)]


# Estimates: t intervals and p-values.


def test_t_interval_of_five_seeds_against_scipy_and_by_hand():
  values = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
  estimate = statistics.mean_se(values)
  assert estimate.mean == pytest.approx(2.8) and estimate.n == 5
  se = np.std(values, ddof=1) / np.sqrt(5)                      # sqrt(3.2 / 5) = 0.8
  assert estimate.se == pytest.approx(se) and se == pytest.approx(0.8)
  assert estimate.half_width() == pytest.approx(T4 * 0.8, abs=1e-4)         # 2.2211
  low, high = scipy.stats.t.interval(0.95, 4, loc=2.8, scale=se)
  np.testing.assert_allclose(estimate.interval(), (low, high))
  assert estimate.p_value == pytest.approx(scipy.stats.ttest_1samp(values, 0.0).pvalue)
  assert estimate.called == "+"                                  # 0.58 .. 5.02
  # At 99% (t(0.995, 4) = 4.6041) the interval -0.88 .. 6.48 includes 0.
  assert estimate.half_width(0.01) == pytest.approx(4.6041 * 0.8, abs=1e-3)
  assert estimate.call(0.01) == ""
  assert estimate.text() == "+2.80 ± 2.22 (95% CI, seeds 5)"
  assert Estimate(-2.8, 0.8, 5).called == "-"


def test_item_estimates_use_the_items_count_so_t_is_about_1_96():
  estimate = Estimate(mean=0.5, se=0.25, n=2000, unit="items")
  assert estimate.half_width() / 0.25 == pytest.approx(scipy.stats.t.ppf(0.975, 1999))
  assert estimate.half_width() / 0.25 == pytest.approx(1.96, abs=2e-3)
  assert estimate.called == "+" and estimate.text() == "+0.50 ± 0.49 (95% CI, items 2000)"


def test_no_interval_without_an_error_and_a_zero_error_calls_any_difference():
  single = statistics.mean_se([3.0])
  assert math.isnan(single.half_width()) and math.isnan(single.p_value)
  assert single.called == "" and single.text() == "+3.00 (seeds 1, no interval)"
  assert Estimate(1.0, 0.0, 3).called == "+" and Estimate(1.0, 0.0, 3).p_value == 0.0
  assert Estimate(0.0, 0.0, 3).called == "" and Estimate(0.0, 0.0, 3).p_value == 1.0


@pytest.mark.parametrize("mean, called", [(BOUNDARY + 0.01, "+"), (BOUNDARY - 0.01, ""),
                                          (-BOUNDARY - 0.01, "-"), (-BOUNDARY + 0.01, "")])
def test_differences_just_beyond_and_just_within_the_interval(mean, called):
  rows = _study({"+8e": 0.0, "32->8 uncurl (reinit)": mean + Z})
  difference = statistics.paired_difference(rows, "32->8 uncurl (reinit)", "+8e", task="t")
  assert difference.mean == pytest.approx(mean)
  assert difference.se == pytest.approx(math.sqrt(0.5))
  assert difference.half_width() == pytest.approx(1.9632, abs=1e-4)
  assert difference.called == called
  assert (difference.p_value < 0.05) == bool(called)


# Holm's correction.


def test_holm_on_known_examples():
  # Sorted 0.01 < 0.05 / 3; then 0.03 >= 0.05 / 2 stops (0.04 is not tried).
  assert statistics.holm([0.01, 0.04, 0.03]) == [True, False, False]
  assert statistics.holm([0.01, 0.02, 0.03]) == [True, True, True]  # < 1/60, 1/40, 1/20
  # 0.03 < 0.05 alone, but the step before it fails (0.03 >= 0.025): stopped.
  assert statistics.holm([0.03, 0.03, 0.001]) == [False, False, True]
  assert statistics.holm([0.04]) == [True] and statistics.holm([]) == []
  assert statistics.holm([0.001, math.nan]) == [True, False]
  assert statistics.holm([0.01, 0.04, 0.03], alpha=0.1) == [True, True, True]


def test_corrected_calls_agree_with_holm_on_the_p_values():
  rng = np.random.default_rng(0)
  for _ in range(200):
    m = int(rng.integers(1, 6))
    estimates = [Estimate(float(rng.normal(0, 3)), float(rng.uniform(0.3, 2)),
                          int(rng.integers(2, 8))) for _ in range(m)]
    calls = statistics.corrected_calls(estimates)
    rejected = statistics.holm([e.p_value for e in estimates])
    assert [bool(c) for c in calls] == rejected
    assert all(c in ("", "+" if e.mean > 0 else "-") for c, e in zip(calls, estimates))
  # Each of these is called alone (p 0.026 and 0.045 < 0.05), neither after Holm.
  pair = [Estimate(3.1, 0.9, 5), Estimate(-2.6, 0.9, 5)]
  assert [e.called for e in pair] == ["+", "-"] and statistics.corrected_calls(pair) == ["", ""]
  assert statistics.corrected_calls([Estimate(4.0, 0.9, 5), pair[1]]) == ["+", "-"]


def test_verdict_rules():
  assert statistics.verdict_of(["+", "+"]) == "holds"
  assert statistics.verdict_of(["+", "-"]) == "does not hold"
  assert statistics.verdict_of(["+", ""]) == "cannot tell"
  assert statistics.verdict_of(["", ""]) == "cannot tell"
  assert statistics.verdict_of([]) == "cannot tell"
  assert statistics.verdict_of(["-", "-"], expected="-") == "holds"


# Findings.


@pytest.mark.parametrize("mean, verdict", [(BOUNDARY + 0.01, "holds"),
                                           (BOUNDARY - 0.01, "cannot tell"),
                                           (-BOUNDARY - 0.01, "does not hold")])
def test_keeps_the_benefit_just_beyond_and_just_within_the_interval(mean, verdict):
  rows = _study({"+8e": 0.0, "+32e": 5.0 + Z, "32->8 uncurl (reinit)": mean + Z})
  keeps = _found(statistics.findings(rows, pairs=[(32, 8)]), variant="paper",
                 contains="keeps the benefit")
  assert [f.verdict for f in keeps] == [verdict]
  assert keeps[0].claim == ("[t, after finetuning] UNCURL 32->8 keeps the benefit (beats +8e "
                            "from scratch) (paper's variant: uncurl (reinit))")
  assert keeps[0].evidence.startswith(
      f"one comparison, no correction: 32->8 uncurl (reinit) - +8e: {mean:+.2f} ± 1.96 (95% "
      "CI, seeds 5)")


def test_mixed_outcomes_and_holm_in_a_family():
  # UNCURL far above frequency, far below frequency_merge (a router in its label).
  rows = _study({"+8e": 0.0, "32->8 uncurl (reinit)": 3.0 + Z / 4,
                 "32->8 frequency": -Z / 4, "32->8 frequency_merge (reinit)": 6.0 + Z / 4})
  beats = _found(statistics.findings(rows, pairs=[(32, 8)]), variant="paper",
                 contains="beats frequency")[0]
  assert beats.verdict == "does not hold"
  assert beats.evidence.startswith("Holm over 2 comparisons (alpha 0.05): ")
  assert "32->8 uncurl (reinit) - 32->8 frequency: +3.00" in beats.evidence
  assert "32->8 uncurl (reinit) - 32->8 frequency_merge (reinit): -3.00" in beats.evidence
  assert beats.evidence.count("called +") == 1 and beats.evidence.count("called -") == 1
  # One called +, one not called: cannot tell.
  rows = _study({"+8e": 0.0, "32->8 uncurl (reinit)": 3.0 + Z / 4,
                 "32->8 frequency": -Z / 4, "32->8 frequency_merge": 2.9 + Z})
  beats = _found(statistics.findings(rows, pairs=[(32, 8)]), variant="paper",
                 contains="beats frequency")[0]
  assert beats.verdict == "cannot tell" and beats.evidence.count("called") == 1
  # Both +2.0 + Z: each called alone (p = 0.047), neither after Holm over 2 (needs 0.025).
  rows = _study({"+8e": 0.0, "32->8 uncurl (reinit)": 2.0 + Z, "32->8 frequency": 0.0,
                 "32->8 frequency_merge": 0.0})
  found = statistics.findings(rows, pairs=[(32, 8)])
  assert _found(found, variant="paper", contains="keeps")[0].verdict == "holds"
  beats = _found(found, variant="paper", contains="beats frequency")[0]
  assert beats.verdict == "cannot tell" and "called" not in beats.evidence


def _sweep_rows(one_shot=False):
  """Sources of 32 and 128 experts; UNCURL reinit and merge at 2x and 4x of each."""
  finetuned = {"+8e": 0.0, "+16e": 1.0, "+32e": 2.0, "+64e": 3.0, "+128e": 4.0,
               # From 32: the paper's variant 3 above at 2x, 3 below at 4x; merge above.
               "32->16 uncurl (reinit)": 4.0 + Z / 4, "32->8 uncurl (reinit)": -3.0 + Z / 4,
               "32->16 uncurl (merge)": 5.0 + Z / 4, "32->8 uncurl (merge)": 3.0 + Z / 4,
               # From 128: below from 2x on (reinit); merge within noise at 2x, below at 4x.
               "128->64 uncurl (reinit)": -2.0 + Z / 4, "128->32 uncurl (reinit)": -4.0 + Z / 4,
               "128->64 uncurl (merge)": 3.0 + Z, "128->32 uncurl (merge)": -1.0 + Z / 4}
  before = {label: offset - 10.0 for label, offset in finetuned.items()} if one_shot else {}
  return _study(finetuned, before)


def test_equal_factors_from_different_sources_do_not_crash_and_need_a_sweep():
  rows = _sweep_rows()
  found = statistics.findings(rows, pairs=[(32, 8), (128, 32)])  # both 4x
  threshold = _found(found, contains="threshold")
  assert [(f.verdict, f.evidence) for f in threshold] == [
      ("cannot tell", "needs a sweep of at least two pruning factors from one source")]
  more = _found(found, contains="more experts")[0]
  assert more.verdict == "holds" and more.evidence.startswith("Holm over 2 comparisons")
  assert "+32e - +8e: +2.00 ± 0.00" in more.evidence
  assert "+128e - +32e: +2.00 ± 0.00" in more.evidence


def test_threshold_is_judged_per_source_for_the_papers_and_the_best_variant():
  rows = _sweep_rows()
  found = statistics.findings(rows, pairs=[(32, 8), (32, 16), (128, 32), (128, 64)])
  threshold = {(f.claim.split(" experts")[0], f.variant): f
               for f in _found(found, contains="threshold")}
  assert len(threshold) == 4
  paper32 = threshold[("[t, after finetuning] from 32", "paper")]
  assert paper32.verdict == "holds"
  assert paper32.claim.endswith("(paper's variant: uncurl (reinit))")
  assert paper32.evidence.startswith("Holm over 2 comparisons (alpha 0.05): first called "
                                     "below at 4x; 2x: 32->16 uncurl (reinit) - +16e: +3.00")
  best32 = threshold[("[t, after finetuning] from 32", "best")]
  assert best32.verdict == "does not hold" and "above at every factor" in best32.evidence
  assert "2x: 32->16 uncurl (merge)" in best32.evidence
  assert "4x: 32->8 uncurl (merge)" in best32.evidence
  paper128 = threshold[("[t, after finetuning] from 128", "paper")]
  assert paper128.verdict == "does not hold"
  assert "below from the smallest factor (2x) on" in paper128.evidence
  best128 = threshold[("[t, after finetuning] from 128", "best")]
  assert best128.verdict == "holds" and "first called below at 4x" in best128.evidence


def test_above_again_after_falling_below_does_not_hold():
  assert statistics._threshold_verdict(["", "-", "+"], [2, 4, 8], "+", "-") == (
      "does not hold", "called below at 4x but above again at 8x")
  assert statistics._threshold_verdict(["+", "-", ""], [2, 4, 8], "+", "-") == (
      "holds", "first called below at 4x")
  assert statistics._threshold_verdict(["", ""], [2, 4], "+", "-")[0] == "cannot tell"


def test_findings_come_in_both_phases_for_the_papers_and_the_best_variant():
  rows = _sweep_rows(one_shot=True)
  found = statistics.findings(rows, pairs=[(32, 8), (32, 16)])
  assert [f.phase for f in found] == ["one_shot"] * 7 + ["finetuned"] * 7
  for phase, name in (("one_shot", "one-shot"), ("finetuned", "after finetuning")):
    claims = [f.claim for f in _found(found, phase=phase)]
    assert all(c.startswith(f"[t, {name}]") for c in claims)
    keeps = _found(found, phase=phase, contains="keeps the benefit")
    assert [f.variant for f in keeps] == ["paper", "best"]
    assert keeps[0].claim.endswith("(paper's variant: uncurl (reinit))")
    assert keeps[1].claim.endswith("(best variant: uncurl (merge))")   # 3.0 above -3.0
    assert [f.verdict for f in keeps] == ["does not hold", "holds"]
  # One-shot differences are those of score_before_finetune (all 10 lower: same here).
  one_shot = _found(found, phase="one_shot", variant="best", contains="keeps")[0]
  assert "32->8 uncurl (merge) - +8e: +3.00 ± " in one_shot.evidence
  difference = statistics.paired_difference(rows, "32->8 uncurl (reinit)", "+8e", task="t",
                                            phase="one_shot")
  assert difference.mean == pytest.approx(-3.0) and difference.n == 5


def test_best_variant_follows_the_phase_and_the_direction():
  rows = _study({"+8e": 0.0, "32->8 uncurl (reinit)": 1.0, "32->8 uncurl (merge)": 2.0},
                one_shot={"+8e": 0.0, "32->8 uncurl (reinit)": 5.0,
                          "32->8 uncurl (merge)": 4.0})
  found = statistics.findings(rows, pairs=[(32, 8)])
  best = {f.phase: f.claim for f in found if f.variant == "best" and "keeps" in f.claim}
  assert best["one_shot"].endswith("(best variant: uncurl (reinit))")
  assert best["finetuned"].endswith("(best variant: uncurl (merge))")
  # A loss: lower is better; the best is the lowest and "better" is a negative difference.
  found = statistics.findings(rows, pairs=[(32, 8)], phases=["finetuned"],
                              lower_is_better=True)
  keeps = _found(found, contains="keeps")
  assert keeps[1].claim.endswith("(best variant: uncurl (reinit))")
  assert [f.verdict for f in keeps] == ["does not hold", "does not hold"]


def test_rows_without_the_phase_score_are_skipped_and_a_missing_paper_variant_says_so():
  rows = _study({"+8e": 0.0, "32->8 uncurl (merge)": 2.0 + Z / 4},
                one_shot={"32->8 uncurl (merge)": 1.0})        # +8e has no one-shot score
  found = statistics.findings(rows, pairs=[(32, 8)])
  paper = _found(found, variant="paper", contains="keeps")[0]
  assert paper.verdict == "cannot tell"
  assert paper.claim.endswith("(paper's variant: uncurl (reinit))")
  assert "no 32->8 UNCURL row of this variant" in paper.evidence
  one_shot = _found(found, phase="one_shot", variant="best", contains="keeps")[0]
  assert one_shot.verdict == "cannot tell"
  assert one_shot.evidence == "no comparison has scores in this phase"
  assert statistics.paired_difference(rows, "32->8 uncurl (merge)", "+8e", task="t",
                                      phase="one_shot") is None
  with pytest.raises(ValueError, match="phase"):
    statistics.paired_difference(rows, "32->8 uncurl (merge)", "+8e", task="t", phase="x")
  # A task without any one-shot score gets no one-shot findings.
  rows = _study({"+8e": 0.0, "32->8 uncurl (reinit)": 2.0})
  assert {f.phase for f in statistics.findings(rows, pairs=[(32, 8)])} == {"finetuned"}


def test_one_seed_uses_items_of_the_finetuned_score_only_unless_one_shot_items_are_given():
  rows = [r for r in _study({"+8e": 0.0, "32->8 uncurl (reinit)": 1.5},
                            one_shot={"+8e": 0.0, "32->8 uncurl (reinit)": 1.5})
          if r.seed == 0]
  base = np.zeros(2000)
  base[np.random.default_rng(0).permutation(2000)[:1200]] = 100.0           # 60.0
  better = base.copy()
  better[np.flatnonzero(base == 0)[:30]] = 100.0                            # 61.5
  items = {("t", "+8e", 0): base, ("t", "32->8 uncurl (reinit)", 0): better}
  found = statistics.findings(rows, pairs=[(32, 8)], items=items)
  keeps = {f.phase: f for f in found if f.variant == "paper" and "keeps" in f.claim}
  assert keeps["finetuned"].verdict == "holds" and "(95% CI, items 2000)" in keeps[
      "finetuned"].evidence
  assert keeps["one_shot"].verdict == "cannot tell"
  assert "(seeds 1, no interval)" in keeps["one_shot"].evidence
  found = statistics.findings(rows, pairs=[(32, 8)], items=items, items_one_shot=items)
  keeps = {f.phase: f for f in found if f.variant == "paper" and "keeps" in f.claim}
  assert keeps["one_shot"].verdict == "holds"


def test_findings_text_lists_verdict_claim_and_evidence():
  rows = _study({"+8e": 0.0, "+32e": 5.0 + Z, "32->8 uncurl (reinit)": 3.0 + Z})
  text = report.findings_text(statistics.findings(rows, pairs=[(32, 8)]))
  assert text.splitlines()[0] == (
      "- **holds**: [t, after finetuning] more experts help on the task (the source beats "
      "the same-size model from scratch). one comparison, no correction: +32e - +8e: +5.00 "
      "± 1.96 (95% CI, seeds 5), p = 0.0021, called +")  # t = 7.07, 4 df


def test_uncurl_is_compared_with_the_papers_baselines_where_the_study_has_them():
  """Finding 3 compares UNCURL with frequency pruning (its router sliced, 'anchor') and
  frequency-based merging (its router re-initialized) as the paper runs them; a stronger
  variant (frequency with its router bound) is another baseline and does not enter. A study
  without the paper's variant of a baseline compares with the rows it has."""
  offsets = {"+32e": 10.0, "+8e": 0.0, "32->8 uncurl (reinit)": 5.0,
             "32->8 frequency (anchor)": 0.0, "32->8 frequency (bind)": 20.0,
             "32->8 frequency_merge (reinit)": 0.0}
  found = _found(statistics.findings(_study(offsets), pairs=[(32, 8)]), variant="paper",
                 contains="beats frequency")
  assert len(found) == 1 and found[0].verdict == "holds"
  assert "frequency (anchor)" in found[0].evidence and "frequency (bind)" not in found[0].evidence
  del offsets["32->8 frequency (anchor)"]
  found = _found(statistics.findings(_study(offsets), pairs=[(32, 8)]), variant="paper",
                 contains="beats frequency")
  assert "frequency (bind)" in found[0].evidence and found[0].verdict == "does not hold"


@pytest.mark.parametrize("offset, verdict", [(BOUNDARY + 0.01, "holds"),
                                             (BOUNDARY - 0.01, "cannot tell"),
                                             (-BOUNDARY - 0.01, "does not hold")])
def test_progressive_dropping_is_judged_against_993_per_mille_of_the_benefit(offset, verdict):
  """dense 0, +32e 10: the claim's level is 9.93; the dropped model at 9.93 + offset, its
  contrast's interval of half-width BOUNDARY decides (just beyond it, just within)."""
  rows = _study({"dense": 0.0, "+32e": 10.0, "+8e": 5.0,
                 "32->8 progressive_dropping": 9.93 + offset + Z,
                 "32->16 progressive_dropping": 10.0})
  found = _found(statistics.findings(rows, pairs=[(32, 16), (32, 8)]),
                 contains="progressive dropping")
  assert [f.verdict for f in found] == [verdict]
  assert found[0].claim == ("[t, after finetuning] progressive dropping 32->8 keeps 99.3% of "
                            "the 32-expert model's benefit over dense (Chen et al. 2022, who "
                            "drop to one expert)")
  assert found[0].evidence.startswith(
      f"one comparison, no correction: 32->8 progressive_dropping - (dense + 0.993 x (+32e - "
      f"dense)): {offset:+.2f} ± 1.96 (95% CI, seeds 5)")
  assert not _found(statistics.findings(rows, pairs=[(32, 8)]), phase="one_shot",
                    contains="progressive dropping")


@pytest.mark.parametrize("offset, verdict", [(BOUNDARY - 1.0 + 0.01, "holds"),
                                             (-1.0 - BOUNDARY + 0.01, "cannot tell"),
                                             (-1.0 - BOUNDARY - 0.01, "does not hold")])
def test_router_norm_is_judged_within_a_point_of_the_finetuned_source(offset, verdict):
  rows = _study({"+32e": 10.0, "+8e": 5.0, "32->8 router_norm (anchor)": 10.0 + offset + Z})
  found = _found(statistics.findings(rows, pairs=[(32, 8)]), contains="router-norm")
  assert [f.verdict for f in found] == [verdict]
  assert found[0].claim == ("[t, after finetuning] router-norm pruning 32->8 preserves the "
                            "finetuned 32-expert model's accuracy (within 1 point; Chowdhury "
                            "et al. 2024)")
  assert f"32->8 router_norm (anchor) - (+32e - 1): {offset + 1.0:+.2f} ± 1.96" in (
      found[0].evidence)
  # Not run: no finding.
  assert not _found(statistics.findings(_study({"+32e": 1.0, "+8e": 0.0}), pairs=[(32, 8)]),
                    contains="router-norm")


def test_paired_contrast_equals_the_difference_and_uses_items_with_one_seed():
  rows = _study({"+32e": 3.0 + Z, "+8e": 1.0, "dense": -1.0 - Z})
  by_hand = statistics.mean_se(2.0 + Z)  # +32e - +8e per seed
  assert statistics.paired_contrast(rows, {"+32e": 1.0, "+8e": -1.0}, task="t") == by_hand
  assert statistics.paired_difference(rows, "+32e", "+8e", task="t") == by_hand
  assert statistics.paired_difference(rows, "+8e", "+8e", task="t").mean == 0.0
  # 0.5 x +32e + 0.5 x dense - +8e + 1 = (1.5 + 0.5 Z) + (-0.5 - 0.5 Z) - 1 + 1 = 1 per seed
  weighted = statistics.paired_contrast(rows, {"+32e": 0.5, "dense": 0.5, "+8e": -1.0},
                                        task="t", offset=1.0)
  assert weighted.mean == pytest.approx(1.0) and weighted.se == pytest.approx(0.0, abs=1e-9)
  items = {("t", "+32e", 0): np.array([100.0, 0.0, 100.0, 100.0]),
           ("t", "+8e", 0): np.array([0.0, 0.0, 100.0, 100.0])}
  one = [ResultRow("t", "scratch", 32, score=75.0, seed=0),
         ResultRow("t", "scratch", 8, score=50.0, seed=0)]
  estimate = statistics.paired_contrast(one, {"+32e": 1.0, "+8e": -1.0}, task="t",
                                        items=items, offset=1.0)
  assert estimate.unit == "items" and estimate.n == 4 and estimate.mean == pytest.approx(26.0)
  assert estimate.se == pytest.approx(np.std([100.0, 0, 0, 0], ddof=1) / 2)
