"""One way to build and run a training run: `Run(config, settings, mesh).train(directory, ...)`.

A run is a model config, its `RunSettings` (batch shape, steps, optimizer, router warm-up,
progressive dropping, checkpoint and log periods) and a directory. `Run` builds the run's
`Trainer` (its compiled variants); `Run.train` makes the checkpoint manager, the initial
state (the directory's newest checkpoint, else the initial params or checkpoint, else a
random initialization from the seed), the dropout key, and runs `loop.train_loop` over the
batches from the step it starts at, closing the manager whatever happens.

`python -m uncurl_jax.train` (`run.train`) builds one `Run` and trains it once; the study
keeps one `Run` per (model, settings), so that its stages share compiled steps, and gives
each stage its directory, its initial params and its cached batches. Both therefore train
the same model from the same seed, params and batches.

Example:
  >>> settings = RunSettings(batch_size=16, length=128, steps=100,
  ...                        make_optimizer=functools.partial(optim.make_optimizer,
  ...                                                         peak_learning_rate=1e-3))
  >>> run = Run(configs.get("tiny"), settings, mesh=partitioning.make_mesh())
  >>> result = run.train("/tmp/tiny", seed=0, batches=lambda start: iter(my_batches[start:]))
  >>> result.state.step, result.history[-1]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from uncurl_jax import checks
from uncurl_jax.model import configs
from uncurl_jax.train import checkpoints
from uncurl_jax.train import loop
from uncurl_jax.train import optim
from uncurl_jax.train import schedules
from uncurl_jax.train import step as step_lib
from uncurl_jax.train import trainer as trainer_lib


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """How a run trains (everything but the model, the data and the directory).

  Attributes:
    batch_size, length: The (global batch, decoder length) of the training batches.
    steps: The step training ends at (finetuning counts from 0).
    make_optimizer: Optimizer factory, called per phase as `make_optimizer(total_steps=...,
      [warmup_steps=0, trainable=...])` (see `trainer.Trainer`).
    router_warmup_steps: Router-only steps first (0: none).
    router_warmup_learning_rate: Their peak learning rate (None: the optimizer's).
    dropping: Progressive expert dropping, or None.
    adapt_experts_to_checkpoint: Take the initial params' expert counts (a pruned model).
    checkpoint_every_steps: Checkpoint period (and at the end).
    keep_checkpoints: Newest checkpoints kept (None: all).
    async_checkpointing: Write checkpoints in a background thread.
    log_every_steps: Period of the logged metrics (and at the end).
    eval_every_steps: Period of `on_eval` (and at the end); None: at the end only.
  """

  batch_size: int
  length: int
  steps: int
  make_optimizer: Callable[..., Any] = optim.make_optimizer
  router_warmup_steps: int = 0
  router_warmup_learning_rate: float | None = None
  dropping: schedules.ProgressiveDropping | None = None
  adapt_experts_to_checkpoint: bool = False
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int | None = None
  async_checkpointing: bool = True
  log_every_steps: int = 10
  eval_every_steps: int | None = None

  def __post_init__(self):
    for name in ("batch_size", "length", "steps", "checkpoint_every_steps", "log_every_steps"):
      checks.integer(f"RunSettings.{name}", getattr(self, name), low=1)
    checks.integer("RunSettings.router_warmup_steps", self.router_warmup_steps, low=0,
                   high=self.steps)
    for name in ("keep_checkpoints", "eval_every_steps"):
      if getattr(self, name) is not None:
        checks.integer(f"RunSettings.{name}", getattr(self, name), low=1)


@dataclasses.dataclass
class RunResult:
  """What `Run.train` returns.

  Attributes:
    state: The final train state.
    config: The final model's config (a pruned or dropped model's own counts).
    history: [(step, scalar metrics)] of the steps logged by this call.
    first_step: The first step this call trained (a resumed run starts past 1).
  """

  state: step_lib.TrainState
  config: configs.ModelConfig
  history: list[tuple[int, dict[str, float]]]
  first_step: int


class Run:
  """A model config and its settings, compiled once, trained into any directory.

  Args:
    config: The model (a pruned model's own config when training from its params).
    settings: `RunSettings`.
    mesh: The device mesh.
  """

  def __init__(self, config: configs.ModelConfig, settings: RunSettings, mesh: Mesh):
    if not isinstance(config, configs.ModelConfig):
      raise TypeError(f"Run needs a ModelConfig, got {type(config).__name__}")
    if not isinstance(settings, RunSettings):
      raise TypeError(f"Run needs RunSettings, got {type(settings).__name__}")
    self.settings = settings
    self.trainer = trainer_lib.Trainer(
        config=config, mesh=mesh, batch_shape=(settings.batch_size, settings.length),
        phases=schedules.training_phases(train_steps=settings.steps,
                                         router_warmup_steps=settings.router_warmup_steps),
        make_optimizer=settings.make_optimizer,
        router_warmup_learning_rate=settings.router_warmup_learning_rate,
        dropping=settings.dropping,
        adapt_experts_to_checkpoint=settings.adapt_experts_to_checkpoint)

  def train(self, directory: str, *, seed: int,
            batches: Callable[[int], Iterator[Mapping[str, Any]]],
            init_params: Any = None, init_checkpoint: str | None = None,
            init_checkpoint_step: int | None = None,
            probe: Callable[[], Sequence[Any]] | None = None,
            on_start: Callable[[int], None] | None = None,
            on_log: loop.LogFn | None = None,
            on_eval: loop.EvalFn | None = None) -> RunResult:
    """Trains into `directory` (checkpoints in `directory/checkpoints`), resuming from its
    newest checkpoint if there is one.

    Args:
      directory: The run's directory.
      seed: Initialization (fold 0) and dropout (fold 1) seed.
      batches: `batches(start)` -> host-local numpy batches of steps start, start + 1, ...
        (called once the starting step is known).
      init_params: Params to start from (in memory, e.g. a pruned model), or None.
      init_checkpoint, init_checkpoint_step: A checkpoint to start from, or None.
      probe: The fixed batches progressive dropping measures proficiency on.
      on_start: Called with the starting step before the first training step.
      on_log, on_eval: `loop.train_loop`'s hooks.
    """
    settings = self.settings
    manager = checkpoints.make_manager(os.path.join(directory, "checkpoints"),
                                       keep=settings.keep_checkpoints,
                                       async_save=settings.async_checkpointing)
    rng = jax.random.key(seed)
    try:
      # A resumed run restarts from its checkpoint, whatever the initial params are.
      state = self.trainer.initial_state(
          manager, rng=jax.random.fold_in(rng, 0), init_params=init_params,
          init_checkpoint=init_checkpoint, init_checkpoint_step=init_checkpoint_step)
      start = int(state.step)
      if on_start is not None:
        on_start(start)
      state, history = loop.train_loop(
          self.trainer, state, batches(start), manager=manager, total_steps=settings.steps,
          dropout_rng=jax.random.fold_in(rng, 1),
          checkpoint_every=settings.checkpoint_every_steps,
          log_every=settings.log_every_steps, eval_every=settings.eval_every_steps,
          probe=probe, on_log=on_log, on_eval=on_eval)
    finally:
      manager.wait_until_finished()
      manager.close()
    return RunResult(state=state, config=self.trainer.variant_of(state).config,
                     history=history, first_step=start + 1)
