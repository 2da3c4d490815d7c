"""The work of each study stage besides training: task statistics, pruning, scores.

`study.runner` decides which stages run and caches them (`study.cache`); training is
`study.training.StageTrainer`; `StageWork` does the other stages' work with the
project's modules: statistics through `pruning.collect_expert_stats`, pruning through
`pruning.plan_pruning` / `apply_plan`, scores through seqio's Evaluator with
`evaluation.ModelOutputs` (rank classification), through `evaluation.evaluate_loss`
(language modelling, and the answer accuracy of the knowledge tasks) or through
`study.recall_judge` (the property tasks: recall the fact, then judge it). One compiled
scorer per expert count serves every model scored. It also knows each stage's settings
(its key) and an estimate of its cost (for progress and the ETA).

Example:
  >>> work = StageWork(study_config)
  >>> result = work.collect_stats("/tmp/stats", task, 32, params)      # stats.npz
  >>> small, summary = work.prune("/tmp/prune", params=params, stats_dir="/tmp/stats",
  ...                             method=MethodSpec("uncurl", "merge"), num_experts=8, seed=0)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import forward as forward_lib
from uncurl_jax.model import inputs as inputs_lib
from uncurl_jax.model import partitioning
from uncurl_jax.model import router as router_lib
from uncurl_jax.pruning import features
from uncurl_jax.pruning import methods as pruning_methods
from uncurl_jax.study import compiled
from uncurl_jax.study import recall_judge
from uncurl_jax.tasks import facts as fact_tasks
from uncurl_jax.tasks import metrics as metrics_lib
from uncurl_jax.train import checkpoints
from uncurl_jax.train import evaluation
from uncurl_jax.train import state as state_lib
from uncurl_jax.train import step as step_lib

PARAMS_DIR = "params"  # a pruned model's params-only checkpoint, inside its stage directory


# ------------------------------------------------------------------------------------------
# Params.


def restore_params(checkpoint_dir: str, *, config: configs.ModelConfig,
                   mesh: jax.sharding.Mesh) -> Any:
  """Params of a finished stage (a training run's directory or a params-only checkpoint)
  of the model `config` (the stage's own)."""
  directory = checkpoints.resolve_checkpoint_dir(checkpoint_dir)
  return checkpoints.restore_params(directory, abstract_params=_abstract_params(config, mesh))


def _abstract_params(config: configs.ModelConfig, mesh: jax.sharding.Mesh) -> Any:
  return state_lib.abstract_params(decoder.SMoEDecoder(config),
                                   batch_shape=forward_lib.init_batch_shape(config), mesh=mesh)


def place_params(params: Any, *, config: configs.ModelConfig, mesh: jax.sharding.Mesh) -> Any:
  """`params` (host arrays, e.g. a pruned model's) placed as training and restoring place
  the params of the model `config`, so they reuse the steps and scorers compiled for those
  (host inputs would compile their own)."""
  return jax.tree.map(lambda spec, value: jax.device_put(np.asarray(value, spec.dtype),
                                                         spec.sharding),
                      _abstract_params(config, mesh), params)


# ------------------------------------------------------------------------------------------
# Task statistics.


def task_batches(*, task: str, settings: Any, batch_size: int,
                 max_tokens: int) -> list[dict[str, np.ndarray]]:
  """The first training examples of `task` (fixed order), enough for `max_tokens` tokens."""
  length = settings.length
  max_batches = max(1, -(-max_tokens // (batch_size * length)) * 4)  # prompts are short
  return list(pipeline.eval_batches(mixture_or_task_name=task,
                                    task_feature_lengths=dict(settings.task_feature_lengths),
                                    batch_size=batch_size, split="train", pack=settings.pack,
                                    max_batches=max_batches))


def expert_usage(logits: Mapping[str, np.ndarray], top_k: int = 1) -> dict[str, list[float]]:
  """{MoE layer: [E] share of tokens routed to each expert (any of their top-k choices)}."""
  return {name: features.selection_frequencies(h, top_k).tolist() for name, h in logits.items()}


def top_choices(logits: Mapping[str, np.ndarray], config: configs.ModelConfig
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{MoE layer: (the expert each token's first choice reaches [T], its gate [T])}, routed
  as the model routes (`router.route_tokens` with the layer's own config: a bound router's
  map, E-way gates), without capacity."""
  out = {}
  for name, h in logits.items():
    layer = config.layer_config(configs.block_index(name))
    h = jnp.asarray(h, jnp.float32)[None]
    routing = router_lib.route_tokens(h, top_k=1, capacity=max(h.shape[1], 1),
                                      expert_map=layer.router_map)
    out[name] = (np.asarray(routing.expert_index[0, :, 0]), np.asarray(routing.gate[0, :, 0]))
  return out


STATS_FILE = "stats.npz"
ITEMS_FILE = "items.npy"  # a score stage's per-item scores (accuracy: 0 or 100)
_STATS_FIELDS = ("logits", "top1_counts", "topk_counts", "reap", "mean_output")


def save_stats(path: str, stats: Mapping[str, pruning.ExpertStats]) -> None:
  """Writes {layer: ExpertStats} to one npz file (member names: '<field>|<layer>')."""
  arrays = {f"{field}|{name.replace('/', ':')}": getattr(value, field)
            for name, value in stats.items() for field in _STATS_FIELDS}
  arrays.update({f"top_k|{name.replace('/', ':')}": np.asarray(value.top_k)
                 for name, value in stats.items()})
  np.savez(path, **arrays)


def load_stats(path: str) -> dict[str, pruning.ExpertStats]:
  """Reads `save_stats`'s file back."""
  with np.load(path) as archive:
    fields: dict[str, dict[str, Any]] = {}
    for member in archive.files:
      field, name = member.split("|", 1)
      fields.setdefault(name.replace(":", "/"), {})[field] = archive[member]
  return {name: pruning.ExpertStats(**{**values, "top_k": int(values["top_k"])})
          for name, values in fields.items()}


# ------------------------------------------------------------------------------------------
# Pruning.


def prune_model(directory: str, *, params: Any, config: configs.ModelConfig,
                stats: Mapping[str, pruning.ExpertStats], num_experts: int, method: Any,
                seed: int, pretrained_params: Any = None,
                selection: Mapping[str, Any] | None = None) -> tuple[Any, dict]:
  """Prunes `params` to `num_experts` per layer by `method` (a MethodSpec); writes the
  params and the plan.

  MC-SMoE allocates its experts globally, `num_experts` per layer on average, so its
  layers may keep different counts (the model then has `layer_num_experts`). Selection
  frequencies count every one of a token's `top_k` routed choices.

  Outputs: `directory/params` (a params-only checkpoint that finetuning starts from) and
  `directory/plan.json` (`PrunePlan.to_json`).

  Returns:
    (pruned params, JSON summary: router option used, experts kept per layer, the pruned
    model's config, per-layer labels and anchors).
  """
  host_params = jax.device_get(params)
  kwargs = {} if pretrained_params is None else {"pretrained_params": pretrained_params}
  if method.features is not None:
    kwargs["features"] = method.features
  name, count = method.method, num_experts
  if selection is not None:  # the oracle arm: keep the selected experts, router bound
    name, count, kwargs["selection"] = pruning_methods.SELECTION, None, selection
  plan = pruning.plan_pruning(host_params, stats, count, method=name,
                              router=method.router_used, seed=seed,
                              router_init_std=config.router_init_std or config.init_std,
                              top_k=config.top_k, **kwargs)
  small = pruning.apply_plan(host_params, plan)
  small_config = dataclasses.asdict(pruning.pruned_config(config, plan))
  with open(os.path.join(directory, "plan.json"), "w") as f:
    f.write(plan.to_json())
  checkpoints.save_params(os.path.join(directory, PARAMS_DIR), small,
                          metadata={"method": method.method, "router": plan.router,
                                    "model_config": small_config})
  summary = {"router": plan.router, "experts_per_layer": plan.num_experts,
             "model_config": small_config,
             "labels": {name: list(layer.labels) for name, layer in plan.layers.items()},
             "anchors": {name: list(layer.anchors) for name, layer in plan.layers.items()}}
  return small, summary


def scored_examples(name: str) -> int | None:
  """Examples in a seqio task's validation split, when its source knows without reading
  (so that a score computed on other items is not taken from the cache); None otherwise."""
  try:
    return int(seqio.get_mixture_or_task(name).num_input_examples("validation"))
  except Exception:  # pylint: disable=broad-except  (a TFDS source without metadata, ...)
    return None


class StageWork:
  """The work, settings (keys) and costs of the study's stages other than training.

  Costs are in units of one pretraining step (its tokens), for progress and the ETA.

  Args:
    config: The study's StudyConfig.
  """

  def __init__(self, config):
    self.config = config
    self._unit = config.pretrain.batch_size * config.pretrain.length
    self._batches: dict[str, list] = {}
    self._scorers: dict[Any, Any] = {}

  # Keys: everything that changes a stage's output.

  def stats_key(self, task) -> dict:
    cfg = self.config
    return {"task": task.name, "max_tokens": cfg.logits_max_tokens,
            "batch_size": cfg.eval_batch_size, "pack": cfg.finetune.pack,
            "feature_lengths": dict(cfg.finetune.task_feature_lengths)}

  def prune_key(self, method, num_experts: int, seed: int) -> dict:
    return {"method": dataclasses.asdict(method), "num_experts": num_experts, "seed": seed}

  def score_key(self, task) -> dict:
    cfg = self.config
    return {"task": dataclasses.asdict(task), "metric": cfg.task_metric(task),
            "num_examples": cfg.eval_num_examples, "eval_batches": cfg.eval_batches,
            "batch_size": cfg.eval_batch_size, "usage_max_tokens": cfg.usage_max_tokens,
            "feature_lengths": dict(cfg.finetune.task_feature_lengths),
            "dropless": cfg.score_dropless,
            "scored_examples": scored_examples(task.eval_task or task.name)}

  # Costs, in pretraining steps.

  def train_cost(self, settings) -> float:
    return settings.steps * settings.batch_size * settings.length / self._unit

  def stats_cost(self) -> float:
    return 2.0 * self.config.logits_max_tokens / self._unit

  def prune_cost(self, method: str) -> float:
    """Pruning by registered method `method`: aligning experts (Hungarian matching) is the
    expensive kind."""
    return 20.0 if pruning_methods.get(method).aligns else 5.0

  # Compiling a step or a scorer for a new shape, measured on the default study (2-core
  # CPU, shared): a train step ~40 s, a scorer ~20 s, a pretraining step ~0.13 s.

  def train_compile_cost(self) -> float:
    return 300.0

  def score_compile_cost(self) -> float:
    return 150.0

  def score_cost(self) -> float:
    cfg = self.config
    tokens = (cfg.eval_batches or 8) * cfg.eval_batch_size * cfg.finetune.length
    return (tokens * (2 if cfg.score_dropless else 1) + cfg.usage_max_tokens) / (3 * self._unit)

  # Work.

  def task_batches(self, task) -> list:
    """The first training batches of `task` (statistics and expert usage)."""
    if task.name not in self._batches:
      cfg = self.config
      self._batches[task.name] = task_batches(
          task=task.name, settings=cfg.finetune, batch_size=cfg.eval_batch_size,
          max_tokens=max(cfg.logits_max_tokens, cfg.usage_max_tokens))
    return self._batches[task.name]

  def collect_stats(self, directory: str, task, config: configs.ModelConfig,
                    params: Any) -> dict:
    """Writes a source's task statistics to `directory/stats.npz`; returns its usage."""
    stats = pruning.collect_expert_stats(decoder.SMoEDecoder(config), params,
                                         self.task_batches(task),
                                         max_tokens=self.config.logits_max_tokens,
                                         progress=False)
    save_stats(os.path.join(directory, STATS_FILE), stats)
    return {"tokens": next(iter(stats.values())).num_tokens,
            "usage": expert_usage({n: s.logits for n, s in stats.items()}, config.top_k)}

  def prune(self, directory: str, *, params: Any, config: configs.ModelConfig, stats_dir: str,
            method, num_experts: int, seed: int, pretrained_params: Any = None,
            selection: Mapping[str, Any] | None = None) -> tuple[Any, dict]:
    return prune_model(directory, params=params, config=config,
                       stats=load_stats(os.path.join(stats_dir, STATS_FILE)),
                       num_experts=num_experts, method=method, seed=seed,
                       pretrained_params=pretrained_params, selection=selection)

  def oracle_key(self, task, num_experts: int) -> dict:
    cfg = self.config
    dev_task = cfg.dev_tasks[task.name]
    return {"dev_task": dev_task, "num_experts": num_experts, "max_batches": cfg.eval_batches,
            "batch_size": cfg.eval_batch_size, "pack": cfg.finetune.pack,
            "feature_lengths": dict(cfg.finetune.task_feature_lengths),
            "dropless": True, "scored_examples": scored_examples(dev_task)}

  def oracle_cost(self, num_experts: int, source_experts: int, num_layers: int) -> float:
    calls = num_layers * sum(source_experts - d for d in range(num_experts))
    return 0.05 * calls  # ~7 ms per dev-split evaluation, in pretraining steps (~0.13 s)

  def oracle_select(self, directory: str, task, config: configs.ModelConfig, params: Any,
                    num_experts: int) -> dict:
    """The oracle arm's experts: per layer, `num_experts` chosen greedily to maximise the
    accuracy on the task's development split (its first `eval_batches` batches; ties: its
    mean log-likelihood), scored with the gates bound (`pruning.greedy_selection`); written
    to `directory/selection.json`."""
    cfg = self.config
    # Dropless: a mask over E columns routes like the bound D-expert model only when no
    # token is dropped (capacity is computed for E experts here, for D there).
    scored = dataclasses.replace(config, dropless=True)
    batches = list(pipeline.eval_batches(
        mixture_or_task_name=cfg.dev_tasks[task.name],
        task_feature_lengths=dict(cfg.finetune.task_feature_lengths),
        batch_size=cfg.eval_batch_size, split="validation", pack=cfg.finetune.pack,
        max_batches=cfg.eval_batches))
    model = decoder.SMoEDecoder(scored)

    @jax.jit
    def sums(params, masks, batch):
      logits = model.apply({"params": params, "routing": masks}, **inputs_lib.module_inputs(
          batch, inputs_bidirectional_attention=scored.inputs_bidirectional_attention),
                           enable_dropout=False)
      weights = batch["decoder_loss_weights"] > 0
      targets = batch["decoder_target_tokens"]
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
      correct = (jnp.argmax(logits, -1) == targets) & weights
      return jnp.stack([correct.sum(), weights.sum(), (target_log_probs * weights).sum()])

    found = model_lib.find_moe_layers(jax.device_get(params))
    layers = {name: found[name] for name in sorted(found, key=configs.block_index)}
    device_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]

    def score(masks):
      tree = {}
      for name, mask in masks.items():
        node = tree
        for part in name.split("/"):
          node = node.setdefault(part, {})
        node["column_mask"] = jnp.asarray(mask)
      total = sum(np.asarray(sums(params, tree, b)) for b in device_batches)
      return (float(total[0] / total[1]), float(total[2] / total[1]))
    kept, trace = pruning.greedy_selection(
        score, {name: w.num_experts for name, w in layers.items()},
        {name: num_experts for name in layers})
    result = {"selection": {name: list(experts) for name, experts in kept.items()},
              "dev_accuracy": 100.0 * trace[-1][2][0],
              "dev_items": int(sum((b["decoder_loss_weights"] > 0).sum() for b in batches)),
              "trace": [[name, int(expert), 100.0 * value[0]] for name, expert, value in trace]}
    with open(os.path.join(directory, "selection.json"), "w") as f:
      json.dump(result, f, indent=1)
    return result

  def score(self, directory: str, task, config: configs.ModelConfig, params: Any) -> dict:
    """The task's metrics (dropless when configured; then also at capacity) and usage; the
    per-item scores of an LM-scored task go to `directory/items.npy`."""
    cfg = self.config
    metric = cfg.task_metric(task)
    scorer = self._scorer(task)
    scored = dataclasses.replace(config, dropless=True) if (
        cfg.score_dropless and config.num_experts) else config
    metrics = scorer(scored, params)
    if scored is not config:
      metrics[f"{metric}_at_capacity"] = scorer(config, params)[metric]
    if metric == "accuracy" and scorer.has_items:
      # Per-item scores in the score's unit: 0 or 100 (%) per scored token (or example of a
      # rank-classification or recall-then-judge task).
      np.save(os.path.join(directory, ITEMS_FILE), 100.0 * scorer.items(scored, params))
    if metric not in metrics:
      raise ValueError(f"metric {metric!r} is not among the metrics {sorted(metrics)} of "
                       f"{task}; set the task's metric ('task:eval_task:metric')")
    usage = None
    if config.num_experts:
      logits = self.router_logits(task, config, params)
      usage = expert_usage(logits, config.top_k)
      gates = {name: float(np.mean(gate)) for name, (_, gate) in
               top_choices(logits, config).items()}
      metrics["mean_top1_gate"] = float(np.mean(list(gates.values())))
    return {"metrics": metrics, "score": metrics[metric], "usage": usage,
            "model_config": dataclasses.asdict(config)}

  def router_logits(self, task, config: configs.ModelConfig, params: Any
                    ) -> dict[str, np.ndarray]:
    """{MoE layer: [tokens, E]} router logits on the task's (finetuning) tokens, the first
    `usage_max_tokens` of them."""
    return model_lib.collect_router_logits(decoder.SMoEDecoder(config), params,
                                         self.task_batches(task),
                                         max_tokens=self.config.usage_max_tokens,
                                         progress=False)

  def _scorer(self, task):
    if task not in self._scorers:
      cfg = self.config
      lengths = dict(cfg.finetune.task_feature_lengths)
      if task.eval_task is None:
        self._scorers[task] = LossScorer(
            task=task.name, task_feature_lengths=lengths, pack=cfg.finetune.pack,
            batch_size=cfg.eval_batch_size, max_batches=cfg.eval_batches,
            mesh=cfg.runtime.mesh)
      elif task.eval_task in fact_tasks.RECALL_JUDGE_TASKS:
        self._scorers[task] = recall_judge.RecallJudgeScorer(
            eval_task=task.eval_task, task_feature_lengths=lengths,
            batch_size=cfg.eval_batch_size, mesh=cfg.runtime.mesh)
      else:
        self._scorers[task] = TaskScorer(
            eval_task=task.eval_task, task_feature_lengths=lengths,
            num_examples=cfg.eval_num_examples, batch_size=cfg.eval_batch_size,
            mesh=cfg.runtime.mesh)
    return self._scorers[task]


# ------------------------------------------------------------------------------------------
# Evaluation.


class TaskScorer:
  """The metrics of models on one task's evaluation split (e.g. rank classification).

  One seqio Evaluator per task (its examples are read once) and one compiled scoring
  function per expert count, shared by every model evaluated.

  Args:
    eval_task: seqio task with metrics (e.g. 'synthetic_city_country_rank').
    task_feature_lengths: Fixed feature lengths (one compilation per expert count).
    num_examples: seqio's `num_examples` (rows after preprocessing; a rank task has one
      row per answer option); None: the whole split.
    batch_size: Rows per forward pass.
    mesh: Mesh the params live on.

  Example:
    >>> scorer = TaskScorer(eval_task="synthetic_dna_motif_rank", task_feature_lengths=
    ...                     {"inputs": 112, "targets": 16}, num_examples=400, batch_size=64,
    ...                     mesh=mesh)
    >>> scorer(config, params)            # {'accuracy': 71.5}
  """

  def __init__(self, *, eval_task: str, task_feature_lengths: Mapping[str, int],
               num_examples: int | None, batch_size: int, mesh: jax.sharding.Mesh):
    self.eval_task = eval_task
    self._evaluator = evaluation.make_evaluator(
        mixture_or_task_name=eval_task, task_feature_lengths=dict(task_feature_lengths),
        num_examples=num_examples)
    self._batch_size, self._mesh = batch_size, mesh
    self._outputs: dict[configs.ModelConfig, evaluation.ModelOutputs] = (
        compiled.CompiledCache())

  def _model_outputs(self, config: configs.ModelConfig) -> evaluation.ModelOutputs:
    if config not in self._outputs:
      self._outputs[config] = evaluation.ModelOutputs(
          apply_fn=decoder.SMoEDecoder(config).apply, mesh=self._mesh,
          batch_size=self._batch_size)
    return self._outputs[config]

  @property
  def has_items(self) -> bool:
    """Whether its accuracy has per-example items (rank classification)."""
    return self.ranks

  @property
  def ranks(self) -> bool:
    """Whether the task is scored by rank classification (seqio's contract: every row
    has 'idx' = [example, option] and 'is_correct'), so its accuracy has per-example items."""
    spec = self._evaluator.cached_task_datasets[self.eval_task].element_spec
    return {"idx", "is_correct"} <= set(spec)

  def items(self, config: configs.ModelConfig, params: Any) -> np.ndarray:
    """[examples] 0/1: each example of a rank-classification task right or wrong (the
    rank accuracy's items), in example order."""
    if not self.ranks:
      raise ValueError(f"{self.eval_task!r} is not scored by rank classification; its "
                       "metrics have no per-example items")
    outputs = self._model_outputs(config)
    outputs.params = params
    scores = dict(outputs.score_fn(self._evaluator.cached_model_datasets[self.eval_task]))
    rows = self._evaluator.cached_task_datasets[self.eval_task].as_numpy_iterator()
    targets = [{"example": int(row["idx"][0]), "option": int(row["idx"][1]),
                "is_correct": bool(row["is_correct"]), "text": ""} for row in rows]
    return metrics_lib.rank_correct(targets, [scores[i] for i in range(len(targets))]
                                    ).astype(np.float64)

  def __call__(self, config: configs.ModelConfig, params: Any) -> dict[str, float]:
    results = evaluation.task_metrics(self._evaluator, self._model_outputs(config), params)
    if self.eval_task not in results:
      raise ValueError(f"{self.eval_task!r} produced no metrics (got {sorted(results)}); "
                       "is it a task with metric functions?")
    return results[self.eval_task]


class LossScorer:
  """Validation metrics of language-modelling tasks: token accuracy (%) and cross-entropy.

  The score of a task without metric functions (e.g. one domain of the synthetic corpus):
  next-token accuracy and cross-entropy over the first `max_batches` validation batches,
  one compiled eval step per expert count.

  Example:
    >>> scorer = LossScorer(task="synthetic_lm_dna", task_feature_lengths={"targets": 128},
    ...                     pack=True, batch_size=32, max_batches=8, mesh=mesh)
    >>> scorer(config, params)         # {'accuracy': 61.2, 'cross_entropy': 1.21, ...}
  """

  has_items = True  # its accuracy's items: the scored tokens

  def __init__(self, *, task: str, task_feature_lengths: Mapping[str, int], pack: bool,
               batch_size: int, max_batches: int | None, mesh: jax.sharding.Mesh):
    self.task, self._mesh = task, mesh
    self._batches = list(pipeline.eval_batches(
        mixture_or_task_name=task, task_feature_lengths=dict(task_feature_lengths),
        batch_size=batch_size, split="validation", pack=pack, max_batches=max_batches))
    self._steps: dict[configs.ModelConfig, Any] = compiled.CompiledCache()
    self._correct: dict[configs.ModelConfig, Any] = compiled.CompiledCache()

  def __call__(self, config: configs.ModelConfig, params: Any) -> dict[str, float]:
    if config not in self._steps:
      self._steps[config] = step_lib.compile_eval_step(
          config, decoder.SMoEDecoder(config).apply, mesh=self._mesh)
    metrics = evaluation.evaluate_loss(self._steps[config], params, self._batches,
                                       sharding=partitioning.batch_sharding(self._mesh))
    return {**metrics, "accuracy": 100.0 * metrics["accuracy"]}

  def items(self, config: configs.ModelConfig, params: Any) -> np.ndarray:
    """[items] 0/1: each scored token right or wrong (the accuracy's items), in order."""
    if config not in self._correct:
      self._correct[config] = jax.jit(functools.partial(
          evaluation.token_correct, apply_fn=decoder.SMoEDecoder(config).apply))
    return evaluation.item_scores(self._correct[config], params, self._batches,
                                  sharding=partitioning.batch_sharding(self._mesh))
