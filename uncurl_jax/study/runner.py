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

Every arm gets the same task budget, `finetune.steps` steps on the same batches (`recipe`
says which, and `Study.recipes` lists them): a reference (the source, every size from
scratch, dense) trains everything for all of them; a pruned model first trains only its
router for `finetune.router_warmup_steps` steps (at `router_warmup_learning_rate`: the
paper's warm-up, a stage of its own so that it is scored), then everything for the rest.
`router_norm` spends part of its full-parameter steps finetuning the source (it needs a
finetuned router; that probe trains like a reference) and the rest on the pruned model
after its warm-up; `progressive_dropping` finetunes the source like a reference while
dropping experts. The losses are the model's everywhere: LM cross-entropy plus the
load-balancing and z losses of the MoE layers.

Every stage is cached (`study.cache`): a rerun skips finished stages, a changed setting
reruns the stages it affects, and an interrupted training stage resumes from its newest
checkpoint.

Example:
  >>> study = Study(config)                   # a StudyConfig, e.g. from gin
  >>> specs = study.plan()                    # what will run, what is cached
  >>> rows = study.run()
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable

import numpy as np

from uncurl_jax.model import configs
from uncurl_jax.study import cache as cache_lib
from uncurl_jax.study import rows as rows_lib
from uncurl_jax.study import stages
from uncurl_jax.study import training
from uncurl_jax.study.config import ORACLE
from uncurl_jax.study.config import PROGRESSIVE_DROPPING
from uncurl_jax.study.config import MethodSpec
from uncurl_jax.study.config import StudyConfig
from uncurl_jax.study.config import StudyTask
from uncurl_jax.study.config import TrainSettings
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
    cache: The stage cache (its `events` tell what ran, resumed or was skipped).
    rows: Results of the last `run`.
    stats_specs: {(task name, seed, source E): the stage holding the source's statistics}.
  """

  def __init__(self, config: StudyConfig):
    if not isinstance(config, StudyConfig):
      raise TypeError(f"Study needs a StudyConfig, got {type(config).__name__}")
    config.check_runnable()
    self.config = config
    self.cache = cache_lib.StageCache(config.stages_dir
                                      or os.path.join(config.output_dir, "stages"))
    self.rows: list[rows_lib.ResultRow] = []
    self._items: dict[tuple[str, str, int], np.ndarray] | None = None
    self.row_specs: list[RowSpec] = []
    self.stats_specs: dict[tuple[str, int, int], StageSpec] = {}
    self.done: dict[str, cache_lib.Stage] = {}
    self._params: collections.OrderedDict[str, Any] = collections.OrderedDict()
    self._work = stages.StageWork(config)
    runtime = config.runtime
    self._trainer = training.StageTrainer(
        mesh=runtime.mesh, checkpoint_every_steps=runtime.checkpoint_every_steps,
        log_every_steps=runtime.log_every_steps, max_cached_tokens=runtime.max_cached_tokens,
        unit_tokens=config.pretrain.batch_size * config.pretrain.length)
    self._progress: Progress | None = None

  # ----------------------------------------------------------------------------------------
  # Params of finished stages.

  def finished(self, spec: StageSpec) -> cache_lib.Stage:
    """The finished stage of `spec`: from this run, from the cache, or run now."""
    if spec.key not in self.done:
      self.done[spec.key] = self.cache.run_spec(spec)
    return self.done[spec.key]

  def model_config(self, spec: StageSpec) -> configs.ModelConfig:
    """The config of the model a finished model stage holds (a pruned one's own)."""
    return configs.from_dict(self.finished(spec).result["model_config"])

  def params(self, spec: StageSpec) -> Any:
    """The params a model stage produced (kept from this run, else restored)."""
    if spec.key not in self._params:
      stage = self.finished(spec)
      self._remember(spec.key, stages.restore_params(
          stage.path(stage.result["checkpoint"]), config=self.model_config(spec),
          mesh=self.config.runtime.mesh))
    return self._params[spec.key]

  def _remember(self, key: str, params: Any) -> None:
    self._params[key] = params
    self._params.move_to_end(key)
    while len(self._params) > 4:  # older params are restored from disk when needed again
      self._params.popitem(last=False)

  def _model_stage(self, name: str, key: dict, fn: Callable[[str], tuple[Any, dict]], *,
                   inputs: list[StageSpec], cost: float, kind: str, compile_key: Any = None,
                   compile_cost: float = 0.0) -> StageSpec:
    """A stage whose `fn` returns (params, result); its params stay in memory."""
    holder: dict[str, StageSpec] = {}

    def work(directory):
      params, result = fn(directory)
      self._remember(holder["spec"].key, params)
      return result
    holder["spec"] = self.cache.plan(name, key, work, inputs=inputs, cost=cost, kind=kind,
                                     compile_key=compile_key, compile_cost=compile_cost)
    return holder["spec"]

  # ----------------------------------------------------------------------------------------
  # Training stages.

  def _train(self, name: str, key: dict, *, num_experts: int, settings: TrainSettings,
             seed: int, task: str | None, init: StageSpec | None, router_warmup: bool,
             dropping=None, steps: int | None = None, data_offset: int = 0,
             shape: Any = None) -> StageSpec:
    """Trains `init`'s params (its own config: a pruned model's) or a fresh model.

    `shape` names the model's shapes for the progress estimate (default: `num_experts`;
    a pruned model with shapes of its own passes its name)."""
    if steps is not None:
      settings = dataclasses.replace(settings, steps=steps)
    warmup = router_warmup and num_experts > 0

    def run(directory):
      config = (configs.with_expert_counts(self.config.model, num_experts) if init is None
                else self.model_config(init))
      params, summary = self._trainer.train(
          directory, config=config, settings=settings, seed=seed,
          task=settings.mixture_or_task_name or task,
          init_params=None if init is None else self.params(init), router_warmup=warmup,
          dropping=dropping, data_offset=data_offset, on_steps=self._advance)
      return params, {**summary, "checkpoint": "checkpoints"}
    key = {**key, "train": dataclasses.asdict(settings), "seed": seed, "router_warmup": warmup,
           "dropping": None if dropping is None else dataclasses.asdict(dropping),
           "data_offset": data_offset}
    # A trainer per (model shape, settings, procedure), as `training.StageTrainer` keeps
    # them: its steps compile once.
    compile_key = ("train", num_experts if shape is None else shape,
                   cache_lib.config_key(dataclasses.asdict(settings)), warmup,
                   dropping is not None)
    return self._model_stage(name, key, run, inputs=[] if init is None else [init],
                             cost=self._work.train_cost(settings), kind="train",
                             compile_key=compile_key,
                             compile_cost=self._work.train_compile_cost())

  def pretrained(self, num_experts: int, seed: int) -> StageSpec:
    """The pretrained (and, if configured, pre-finetuned) model with `num_experts`."""
    cfg, slug = self.config, _slug(num_experts)
    model = configs.with_expert_counts(cfg.model, num_experts)
    stage = self._train(f"pretrain-{slug}", {"model": model}, num_experts=num_experts,
                        settings=cfg.pretrain, seed=seed, task=None, init=None,
                        router_warmup=False)
    if cfg.prefinetune is None:
      return stage
    return self._train(f"prefinetune-{slug}", {}, num_experts=num_experts,
                       settings=cfg.prefinetune, seed=seed, task=None, init=stage,
                       router_warmup=False)

  def finetuned(self, task: StudyTask, init: StageSpec, label: str, *, num_experts: int,
                seed: int, steps: int | None = None, dropping=None, data_offset: int = 0,
                shape: Any = None) -> StageSpec:
    """`init` finetuned on `task`, every parameter, for `steps` steps (default: the finetune
    settings' `steps`), on the task's batches from `data_offset` on (`shape`: see
    `_train`)."""
    settings = self.config.finetune_settings(task)
    settings = dataclasses.replace(settings, router_warmup_steps=0,
                                   steps=settings.steps if steps is None else steps)
    return self._train(f"finetune-{label}-{task.name}", {"task": task.name},
                       num_experts=num_experts, settings=settings, seed=seed, task=task.name,
                       init=init, router_warmup=False, dropping=dropping,
                       data_offset=data_offset, shape=shape)

  def router_warmed(self, task: StudyTask, init: StageSpec, label: str, *, num_experts: int,
                    seed: int, data_offset: int = 0, shape: Any = None) -> StageSpec:
    """`init` (a pruned model) after the router-only warm-up: `router_warmup_steps` steps
    at `router_warmup_learning_rate`, every other parameter frozen."""
    settings = self.config.finetune_settings(task)
    steps = settings.router_warmup_steps
    settings = dataclasses.replace(settings, steps=steps, warmup_steps=0)
    return self._train(f"warmup-{label}-{task.name}", {"task": task.name},
                       num_experts=num_experts, settings=settings, seed=seed, task=task.name,
                       init=init, router_warmup=True, data_offset=data_offset, shape=shape)

  def _advance(self, units: float) -> None:
    if self._progress is not None:
      self._progress.advance(units)

  # ----------------------------------------------------------------------------------------
  # Statistics, pruning, scores.

  def task_stats(self, task: StudyTask, base: StageSpec, num_experts: int,
                 seed: int) -> StageSpec:
    """A source's task statistics (router logits and expert statistics, `stats.npz`)."""
    def work(directory):
      return self._work.collect_stats(directory, task, self.model_config(base),
                                      self.params(base))
    return self.cache.plan(f"stats-e{num_experts}-{task.name}", self._work.stats_key(task),
                           work, inputs=[base], cost=self._work.stats_cost(), kind="stats")

  def oracle_selected(self, task: StudyTask, source: StageSpec, pair: tuple[int, int]
                      ) -> StageSpec:
    """The oracle arm's experts for `source` at E -> D, chosen on the development split."""
    def work(directory):
      return self._work.oracle_select(directory, task, self.model_config(source),
                                      self.params(source), pair[1])
    layers = len(configs.with_expert_counts(self.config.model, pair[0]).moe_layers)
    return self.cache.plan(f"oracle-e{pair[0]}to{pair[1]}-{task.name}",
                           self._work.oracle_key(task, pair[1]), work, inputs=[source],
                           cost=self._work.oracle_cost(pair[1], pair[0], layers),
                           kind="prune", compile_key=("oracle", pair[0]),
                           compile_cost=self._work.score_compile_cost())

  def pruned(self, task: StudyTask, method: MethodSpec, pair: tuple[int, int], seed: int, *,
             source: StageSpec, stats: StageSpec, pretrained: StageSpec | None = None,
             selected: StageSpec | None = None) -> StageSpec:
    """`source` pruned E -> D (`pair`) by `method` (router_norm: also `pretrained`; the
    oracle: the experts `selected` chose)."""
    def run(directory):
      params, summary = self._work.prune(
          directory, params=self.params(source), config=self.model_config(source),
          stats_dir=stats.directory, method=method, num_experts=pair[1], seed=seed,
          pretrained_params=None if pretrained is None else self.params(pretrained),
          selection=None if selected is None else self.finished(selected).result["selection"])
      params = stages.place_params(params, config=configs.from_dict(summary["model_config"]),
                                   mesh=self.config.runtime.mesh)
      return params, {**summary, "checkpoint": stages.PARAMS_DIR}
    key = self._work.prune_key(method, pair[1], seed)
    inputs = ([source, stats] + ([] if pretrained is None else [pretrained])
              + ([] if selected is None else [selected]))
    return self._model_stage(f"prune-{method.slug}-e{pair[0]}to{pair[1]}-{task.name}", key,
                             run, inputs=inputs, cost=self._work.prune_cost(method),
                             kind="prune")

  def scored(self, task: StudyTask, model: StageSpec, shape: Any) -> StageSpec:
    """Metrics of a model stage on the task, and its expert usage on the task's tokens
    (`shape`: the model's shapes for the progress estimate, see `_train`)."""
    def work(directory):
      return self._work.score(directory, task, self.model_config(model), self.params(model))
    return self.cache.plan(f"score-{model.name}", self._work.score_key(task), work,
                           inputs=[model], cost=self._work.score_cost(), kind="score",
                           compile_key=("score", shape),
                           compile_cost=self._work.score_compile_cost())

  # ----------------------------------------------------------------------------------------
  # The plan.

  def plan(self) -> list[StageSpec]:
    """Every stage of the study in running order (nothing runs)."""
    specs: list[StageSpec] = []
    self.row_specs, self.stats_specs = [], {}
    cfg = self.config
    sizes = sorted(set(cfg.source_experts) | {d for _, d in cfg.pairs}
                   | ({0} if cfg.dense_reference else set()))
    for seed in cfg.seeds:
      bases = {e: self.pretrained(e, seed) for e in sizes}
      for task in cfg.tasks:
        finetuned = {e: self.finetuned(task, bases[e], _slug(e), num_experts=e, seed=seed)
                     for e in sizes}
        for e in sizes:
          self._row(task, "dense" if e == 0 else "scratch", e, seed,
                    self.scored(task, finetuned[e], shape=e),
                    before=self.scored(task, bases[e], shape=e),
                    recipe=self.recipe(task, "reference", moe=e > 0))
        for source in cfg.source_experts:
          self._plan_source(task, source, seed, bases[source])
    # One spec per stage: two arms may plan the same stage (progressive dropping's score
    # before finetuning is the source's), and each plan call makes its own StageSpec.
    keys: set[str] = set()
    for spec in [s for row in self.row_specs for s in _with_inputs(row.before, row.warmed,
                                                                  row.score)] + list(
                                                                      self.stats_specs.values()):
      if spec.key not in keys:
        keys.add(spec.key)
        specs.append(spec)
    return specs

  def _plan_source(self, task: StudyTask, source: int, seed: int, base: StageSpec) -> None:
    cfg = self.config
    stats = self.task_stats(task, base, source, seed)
    self.stats_specs[(task.name, seed, source)] = stats
    settings = cfg.finetune_settings(task)
    warmup = settings.router_warmup_steps
    full_steps = settings.steps - warmup
    for size in [d for e, d in cfg.pairs if e == source]:
      for method in cfg.methods:
        label, before, warmed = f"{method.slug}-e{source}to{size}", None, None
        # Bound routers and uneven counts give every pruned model shapes of its own.
        shape = f"{label}-seed{seed}" if method.own_shapes else size
        if method.method == PROGRESSIVE_DROPPING:  # trains like a reference, dropping
          trained = self.finetuned(task, base, label, num_experts=source, seed=seed,
                                   dropping=dataclasses.replace(cfg.dropping,
                                                                target_experts=size))
          # Before its finetuning it is the intact source (the source's own score stage).
          before = self.scored(task, base, shape=source)
          recipe = self.recipe(task, "dropping", moe=True, size=size)
        else:
          source_params, offset, pretrained, probe, selected = base, 0, None, 0, None
          if method.method == ORACLE:
            selected = self.oracle_selected(task, base, (source, size))
          if method.method == "router_norm":  # its probe finetune counts against its budget
            probe = self.router_norm_probe_steps(task)
            source_params = self.finetuned(task, base, f"{label}-probe", num_experts=source,
                                           seed=seed, steps=probe)
            pretrained, offset = base, probe  # it continues the probe's data
          pruned = self.pruned(task, method, (source, size), seed, source=source_params,
                               stats=stats, pretrained=pretrained, selected=selected)
          before = self.scored(task, pruned, shape=shape)
          tuned = pruned
          if warmup:
            tuned = self.router_warmed(task, pruned, label, num_experts=size, seed=seed,
                                       data_offset=offset, shape=shape)
            warmed = self.scored(task, tuned, shape=shape)
          trained = self.finetuned(task, tuned, label, num_experts=size, seed=seed,
                                   steps=full_steps - probe, data_offset=offset + warmup,
                                   shape=shape)
          recipe = self.recipe(task, "pruned", moe=True, probe=probe)
        self._row(task, "pruned", size, seed, self.scored(task, trained, shape=shape),
                  source=source, method=method, before=before, warmed=warmed, recipe=recipe)

  def router_norm_probe_steps(self, task: StudyTask) -> int:
    """Full-parameter steps of router_norm's probe finetuning of the source (a fraction
    of the full-parameter budget, leaving at least one step for the pruned model)."""
    settings = self.config.finetune_settings(task)
    full_steps = settings.steps - settings.router_warmup_steps
    return min(full_steps - 1, max(1, round(self.config.router_norm_probe_fraction
                                            * full_steps)))

  def recipe(self, task: StudyTask, arm: str, *, moe: bool, probe: int = 0,
             size: int = 0) -> str:
    """What an arm's finetuning does, in words (the plan and results.csv show it).

    `arm`: "reference" (every model before pruning), "pruned" (with `probe` steps of
    router_norm's source finetuning first) or "dropping" (progressive dropping to `size`).
    """
    settings = self.config.finetune_settings(task)
    warmup, lr = settings.router_warmup_steps, settings.learning_rate
    model = self.config.model
    losses = (f"losses LM + {model.aux_loss_coef:g} load-balancing + {model.z_loss_coef:g} z"
              if moe else "loss LM")
    if arm == "reference":
      return f"{settings.steps} steps @ {lr:g} all params; {losses}"
    if arm == "dropping":
      drops = self.config.dropping
      return (f"{settings.steps} steps @ {lr:g} all params, experts x{drops.keep_fraction:g} "
              f"every {drops.drop_every_steps} steps from step {drops.first_drop_step} down "
              f"to {size}; {losses}")
    parts = []
    if probe:
      parts.append(f"probe: source {probe} steps @ {lr:g} all params")
    if warmup:
      warmup_lr = settings.router_warmup_learning_rate or lr
      parts.append(f"router warm-up {warmup} steps @ {warmup_lr:g} router only")
    parts.append(f"{settings.steps - warmup - probe} steps @ {lr:g} all params")
    return f"{', then '.join(parts)}; {losses}"

  def recipes(self) -> dict[str, str]:
    """{arm: recipe} of the planned rows ("+8e", "32->8 uncurl (reinit)", ...), one per
    arm (the first task's, seed's)."""
    out: dict[str, str] = {}
    for row in self.row_specs:
      out.setdefault(_arm_label(row), row.recipe)
    return out

  def _row(self, task, kind, num_experts, seed, score, **kwargs) -> None:
    self.row_specs.append(RowSpec(task, kind, num_experts, seed, score, **kwargs))

  # ----------------------------------------------------------------------------------------
  # Running.

  def run(self, progress: Progress | None = None) -> list[rows_lib.ResultRow]:
    """Runs (or reads from the cache) every stage of `plan()`; returns the result rows."""
    specs = self.plan()
    self._progress = progress
    try:
      for spec in specs:
        if progress is not None:
          progress.start(spec, cached=self.cache.is_done(spec))
        stage = self.finished(spec)
        if progress is not None:
          progress.finish(spec, stage)
    finally:
      self._progress = None
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
    for UNCURL with a re-initialized router, the share of tokens whose first choice is the
    expert the function-preserving merge router (the same experts, `uncurl:merge`)
    chooses, per MoE layer. Measured on the first seed only."""
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
      if spec.method.method == "uncurl" and spec.method.router_used == "reinit":
        merge = next((s for s in self.row_specs if s.seed == seed and s.task == spec.task
                      and s.method is not None and s.method.method == "uncurl"
                      and s.method.router == "merge" and s.method.features == spec.method.features
                      and s.num_experts == spec.num_experts and s.source == spec.source), None)
        if merge is not None:
          entry["agreement"] = self._agreement(spec.task, spec.warmed.inputs[0],
                                               merge.before.inputs[0])
      out.append(entry)
    return out

  def _agreement(self, task: StudyTask, model: StageSpec, reference: StageSpec
                 ) -> dict[str, float]:
    choices = [stages.top_choices(self._work.router_logits(task, self.model_config(spec),
                                                           self.params(spec)),
                                  self.model_config(spec)) for spec in (model, reference)]
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
        recipe=row.recipe, secondary=score["metrics"].get(f"{metric}_at_capacity"))


def _arm_label(row: RowSpec) -> str:
  if row.kind == "dense":
    return "dense"
  if row.kind == "scratch":
    return f"+{row.num_experts}e"
  return f"{row.source}->{row.num_experts} {row.method.label}"


def _slug(num_experts: int) -> str:
  return "dense" if num_experts == 0 else f"e{num_experts}"


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
