"""What a training run does: `train` (pretraining, pre-finetuning, finetuning) and `evaluate`.

Both are plain functions with keyword arguments; `python -m uncurl_jax.train` binds them
with gin (see `uncurl_jax.train.__main__`). `train` builds the run's `Trainer`, data and
evaluation, then trains it with `builder.Run` (the one way a training run is built),
writing TensorBoard events and progress lines.

Example:
  >>> result = train(model_dir="/tmp/tiny", model_config=configs.get("tiny"),
  ...                mixture_or_task_name="synthetic_lm", task_feature_lengths={"targets": 128},
  ...                batch_size=16, train_steps=100)
  >>> result.train_metrics[-1]
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Callable, Mapping

from absl import logging
import jax
import tqdm

from uncurl_jax import checks
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import forward as forward_lib
from uncurl_jax.model import partitioning
from uncurl_jax.train import builder
from uncurl_jax.train import checkpoints
from uncurl_jax.train import evaluation
from uncurl_jax.train import metrics as metrics_lib
from uncurl_jax.train import optim
from uncurl_jax.train import schedules
from uncurl_jax.train import state as state_lib
from uncurl_jax.train import step as step_lib
from uncurl_jax.train import trainer as trainer_lib


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the final state and the logged metrics."""

  state: step_lib.TrainState
  config: configs.ModelConfig
  train_metrics: list[tuple[int, dict[str, float]]]
  eval_metrics: list[tuple[int, dict[str, float]]]


# ------------------------------------------------------------------------------------------
# Training.


def _check_train_args(*, model_dir, train_steps, batch_size, mesh, config, task_feature_lengths,
                      checkpoint_every_steps, log_every_steps, eval_every_steps, tasks,
                      init_checkpoint):
  if not isinstance(config, configs.ModelConfig):
    raise TypeError(f"model_config must be a ModelConfig, got {type(config).__name__}")
  checks.output_dir(model_dir, "MODEL_DIR")
  checks.integer("TRAIN_STEPS", train_steps, low=1)
  checks.integer("BATCH_SIZE", batch_size, low=1)
  for what, name in tasks.items():
    if name is not None:
      pipeline.check_task(name, what)
  if init_checkpoint is not None:
    checks.existing_dir(init_checkpoint, "INITIAL_CHECKPOINT_PATH")
  if batch_size % partitioning.num_batch_shards(mesh):
    raise ValueError(f"BATCH_SIZE={batch_size} must be a multiple of the mesh's "
                     f"{partitioning.num_batch_shards(mesh)} batch shards (data x expert)")
  length = pipeline.model_length(task_feature_lengths)
  if length > config.max_length:
    raise ValueError(f"TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} give length {length}, "
                     f"more than the model's max_length={config.max_length}")
  for name, value in (("checkpoint_every_steps", checkpoint_every_steps),
                      ("log_every_steps", log_every_steps), ("eval_every_steps", eval_every_steps)):
    if value is not None:
      checks.integer(name, value, low=1)


def train(*, model_dir: str, model_config: configs.ModelConfig, mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int], batch_size: int, train_steps: int,
          make_optimizer: Callable[..., Any] = optim.make_optimizer, seed: int = 0,
          data_seed: int = 0, pack: bool = True, use_cached: bool = False,
          expert_parallelism: int = 1, model_parallelism: int = 1,
          checkpoint_every_steps: int = 1000, keep_checkpoints: int | None = None,
          async_checkpointing: bool = True, log_every_steps: int = 10,
          eval_every_steps: int | None = None, eval_split: str | None = "validation",
          eval_loss_batches: int | None = 20, eval_mixture_or_task_name: str | None = None,
          eval_task_feature_lengths: Mapping[str, int] | None = None,
          eval_task_metrics: bool = False, eval_task_examples: int | None = None,
          init_checkpoint: str | None = None, init_checkpoint_step: int | None = None,
          adapt_experts_to_checkpoint: bool = False, router_warmup_steps: int = 0,
          router_warmup_learning_rate: float | None = None,
          progressive_dropping: schedules.ProgressiveDropping | None = None) -> TrainResult:
  """Trains (or resumes training) a model and returns the final state and metrics.

  Checkpoints go to `model_dir/checkpoints` every `checkpoint_every_steps` and at the
  end; a run restarted with the same `model_dir` resumes from the newest one (at most
  one period lost). TensorBoard events go to `model_dir/train` and `model_dir/eval`.

  Args:
    model_dir: Output directory (MODEL_DIR).
    model_config: The model; its `num_experts` is NUM_EXPERTS.
    mixture_or_task_name, task_feature_lengths: Training data (seqio).
    batch_size: Global batch size (BATCH_SIZE).
    train_steps: Total steps of this run (TRAIN_STEPS); finetuning counts from 0.
    make_optimizer: Optimizer factory; see `trainer_lib.Trainer`.
    seed: Initialization and dropout seed. data_seed: Data shuffling seed.
    pack, use_cached: Data options.
    expert_parallelism, model_parallelism: Mesh 'expert' and 'model' sizes; 'data' takes
      the remaining devices.
    checkpoint_every_steps, keep_checkpoints, async_checkpointing: Checkpointing.
    log_every_steps: Steps between metric logs (absl + TensorBoard).
    eval_every_steps: Steps between evaluations (and at the end); None: at the end only.
    eval_split: Split of the loss evaluation; None disables evaluation.
    eval_loss_batches: Batches of the loss evaluation; None: the whole split.
    eval_mixture_or_task_name, eval_task_feature_lengths: Evaluated data (default: the
      training data).
    eval_task_metrics: Also compute the tasks' metrics (scores, greedy predictions).
    eval_task_examples: Examples per task for the task metrics; None: all.
    init_checkpoint: Start from this checkpoint's params (a run's MODEL_DIR or a checkpoint
      root such as a pruned model's), with a fresh optimizer at step 0.
    init_checkpoint_step: Its step; None: the newest.
    adapt_experts_to_checkpoint: Take the init checkpoint's expert counts when they differ
      from NUM_EXPERTS (finetuning a pruned model; gin/runs/finetune.gin sets it); else a
      checkpoint of another expert count is refused. Other architecture differences are
      always refused, and so is a MODEL_DIR holding another model's checkpoints.
    router_warmup_steps: Router-only steps before full training (0: none).
    router_warmup_learning_rate: Peak learning rate of the router-only steps.
    progressive_dropping: Drop experts during training (Chen et al.), or None.
  """
  mesh = partitioning.make_mesh(expert=expert_parallelism, model=model_parallelism)
  _check_train_args(model_dir=model_dir, train_steps=train_steps, batch_size=batch_size,
                    mesh=mesh, config=model_config, task_feature_lengths=task_feature_lengths,
                    checkpoint_every_steps=checkpoint_every_steps,
                    log_every_steps=log_every_steps, eval_every_steps=eval_every_steps,
                    tasks={"MIXTURE_OR_TASK_NAME": mixture_or_task_name,
                           "eval_mixture_or_task_name": eval_mixture_or_task_name},
                    init_checkpoint=init_checkpoint)
  run = builder.Run(model_config, builder.RunSettings(
      batch_size=batch_size, length=pipeline.model_length(task_feature_lengths),
      steps=train_steps, make_optimizer=make_optimizer,
      router_warmup_steps=router_warmup_steps,
      router_warmup_learning_rate=router_warmup_learning_rate, dropping=progressive_dropping,
      adapt_experts_to_checkpoint=adapt_experts_to_checkpoint,
      checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
      async_checkpointing=async_checkpointing, log_every_steps=log_every_steps,
      eval_every_steps=eval_every_steps), mesh=mesh)
  data_args = dict(mixture_or_task_name=mixture_or_task_name,
                   task_feature_lengths=dict(task_feature_lengths), use_cached=use_cached)
  evaluator = None if eval_split is None else evaluation.Evaluation(
      mixture_or_task_name=eval_mixture_or_task_name or mixture_or_task_name,
      task_feature_lengths=dict(eval_task_feature_lengths or task_feature_lengths),
      use_cached=use_cached, mesh=mesh, batch_size=batch_size, split=eval_split,
      loss_batches=eval_loss_batches, pack=pack, task_metrics=eval_task_metrics,
      task_examples=eval_task_examples)
  logger = _RunLogger(model_dir, total_steps=train_steps, evaluator=evaluator)
  try:
    result = run.train(
        model_dir, seed=seed, init_checkpoint=init_checkpoint,
        init_checkpoint_step=init_checkpoint_step,
        batches=lambda start: pipeline.train_dataset(
            **data_args, global_batch_size=batch_size, seed=data_seed, pack=pack,
            start_step=start).as_numpy_iterator(),
        probe=_dropping_probe(progressive_dropping, data_args, batch_size, pack),
        on_start=logger.start, on_log=logger.log,
        on_eval=None if evaluator is None else logger.evaluate)
  finally:
    logger.close()
  return TrainResult(state=result.state, config=result.config,
                     train_metrics=result.history, eval_metrics=logger.eval_history)


def _dropping_probe(dropping, data_args, batch_size, pack):
  """The batches on which progressive dropping measures proficiency (or None).

  The first training batches in file order: the same on every host and in every
  (resumed) run, so a drop depends only on the parameters at its step.
  """
  if dropping is None:
    return None
  return lambda: list(pipeline.eval_batches(**data_args, batch_size=batch_size, split="train",
                                        pack=pack, max_batches=dropping.probe_batches))


# Progress lines start with these, then the other metrics by name.
_PROGRESS_ORDER = ("loss", "cross_entropy", "accuracy", "auxiliary_loss", "router_z_loss")


class _RunLogger:
  """A progress bar with the run's ETA and its main metrics, TensorBoard events
  (MODEL_DIR/train, MODEL_DIR/eval) and a line per evaluation (also logged)."""

  def __init__(self, model_dir: str, *, total_steps: int,
               evaluator: evaluation.Evaluation | None):
    self.model_dir, self.total_steps = model_dir, total_steps
    self.progress = self.bar = self.train_writer = self.eval_writer = None
    self._step = 0
    self.evaluator = evaluator
    self.eval_history: list[tuple[int, dict[str, float]]] = []

  def start(self, start_step: int) -> None:
    """Starts the bar, the ETA and the event files at the run's first step (past 0 when
    resumed): a run refused before it starts writes nothing."""
    self.train_writer = metrics_lib.TensorBoardWriter(os.path.join(self.model_dir, "train"))
    self.eval_writer = metrics_lib.TensorBoardWriter(os.path.join(self.model_dir, "eval"))
    self.progress = metrics_lib.ProgressMeter(total_steps=self.total_steps,
                                              start_step=start_step)
    self.bar = tqdm.tqdm(total=self.total_steps, initial=start_step, unit="step",
                         file=sys.stdout, disable=jax.process_index() != 0,
                         mininterval=0.5 if sys.stdout.isatty() else 30.0)
    self._step = start_step

  def log(self, step: int, variant: trainer_lib.Variant, scalars: dict[str, float]) -> None:
    del variant  # num_experts is among the scalars
    shown = [k for k in _PROGRESS_ORDER if k in scalars]
    shown += sorted(set(scalars) - set(shown) - {"num_tokens"})
    self.progress.update(step=step, metrics={k: scalars[k] for k in shown})
    self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in shown[:3]}, refresh=False)
    self.bar.update(step - self._step)
    self._step = step
    self.train_writer.write_scalars(step, {**scalars, **self.progress.rates()})

  def evaluate(self, step: int, state: step_lib.TrainState,
               variant: trainer_lib.Variant) -> None:
    results = self.evaluator.run(state.params, apply_fn=variant.model.apply,
                                 eval_step=variant.eval_step, step=step)
    line = f"eval at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(results.items()))
    logging.info("%s", line)
    self.bar.write(line, file=sys.stdout)
    self.eval_writer.write_scalars(step, results)
    self.eval_history.append((step, results))

  def close(self) -> None:
    for opened in (self.bar, self.train_writer, self.eval_writer):
      if opened is not None:
        opened.close()


# ------------------------------------------------------------------------------------------
# Evaluation of a checkpoint.


def evaluate(*, checkpoint_path: str, model_config: configs.ModelConfig,
             mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
             batch_size: int, output_dir: str, checkpoint_step: int | None = None,
             split: str = "validation", loss_batches: int | None = None, pack: bool = False,
             task_metrics: bool = True, task_examples: int | None = None,
             use_cached: bool = False, expert_parallelism: int = 1,
             model_parallelism: int = 1) -> dict[str, float]:
  """Evaluates a checkpoint's params: validation loss and the tasks' metrics.

  The model takes the checkpoint's expert count (pruned checkpoints). Results are
  logged, written to TensorBoard under `output_dir` and to
  `output_dir/metrics_<step>.json` (process 0).

  Example:
    >>> evaluate(checkpoint_path="/tmp/ft", model_config=configs.get("tiny"),
    ...          mixture_or_task_name="synthetic_city_country_rank",
    ...          task_feature_lengths={"inputs": 96, "targets": 16}, batch_size=32,
    ...          output_dir="/tmp/ft/eval_final")
  """
  mesh = partitioning.make_mesh(expert=expert_parallelism, model=model_parallelism)
  pipeline.check_task(mixture_or_task_name)
  checks.integer("BATCH_SIZE", batch_size, low=1)
  checks.output_dir(output_dir, "EVAL_OUTPUT_DIR")
  directory = checkpoints.resolve_checkpoint_dir(
      checks.existing_dir(checkpoint_path, "CHECKPOINT_PATH"))
  step = checkpoints.resolve_step(directory, step=checkpoint_step)
  shapes = checkpoints.params_shapes(directory, step=step)
  saved = checkpoints.read_metadata(directory, step=step).get("model_config")
  config = trainer_lib.config_for_params(model_config, shapes, adapt=True, saved_config=saved)
  forward_lib.check_params(decoder.SMoEDecoder(config), shapes,
                           f"the checkpoint {directory} (step {step})", saved_config=saved)
  model = decoder.SMoEDecoder(config)
  target = state_lib.abstract_params(
      model, batch_shape=(batch_size, pipeline.model_length(task_feature_lengths)), mesh=mesh)
  params = checkpoints.restore_params(directory, abstract_params=target, step=step)
  results = evaluation.Evaluation(
      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      mesh=mesh, batch_size=batch_size, split=split, loss_batches=loss_batches, pack=pack,
      task_metrics=task_metrics, task_examples=task_examples, use_cached=use_cached,
  ).run(params, apply_fn=model.apply, step=step,
        eval_step=step_lib.compile_eval_step(config, model.apply, mesh=mesh))
  logging.info("eval of %s step %d: %s", directory, step, json.dumps(results, sort_keys=True))
  writer = metrics_lib.TensorBoardWriter(output_dir)
  writer.write_scalars(step, results)
  writer.close()
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"metrics_{step}.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results
