"""In-process training of the study's stages, sharing compiled steps and data across them.

`train.train` builds a seqio pipeline and compiles a train step on every call; the study
runs a dozen finetunings per task, most of them of same-size models on the same data,
so it would rebuild the same pipeline (about 10 s of TensorFlow tracing on a small CPU)
and retrace the same step every time. `StageTrainer` keeps one `trainer.Trainer` per
(model, procedure), whose compiled variants every stage of that kind reuses, and the
batches of each (task, procedure), read once. The step loop is `train.train`'s: the
same initialization and dropout keys and the same batch order, so a stage trains
exactly the model `train.train` would (tests/test_experiment.py checks this). Training
state is checkpointed with orbax in the stage directory, so an interrupted stage resumes.

Example:
  >>> trainer = StageTrainer(mesh=mesh, seed=0, checkpoint_every_steps=100)
  >>> params, summary = trainer.train("/tmp/stage", config=cfg, settings=settings,
  ...                                 task="synthetic_lm", init_params=None)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Iterator

import jax

from uncurl_jax import checkpoints
from uncurl_jax import configs
from uncurl_jax import data
from uncurl_jax import finetune
from uncurl_jax import metrics_writer
from uncurl_jax import partitioning
from uncurl_jax import sharded_state
from uncurl_jax import study_cache
from uncurl_jax import study_stages
from uncurl_jax import train_step
from uncurl_jax import trainer as trainer_lib

# Training batches of a (task, procedure) are kept in memory up to this many tokens and
# streamed from seqio beyond (pretraining at scale).
MAX_CACHED_TOKENS = 1 << 26


class StageTrainer:
  """Trains study stages with shared `Trainer`s and cached batches (module docstring).

  Args:
    mesh: The device mesh.
    seed: Initialization, dropout and data-order seed of every stage.
    checkpoint_every_steps: Checkpoint period (and at the end).
    log_every_steps: Progress-line period (and at the end).
    max_cached_tokens: Keep a procedure's batches in memory up to this many tokens.
  """

  def __init__(self, *, mesh: jax.sharding.Mesh, seed: int, checkpoint_every_steps: int,
               log_every_steps: int = 50, max_cached_tokens: int = MAX_CACHED_TOKENS):
    for name, value in (("checkpoint_every_steps", checkpoint_every_steps),
                        ("log_every_steps", log_every_steps)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    self.mesh, self.seed = mesh, seed
    self._checkpoint_every, self._log_every = checkpoint_every_steps, log_every_steps
    self._max_cached_tokens = max_cached_tokens
    self._trainers: dict[str, trainer_lib.Trainer] = {}
    self._batches: dict[str, list] = {}

  def _trainer(self, config: configs.ModelConfig, settings, *, router_warmup: bool,
               dropping: finetune.ProgressiveDropping | None) -> trainer_lib.Trainer:
    warmup = settings.router_warmup_steps if router_warmup else 0
    key = study_cache.config_key({"config": config, "settings": settings, "warmup": warmup,
                                  "dropping": dropping})
    if key not in self._trainers:
      self._trainers[key] = trainer_lib.Trainer(
          config=config, mesh=self.mesh, batch_shape=(settings.batch_size, settings.length),
          phases=finetune.training_phases(train_steps=settings.steps,
                                          router_warmup_steps=warmup),
          make_optimizer=settings.make_optimizer(),
          router_warmup_learning_rate=settings.router_warmup_learning_rate,
          dropping=dropping)
    return self._trainers[key]

  def _data_args(self, task: str, settings) -> dict[str, Any]:
    return dict(mixture_or_task_name=task,
                task_feature_lengths=dict(settings.task_feature_lengths))

  def _train_batches(self, task: str, settings, start_step: int) -> Iterator[dict]:
    """The batches of steps start_step, start_step + 1, ... (the order `train.train` uses)."""
    args = dict(self._data_args(task, settings), global_batch_size=settings.batch_size,
                seed=self.seed, pack=settings.pack)
    tokens = settings.steps * settings.batch_size * settings.length
    if tokens > self._max_cached_tokens:
      return data.train_dataset(**args, start_step=start_step).as_numpy_iterator()
    key = study_cache.config_key({**args, "steps": settings.steps})
    if key not in self._batches:
      stream = data.train_dataset(**args).as_numpy_iterator()
      self._batches[key] = list(itertools.islice(stream, settings.steps))
    return iter(self._batches[key][start_step:])

  def _probe(self, task: str, settings, dropping) -> Callable[[], list] | None:
    if dropping is None:
      return None
    args = dict(self._data_args(task, settings), batch_size=settings.batch_size,
                split="train", pack=settings.pack, max_batches=dropping.probe_batches)
    key = study_cache.config_key({**args, "probe": True})
    if key not in self._batches:
      self._batches[key] = list(data.eval_batches(**args))
    return lambda: self._batches[key]

  def _initial_state(self, run: trainer_lib.Trainer, manager, init_params: Any,
                     rng: jax.Array) -> train_step.TrainState:
    if checkpoints.latest_step(manager) is not None:
      return run.initial_state(manager, init_checkpoint=None, rng=rng)  # resume
    variant = run.variant(run.config, 0)
    if init_params is None:
      return sharded_state.init_state(variant.model, variant.tx, rng=rng,
                                      batch_shape=run.batch_shape, layout=variant.layout)
    return sharded_state.state_from_params(variant.model, variant.tx, init_params,
                                           layout=variant.layout, step=0)

  def train(self, directory: str, *, config: configs.ModelConfig, settings, task: str,
            init_params: Any, router_warmup: bool = False,
            dropping: finetune.ProgressiveDropping | None = None) -> tuple[Any, dict]:
    """Trains into `directory`, resuming from its newest checkpoint if there is one.

    Args:
      directory: Stage directory; checkpoints go to `directory/checkpoints`.
      config: The model (its expert counts are taken from `init_params` if given).
      settings: A `study_config.TrainSettings`.
      task: seqio task or mixture trained on.
      init_params: Starting params, or None for a random initialization.
      router_warmup: Begin with `settings.router_warmup_steps` router-only steps.
      dropping: Progressive expert dropping, or None.

    Returns:
      (final params, JSON summary: final expert count, steps, first step trained by this
      call, last logged loss).
    """
    if init_params is not None:  # a pruned model has fewer experts than `config` may say
      config = study_stages.with_experts(config, init_params)
    run = self._trainer(config, settings, router_warmup=router_warmup, dropping=dropping)
    manager = checkpoints.make_manager(os.path.join(directory, "checkpoints"), keep=1)
    rng = jax.random.key(self.seed)
    try:
      state = self._initial_state(run, manager, init_params, jax.random.fold_in(rng, 0))
      start = int(state.step)
      state, last = self._loop(run, manager, state, task=task, settings=settings,
                               dropout_rng=jax.random.fold_in(rng, 1),
                               probe=self._probe(task, settings, dropping))
    finally:
      manager.wait_until_finished()
      manager.close()
    return state.params, {"experts_per_layer": finetune.experts_per_layer(state.params),
                          "steps": int(state.step), "first_step": start + 1,
                          "final_loss": last.get("loss")}

  def _loop(self, run, manager, state, *, task, settings, dropout_rng, probe):
    """`train.train`'s loop: advance (phase change, expert drop), step, log, checkpoint."""
    steps, start = settings.steps, int(state.step)
    batches = self._train_batches(task, settings, start)
    sharding = partitioning.batch_sharding(self.mesh)
    progress = metrics_writer.ProgressMeter(total_steps=steps, start_step=start)
    last: dict[str, float] = {}
    for step in range(start, steps):
      state = run.advance(state, probe_batches=probe)
      variant = run.variant_of(state)
      state, metrics = variant.train_step(state, data.to_global(next(batches), sharding),
                                          dropout_rng)
      done = step + 1
      if done % self._log_every == 0 or done == steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        progress.update(step=done, metrics={"loss": last["loss"],
                                            "experts": variant.config.num_experts})
      if done % self._checkpoint_every == 0 or done == steps:
        checkpoints.save(manager, state, metadata={
            "model_config": dataclasses.asdict(variant.config),
            "phase": run.phases[variant.phase_index].name})
    return state, last
