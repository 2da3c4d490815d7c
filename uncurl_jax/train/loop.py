"""The training loop: the one that `python -m uncurl_jax.train` and the study's stages run.

Per step: `Trainer.advance` (a phase change or an expert drop due at this step), the
variant's compiled train step on the next batch, then logging, evaluation and
checkpointing when they are due. What happens with logged metrics and evaluations is up
to the caller (`on_log`, `on_eval`): `run.train` writes TensorBoard and progress lines,
the study updates its progress bar.

Example:
  >>> state, history = train_loop(trainer, state, batches, manager=manager, total_steps=100,
  ...                             dropout_rng=jax.random.key(1), checkpoint_every=50,
  ...                             log_every=10)
  >>> history[-1]            # (100, {'loss': ..., 'accuracy': ..., 'num_experts': 8.0, ...})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from uncurl_jax.data import pipeline
from uncurl_jax.model import partitioning
from uncurl_jax.train import checkpoints
from uncurl_jax.train import step as step_lib
from uncurl_jax.train import trainer as trainer_lib

# (step, variant, scalar metrics) of a logged step; (step, state, variant) of an eval.
LogFn = Callable[[int, trainer_lib.Variant, dict[str, float]], None]
EvalFn = Callable[[int, step_lib.TrainState, trainer_lib.Variant], None]


def due(step: int, every: int | None, last: int) -> bool:
  """Whether a periodic action is due after `step` (every `every` steps, and at the end)."""
  return step == last or (every is not None and step % every == 0)


def train_loop(trainer: trainer_lib.Trainer, state: step_lib.TrainState,
               batches: Iterator[Mapping[str, Any]], *, manager: ocp.CheckpointManager,
               total_steps: int, dropout_rng: jax.Array, checkpoint_every: int,
               log_every: int, probe: Callable[[], Sequence[Any]] | None = None,
               eval_every: int | None = None, on_log: LogFn | None = None,
               on_eval: EvalFn | None = None
               ) -> tuple[step_lib.TrainState, list[tuple[int, dict[str, float]]]]:
  """Trains from `state.step` to `total_steps`.

  Args:
    trainer: The run's variants (model, optimizer, compiled steps per config and phase).
    state: The starting state (`Trainer.initial_state`).
    batches: Host-local numpy batches of steps `state.step`, `state.step + 1`, ...
    manager: Where checkpoints go (every `checkpoint_every` steps and at the end).
    total_steps: The step training ends at.
    dropout_rng: Dropout key (folded with the step inside the train step).
    checkpoint_every, log_every: Periods (both also at the end).
    probe: Returns the batches on which progressive dropping measures proficiency.
    eval_every: Period of `on_eval` (and at the end); None: at the end only.
    on_log: Called with (step, variant, scalars) at each logged step.
    on_eval: Called with (step, state, variant) at each evaluation.

  Returns:
    (final state, [(step, scalars)] of the logged steps). Scalars are the train step's
    metrics as floats plus 'num_experts'.
  """
  history: list[tuple[int, dict[str, float]]] = []
  sharding = partitioning.batch_sharding(trainer.mesh)
  for step in range(int(state.step), total_steps):
    state = trainer.advance(state, probe_batches=probe, step=step)
    variant = trainer.variant_of(state)
    state, metrics = variant.train_step(state, pipeline.to_global(next(batches), sharding),
                                        dropout_rng)
    done = step + 1
    if due(done, log_every, total_steps):
      scalars = {name: float(value) for name, value in jax.device_get(metrics).items()}
      scalars["num_experts"] = float(variant.config.num_experts)
      history.append((done, scalars))
      if on_log is not None:
        on_log(done, variant, scalars)
    if on_eval is not None and due(done, eval_every, total_steps):
      on_eval(done, state, variant)
    if due(done, checkpoint_every, total_steps):
      checkpoints.save(manager, state, metadata={
          "model_config": dataclasses.asdict(variant.config),
          "phase": trainer.phases[variant.phase_index].name})
  return state, history
