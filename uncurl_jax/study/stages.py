"""The work of each study stage besides training: router logits, pruning, scores.

`study.runner` decides which stages run and caches them (`study.cache`); training is
`study.training.StageTrainer`; the functions here do the other stages' work with the
project's modules: logits through `pruning.collect_router_logits`, pruning through
`pruning.plan_pruning` / `apply_plan`, scores through seqio's Evaluator with
`evaluation.ModelOutputs` (rank classification) or through `evaluation.evaluate_loss`
(language modelling). One compiled scorer per expert count serves every model scored.

Example:
  >>> logits = router_logits(config, params, batches, max_tokens=8192)
  >>> small, summary = prune_model("/tmp/prune", params=params, logits=logits,
  ...                              num_experts=8, method="uncurl", router="reinit", seed=0,
  ...                              init_std=0.02)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from uncurl_jax import pruning
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import partitioning
from uncurl_jax.pruning import features
from uncurl_jax.train import checkpoints
from uncurl_jax.train import evaluation
from uncurl_jax.train import state as state_lib
from uncurl_jax.train import step as step_lib

PARAMS_DIR = "params"  # a pruned model's params-only checkpoint, inside its stage directory


# ------------------------------------------------------------------------------------------
# Params.


def model_config(config: configs.ModelConfig, params: Any) -> configs.ModelConfig:
  """`config` with the expert counts of `params` (per layer when they differ; 0: dense)."""
  return configs.with_expert_counts(config, pruning.expert_counts(params))


def restore_params(checkpoint_dir: str, *, config: configs.ModelConfig,
                   mesh: jax.sharding.Mesh) -> Any:
  """Params of a finished stage (a training run's directory or a params-only checkpoint),
  with the expert counts the checkpoint has."""
  directory = checkpoints.resolve_checkpoint_dir(checkpoint_dir)
  config = model_config(config, checkpoints.params_shapes(directory))
  abstract = state_lib.abstract_params(decoder.SMoEDecoder(config),
                                       batch_shape=state_lib.init_batch_shape(config),
                                       mesh=mesh)
  return checkpoints.restore_params(directory, abstract_params=abstract)


# ------------------------------------------------------------------------------------------
# Router logits and expert usage.


def task_batches(*, task: str, settings: Any, batch_size: int,
                 max_tokens: int) -> list[dict[str, np.ndarray]]:
  """The first training examples of `task` (fixed order), enough for `max_tokens` tokens."""
  length = settings.length
  max_batches = max(1, -(-max_tokens // (batch_size * length)) * 4)  # prompts are short
  return list(pipeline.eval_batches(mixture_or_task_name=task,
                                task_feature_lengths=dict(settings.task_feature_lengths),
                                batch_size=batch_size, split="train", pack=False,
                                max_batches=max_batches))


def router_logits(config: configs.ModelConfig, params: Any, batches: Sequence[Mapping[str, Any]],
                  *, max_tokens: int) -> dict[str, np.ndarray]:
  """{MoE layer: [tokens, E] raw router logits} of the model on the task batches."""
  return pruning.collect_router_logits(decoder.SMoEDecoder(config), params, batches,
                                       max_tokens=max_tokens)


def expert_usage(logits: Mapping[str, np.ndarray], top_k: int = 1) -> dict[str, list[float]]:
  """{MoE layer: [E] share of tokens routed to each expert (any of their top-k choices)}."""
  return {name: features.selection_frequencies(h, top_k).tolist() for name, h in logits.items()}


def save_logits(path: str, logits: Mapping[str, np.ndarray]) -> None:
  # npz member names cannot hold '/', the separator of layer paths.
  np.savez(path, **{name.replace("/", "|"): h for name, h in logits.items()})


def load_logits(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as archive:
    return {name.replace("|", "/"): archive[name] for name in archive.files}


# ------------------------------------------------------------------------------------------
# Pruning.


def prune_model(directory: str, *, params: Any, logits: Mapping[str, np.ndarray] | None,
                num_experts: int, method: str, router: str | None, seed: int, init_std: float,
                top_k: int = 1, pretrained_params: Any = None) -> tuple[Any, dict]:
  """Prunes `params` to `num_experts` per layer; writes the params and the plan.

  MC-SMoE allocates its experts globally, `num_experts` per layer on average, so its
  layers may keep different counts (the model then has `layer_num_experts`). Selection
  frequencies count every one of a token's `top_k` routed choices.

  Outputs: `directory/params` (a params-only checkpoint that finetuning starts from) and
  `directory/plan.json` (`PrunePlan.to_json`).

  Returns:
    (pruned params, JSON summary: router option used, experts kept per layer, per-layer
    labels and anchors).
  """
  host_params = jax.device_get(params)
  kwargs = {} if pretrained_params is None else {"pretrained_params": pretrained_params}
  plan = pruning.plan_pruning(host_params, logits, num_experts, method=method, router=router,
                              seed=seed, router_init_std=init_std, top_k=top_k, **kwargs)
  small = pruning.apply_plan(host_params, plan)
  with open(os.path.join(directory, "plan.json"), "w") as f:
    f.write(plan.to_json())
  checkpoints.save_params(os.path.join(directory, PARAMS_DIR), small,
                          metadata={"method": method, "router": plan.router})
  summary = {"router": plan.router, "experts_per_layer": plan.num_experts,
             "labels": {name: list(layer.labels) for name, layer in plan.layers.items()},
             "anchors": {name: list(layer.anchors) for name, layer in plan.layers.items()}}
  return small, summary


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
    self._outputs: dict[configs.ModelConfig, evaluation.ModelOutputs] = {}

  def __call__(self, config: configs.ModelConfig, params: Any) -> dict[str, float]:
    if config not in self._outputs:
      self._outputs[config] = evaluation.ModelOutputs(
          apply_fn=decoder.SMoEDecoder(config).apply, mesh=self._mesh,
          batch_size=self._batch_size)
    results = evaluation.task_metrics(self._evaluator, self._outputs[config], params)
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

  def __init__(self, *, task: str, task_feature_lengths: Mapping[str, int], pack: bool,
               batch_size: int, max_batches: int | None, mesh: jax.sharding.Mesh):
    self.task, self._mesh = task, mesh
    self._batches = list(pipeline.eval_batches(
        mixture_or_task_name=task, task_feature_lengths=dict(task_feature_lengths),
        batch_size=batch_size, split="validation", pack=pack, max_batches=max_batches))
    self._steps: dict[configs.ModelConfig, Any] = {}

  def __call__(self, config: configs.ModelConfig, params: Any) -> dict[str, float]:
    if config not in self._steps:
      self._steps[config] = step_lib.compile_eval_step(
          config, decoder.SMoEDecoder(config).apply, mesh=self._mesh)
    metrics = evaluation.evaluate_loss(self._steps[config], params, self._batches,
                                       sharding=partitioning.batch_sharding(self._mesh))
    return {**metrics, "accuracy": 100.0 * metrics["accuracy"]}
