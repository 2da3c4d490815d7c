"""Configuration of the study: what to train, prune, finetune and score.

`StudyConfig` is bound by gin in `python -m uncurl_jax.study` (gin/experiments/*.gin);
`TrainSettings` describes one training procedure (pretraining, pre-finetuning,
finetuning), `Runtime` how stages run (mesh, checkpoint period), `MethodSpec` and
`StudyTask` parse the method and task strings of the config. Everything that changes a
result enters the stage keys of `study.runner`; `Runtime` does not.

Example:
  >>> config = StudyConfig(
  ...     name="mini", output_dir="/tmp/study", model=configs.get("tiny", num_experts=8),
  ...     tasks=["synthetic_lm_geography"],
  ...     pretrain=TrainSettings(task_feature_lengths={"targets": 128}, steps=300,
  ...                            batch_size=16, learning_rate=3e-3,
  ...                            mixture_or_task_name="synthetic_lm"),
  ...     finetune=TrainSettings(task_feature_lengths={"targets": 128}, steps=80,
  ...                            batch_size=16, learning_rate=1e-3, router_warmup_steps=10),
  ...     source_experts=[32], pruned_experts=[8], methods=["uncurl:reinit", "frequency"])
  >>> config.pairs
  ((32, 8),)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Sequence

import jax

from uncurl_jax import checks
from uncurl_jax import pruning
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import partitioning
from uncurl_jax.pruning import methods as pruning_methods
from uncurl_jax.study import arms
from uncurl_jax.train import optim
from uncurl_jax.train import schedules

PROGRESSIVE_DROPPING = arms.PROGRESSIVE_DROPPING
# The ceiling arm (approximate: a greedy choice): per layer the experts chosen greedily to
# score best on the task's development split (`pruning.greedy_selection`), kept with their
# router columns bound.
ORACLE = arms.ORACLE
STUDY_ARMS = tuple(arms.STUDY_ARMS)  # arms that are not pruning methods
DEFAULT_METHODS = ("uncurl:reinit", "uncurl:anchor", "uncurl:merge", "frequency",
                   "frequency_merge", "mc_smoe", "router_norm", "random", PROGRESSIVE_DROPPING)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """One training procedure of the study (pretraining, pre-finetuning or finetuning).

  Everything here changes the trained model, so all of it enters the stage key.

  Attributes:
    task_feature_lengths: seqio feature lengths, e.g. {"targets": 128} for LM data or
      {"inputs": 112, "targets": 16} for prompts.
    steps: Training steps.
    batch_size: Global batch size.
    learning_rate: Peak AdamW learning rate (linear warm-up, then linear decay to 0).
    warmup_steps: Learning-rate warm-up steps.
    weight_decay: AdamW weight decay (matrices only).
    mixture_or_task_name: seqio data; None means the study's target task (finetuning).
    pack: Pack several examples per row.
    router_warmup_steps: Router-only steps that start the finetuning of a pruned model
      (the paper's warm-up; other models train fully for all `steps`); equal to `steps`,
      a router-only run.
    router_warmup_learning_rate: Peak learning rate of those steps.
  """

  task_feature_lengths: Mapping[str, int]
  steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int = 0
  weight_decay: float = 0.1
  mixture_or_task_name: str | None = None
  pack: bool = True
  router_warmup_steps: int = 0
  router_warmup_learning_rate: float | None = None

  def __post_init__(self):
    for name in ("steps", "batch_size"):
      checks.integer(f"TrainSettings.{name}", getattr(self, name), low=1)
    for name in ("warmup_steps", "router_warmup_steps"):
      checks.integer(f"TrainSettings.{name}", getattr(self, name), low=0)
    checks.real("TrainSettings.learning_rate", self.learning_rate, positive=True)
    checks.real("TrainSettings.weight_decay", self.weight_decay)
    if self.router_warmup_learning_rate is not None:
      checks.real("TrainSettings.router_warmup_learning_rate",
                    self.router_warmup_learning_rate, positive=True)
    if not 0 <= self.router_warmup_steps <= self.steps:
      raise ValueError(f"router_warmup_steps must be in [0, steps={self.steps}], got "
                       f"{self.router_warmup_steps}")
    if not 0 <= self.warmup_steps <= self.steps - self.router_warmup_steps:
      raise ValueError(f"warmup_steps must be in [0, steps - router_warmup_steps = "
                       f"{self.steps - self.router_warmup_steps}], got {self.warmup_steps}")
    pipeline.model_length(self.task_feature_lengths)  # validates the lengths

  @property
  def length(self) -> int:
    """Decoder sequence length (inputs and targets concatenated)."""
    return pipeline.model_length(self.task_feature_lengths)

  def make_optimizer(self):
    """`optim.make_optimizer` with these hyperparameters (the trainer adds the rest)."""
    return functools.partial(optim.make_optimizer, peak_learning_rate=self.learning_rate,
                             warmup_steps=self.warmup_steps, weight_decay=self.weight_decay)


@dataclasses.dataclass(frozen=True)
class Runtime:
  """Settings that change how stages run but not what they compute (not hashed).

  Attributes:
    expert_parallelism, model_parallelism: Mesh sizes ('data' takes the rest).
    checkpoint_every_steps: Checkpoint period of training stages (resume granularity).
    log_every_steps: Progress lines of training stages.
    max_cached_tokens: Training batches of a (task, procedure) are read once and kept in
      memory up to this many tokens, streamed beyond.
  """

  expert_parallelism: int = 1
  model_parallelism: int = 1
  checkpoint_every_steps: int = 100
  log_every_steps: int = 50
  max_cached_tokens: int = 1 << 26

  def __post_init__(self):
    for field in dataclasses.fields(self):
      checks.integer(f"Runtime.{field.name}", getattr(self, field.name), low=1)

  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    return partitioning.make_mesh(expert=self.expert_parallelism, model=self.model_parallelism)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One pruning method of the study, written "method[:router[:features]]".

  `features` is what "uncurl" clusters on ("expert_outputs"; default: router logits).

  Example:
    >>> MethodSpec.parse("uncurl:merge")
    MethodSpec(method='uncurl', router='merge', features=None)
    >>> MethodSpec.parse("uncurl:anchor:expert_outputs").slug
    'uncurl-anchor-expert_outputs'
  """

  method: str
  router: str | None = None
  features: str | None = None

  @property
  def merges(self) -> bool:
    """Whether it is a pruning method that merges experts (not an arm of the study)."""
    return self.method not in arms.STUDY_ARMS and pruning_methods.get(self.method).merges

  @property
  def own_shapes(self) -> bool:
    """Whether its pruned models have shapes of their own (a bound router's column map,
    uneven expert counts), so each compiles its own steps."""
    if self.method in arms.STUDY_ARMS:
      return arms.STUDY_ARMS[self.method].own_shapes
    method = pruning_methods.get(self.method)
    return (self.router or method.default_router) == "bind" or method.uneven_counts

  @classmethod
  def parse(cls, text: str) -> MethodSpec:
    parts = str(text).split(":")
    method, router, features = (parts + [None, None])[:3]
    known = pruning_methods.names() + STUDY_ARMS
    if method not in known or len(parts) > 3:
      raise ValueError(f"unknown method {method!r} in {text!r}; expected one of {known}, "
                       "written 'method[:router[:features]]'")
    if router and (router not in pruning.ROUTER_MODES or method in STUDY_ARMS):
      raise ValueError(f"router option {router!r} in {text!r}: expected one of "
                       f"{pruning.ROUTER_MODES} after a pruning method")
    if features and (features not in pruning_methods.FEATURES or method in STUDY_ARMS
                     or not pruning_methods.get(method).takes_features):
      takers = [m for m in pruning_methods.names() if pruning_methods.get(m).takes_features]
      raise ValueError(f"features {features!r} in {text!r}: expected one of "
                       f"{pruning_methods.FEATURES} after a method that takes them "
                       f"({takers}), as 'method:router:features'")
    return cls(method, router or None, features or None)

  @property
  def slug(self) -> str:
    return "-".join(part for part in (self.method, self.router, self.features) if part)

  @property
  def router_used(self) -> str | None:
    """The router option its pruned models get: the one named, else the method's default
    (None for progressive dropping, which keeps the source's router)."""
    if self.method in arms.STUDY_ARMS:
      return arms.STUDY_ARMS[self.method].router or None
    return self.router or pruning_methods.get(self.method).default_router

  @property
  def options(self) -> str:
    """The row label's options: the router used and the features ('merge, expert_outputs')."""
    return ", ".join(part for part in (self.router_used, self.features) if part)

  @property
  def label(self) -> str:
    """The row label's method part, naming the router even where it is the method's
    default: 'uncurl (merge)', 'frequency (anchor)', 'frequency_merge (reinit)'."""
    return f"{self.method} ({self.options})" if self.options else self.method


@dataclasses.dataclass(frozen=True)
class StudyTask:
  """A target task, written "train_task[:eval_task[:metric]]".

  Without an eval task the score is the task's own validation metrics (language
  modelling: next-token 'accuracy' in %, 'cross_entropy'); with one, the eval task's
  seqio metrics (e.g. rank classification 'accuracy' of 'super_glue_rte_v102_rank').
  `metric` (default: `StudyConfig.metric`) picks the table's score among them.

  Example:
    >>> StudyTask.parse("super_glue_record_v102:super_glue_record_v102_rank:exact_match")
    StudyTask(name='super_glue_record_v102', eval_task='super_glue_record_v102_rank',
              metric='exact_match')
  """

  name: str
  eval_task: str | None = None
  metric: str | None = None

  @classmethod
  def parse(cls, text: str) -> StudyTask:
    parts = str(text).split(":")
    if not parts[0] or len(parts) > 3:
      raise ValueError(f"task spec {text!r}: expected 'task', 'task:eval_task' or "
                       "'task:eval_task:metric'")
    parts += [""] * (3 - len(parts))
    return cls(parts[0], parts[1] or None, parts[2] or None)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """Everything the study does (bound by gin in `python -m uncurl_jax.study`).

  Attributes:
    name: Study name (the report's title).
    output_dir: Where results.csv, results.md and the plots go.
    model: The model; `num_experts` is replaced per model (E, D, 0).
    tasks: Target tasks ("task" or "task:eval_task", see `StudyTask`).
    pretrain: Pretraining (its `mixture_or_task_name` is required).
    finetune: Task finetuning (data: the task); its `router_warmup_*` fields apply to
      pruned models.
    prefinetune: Optional pre-finetuning of every pretrained model, or None.
    source_experts: The E of each model that is pruned.
    pruned_experts: The D of the pruned models; every source is pruned to every smaller D
      (sources [32, 64, 128] and D [8, 32, 64] give the paper's six pairs).
    methods: "method" or "method:router" (`MethodSpec`); methods of `pruning.METHODS`
      plus "progressive_dropping" and "oracle" (the ceiling: needs `dev_tasks`).
    dense_reference: Also train and finetune a dense model.
    finetune_steps: Per-task finetuning steps ({task name: steps}, e.g. 50 epochs),
      overriding `finetune.steps`; its learning-rate warm-up is capped to fit.
    task_finetune: Per-task finetuning ({task name: TrainSettings}) replacing `finetune`
      for that task (a task learned in finetuning needs another learning rate and length
      than one whose knowledge is only kept); `finetune_steps` applies on top. The
      sequence lengths and packing of scoring stay `finetune`'s. Its
      `mixture_or_task_name`, if set, is the finetuning data instead of the task (e.g. a
      mixture of the task and replayed pretraining data); the task's own data still drives
      the pruning statistics and the expert usage.
    dropping: Progressive dropping schedule; its `target_experts` is set to each D.
    seeds: Seeds of initialization, data order, clustering and re-initialized routers;
      every model and arm is run once per seed, and the report gives means and standard
      errors over them.
    router_norm_probe_fraction: `router_norm` needs a finetuned router: it finetunes the
      source for this fraction of the full-parameter steps, prunes, and finetunes the
      pruned model for the rest, so its budget equals every other arm's.
    score_dropless: Score with no token dropped for capacity (the task's few topics
      overload their experts at the evaluation capacity factor); the score at the model's
      evaluation capacity is reported too, as '<metric>_at_capacity'.
    stages_dir: Stage cache root (None: `output_dir/stages`); studies that share it share
      the stages they have in common.
    metric: Score of the table; `lower_is_better` flips the +/- marks.
    eval_num_examples: seqio `num_examples` of eval tasks (rows; rank tasks have one per
      option); None: the whole split.
    eval_batches: Validation batches of tasks scored by their LM metrics, and of the
      development split the oracle arm selects on (None: all).
    eval_batch_size: Rows per scoring forward pass.
    logits_max_tokens: Task tokens whose router logits drive pruning.
    usage_max_tokens: Task tokens of the expert-usage histograms.
    dev_tasks: {task name: its development task} (a seqio task whose validation split is
      disjoint from the scored items, e.g. 'facts_task_dev'), on which the oracle arm
      selects its experts.
    runtime: Mesh, checkpoint period and logging (not part of any stage key).
  """

  name: str
  output_dir: str
  model: configs.ModelConfig
  tasks: Sequence[str]
  pretrain: TrainSettings
  finetune: TrainSettings
  prefinetune: TrainSettings | None = None
  source_experts: Sequence[int] = (32,)
  pruned_experts: Sequence[int] = (8,)
  methods: Sequence[str] = DEFAULT_METHODS
  dense_reference: bool = True
  finetune_steps: Mapping[str, int] = dataclasses.field(default_factory=dict)
  task_finetune: Mapping[str, TrainSettings] = dataclasses.field(default_factory=dict)
  dropping: schedules.ProgressiveDropping | None = None
  seeds: Sequence[int] = (0,)
  router_norm_probe_fraction: float = 0.5
  score_dropless: bool = False
  stages_dir: str | None = None
  metric: str = "accuracy"
  lower_is_better: bool = False
  eval_num_examples: int | None = None
  eval_batches: int | None = 8
  eval_batch_size: int = 32
  logits_max_tokens: int = 16384
  usage_max_tokens: int = 4096
  dev_tasks: Mapping[str, str] = dataclasses.field(default_factory=dict)
  runtime: Runtime = Runtime()

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(StudyTask.parse(t) for t in self.tasks))
    object.__setattr__(self, "methods", tuple(MethodSpec.parse(m) for m in self.methods))
    object.__setattr__(self, "source_experts", tuple(self.source_experts))
    object.__setattr__(self, "pruned_experts", tuple(self.pruned_experts))
    object.__setattr__(self, "finetune_steps", dict(self.finetune_steps))
    object.__setattr__(self, "task_finetune", dict(self.task_finetune))
    object.__setattr__(self, "dev_tasks", dict(self.dev_tasks))
    object.__setattr__(self, "seeds", tuple(self.seeds))
    self._check_types()
    if not self.tasks:
      raise ValueError("StudyConfig.tasks is empty; give at least one target task")
    if not self.methods:
      raise ValueError("StudyConfig.methods is empty; give at least one pruning method")
    for name in ("source_experts", "pruned_experts"):
      counts = getattr(self, name)
      if not counts or min(counts) < 1:
        raise ValueError(f"StudyConfig.{name} must be a non-empty list of expert counts "
                         f">= 1, got {list(counts)}")
    unused = [d for d in self.pruned_experts if d >= max(self.source_experts)]
    if unused:
      raise ValueError(f"pruned_experts {unused} are not below any source_experts "
                       f"{list(self.source_experts)}")
    for name in ("finetune_steps", "task_finetune"):
      unknown = sorted(set(getattr(self, name)) - {t.name for t in self.tasks})
      if unknown:
        raise ValueError(f"{name} names tasks {unknown} that are not in tasks")
    for name, settings in self.task_finetune.items():
      if not isinstance(settings, TrainSettings):
        raise TypeError(f"StudyConfig.task_finetune[{name!r}] must be a TrainSettings, got "
                        f"{type(settings).__name__}")
      if (settings.task_feature_lengths != self.finetune.task_feature_lengths
          or settings.pack != self.finetune.pack):
        raise ValueError(f"StudyConfig.task_finetune[{name!r}] must keep finetune's "
                         f"task_feature_lengths {dict(self.finetune.task_feature_lengths)} "
                         f"and pack={self.finetune.pack} (scoring uses them)")
    for task in self.tasks:
      settings = self.finetune_settings(task)  # validates per-task steps
      if settings.steps - settings.router_warmup_steps < 2:
        raise ValueError(f"finetuning {task.name} for {settings.steps} steps with "
                         f"{settings.router_warmup_steps} router warm-up steps leaves "
                         f"{settings.steps - settings.router_warmup_steps} full-parameter "
                         "steps; a pruned arm needs at least 2 (router_norm: a probe and a "
                         "rest)")
    if self.pretrain.mixture_or_task_name is None:
      raise ValueError("StudyConfig.pretrain needs a mixture_or_task_name (the LM data)")
    if self.finetune.mixture_or_task_name is not None:
      raise ValueError("StudyConfig.finetune trains on each target task: leave its "
                       f"mixture_or_task_name None, got {self.finetune.mixture_or_task_name!r}")
    lengths = [self.pretrain.length, self.finetune.length]
    if max(lengths) > self.model.max_length:
      raise ValueError(f"sequence lengths {lengths} exceed model.max_length="
                       f"{self.model.max_length}")
    if any(m.method == PROGRESSIVE_DROPPING for m in self.methods):
      self._check_dropping()
    unknown = sorted(set(self.dev_tasks) - {t.name for t in self.tasks})
    if unknown:
      raise ValueError(f"dev_tasks names tasks {unknown} that are not in tasks")
    if any(m.method == ORACLE for m in self.methods):
      lacking = [t.name for t in self.tasks if t.name not in self.dev_tasks]
      if lacking:
        raise ValueError(f"the oracle arm selects on a development split: give dev_tasks "
                         f"for {lacking} (e.g. {{'facts_task': 'facts_task_dev'}})")

  def _check_types(self):
    for name, kind in (("model", configs.ModelConfig), ("pretrain", TrainSettings),
                       ("finetune", TrainSettings), ("runtime", Runtime)):
      if not isinstance(getattr(self, name), kind):
        raise TypeError(f"StudyConfig.{name} must be a {kind.__name__}, got "
                        f"{type(getattr(self, name)).__name__}")
    if self.prefinetune is not None and not isinstance(self.prefinetune, TrainSettings):
      raise TypeError("StudyConfig.prefinetune must be a TrainSettings or None")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"StudyConfig.seeds must be distinct seeds, got {list(self.seeds)}")
    for seed in self.seeds:
      checks.integer("StudyConfig.seeds[i]", seed, low=0)
    if not 0.0 < checks.real("StudyConfig.router_norm_probe_fraction",
                               self.router_norm_probe_fraction) < 1.0:
      raise ValueError(f"StudyConfig.router_norm_probe_fraction must be in (0, 1), got "
                       f"{self.router_norm_probe_fraction}")
    for name in ("eval_batch_size", "logits_max_tokens", "usage_max_tokens"):
      checks.integer(f"StudyConfig.{name}", getattr(self, name), low=1)
    for name in ("eval_batches", "eval_num_examples"):
      if getattr(self, name) is not None:
        checks.integer(f"StudyConfig.{name}", getattr(self, name), low=1)

  def _check_dropping(self):
    if self.dropping is None:
      raise ValueError("method 'progressive_dropping' needs StudyConfig.dropping")
    steps = min(self.finetune_settings(task).steps for task in self.tasks)
    for source, size in self.pairs:
      schedule = dataclasses.replace(self.dropping, target_experts=size).schedule(
          num_experts=source)
      if schedule[-1][0] >= steps:
        raise ValueError(f"progressive dropping {source} -> {size} experts ends at step "
                         f"{schedule[-1][0]}, not before the finetuning's {steps} steps; "
                         "shorten the dropping schedule")

  @property
  def pairs(self) -> tuple[tuple[int, int], ...]:
    """(E, D) for every source and every smaller pruned size."""
    return tuple((e, d) for e in self.source_experts for d in self.pruned_experts if d < e)

  def finetune_settings(self, task: StudyTask) -> TrainSettings:
    """The task's finetuning (`task_finetune`, else `finetune`) with its own steps
    (`finetune_steps`), warm-up capped to fit."""
    settings = self.task_finetune.get(task.name, self.finetune)
    steps = self.finetune_steps.get(task.name)
    if steps is None:
      return settings
    room = max(0, steps - settings.router_warmup_steps)
    return dataclasses.replace(settings, steps=steps,
                               warmup_steps=min(settings.warmup_steps, room))

  def task_metric(self, task: StudyTask) -> str:
    return task.metric or self.metric

  def check_runnable(self) -> None:
    """Checks what needs the environment, before any stage: the seqio tasks and mixtures
    are registered and the output paths are directories (or not there yet)."""
    for settings in (self.pretrain, self.prefinetune):
      if settings is not None and settings.mixture_or_task_name is not None:
        pipeline.check_task(settings.mixture_or_task_name, "a training mixture")
    for task in self.tasks:
      pipeline.check_task(task.name, "a study task")
      data = self.finetune_settings(task).mixture_or_task_name
      if data is not None:
        pipeline.check_task(data, f"the finetuning data of {task.name}")
      if task.name in self.dev_tasks:
        pipeline.check_task(self.dev_tasks[task.name], f"the development task of {task.name}")
      if task.eval_task is not None:
        pipeline.check_task(task.eval_task, f"the eval task of {task.name}")
    for name in ("output_dir", "stages_dir"):
      path = getattr(self, name)
      if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"StudyConfig.{name}={path!r} is a file, expected a directory")
