"""In-process training of the study's stages, sharing compiled runs and data across them.

Every stage trains through `train.builder.Run`, the one way a training run is built (the
same as `python -m uncurl_jax.train`): the checkpoint manager, the initial state, the keys
and the loop are the builder's. What is the study's own is caching: it runs a dozen
finetunings per task, most of them of same-size models on the same data, so
`StageTrainer` keeps one `Run` per (model, procedure), whose compiled variants every stage
of that kind reuses, and the batches of each (task, procedure), read once from seqio
(rebuilding a pipeline costs about 10 s of TensorFlow tracing on a small CPU). Training
state is checkpointed in the stage directory, so an interrupted stage resumes.

Example:
  >>> trainer = StageTrainer(mesh=mesh, seed=0, checkpoint_every_steps=100)
  >>> params, summary = trainer.train("/tmp/stage", config=cfg, settings=settings,
  ...                                 task="synthetic_lm", init_params=None)
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterator

import jax

from uncurl_jax import model as model_lib
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.study import cache as cache_lib
from uncurl_jax.study import compiled
from uncurl_jax.train import builder
from uncurl_jax.train import schedules

# Training batches of a (task, procedure) are kept in memory up to this many tokens and
# streamed from seqio beyond (pretraining at scale).
MAX_CACHED_TOKENS = 1 << 26


class StageTrainer:
  """Trains study stages with shared `Trainer`s and cached batches (module docstring).

  Args:
    mesh: The device mesh.
    checkpoint_every_steps: Checkpoint period (and at the end).
    log_every_steps: Period of the progress updates (and at the end).
    max_cached_tokens: Keep a procedure's batches in memory up to this many tokens.
    unit_tokens: Tokens of one unit of work reported to `on_steps` (default: a step).
  """

  def __init__(self, *, mesh: jax.sharding.Mesh, checkpoint_every_steps: int,
               log_every_steps: int = 50, max_cached_tokens: int = MAX_CACHED_TOKENS,
               unit_tokens: int | None = None):
    for name, value in (("checkpoint_every_steps", checkpoint_every_steps),
                        ("log_every_steps", log_every_steps)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    self.mesh = mesh
    self._checkpoint_every, self._log_every = checkpoint_every_steps, log_every_steps
    self._max_cached_tokens, self._unit_tokens = max_cached_tokens, unit_tokens
    self._runs: dict[str, builder.Run] = compiled.CompiledCache()
    self._batches: dict[str, list] = {}
    self._streams: dict[str, Iterator[dict]] = {}

  def _run(self, config: configs.ModelConfig, settings, *, router_warmup: bool,
           dropping: schedules.ProgressiveDropping | None) -> builder.Run:
    warmup = settings.router_warmup_steps if router_warmup else 0
    key = cache_lib.config_key({"config": config, "settings": settings, "warmup": warmup,
                                "dropping": dropping})
    if key not in self._runs:
      self._runs[key] = builder.Run(config, builder.RunSettings(
          batch_size=settings.batch_size, length=settings.length, steps=settings.steps,
          make_optimizer=settings.make_optimizer(), router_warmup_steps=warmup,
          router_warmup_learning_rate=settings.router_warmup_learning_rate,
          dropping=dropping, checkpoint_every_steps=self._checkpoint_every,
          keep_checkpoints=1, log_every_steps=self._log_every), mesh=self.mesh)
    return self._runs[key]

  def _data_args(self, task: str, settings) -> dict[str, Any]:
    return dict(mixture_or_task_name=task,
                task_feature_lengths=dict(settings.task_feature_lengths))

  def _train_batches(self, task: str, settings, seed: int, first: int, last: int
                     ) -> Iterator[dict]:
    """The batches of steps first, ..., last - 1 of `task`'s stream (the order
    `train.run.train` uses). Procedures of one task share the stream, read once, and
    lazily: a batch is read when training reaches it, so the first step does not wait for
    the whole stream (on 2 CPU cores reading and training still add up: the pipeline
    alone keeps both busy, benchmarks/RESULTS.md)."""
    args = dict(self._data_args(task, settings), global_batch_size=settings.batch_size,
                seed=seed, pack=settings.pack)
    if last * settings.batch_size * settings.length > self._max_cached_tokens:
      return itertools.islice(pipeline.train_dataset(**args, start_step=first)
                              .as_numpy_iterator(), last - first)
    key = cache_lib.config_key(args)
    if key not in self._batches:
      self._batches[key] = []
      self._streams[key] = pipeline.train_dataset(**args).as_numpy_iterator()
    return self._read_through(self._batches[key], self._streams[key], first, last)

  @staticmethod
  def _read_through(cached: list, stream: Iterator[dict], first: int, last: int
                    ) -> Iterator[dict]:
    for index in range(first, last):
      if index >= len(cached):
        cached.extend(itertools.islice(stream, index + 1 - len(cached)))
      yield cached[index]

  def _probe(self, task: str, settings, dropping) -> Callable[[], list] | None:
    if dropping is None:
      return None
    args = dict(self._data_args(task, settings), batch_size=settings.batch_size,
                split="train", pack=settings.pack, max_batches=dropping.probe_batches)
    key = cache_lib.config_key({**args, "probe": True})
    if key not in self._batches:
      self._batches[key] = list(pipeline.eval_batches(**args))
    return lambda: self._batches[key]

  def train(self, directory: str, *, config: configs.ModelConfig, settings, seed: int,
            task: str, init_params: Any, router_warmup: bool = False,
            dropping: schedules.ProgressiveDropping | None = None, data_offset: int = 0,
            on_steps: Callable[[float], None] | None = None) -> tuple[Any, dict]:
    """Trains into `directory`, resuming from its newest checkpoint if there is one.

    Args:
      directory: Stage directory; checkpoints go to `directory/checkpoints`.
      config: The model (that of `init_params` if given: a pruned model's own config).
      settings: A `study.config.TrainSettings`.
      task: seqio task or mixture trained on.
      init_params: Starting params, or None for a random initialization.
      seed: Initialization, dropout and data-order seed.
      router_warmup: Begin with `settings.router_warmup_steps` router-only steps.
      dropping: Progressive expert dropping, or None.
      data_offset: Start at this batch of the task's stream (a procedure continuing
        another's data).
      on_steps: Called with the work done (in pretraining steps) as training advances.

    Returns:
      (final params, JSON summary: final expert count, steps, first step trained by this
      call, last logged loss).
    """
    run = self._run(config, settings, router_warmup=router_warmup, dropping=dropping)
    unit = settings.batch_size * settings.length / (self._unit_tokens or
                                                     settings.batch_size * settings.length)
    logged = [0]

    def on_start(step):
      logged[0] = step

    def on_log(step, variant, scalars):
      del variant, scalars
      if on_steps is not None:
        on_steps((step - logged[0]) * unit)
      logged[0] = step
    result = run.train(
        directory, seed=seed, init_params=init_params,
        batches=lambda start: self._train_batches(task, settings, seed, data_offset + start,
                                                  data_offset + settings.steps),
        probe=self._probe(task, settings, dropping), on_start=on_start, on_log=on_log)
    final_loss = result.history[-1][1]["loss"] if result.history else None
    return result.state.params, {
        "experts_per_layer": model_lib.expert_counts(result.state.params),
        "model_config": dataclasses.asdict(result.config), "steps": int(result.state.step),
        "first_step": result.first_step, "final_loss": final_loss}
