"""Evaluation: validation loss, and the tasks' own metrics through seqio's Evaluator.

Task metrics need model outputs of two kinds, both computed here with the model:

* scores (rank classification, SuperGLUE as decoder-only LMs are evaluated): the
  log-likelihood of each example's targets given its prompt, summed over target tokens.
  seqio's rank-classification tasks turn one example into one row per answer option and
  pick the option with the highest score.
* predictions: greedy decoding of the targets after the prompt (the prompt's length is
  read from `decoder_causal_attention`, as t5x's DecoderOnlyModel does). Each decoding
  step re-runs the full forward pass at a fixed length, so one compilation serves every
  step; answers are short (a label word), so the quadratic cost does not matter.

Every host runs the full evaluation on replicated inputs and receives replicated
outputs, so the metrics are the same on every host (only process 0 writes them).

Example:
  >>> evaluator = evaluation.make_evaluator(mixture_or_task_name="synthetic_city_country_rank",
  ...                                       task_feature_lengths={"inputs": 96, "targets": 16})
  >>> outputs = evaluation.ModelOutputs(apply_fn=model.apply, mesh=mesh, batch_size=32)
  >>> evaluation.task_metrics(evaluator, outputs, params)
  {'synthetic_city_country_rank': {'accuracy': 41.2}}
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import seqio

from uncurl_jax.data import pipeline
from uncurl_jax.model import inputs as inputs_lib
from uncurl_jax.model import partitioning


def mean_metrics(per_batch: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Token-weighted means of per-batch eval metrics (each batch's 'num_tokens' weighs it).

  Example:
    >>> mean_metrics([{"loss": 2.0, "num_tokens": 10}, {"loss": 4.0, "num_tokens": 30}])
    {'loss': 3.5, 'num_tokens': 40.0}
  """
  sums: dict[str, float] = {}
  total = 0.0
  for metrics in per_batch:
    weight = float(metrics["num_tokens"])
    total += weight
    for name, value in metrics.items():
      if name != "num_tokens":
        sums[name] = sums.get(name, 0.0) + weight * float(value)
  if total == 0:
    raise ValueError("no evaluation tokens: every batch was empty or all padding")
  return {**{name: value / total for name, value in sums.items()}, "num_tokens": total}


def evaluate_loss(eval_step: Callable, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
                  *, sharding: jax.sharding.Sharding) -> dict[str, float]:
  """Validation loss, accuracy and MoE diagnostics averaged over `batches`' tokens.

  Args:
    eval_step: `train_step.compile_eval_step(...)`, called as `eval_step(params, batch)`.
    params: Model params.
    batches: Full (not per-host) numpy batches, e.g. `pipeline.eval_batches(...)`.
    sharding: Batch sharding (`partitioning.batch_sharding(mesh)`).

  Example:
    >>> evaluate_loss(eval_step, params, pipeline.eval_batches(...), sharding=sharding)["loss"]
  """
  per_batch = (jax.device_get(eval_step(params, pipeline.to_global_replicated(batch, sharding)))
               for batch in batches)
  return mean_metrics(per_batch)


def token_correct(params: Any, batch: Mapping[str, jax.Array], *,
                  apply_fn: Callable) -> jax.Array:
  """[B, L] 1 where the argmax prediction equals the target token, 0 elsewhere (padding and
  weight-0 positions included: select them with the loss weights).

  Example:
    >>> correct = jax.jit(functools.partial(token_correct, apply_fn=model.apply))(p, batch)
  """
  logits = apply_fn({"params": params}, **_module_inputs(batch, apply_fn), enable_dropout=False)
  return (jnp.argmax(logits, -1) == batch["decoder_target_tokens"]).astype(jnp.int8)


def item_scores(correct_fn: Callable, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
                *, sharding: jax.sharding.Sharding) -> np.ndarray:
  """[items] 0/1 correctness of every scored token (loss weight > 0), in batch order.

  Per-item scores let two models evaluated on the same items be compared item by item
  (the paired standard error of a single run).

  Example:
    >>> items = item_scores(jax.jit(functools.partial(token_correct, apply_fn=model.apply)),
    ...                     params, batches, sharding=sharding)
  """
  scores = []
  for batch in batches:
    correct = np.asarray(jax.device_get(correct_fn(params, pipeline.to_global_replicated(
        batch, sharding))))
    scores.append(correct[np.asarray(batch["decoder_loss_weights"]) > 0])
  return np.concatenate(scores).astype(np.int8)


def _module_inputs(batch: Mapping[str, jax.Array], apply_fn: Callable) -> dict[str, jax.Array]:
  """The decoder call of every scoring pass: the module's own switch (`model.inputs`)."""
  return inputs_lib.module_inputs(
      batch, inputs_bidirectional_attention=inputs_lib.bidirectional_inputs(apply_fn))


def target_scores(params: Any, batch: Mapping[str, jax.Array], *, apply_fn: Callable) -> jax.Array:
  """[B] sum over target positions (loss weight > 0) of log p(target token).

  Example:
    >>> scores = jax.jit(functools.partial(target_scores, apply_fn=model.apply))(params, batch)
  """
  logits = apply_fn({"params": params}, **_module_inputs(batch, apply_fn), enable_dropout=False)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = batch["decoder_target_tokens"]
  token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(token_scores * (batch["decoder_loss_weights"] > 0), axis=-1)


def greedy_decode(params: Any, batch: Mapping[str, jax.Array], *, apply_fn: Callable,
                  num_steps: int) -> jax.Array:
  """[B, num_steps] greedy continuation of each prompt (prefix-LM batches).

  The prompt of row b is its first `sum(decoder_causal_attention[b]) - 1` target tokens;
  positions past the sequence length decode as 0.

  Example:
    >>> answers = greedy_decode(params, batch, apply_fn=model.apply, num_steps=8)
  """
  targets = batch["decoder_target_tokens"]
  batch_size, length = targets.shape
  prompt_lengths = jnp.sum(batch["decoder_causal_attention"], axis=1) - 1
  positions = jnp.arange(length)[None, :]
  sequence = jnp.where(positions < prompt_lengths[:, None], targets, 0)
  rows = jnp.arange(batch_size)
  prefix = ({"decoder_causal_attention": batch["decoder_causal_attention"]}
            if inputs_lib.bidirectional_inputs(apply_fn) else {})

  def step(t, sequence):
    inputs = jnp.pad(sequence, ((0, 0), (1, 0)))[:, :-1]  # shift right: BOS = 0
    logits = apply_fn({"params": params}, inputs, sequence, **prefix, enable_dropout=False)
    where = jnp.minimum(prompt_lengths + t, length - 1)
    next_token = jnp.argmax(logits[rows, where], axis=-1).astype(sequence.dtype)
    in_range = prompt_lengths + t < length
    return sequence.at[rows, where].set(jnp.where(in_range, next_token, sequence[rows, where]))

  sequence = jax.lax.fori_loop(0, num_steps, step, sequence)
  offsets = jnp.minimum(prompt_lengths[:, None] + jnp.arange(num_steps)[None, :], length - 1)
  decoded = jnp.take_along_axis(sequence, offsets, axis=1)
  return jnp.where(prompt_lengths[:, None] + jnp.arange(num_steps) < length, decoded, 0)


@dataclasses.dataclass
class ModelOutputs:
  """seqio-style `score_fn` / `predict_fn` for one model on one mesh.

  Attributes:
    apply_fn: The model's `apply`.
    mesh: Mesh the params live on.
    batch_size: Rows per forward pass (a multiple of the mesh's batch shards).
    max_decode_steps: Tokens greedily decoded per example by `predict_fn`.
    params: Set by `task_metrics` before the seqio Evaluator calls the functions.

  Example:
    >>> outputs = ModelOutputs(apply_fn=model.apply, mesh=mesh, batch_size=32, params=params)
    >>> outputs.score_fn(evaluator.cached_model_datasets["synthetic_city_country_rank"])
    [(0, -12.3), (1, -15.0), ...]
  """

  apply_fn: Callable
  mesh: Mesh
  batch_size: int
  max_decode_steps: int = 16
  params: Any = None

  def __post_init__(self):
    if self.batch_size % partitioning.num_batch_shards(self.mesh):
      raise ValueError(f"eval batch_size={self.batch_size} must be a multiple of the mesh's "
                       f"{partitioning.num_batch_shards(self.mesh)} batch shards")
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._sharding = partitioning.batch_sharding(self.mesh)
    self._score = jax.jit(functools.partial(target_scores, apply_fn=self.apply_fn),
                          out_shardings=replicated)
    self._decode = jax.jit(functools.partial(greedy_decode, apply_fn=self.apply_fn,
                                             num_steps=self.max_decode_steps),
                           out_shardings=replicated)

  def _run(self, fn, dataset) -> list[tuple[int, np.ndarray]]:
    outputs = []
    for indices, features in dataset.batch(self.batch_size).as_numpy_iterator():
      batch = pipeline.pad_batch(features, self.batch_size)
      with jax.set_mesh(self.mesh):
        result = np.asarray(fn(self.params, pipeline.to_global_replicated(batch, self._sharding)))
      outputs.extend(zip(indices.tolist(), result[:len(indices)]))
    return outputs

  def score_fn(self, dataset, model_feature_shapes=None) -> list[tuple[int, float]]:
    """[(example index, target log-likelihood)] over an enumerated model-feature dataset."""
    del model_feature_shapes  # Shapes are fixed by the dataset.
    return [(i, float(s)) for i, s in self._run(self._score, dataset)]

  def predict_fn(self, dataset, model_feature_shapes=None) -> list[tuple[int, list[int]]]:
    """[(example index, greedily decoded target ids)] over an enumerated dataset."""
    del model_feature_shapes
    if "decoder_causal_attention" not in dataset.element_spec[1]:
      raise ValueError("predictions need prompts: the task has no 'inputs' feature "
                       "(decoder_causal_attention); evaluate it with scores instead")
    return [(i, t.tolist()) for i, t in self._run(self._decode, dataset)]


def make_evaluator(*, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int] | None,
                   split: str = "validation", num_examples: int | None = None,
                   use_cached: bool = False) -> seqio.Evaluator:
  """A seqio Evaluator for the tasks of `mixture_or_task_name` that define metrics.

  Examples are not packed. `task_feature_lengths` fixes the feature lengths (one
  compilation for every evaluation); None lets seqio measure the longest example.

  Example:
    >>> make_evaluator(mixture_or_task_name="super_glue_rte_v102_rank",
    ...                task_feature_lengths={"inputs": 224, "targets": 32})
  """
  return seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name,
      feature_converter=pipeline.feature_converter(pack=False), eval_split=split,
      use_cached=use_cached, sequence_length=None if task_feature_lengths is None
      else dict(task_feature_lengths), num_examples=num_examples,
      async_compute_metrics=False)


def task_metrics(evaluator: seqio.Evaluator, outputs: ModelOutputs, params: Any, *,
                 step: int | None = None) -> dict[str, dict[str, float]]:
  """{task name: {metric: value}} of the model `params` on the evaluator's tasks.

  Empty when no task of the mixture defines metrics (e.g. pure language modelling).

  Example:
    >>> task_metrics(evaluator, outputs, params, step=1000)
    {'synthetic_city_country_rank': {'accuracy': 41.2}}
  """
  if not evaluator.eval_tasks:
    return {}
  outputs.params = params
  future, _ = evaluator.evaluate(compute_metrics=True, step=step, score_fn=outputs.score_fn,
                                 predict_fn=outputs.predict_fn)
  results = future.result()
  return {task: {name: float(getattr(value, "value", value)) for name, value in metrics.items()}
          for task, metrics in results.items()}


def flatten_task_metrics(results: Mapping[str, Mapping[str, float]],
                         prefix: str = "eval") -> dict[str, float]:
  """{'eval/<task>/<metric>': value} for logging and TensorBoard.

  Example:
    >>> flatten_task_metrics({"rte": {"accuracy": 60.0}})
    {'eval/rte/accuracy': 60.0}
  """
  return {f"{prefix}/{task}/{name}": value
          for task, metrics in results.items() for name, value in metrics.items()}


class Evaluation:
  """Periodic evaluation of a run: validation loss and, optionally, the task metrics.

  Args:
    mixture_or_task_name: Task or mixture evaluated.
    task_feature_lengths: Feature lengths (also fixes the task-metric shapes).
    mesh: The run's mesh.
    batch_size: Eval batch size.
    split: Split evaluated; None disables the loss evaluation.
    loss_batches: Batches of the loss evaluation; None: the whole split.
    pack: Pack the loss-evaluation examples (as in training).
    task_metrics: Also compute the tasks' metrics with seqio's Evaluator.
    task_examples: Examples per task for the task metrics (rows: a rank-classification
      task has one row per answer option); None: all.
    use_cached: Read seqio's offline cache.

  Example:
    >>> ev = Evaluation(mixture_or_task_name="synthetic_lm", task_feature_lengths={"targets": 128},
    ...                 mesh=mesh, batch_size=32, loss_batches=10)
    >>> ev.run(params, apply_fn=model.apply, eval_step=eval_step, step=1000)
    {'eval/loss': ..., 'eval/cross_entropy': ..., 'eval/accuracy': ..., ...}
  """

  def __init__(self, *, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
               mesh: Mesh, batch_size: int, split: str | None = "validation",
               loss_batches: int | None = None, pack: bool = True, task_metrics: bool = False,
               task_examples: int | None = None, use_cached: bool = False):
    self._data_args = dict(mixture_or_task_name=mixture_or_task_name,
                           task_feature_lengths=dict(task_feature_lengths), use_cached=use_cached)
    self._mesh, self._batch_size, self._split = mesh, batch_size, split
    self._loss_batches, self._pack = loss_batches, pack
    self._task_metrics, self._task_examples = task_metrics, task_examples
    self._evaluator = None
    self._outputs: list[ModelOutputs] = []

  def run(self, params: Any, *, apply_fn: Callable, eval_step: Callable,
          step: int | None = None) -> dict[str, float]:
    """{'eval/<metric>': ...} for the loss and {'eval/<task>/<metric>': ...} for tasks."""
    results = {}
    if self._split is not None:
      batches = pipeline.eval_batches(**self._data_args, batch_size=self._batch_size,
                                  split=self._split, pack=self._pack,
                                  max_batches=self._loss_batches)
      loss = evaluate_loss(eval_step, params, batches,
                           sharding=partitioning.batch_sharding(self._mesh))
      results.update({f"eval/{name}": value for name, value in loss.items()})
    if self._task_metrics:
      if self._evaluator is None:
        self._evaluator = make_evaluator(**self._data_args, split=self._split or "validation",
                                         num_examples=self._task_examples)
      results.update(flatten_task_metrics(task_metrics(
          self._evaluator, self._model_outputs(apply_fn), params, step=step)))
    return results

  def _model_outputs(self, apply_fn: Callable) -> ModelOutputs:
    # One compiled set per model: `model.apply` of equal modules compare equal, and a
    # model with another expert count (progressive dropping) gets its own.
    for outputs in self._outputs:
      if outputs.apply_fn == apply_fn:
        return outputs
    self._outputs.append(ModelOutputs(
        apply_fn=apply_fn, mesh=self._mesh, batch_size=self._batch_size,
        max_decode_steps=self._data_args["task_feature_lengths"]["targets"]))
    return self._outputs[-1]
