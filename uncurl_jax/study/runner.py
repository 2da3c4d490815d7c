"""The UNCURL study: pretrain, prune E -> D with every method, finetune, evaluate, compare.

`Study.plan()` lays out every stage before anything runs; `Study.run()` runs them in
order. For each seed and target task the plan

1. pretrains every model size from scratch: the sources (E experts), every pruned size
   (D experts) and a dense model; optionally pre-finetunes them; scores each (the
   references before finetuning);
2. finetunes each of them on the task and scores it again (the reference rows);
3. measures each source's task statistics (router logits and what the experts compute);
4. for every pair E -> D and every method: prunes and scores the pruned model (one-shot),
   trains its router alone and scores it (after the warm-up), finetunes it and scores it.

Each row comes from an arm of `study.arms` (a table: references, prune then finetune,
router_norm's probe, progressive dropping, the oracle), built from the stages of
`study.graph.StageGraph`. Every arm gets the same task budget, `finetune.steps` steps on
the same batches (`recipe` says which, and `Study.recipes` lists them): a reference (the
source, every size from scratch, dense) trains everything for all of them; a pruned model
first trains only its router for `finetune.router_warmup_steps` steps (at
`router_warmup_learning_rate`: the paper's warm-up, a stage of its own so that it is
scored), then everything for the rest. `router_norm` spends part of its full-parameter
steps finetuning the source (it needs a finetuned router; that probe trains like a
reference) and the rest on the pruned model after its warm-up; `progressive_dropping`
finetunes the source like a reference while dropping experts. The losses are the model's
everywhere: LM cross-entropy plus the load-balancing and z losses of the MoE layers.

`Study` plans the rows, runs their stages and keeps the results.

Every stage is cached (`study.cache`): a rerun skips finished stages, a changed setting
reruns the stages it affects, and an interrupted training stage resumes from its newest
checkpoint.

Example:
  >>> study = Study(config)                   # a StudyConfig, e.g. from gin
  >>> specs = study.plan()                    # what will run, what is cached
  >>> rows = study.run()
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from uncurl_jax.study import arms
from uncurl_jax.study import cache as cache_lib
from uncurl_jax.study import graph as graph_lib
from uncurl_jax.study import rows as rows_lib
from uncurl_jax.study import stages
from uncurl_jax.study.config import MethodSpec
from uncurl_jax.study.config import StudyConfig
from uncurl_jax.study.config import StudyTask
from uncurl_jax.study.progress import Progress

StageSpec = cache_lib.StageSpec


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """A result row to read once its stages ran: the model's identity and its score stages."""

  task: StudyTask
  kind: str
  num_experts: int
  seed: int
  score: StageSpec
  source: int = 0
  method: MethodSpec | None = None
  before: StageSpec | None = None
  warmed: StageSpec | None = None
  recipe: str = ""


class Study:
  """Plans and runs a `StudyConfig` stage by stage (see the module docstring).

  Attributes:
    config: The study.
    graph: Its stage builders and the outputs of finished stages (`graph.StageGraph`).
    rows: Results of the last `run`.
    row_specs: The planned rows (`RowSpec`), in plan order.
    stats_specs: {(task name, seed, source E): the stage holding the source's statistics}.
  """

  def __init__(self, config: StudyConfig):
    if not isinstance(config, StudyConfig):
      raise TypeError(f"Study needs a StudyConfig, got {type(config).__name__}")
    config.check_runnable()
    self.config = config
    self.graph = graph_lib.StageGraph(config)
    self.rows: list[rows_lib.ResultRow] = []
    self._items: dict[str, dict[tuple[str, str, int], np.ndarray]] | None = None
    self.row_specs: list[RowSpec] = []
    self.stats_specs: dict[tuple[str, int, int], StageSpec] = {}

  @property
  def cache(self) -> cache_lib.StageCache:
    """The stage cache (its `events` tell what ran, resumed or was skipped)."""
    return self.graph.cache

  @property
  def done(self) -> dict[str, cache_lib.Stage]:
    """{stage key: finished stage} of this process."""
    return self.graph.done

  def finished(self, spec: StageSpec) -> cache_lib.Stage:
    """The finished stage of `spec`: from this run, from the cache, or run now."""
    return self.graph.finished(spec)

  def params(self, spec: StageSpec) -> Any:
    """The params a model stage produced."""
    return self.graph.params(spec)

  # ----------------------------------------------------------------------------------------
  # The plan.

  def plan(self) -> list[StageSpec]:
    """Every stage of the study in running order (nothing runs)."""
    self.row_specs, self.stats_specs = [], {}
    cfg, graph = self.config, self.graph
    sizes = sorted(set(cfg.source_experts) | {d for _, d in cfg.pairs}
                   | ({0} if cfg.dense_reference else set()))
    for seed in cfg.seeds:
      bases = {e: graph.pretrained(e, seed) for e in sizes}
      for task in cfg.tasks:
        for e in sizes:
          self._row(task, "dense" if e == 0 else "scratch", e, seed,
                    arms.reference(graph, task, e, seed, bases[e]))
        for source in cfg.source_experts:
          stats = graph.task_stats(task, bases[source], source, seed)
          self.stats_specs[(task.name, seed, source)] = stats
          for size in [d for e, d in cfg.pairs if e == source]:
            for method in cfg.methods:
              inputs = arms.ArmInputs(task, method, source, size, seed, base=bases[source],
                                      stats=stats)
              self._row(task, "pruned", size, seed, arms.arm_of(method.method)(graph, inputs),
                        source=source, method=method)
    # One spec per stage: two arms may plan the same stage (progressive dropping's score
    # before finetuning is the source's), and each plan call makes its own StageSpec.
    specs, keys = [], set()
    for spec in [s for row in self.row_specs for s in _with_inputs(row.before, row.warmed,
                                                                  row.score)] + list(
                                                                      self.stats_specs.values()):
      if spec.key not in keys:
        keys.add(spec.key)
        specs.append(spec)
    return specs

  def _row(self, task: StudyTask, kind: str, num_experts: int, seed: int, plan: arms.ArmPlan,
           **kwargs) -> None:
    score = self.graph.scored(task, plan.trained, shape=plan.shape)
    self.row_specs.append(RowSpec(task, kind, num_experts, seed, score, before=plan.before,
                                  warmed=plan.warmed, recipe=plan.recipe, **kwargs))

  def recipes(self) -> dict[str, str]:
    """{arm: recipe} of the planned rows ("+8e", "32->8 uncurl (reinit)", ...), one per
    arm (the first seed's). Where the tasks' recipes differ (a task with a finetuning of its
    own, `StudyConfig.task_finetune`), every task's arms are listed, each label prefixed
    with its task ("facts_property: +8e")."""
    per_task: dict[str, dict[str, str]] = {}
    for row in self.row_specs:
      per_task.setdefault(row.task.name, {}).setdefault(_arm_label(row), row.recipe)
    tables = list(per_task.values())
    if all(table == tables[0] for table in tables[1:]):
      return dict(tables[0]) if tables else {}
    return {f"{task}: {arm}": recipe for task, table in per_task.items()
            for arm, recipe in table.items()}

  # ----------------------------------------------------------------------------------------
  # Running.

  def run(self, progress: Progress | None = None) -> list[rows_lib.ResultRow]:
    """Runs (or reads from the cache) every stage of `plan()`; returns the result rows."""
    specs = self.plan()
    self.graph.progress = progress
    try:
      for spec in specs:
        if progress is not None:
          progress.start(spec, cached=self.cache.is_done(spec))
        stage = self.finished(spec)
        if progress is not None:
          progress.finish(spec, stage)
    finally:
      self.graph.progress = None
    self.rows = [self._result_row(row) for row in self.row_specs]
    self._items = None
    return self.rows

  def items(self, phase: str = "finetuned") -> dict[tuple[str, str, int], np.ndarray]:
    """{(task, model label, seed): per-item scores} of the rows whose scores have items,
    after finetuning or ("one_shot") before it; read once per run, and only for one seed
    (with several, the seeds give the errors)."""
    if phase not in ("finetuned", "one_shot"):
      raise ValueError(f"phase must be 'finetuned' or 'one_shot', got {phase!r}")
    if self._items is None:
      self._items = {}
    if phase not in self._items:
      found = self._items[phase] = {}
      if len(self.config.seeds) == 1:
        for spec, row in zip(self.row_specs, self.rows):
          scored = spec.score if phase == "finetuned" else spec.before
          path = None if scored is None else os.path.join(scored.directory, stages.ITEMS_FILE)
          if path is not None and os.path.exists(path):
            found[(row.task, row.model, row.seed)] = np.load(path)
    return self._items[phase]

  def router_diagnostics(self) -> list[dict[str, Any]]:
    """After the warm-up, per pruned arm: the mean top-1 gate on the task's tokens and,
    for a merging method with a re-initialized router (UNCURL as the paper runs it), the
    share of tokens whose first choice is the expert the function-preserving merge router
    of the same method and experts (e.g. `uncurl:merge`) chooses, per MoE layer, where the
    study has that row. Measured on the first seed only."""
    out = []
    seed = self.config.seeds[0]
    for spec, row in zip(self.row_specs, self.rows):
      if spec.warmed is None or row.seed != seed:
        continue
      result = self.finished(spec.warmed).result
      entry = {"task": row.task, "model": row.model,
               "mean_top1_gate": result["metrics"].get("mean_top1_gate"),
               "mean_top1_gate_before": self.finished(spec.before).result["metrics"].get(
                   "mean_top1_gate"), "agreement": None}
      if spec.method.merges and spec.method.router_used == "reinit":
        merge = next((s for s in self.row_specs if s.seed == seed and s.task == spec.task
                      and s.method == dataclasses.replace(spec.method, router="merge")
                      and s.num_experts == spec.num_experts and s.source == spec.source), None)
        if merge is not None:
          entry["agreement"] = self._agreement(spec.task, spec.warmed.inputs[0],
                                               merge.before.inputs[0])
      out.append(entry)
    return out

  def _agreement(self, task: StudyTask, model: StageSpec, reference: StageSpec
                 ) -> dict[str, float]:
    graph = self.graph
    choices = [stages.top_choices(graph.work.router_logits(task, graph.model_config(spec),
                                                           graph.params(spec)),
                                  graph.model_config(spec)) for spec in (model, reference)]
    return {name: float(np.mean(choices[0][name][0] == choices[1][name][0]))
            for name in choices[0]}

  def _result_row(self, row: RowSpec) -> rows_lib.ResultRow:
    score = self.done[row.score.key].result
    before = None if row.before is None else self.done[row.before.key].result
    warmed = None if row.warmed is None else self.done[row.warmed.key].result
    metric = self.config.task_metric(row.task)
    router = "" if row.method is None else row.method.options
    return rows_lib.ResultRow(
        task=row.task.name, kind=row.kind, num_experts=row.num_experts,
        source_experts=row.source, seed=row.seed,
        method="" if row.method is None else row.method.method, router=router,
        score=float(score["score"]), metric=metric,
        score_before_finetune=None if before is None else float(before["score"]),
        score_after_warmup=None if warmed is None else float(warmed["score"]),
        recipe=row.recipe, secondary=score["metrics"].get(f"{metric}_at_capacity"),
        recall=score["metrics"].get("recall"),
        score_true_value=score["metrics"].get(f"{metric}_true_value"))


def _arm_label(row: RowSpec) -> str:
  if row.kind == "dense":
    return "dense"
  if row.kind == "scratch":
    return f"+{row.num_experts}e"
  return f"{row.source}->{row.num_experts} {row.method.label}"


def _with_inputs(*specs: StageSpec | None) -> list[StageSpec]:
  """The specs and everything they read, inputs first (a topological order)."""
  ordered: list[StageSpec] = []

  def visit(spec):
    if spec is None or spec in ordered:
      return
    for item in spec.inputs:
      visit(item)
    ordered.append(spec)
  for spec in specs:
    visit(spec)
  return ordered
