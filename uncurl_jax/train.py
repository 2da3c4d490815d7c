r"""Training entry point: pretraining, pre-finetuning, finetuning and evaluation via gin.

  python -m uncurl_jax.train \
    --gin_file=gin/models/tiny.gin --gin_file=gin/runs/pretrain.gin \
    --gin.MODEL_DIR=/tmp/uncurl_tiny --gin.TRAIN_STEPS=2000

Gin macros (as in t5x): MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS,
BATCH_SIZE, MODEL_DIR from the run file, NUM_EXPERTS from the model file. `--gin.NAME=V`
is shorthand for `--gin_bindings='NAME = V'`; a V that is not a Python literal is taken
as a string (`--gin.MODEL_DIR=/tmp/x`). The run file picks the procedure
(`run.function = @train` or `@evaluate`).

Multi-host (as t5x): `--coordinator_address=host:port --process_count=N
--process_index=i` on every host, or `--multiprocess` where jax detects the cluster
(TPU pods, SLURM); each host then reads its own shard of the training data.

The library modules do not use gin: `register_configurables` applies
`gin.external_configurable` to the functions the gin files name, here at the edge.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax

from uncurl_jax import checkpoints
from uncurl_jax import configs
from uncurl_jax import data
from uncurl_jax import decoder
from uncurl_jax import evaluation
from uncurl_jax import finetune
from uncurl_jax import metrics_writer
from uncurl_jax import optim
from uncurl_jax import partitioning
from uncurl_jax import sharded_state
from uncurl_jax import trainer
from uncurl_jax import train_step

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin files, parsed in order.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
flags.DEFINE_multi_string("gin_search_paths", ["."], "Directories searched for gin files.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("process_count", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_index", None, "Multi-host: index of this process.")
flags.DEFINE_boolean("multiprocess", False,
                     "Multi-host with the cluster detected by jax.distributed.initialize().")


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the final state and the logged metrics."""

  state: train_step.TrainState
  config: configs.ModelConfig
  train_metrics: list[tuple[int, dict[str, float]]]
  eval_metrics: list[tuple[int, dict[str, float]]]


# ------------------------------------------------------------------------------------------
# Training.


def _check_train_args(*, train_steps, batch_size, mesh, config, task_feature_lengths,
                      checkpoint_every_steps, log_every_steps, eval_every_steps):
  if train_steps < 1:
    raise ValueError(f"TRAIN_STEPS must be >= 1, got {train_steps}")
  if batch_size % partitioning.num_batch_shards(mesh):
    raise ValueError(f"BATCH_SIZE={batch_size} must be a multiple of the mesh's "
                     f"{partitioning.num_batch_shards(mesh)} batch shards (data x expert)")
  length = data.model_length(task_feature_lengths)
  if length > config.max_length:
    raise ValueError(f"TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} give length {length}, "
                     f"more than the model's max_length={config.max_length}")
  for name, value in (("checkpoint_every_steps", checkpoint_every_steps),
                      ("log_every_steps", log_every_steps), ("eval_every_steps", eval_every_steps)):
    if value is not None and value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")


def _due(step: int, every: int | None, last: int) -> bool:
  return step == last or (every is not None and step % every == 0)


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
          adapt_experts_to_checkpoint: bool = True, router_warmup_steps: int = 0,
          router_warmup_learning_rate: float | None = None,
          progressive_dropping: finetune.ProgressiveDropping | None = None) -> TrainResult:
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
    make_optimizer: Optimizer factory; see `trainer.Trainer`.
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
    adapt_experts_to_checkpoint: Take the init checkpoint's expert count when it differs
      from NUM_EXPERTS (else raise).
    router_warmup_steps: Router-only steps before full training (0: none).
    router_warmup_learning_rate: Peak learning rate of the router-only steps.
    progressive_dropping: Drop experts during training (Chen et al.), or None.
  """
  mesh = partitioning.make_mesh(expert=expert_parallelism, model=model_parallelism)
  _check_train_args(train_steps=train_steps, batch_size=batch_size, mesh=mesh,
                    config=model_config, task_feature_lengths=task_feature_lengths,
                    checkpoint_every_steps=checkpoint_every_steps,
                    log_every_steps=log_every_steps, eval_every_steps=eval_every_steps)
  run = trainer.Trainer(
      config=model_config, mesh=mesh,
      batch_shape=(batch_size, data.model_length(task_feature_lengths)),
      phases=finetune.training_phases(train_steps=train_steps,
                                      router_warmup_steps=router_warmup_steps),
      make_optimizer=make_optimizer, router_warmup_learning_rate=router_warmup_learning_rate,
      dropping=progressive_dropping, adapt_experts_to_checkpoint=adapt_experts_to_checkpoint)
  manager = checkpoints.make_manager(os.path.join(model_dir, "checkpoints"),
                                     keep=keep_checkpoints, async_save=async_checkpointing)
  rng = jax.random.key(seed)
  state = run.initial_state(manager, init_checkpoint=init_checkpoint,
                            init_checkpoint_step=init_checkpoint_step,
                            rng=jax.random.fold_in(rng, 0))
  data_args = dict(mixture_or_task_name=mixture_or_task_name,
                   task_feature_lengths=dict(task_feature_lengths), use_cached=use_cached)
  evaluator = None if eval_split is None else evaluation.Evaluation(
      mixture_or_task_name=eval_mixture_or_task_name or mixture_or_task_name,
      task_feature_lengths=dict(eval_task_feature_lengths or task_feature_lengths),
      use_cached=use_cached, mesh=mesh, batch_size=batch_size, split=eval_split,
      loss_batches=eval_loss_batches, pack=pack, task_metrics=eval_task_metrics,
      task_examples=eval_task_examples)
  batches = data.train_dataset(**data_args, global_batch_size=batch_size, seed=data_seed,
                               pack=pack, start_step=int(state.step)).as_numpy_iterator()
  loop = _Loop(run=run, manager=manager, model_dir=model_dir, train_steps=train_steps,
               start_step=int(state.step), log_every_steps=log_every_steps,
               checkpoint_every_steps=checkpoint_every_steps,
               eval_every_steps=eval_every_steps, evaluator=evaluator)
  try:
    state = loop.train(state, batches, dropout_rng=jax.random.fold_in(rng, 1),
                       probe=_dropping_probe(progressive_dropping, data_args, batch_size, pack))
  finally:
    loop.close()
  return TrainResult(state=state, config=run.variant_of(state).config,
                     train_metrics=loop.train_history, eval_metrics=loop.eval_history)


def _dropping_probe(dropping, data_args, batch_size, pack):
  """The batches on which progressive dropping measures proficiency (or None).

  The first training batches in file order: the same on every host and in every
  (resumed) run, so a drop depends only on the parameters at its step.
  """
  if dropping is None:
    return None
  return lambda: list(data.eval_batches(**data_args, batch_size=batch_size, split="train",
                                        pack=pack, max_batches=dropping.probe_batches))


# Progress lines start with these, then the other metrics by name.
_PROGRESS_ORDER = ("loss", "cross_entropy", "accuracy", "auxiliary_loss", "router_z_loss")


class _Loop:
  """The step loop of `train`: advance phases, train, log, evaluate, checkpoint."""

  def __init__(self, *, run, manager, model_dir, train_steps, start_step, log_every_steps,
               checkpoint_every_steps, eval_every_steps, evaluator):
    self.run, self.manager, self.train_steps = run, manager, train_steps
    self.log_every, self.checkpoint_every = log_every_steps, checkpoint_every_steps
    self.eval_every, self.evaluator = eval_every_steps, evaluator
    self.progress = metrics_writer.ProgressMeter(total_steps=train_steps, start_step=start_step)
    self.train_writer = metrics_writer.TensorBoardWriter(os.path.join(model_dir, "train"))
    self.eval_writer = metrics_writer.TensorBoardWriter(os.path.join(model_dir, "eval"))
    self.train_history: list[tuple[int, dict[str, float]]] = []
    self.eval_history: list[tuple[int, dict[str, float]]] = []
    self._batch_sharding = partitioning.batch_sharding(run.mesh)

  def train(self, state, batches, *, dropout_rng, probe):
    """Trains from `state.step` to the end; returns the final state."""
    for step in range(int(state.step), self.train_steps):
      state = self.run.advance(state, probe_batches=probe)
      variant = self.run.variant_of(state)
      batch = data.to_global(next(batches), self._batch_sharding)
      state, metrics = variant.train_step(state, batch, dropout_rng)
      done = step + 1
      if _due(done, self.log_every, self.train_steps):
        self._log(done, metrics, variant)
      if self.evaluator is not None and _due(done, self.eval_every, self.train_steps):
        self._evaluate(done, state, variant)
      if _due(done, self.checkpoint_every, self.train_steps):
        checkpoints.save(self.manager, state, metadata={
            "model_config": dataclasses.asdict(variant.config),
            "phase": self.run.phases[variant.phase_index].name})
    return state

  def _log(self, step, metrics, variant):
    scalars = {name: float(value) for name, value in jax.device_get(metrics).items()}
    scalars["num_experts"] = float(variant.config.num_experts)
    shown = [k for k in _PROGRESS_ORDER if k in scalars]
    shown += sorted(set(scalars) - set(shown) - {"num_tokens"})
    self.progress.update(step=step, metrics={k: scalars[k] for k in shown})
    self.train_writer.write_scalars(step, {**scalars, **self.progress.rates()})
    self.train_history.append((step, scalars))

  def _evaluate(self, step, state, variant):
    results = self.evaluator.run(state.params, apply_fn=variant.model.apply,
                                 eval_step=variant.eval_step, step=step)
    logging.info("eval at step %d: %s", step,
                 ", ".join(f"{k} {v:.4g}" for k, v in sorted(results.items())))
    self.eval_writer.write_scalars(step, results)
    self.eval_history.append((step, results))

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
    self.train_writer.close()
    self.eval_writer.close()


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
  directory = trainer.resolve_checkpoint_dir(checkpoint_path)
  step = checkpoints.resolve_step(directory, step=checkpoint_step)
  config = trainer.config_for_params(
      model_config, checkpoints.params_shapes(directory, step=step), adapt=True)
  model = decoder.SMoEDecoder(config)
  target = sharded_state.abstract_params(
      model, batch_shape=(batch_size, data.model_length(task_feature_lengths)), mesh=mesh)
  params = checkpoints.restore_params(directory, abstract_params=target, step=step)
  results = evaluation.Evaluation(
      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      mesh=mesh, batch_size=batch_size, split=split, loss_batches=loss_batches, pack=pack,
      task_metrics=task_metrics, task_examples=task_examples, use_cached=use_cached,
  ).run(params, apply_fn=model.apply, step=step,
        eval_step=train_step.compile_eval_step(config, model.apply, mesh=mesh))
  logging.info("eval of %s step %d: %s", directory, step, json.dumps(results, sort_keys=True))
  writer = metrics_writer.TensorBoardWriter(output_dir)
  writer.write_scalars(step, results)
  writer.close()
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"metrics_{step}.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


# ------------------------------------------------------------------------------------------
# Gin and flags.


def run(*, function: Callable[[], Any]) -> Any:
  """Calls the procedure the run gin file names (`run.function = @train`)."""
  return function()


_REGISTERED: dict[str, Callable] = {}


def register_configurables() -> dict[str, Callable]:
  """Registers (once) the functions and classes the gin files name; returns them by name.

  Gin names: `configs.get`, `configs.ModelConfig`, `optim.make_optimizer`,
  `finetune.ProgressiveDropping`, `train`, `evaluate`, `run`.
  """
  if not _REGISTERED:
    module = "uncurl_jax"
    _REGISTERED.update(
        get=gin.external_configurable(configs.get, module=f"{module}.configs"),
        ModelConfig=gin.external_configurable(configs.ModelConfig, module=f"{module}.configs"),
        make_optimizer=gin.external_configurable(optim.make_optimizer,
                                                 module=f"{module}.optim"),
        ProgressiveDropping=gin.external_configurable(finetune.ProgressiveDropping,
                                                      module=f"{module}.finetune"),
        train=gin.external_configurable(train, module=f"{module}.train"),
        evaluate=gin.external_configurable(evaluate, module=f"{module}.train"),
        run=gin.external_configurable(run, module=f"{module}.train"))
  return dict(_REGISTERED)


def parse_gin(*, gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
              gin_search_paths: Sequence[str] = (".",)) -> None:
  """Clears gin, registers the configurables and parses `gin_files` then `gin_bindings`."""
  register_configurables()
  gin.clear_config()
  for path in gin_search_paths:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings))


def run_with_gin(*, gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                 gin_search_paths: Sequence[str] = (".",)) -> Any:
  """Parses the gin configuration and runs its procedure (what `main` does, minus flags).

  Example:
    >>> run_with_gin(gin_files=["gin/models/tiny.gin", "gin/runs/pretrain.gin"],
    ...              gin_bindings=["MODEL_DIR = '/tmp/tiny'", "TRAIN_STEPS = 100"])
  """
  parse_gin(gin_files=gin_files, gin_bindings=gin_bindings, gin_search_paths=gin_search_paths)
  logging.info("Gin configuration:\n%s", gin.config_str())
  return register_configurables()["run"]()


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE` (as t5x does).

  A VALUE that is not a Python literal, a gin reference (@...) or macro (%...) is quoted.

  Example:
    >>> rewrite_gin_args(["prog", "--gin.MODEL_DIR=/tmp/x", "--gin.TRAIN_STEPS=5"])
    ['prog', "--gin_bindings=MODEL_DIR = '/tmp/x'", '--gin_bindings=TRAIN_STEPS = 5']
  """
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      rewritten.append(f"--gin_bindings={name} = {_gin_value(value)}")
    else:
      rewritten.append(arg)
  return rewritten


def _gin_value(value: str) -> str:
  if value.startswith(("@", "%")):
    return value
  try:
    ast.literal_eval(value)
    return value
  except (ValueError, SyntaxError):
    return repr(value)


def initialize_distributed(*, coordinator_address: str | None, process_count: int | None,
                           process_index: int | None, auto: bool = False) -> None:
  """`jax.distributed.initialize` from the multi-host flags; a no-op on one host."""
  if coordinator_address is not None:
    if process_count is None or process_index is None:
      raise ValueError("--coordinator_address needs --process_count and --process_index")
    jax.distributed.initialize(coordinator_address, num_processes=process_count,
                               process_id=process_index)
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parser accepting t5x's `--gin.NAME=VALUE` shorthand."""
  return FLAGS(rewrite_gin_args(argv))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  initialize_distributed(coordinator_address=FLAGS.coordinator_address,
                         process_count=FLAGS.process_count, process_index=FLAGS.process_index,
                         auto=FLAGS.multiprocess)
  run_with_gin(gin_files=FLAGS.gin_file, gin_bindings=FLAGS.gin_bindings,
               gin_search_paths=FLAGS.gin_search_paths)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
