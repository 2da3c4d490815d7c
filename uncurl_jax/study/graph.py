"""The study's stage builders: every stage a study plans, with its key, inputs and cost.

`StageGraph` turns "pretrain an 8-expert model", "prune this source with that method",
"score this model" into `cache.StageSpec`s (what `study.arms` composes into rows), and
keeps what finished stages produced: their results and, for model stages, their params
(the newest few in memory, older ones restored from disk when needed again). Training
stages train through `study.training.StageTrainer` (itself `train.builder.Run`); the
other stages' work is `study.stages.StageWork`.

Example:
  >>> graph = StageGraph(config)
  >>> base = graph.pretrained(32, seed=0)
  >>> tuned = graph.finetuned(task, base, "e32", num_experts=32, seed=0)
  >>> graph.finished(tuned).result["final_loss"]
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable

from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.pruning import methods as pruning_methods
from uncurl_jax.study import arms
from uncurl_jax.study import cache as cache_lib
from uncurl_jax.study import stages
from uncurl_jax.study import training
from uncurl_jax.study.config import MethodSpec
from uncurl_jax.study.config import StudyConfig
from uncurl_jax.study.config import StudyTask
from uncurl_jax.study.config import TrainSettings
from uncurl_jax.study.progress import Progress

StageSpec = cache_lib.StageSpec


class StageGraph:
  """The stage builders of a `StudyConfig` and the outputs of its finished stages.

  Attributes:
    config: The study.
    cache: The stage cache (its `events` tell what ran, resumed or was skipped).
    done: {stage key: the finished `cache.Stage`} of this process.
    work: The non-training stages' work (`stages.StageWork`: statistics, pruning, scores).
    progress: The progress bar training stages advance, while a run is under way.
  """

  def __init__(self, config: StudyConfig):
    self.config = config
    self.cache = cache_lib.StageCache(config.stages_dir
                                      or os.path.join(config.output_dir, "stages"))
    self.done: dict[str, cache_lib.Stage] = {}
    self._params: collections.OrderedDict[str, Any] = collections.OrderedDict()
    self.work = stages.StageWork(config)  # the non-training stages' work
    runtime = config.runtime
    self._trainer = training.StageTrainer(
        mesh=runtime.mesh, checkpoint_every_steps=runtime.checkpoint_every_steps,
        log_every_steps=runtime.log_every_steps, max_cached_tokens=runtime.max_cached_tokens,
        unit_tokens=config.pretrain.batch_size * config.pretrain.length)
    self.progress: Progress | None = None

  # ----------------------------------------------------------------------------------------
  # Outputs of finished stages.

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
      try:
        params = self._restore(stage, spec)
      except (OSError, ValueError) as e:
        # A damaged stage (its checkpoint does not restore: file and tensorstore errors;
        # other errors are bugs and propagate): reported, emptied, run again.
        self.cache.repair(stage, f"its checkpoint does not restore ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})")
        del self.done[spec.key]
        stage = self.finished(spec)  # runs again; a model stage keeps its params in memory
        params = self._params.get(spec.key)
        if params is None:
          params = self._restore(stage, spec)
      self._remember(spec.key, params)
    return self._params[spec.key]

  def _restore(self, stage: cache_lib.Stage, spec: StageSpec) -> Any:
    return stages.restore_params(stage.path(stage.result["checkpoint"]),
                                 config=self.model_config(spec), mesh=self.config.runtime.mesh)

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
    # A mixture's composition: a mixture re-registered under its name with other tasks or
    # rates trains another model (a task is known by its name).
    data = settings.mixture_or_task_name or task
    rates = None if data is None else pipeline.mixture_rates(data)
    if rates is not None:
      key["mixture"] = rates
    # A trainer per (model shape, settings, procedure), as `training.StageTrainer` keeps
    # them: its steps compile once.
    compile_key = ("train", num_experts if shape is None else shape,
                   cache_lib.config_key(dataclasses.asdict(settings)), warmup,
                   dropping is not None)
    return self._model_stage(name, key, run, inputs=[] if init is None else [init],
                             cost=self.work.train_cost(settings), kind="train",
                             compile_key=compile_key,
                             compile_cost=self.work.train_compile_cost())

  def pretrained(self, num_experts: int, seed: int) -> StageSpec:
    """The pretrained (and, if configured, pre-finetuned) model with `num_experts`."""
    cfg, slug = self.config, arms.slug(num_experts)
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
    if self.progress is not None:
      self.progress.advance(units)

  # ----------------------------------------------------------------------------------------
  # Statistics, pruning, scores.

  def task_stats(self, task: StudyTask, base: StageSpec, num_experts: int,
                 seed: int) -> StageSpec:
    """A source's task statistics (router logits and expert statistics, `stats.npz`)."""
    def work(directory):
      return self.work.collect_stats(directory, task, self.model_config(base),
                                      self.params(base))
    return self.cache.plan(f"stats-e{num_experts}-{task.name}", self.work.stats_key(task),
                           work, inputs=[base], cost=self.work.stats_cost(), kind="stats")

  def oracle_selected(self, task: StudyTask, source: StageSpec, pair: tuple[int, int]
                      ) -> StageSpec:
    """The oracle arm's experts for `source` at E -> D, chosen on the development split."""
    def work(directory):
      return self.work.oracle_select(directory, task, self.model_config(source),
                                      self.params(source), pair[1])
    layers = len(configs.with_expert_counts(self.config.model, pair[0]).moe_layers)
    return self.cache.plan(f"oracle-e{pair[0]}to{pair[1]}-{task.name}",
                           self.work.oracle_key(task, pair[1]), work, inputs=[source],
                           cost=self.work.oracle_cost(pair[1], pair[0], layers),
                           kind="prune", compile_key=("oracle", pair[0]),
                           compile_cost=self.work.score_compile_cost())

  def pruned(self, task: StudyTask, method: MethodSpec, pair: tuple[int, int], seed: int, *,
             source: StageSpec, stats: StageSpec, pretrained: StageSpec | None = None,
             selected: StageSpec | None = None) -> StageSpec:
    """`source` pruned E -> D (`pair`) by `method` (a method that needs the pretrained
    router: also `pretrained`; the oracle: the experts `selected` chose)."""
    def run(directory):
      params, summary = self.work.prune(
          directory, params=self.params(source), config=self.model_config(source),
          stats_dir=stats.directory, method=method, num_experts=pair[1], seed=seed,
          pretrained_params=None if pretrained is None else self.params(pretrained),
          selection=None if selected is None else self.finished(selected).result["selection"])
      params = stages.place_params(params, config=configs.from_dict(summary["model_config"]),
                                   mesh=self.config.runtime.mesh)
      return params, {**summary, "checkpoint": stages.PARAMS_DIR}
    key = self.work.prune_key(method, pair[1], seed)
    inputs = ([source, stats] + ([] if pretrained is None else [pretrained])
              + ([] if selected is None else [selected]))
    return self._model_stage(f"prune-{method.slug}-e{pair[0]}to{pair[1]}-{task.name}", key,
                             run, inputs=inputs, kind="prune",
                             cost=self.work.prune_cost(
                                 pruning_methods.SELECTION if selected else method.method))

  def scored(self, task: StudyTask, model: StageSpec, shape: Any) -> StageSpec:
    """Metrics of a model stage on the task, and its expert usage on the task's tokens
    (`shape`: the model's shapes for the progress estimate, see `_train`)."""
    def work(directory):
      return self.work.score(directory, task, self.model_config(model), self.params(model))
    return self.cache.plan(f"score-{model.name}", self.work.score_key(task), work,
                           inputs=[model], cost=self.work.score_cost(), kind="score",
                           compile_key=("score", shape),
                           compile_cost=self.work.score_compile_cost())

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
