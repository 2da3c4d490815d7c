"""The UNCURL study: pretrain, prune E -> D with every method, finetune, evaluate, compare.

For each target task the study

1. pretrains every model size from scratch: the sources (E experts), every pruned size
   (D experts) and a dense model; optionally pre-finetunes them;
2. finetunes each of them on the task (the reference rows of the table; a finetuned
   source also feeds `router_norm`);
3. collects each source's router logits on the task's training data;
4. for every pair E -> D (D < E) and every method: prunes, scores the pruned model,
   finetunes it (router-only warm-up first, as the paper) and scores it again;
   `progressive_dropping` instead finetunes the source while dropping experts;
5. returns one `report.ResultRow` per (task, model).

Every step is a cached stage (`study.cache`): a rerun skips finished stages, a changed
setting reruns the stages it affects, and an interrupted training stage resumes from its
newest checkpoint. Seeds are fixed by `StudyConfig.seed`.

Example:
  >>> study = Study(config)                   # a StudyConfig, e.g. from gin
  >>> rows = study.run()
  >>> print(report.markdown_table(rows))
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from uncurl_jax.model import configs
from uncurl_jax.pruning import features
from uncurl_jax.study import cache as cache_lib
from uncurl_jax.study import report
from uncurl_jax.study import stages
from uncurl_jax.study import training
from uncurl_jax.study.config import PROGRESSIVE_DROPPING
from uncurl_jax.study.config import MethodSpec
from uncurl_jax.study.config import StudyConfig
from uncurl_jax.study.config import StudyTask
from uncurl_jax.study.config import TrainSettings
from uncurl_jax.train import schedules


def _settings_key(settings: TrainSettings | None) -> Any:
  return None if settings is None else dataclasses.asdict(settings)


@dataclasses.dataclass
class TaskFigures:
  """What the per-task plots need (of the first source and its first pruned size).

  Attributes:
    source_experts, num_experts: The pair E -> D shown.
    logits: The stage holding the source's router logits on the task.
    usage_before: {layer: [E] selection frequencies of the source}.
    clusters: The first UNCURL prune stage's result (labels, anchors), or None.
    usage_after: {row label: {layer: [D] frequencies after pruning and finetuning}}.
  """

  source_experts: int
  num_experts: int
  logits: cache_lib.Stage
  usage_before: dict[str, list[float]]
  clusters: dict[str, Any] | None = None
  usage_after: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)


class Study:
  """Runs a `StudyConfig` stage by stage (see the module docstring).

  Attributes:
    config: The study.
    cache: The stage cache (its `events` tell what ran, resumed or was skipped).
    rows: Results of the last `run`.
    figures: {task name: TaskFigures} of the last `run`.
  """

  def __init__(self, config: StudyConfig):
    if not isinstance(config, StudyConfig):
      raise TypeError(f"Study needs a StudyConfig, got {type(config).__name__}")
    config.check_runnable()
    self.config = config
    self.cache = cache_lib.StageCache(config.stages_dir
                                        or os.path.join(config.output_dir, "stages"))
    self.rows: list[report.ResultRow] = []
    self.figures: dict[str, TaskFigures] = {}
    self._params: collections.OrderedDict[str, Any] = collections.OrderedDict()
    self._scorers: dict[StudyTask, Callable] = {}
    self._task_batches: dict[str, list] = {}
    runtime = config.runtime
    self._trainer = training.StageTrainer(
        mesh=runtime.mesh, seed=config.seed,
        checkpoint_every_steps=runtime.checkpoint_every_steps,
        log_every_steps=runtime.log_every_steps, max_cached_tokens=runtime.max_cached_tokens)

  # ----------------------------------------------------------------------------------------
  # Params of stages.

  def _remember(self, stage_key: str, params: Any) -> None:
    self._params[stage_key] = params
    self._params.move_to_end(stage_key)
    while len(self._params) > 4:  # older params are restored from disk when needed again
      self._params.popitem(last=False)

  def params(self, stage: cache_lib.Stage) -> Any:
    """The params a model stage produced (kept from this run, else restored)."""
    if stage.key not in self._params:
      self._remember(stage.key, stages.restore_params(
          stage.path(stage.result["checkpoint"]), config=self.config.model,
          mesh=self.config.runtime.mesh))
    return self._params[stage.key]

  def _run_model_stage(self, name: str, key: dict, fn: Callable[[str], tuple[Any, dict]], *,
                       depends_on: Sequence[cache_lib.Stage]) -> cache_lib.Stage:
    """Runs a stage whose `fn` returns (params, result); keeps the params in memory."""
    produced = {}

    def run(directory):
      produced["params"], result = fn(directory)
      return result
    stage = self.cache.run(name, key, run, depends_on=depends_on)
    if "params" in produced:
      self._remember(stage.key, produced["params"])
    return stage

  def _model_config(self, num_experts: int) -> configs.ModelConfig:
    return configs.with_expert_counts(self.config.model, num_experts)

  @staticmethod
  def _model_slug(num_experts: int) -> str:
    return "dense" if num_experts == 0 else f"e{num_experts}"

  # ----------------------------------------------------------------------------------------
  # Training stages.

  def _train_stage(self, name: str, key: dict, *, config: configs.ModelConfig,
                   settings: TrainSettings, task: str | None, init: cache_lib.Stage | None,
                   router_warmup: bool = False,
                   dropping: schedules.ProgressiveDropping | None = None) -> cache_lib.Stage:
    """Trains `init`'s params (or a fresh `config` model); the config's expert counts
    follow the params (a pruned model)."""
    def run(directory):
      params, summary = self._trainer.train(
          directory, config=config, settings=settings,
          task=settings.mixture_or_task_name or task,
          init_params=None if init is None else self.params(init),
          router_warmup=router_warmup, dropping=dropping)
      return params, {**summary, "checkpoint": "checkpoints"}
    return self._run_model_stage(name, key, run, depends_on=[] if init is None else [init])

  def pretrained(self, num_experts: int) -> cache_lib.Stage:
    """The pretrained (and, if configured, pre-finetuned) model with `num_experts`."""
    cfg = self.config
    model = self._model_config(num_experts)
    stage = self._train_stage(
        f"pretrain-{self._model_slug(num_experts)}",
        {"model": model, "train": _settings_key(cfg.pretrain), "seed": cfg.seed},
        config=model, settings=cfg.pretrain, task=None, init=None)
    if cfg.prefinetune is None:
      return stage
    return self._train_stage(
        f"prefinetune-{self._model_slug(num_experts)}",
        {"train": _settings_key(cfg.prefinetune), "seed": cfg.seed},
        config=model, settings=cfg.prefinetune, task=None, init=stage)

  def finetuned(self, task: StudyTask, init: cache_lib.Stage, label: str, *,
                num_experts: int, router_warmup: bool = False,
                dropping: schedules.ProgressiveDropping | None = None) -> cache_lib.Stage:
    """`init` finetuned on `task` (pruned models: router warm-up first).

    `num_experts` is the model's expert count before any dropping; pruned params bring
    their own counts (per layer for MC-SMoE).
    """
    cfg = self.config
    settings = cfg.finetune_settings(task)
    key = {"task": task.name, "train": _settings_key(settings), "seed": cfg.seed,
           "router_warmup": router_warmup,
           "dropping": None if dropping is None else dataclasses.asdict(dropping)}
    return self._train_stage(f"finetune-{label}-{task.name}", key,
                             config=self._model_config(num_experts), settings=settings,
                             task=task.name, init=init, router_warmup=router_warmup,
                             dropping=dropping)

  # ----------------------------------------------------------------------------------------
  # Logits, pruning, scores.

  def _batches(self, task: StudyTask) -> list:
    if task.name not in self._task_batches:
      cfg = self.config
      self._task_batches[task.name] = stages.task_batches(
          task=task.name, settings=cfg.finetune, batch_size=cfg.eval_batch_size,
          max_tokens=max(cfg.logits_max_tokens, cfg.usage_max_tokens))
    return self._task_batches[task.name]

  def router_logits(self, task: StudyTask, base: cache_lib.Stage,
                    num_experts: int) -> cache_lib.Stage:
    """A source's router logits on the task's training tokens (`logits.npz`)."""
    cfg = self.config

    def run(directory):
      logits = stages.router_logits(self._model_config(num_experts), self.params(base),
                                    self._batches(task), max_tokens=cfg.logits_max_tokens)
      stages.save_logits(os.path.join(directory, "logits.npz"), logits)
      return {"tokens": int(next(iter(logits.values())).shape[0]),
              "usage": stages.expert_usage(logits, cfg.model.top_k)}
    key = {"task": task.name, "max_tokens": cfg.logits_max_tokens,
           "batch_size": cfg.eval_batch_size,
           "feature_lengths": dict(cfg.finetune.task_feature_lengths), "pack": cfg.finetune.pack}
    return self.cache.run(f"logits-e{num_experts}-{task.name}", key, run, depends_on=[base])

  def pruned(self, task: StudyTask, spec: MethodSpec, source: int, num_experts: int, *,
             base: cache_lib.Stage, logits: cache_lib.Stage,
             source_finetuned: cache_lib.Stage) -> cache_lib.Stage:
    """A source pruned to `num_experts` by `spec` (router_norm: the finetuned source)."""
    cfg = self.config
    from_finetuned = spec.method == "router_norm"
    pruned_stage = source_finetuned if from_finetuned else base

    def run(directory):
      params, summary = stages.prune_model(
          directory, params=self.params(pruned_stage),
          logits=stages.load_logits(logits.path("logits.npz")),
          num_experts=num_experts, method=spec.method, router=spec.router, seed=cfg.seed,
          init_std=cfg.model.init_std, top_k=cfg.model.top_k,
          pretrained_params=self.params(base) if from_finetuned else None)
      return params, {**summary, "checkpoint": stages.PARAMS_DIR}
    key = {"method": spec.method, "router": spec.router, "num_experts": num_experts,
           "seed": cfg.seed, "init_std": cfg.model.init_std, "top_k": cfg.model.top_k}
    inputs = [base, logits] + ([source_finetuned] if from_finetuned else [])
    return self._run_model_stage(f"prune-{spec.slug}-e{source}to{num_experts}-{task.name}",
                                 key, run, depends_on=inputs)

  def _scorer(self, task: StudyTask) -> Callable:
    if task not in self._scorers:
      cfg = self.config
      lengths = dict(cfg.finetune.task_feature_lengths)
      if task.eval_task is None:
        self._scorers[task] = stages.LossScorer(
            task=task.name, task_feature_lengths=lengths, pack=cfg.finetune.pack,
            batch_size=cfg.eval_batch_size, max_batches=cfg.eval_batches,
            mesh=cfg.runtime.mesh)
      else:
        self._scorers[task] = stages.TaskScorer(
            eval_task=task.eval_task, task_feature_lengths=lengths,
            num_examples=cfg.eval_num_examples, batch_size=cfg.eval_batch_size,
            mesh=cfg.runtime.mesh)
    return self._scorers[task]

  def scored(self, task: StudyTask, model: cache_lib.Stage) -> cache_lib.Stage:
    """Metrics of a model stage on the task, and its expert usage on the task's tokens."""
    cfg = self.config
    metric = cfg.task_metric(task)

    def run(directory):
      del directory  # The result is the whole output.
      params = self.params(model)
      config = stages.model_config(cfg.model, params)
      metrics = self._scorer(task)(config, params)
      if metric not in metrics:
        raise ValueError(f"metric {metric!r} is not among the metrics {sorted(metrics)} of "
                         f"{task}; set the task's metric ('task:eval_task:metric')")
      usage = None
      if config.num_experts:
        usage = stages.expert_usage(stages.router_logits(
            config, params, self._batches(task), max_tokens=cfg.usage_max_tokens), config.top_k)
      return {"metrics": metrics, "score": metrics[metric], "usage": usage}
    key = {"task": dataclasses.asdict(task), "metric": metric,
           "num_examples": cfg.eval_num_examples, "eval_batches": cfg.eval_batches,
           "batch_size": cfg.eval_batch_size, "usage_max_tokens": cfg.usage_max_tokens,
           "feature_lengths": dict(cfg.finetune.task_feature_lengths)}
    return self.cache.run(f"score-{model.name}", key, run, depends_on=[model])

  # ----------------------------------------------------------------------------------------
  # The whole study.

  def run(self) -> list[report.ResultRow]:
    """Runs (or reads from the cache) every stage; returns and keeps the result rows."""
    cfg = self.config
    sizes = set(cfg.source_experts) | {d for _, d in cfg.pairs}
    sizes = sorted(sizes | ({0} if cfg.dense_reference else set()))
    bases = {e: self.pretrained(e) for e in sizes}
    self.rows, self.figures = [], {}
    for task in cfg.tasks:
      logging.info("Study %s: task %s", cfg.name, task.name)
      finetuned = {e: self.finetuned(task, bases[e], self._model_slug(e), num_experts=e)
                   for e in sizes}
      for e in sizes:
        self._add_row(task, self.scored(task, finetuned[e]),
                      kind="dense" if e == 0 else "scratch", num_experts=e)
      for source in cfg.source_experts:
        self._prune_source(task, source, bases[source], finetuned[source])
    return self.rows

  def _prune_source(self, task: StudyTask, source: int, base: cache_lib.Stage,
                    source_finetuned: cache_lib.Stage) -> None:
    cfg = self.config
    logits = self.router_logits(task, base, source)
    sizes = [d for e, d in cfg.pairs if e == source]
    if task.name not in self.figures and sizes:
      self.figures[task.name] = TaskFigures(source, sizes[0], logits, logits.result["usage"])
    figures = self.figures.get(task.name)
    shown = figures is not None and figures.source_experts == source
    for size in sizes:
      for spec in cfg.methods:
        label = f"{spec.slug}-e{source}to{size}"
        before = None
        if spec.method == PROGRESSIVE_DROPPING:
          trained = self.finetuned(task, base, label, num_experts=source,
                                   dropping=dataclasses.replace(cfg.dropping,
                                                                target_experts=size))
        else:
          pruned = self.pruned(task, spec, source, size, base=base, logits=logits,
                               source_finetuned=source_finetuned)
          before = self.scored(task, pruned)
          trained = self.finetuned(task, pruned, label, num_experts=size, router_warmup=True)
          if shown and size == figures.num_experts and spec.method == "uncurl" \
              and figures.clusters is None:
            figures.clusters = pruned.result
        after = self.scored(task, trained)
        self._add_row(task, after, kind="pruned", num_experts=size, source=source, spec=spec,
                      before=before)
        if shown and size == figures.num_experts and after.result["usage"] is not None:
          figures.usage_after[self.rows[-1].model] = after.result["usage"]

  def _add_row(self, task: StudyTask, scored: cache_lib.Stage, *, kind: str,
               num_experts: int, source: int = 0, spec: MethodSpec | None = None,
               before: cache_lib.Stage | None = None) -> None:
    self.rows.append(report.ResultRow(
        task=task.name, kind=kind, num_experts=num_experts, source_experts=source,
        method="" if spec is None else spec.method,
        router="" if spec is None else spec.router or "",
        score=float(scored.result["score"]),
        score_before_finetune=None if before is None else float(before.result["score"]),
        metric=self.config.task_metric(task), seed=self.config.seed))

  def source_similarity(self, task: str) -> dict[str, np.ndarray]:
    """{MoE layer: [E, E] router-logit similarity of the plotted source on the task}."""
    logits = self.figures[task].logits
    return {name: features.router_similarity(h)
            for name, h in stages.load_logits(logits.path("logits.npz")).items()}
