r"""`python -m uncurl_jax.study.dev_search`: the finetuning recipe and the router warm-up,
chosen on the task's development split.

  python -m uncurl_jax.study.dev_search                     # the grid below, seed 0
  python -m uncurl_jax.study.dev_search --stages_dir=outputs/stages --output=outputs/dev

Every point of the grid is the study of `gin/experiments/dev_search.gin` (the default
study's models, finetuned on the task's finetuning facts and scored on its development
facts, never on the scored ones) with a few bindings; its stages are cached in
`--stages_dir` (pretraining is the default study's). For each point it reports:

* the references (dense, +8e, +32e): score before and after finetuning, and the paired
  per-item standard error of that change. The finetuning learning rate is the largest of
  the learning-rate points at which no reference loses more than one paired standard
  error: finetuning that does no harm to models that need no pruning recovery;
* the pruned arms: score right after pruning, after the router warm-up, after finetuning;
  for UNCURL with a re-initialized router its mean top-1 gate after the warm-up and the
  share of tokens on which it picks the expert the function-preserving merge router picks.
  The warm-up is the point at which the re-initialized router recovers best (its score
  after the warm-up; the agreement breaks ties): it must be able to learn to route.

The summary goes to `<output>/summary.md` and to stdout. The chosen settings are bound in
`gin/experiments/synthetic.gin` by hand (docs/study.md records the search).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

from absl import flags
import numpy as np

from uncurl_jax import cli
from uncurl_jax.study import __main__ as study_main
from uncurl_jax.study import run as run_lib
from uncurl_jax.study import runner

DEV_GIN_FILE = os.path.join(study_main.REPOSITORY_ROOT, "gin", "experiments",
                            "dev_search.gin")
_FT = "finetuning/TrainSettings"
# (name, gin bindings, what the point varies: "lr" for the finetuning learning rate,
# "warmup" for the router warm-up).
GRID: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("lr3e-6", (f"{_FT}.learning_rate=3e-6",), "lr"),
    ("lr1e-5", (f"{_FT}.learning_rate=1e-5",), "lr"),
    ("lr3e-5", (f"{_FT}.learning_rate=3e-5",), "lr"),
) + tuple(
    (f"w{steps}_lr{rate}", (f"{_FT}.router_warmup_steps={steps}",
                            f"{_FT}.router_warmup_learning_rate={rate}"), "warmup")
    for steps in (10, 30, 60) for rate in ("3e-3", "1e-2", "3e-2", "1e-1"))

_STAGES_DIR = flags.DEFINE_string("stages_dir", "outputs/stages",
                                  "Stage cache (shared with the default study).")
_OUTPUT = flags.DEFINE_string("output", "outputs/dev_search", "Where summary.md goes.")
_ONLY = flags.DEFINE_list("points", [], "Run only these grid points (names); all if empty.")


@dataclasses.dataclass(frozen=True)
class Point:
  """What one grid point measured on the development split (seed 0)."""

  name: str
  varies: str
  bindings: tuple[str, ...]
  references: dict[str, tuple[float, float, float]]  # model: (before, after, paired SE)
  pruned: dict[str, tuple[float | None, float | None, float]]  # one-shot, warm-up, after
  reinit_gate: float | None
  reinit_agreement: dict[str, float] | None

  @property
  def harmless(self) -> bool:
    """No reference loses more than one paired standard error to finetuning."""
    return all(after >= before - se for before, after, se in self.references.values())

  @property
  def reinit_recovery(self) -> tuple[float, float]:
    """(score after the warm-up, mean agreement) of UNCURL with a re-initialized router."""
    score = next((warm for model, (_, warm, _) in self.pruned.items()
                  if "uncurl (reinit" in model and warm is not None), -math.inf)
    agreement = np.mean(list(self.reinit_agreement.values())) if self.reinit_agreement else 0.0
    return score, float(agreement)


def measure(name: str, bindings: Sequence[str], varies: str, *, stages_dir: str) -> Point:
  """Runs (or reads from the cache) one grid point's study and measures it."""
  study_main.parse_gin(gin_files=[DEV_GIN_FILE], gin_bindings=[
      *bindings, f"STAGES_DIR = '{os.path.abspath(stages_dir)}'", "SEEDS = [0]"])
  config = study_main.register_configurables()["StudyConfig"]()
  study = runner.Study(config)
  with run_lib.persistent_compilation_cache(os.path.join(study.cache.root,
                                                         "jax_compilation_cache")):
    rows = study.run()
  before, after = study.items("one_shot"), study.items("finetuned")
  references, pruned = {}, {}
  for row in rows:
    if row.kind == "pruned":
      pruned[row.model] = (row.score_before_finetune, row.score_after_warmup, row.score)
      continue
    key = (row.task, row.model, row.seed)
    change = np.asarray(after[key], np.float64) - np.asarray(before[key], np.float64)
    se = float(change.std(ddof=1) / math.sqrt(len(change)))
    references[row.model] = (row.score_before_finetune, row.score, se)
  reinit = next((d for d in study.router_diagnostics() if "uncurl (reinit" in d["model"]), {})
  return Point(name, varies, tuple(bindings), references, pruned,
               reinit.get("mean_top1_gate"), reinit.get("agreement"))


def choose(points: Sequence[Point]) -> dict[str, Point | None]:
  """{'lr': the harmless learning-rate point with the largest learning rate, 'warmup': the
  warm-up point where the re-initialized router recovers best} (None: no such point)."""
  rates = [p for p in points if p.varies == "lr" and p.harmless]
  rate = max(rates, key=lambda p: float(p.bindings[0].split("=")[1]), default=None)
  warmups = [p for p in points if p.varies == "warmup"]
  warmup = max(warmups, key=lambda p: p.reinit_recovery, default=None)
  return {"lr": rate, "warmup": warmup}


def summary(points: Sequence[Point]) -> str:
  """The search as markdown: references, pruned arms and routers per point, the choice."""
  lines = ["| point | " + " | ".join(points[0].references) + " | no harm | "
           + " | ".join(points[0].pruned) + " | reinit gate | reinit agrees with merge |",
           "|---|" + "---|" * (len(points[0].references) + 1 + len(points[0].pruned) + 2)]
  fmt = lambda x: "" if x is None else f"{x:.1f}"
  for p in points:
    refs = [f"{b:.1f} -> {a:.1f} ({a - b:+.1f} ± {se:.1f})" for b, a, se in p.references.values()]
    arms = [" / ".join(fmt(x) for x in scores) for scores in p.pruned.values()]
    agree = ("" if not p.reinit_agreement else ", ".join(
        f"{100 * v:.0f}%" for v in p.reinit_agreement.values()))
    harm = ("yes" if p.harmless else "no") if p.varies == "lr" else "-"
    lines.append(f"| {p.name} | " + " | ".join(refs) + f" | {harm} | "
                 + " | ".join(arms) + f" | {fmt(p.reinit_gate and 100 * p.reinit_gate)}% | "
                 f"{agree} |")
  chosen = choose(points)
  lines += ["", "References: before -> after finetuning (change ± its paired per-item "
            "standard error); 'no harm' (learning-rate points): no reference loses more than "
            "that standard error. Pruned arms: one-shot / after the warm-up / after "
            "finetuning; the warm-up points finetune at 1e-5. Re-initialized router: its "
            "mean top-1 gate after the warm-up (%) and its agreement with the merge router "
            "per MoE layer. Development split (192 facts), seed 0.", "",
            f"Chosen finetuning learning rate: "
            f"{chosen['lr'].bindings[0] if chosen['lr'] else 'none is harmless'}; "
            f"chosen warm-up: {', '.join(chosen['warmup'].bindings) if chosen['warmup'] else '-'}."]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> list[Point]:
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  cli.set_up_logging(verbose=flags.FLAGS.verbose)
  unknown = sorted(set(_ONLY.value) - {name for name, _, _ in GRID})
  if unknown:
    cli.exit_with_message(argv[0], f"unknown grid points {unknown}; the grid has "
                          f"{[name for name, _, _ in GRID]}")
  points = [measure(name, bindings, varies, stages_dir=_STAGES_DIR.value)
            for name, bindings, varies in GRID if not _ONLY.value or name in _ONLY.value]
  text = summary(points)
  os.makedirs(_OUTPUT.value, exist_ok=True)
  with open(os.path.join(_OUTPUT.value, "summary.md"), "w") as f:
    f.write(text)
  print(text)
  return points


if __name__ == "__main__":
  cli.run(main)
