"""The study's training loop against the bare compiled train step, and per-stage set-up.

Side by side in one process, at the default study's settings (gin/experiments/synthetic.gin):

1. bare: the jitted train step of the source model on one in-memory batch, `--steps`
   times (the floor: no data, no loop, no checkpoint);
2. study: a pretraining stage of the same model through the study's StageTrainer (cached
   batches, the shared training loop, one checkpoint at the end), same steps;
3. set-up: a second stage of the same shapes and seed (its batches cached, as for the
   models of one seed in the study), timed at its progress reports: its time beyond its
   steps is what every further stage pays;
4. data: the seqio pipeline alone (reading a seed's batches, no training), and a stage
   of another seed, which reads its own batches as it trains (the overlap hides part of
   the reading).

Prints seconds, steps per second and the ratios; the target is study/bare <= 1.10 and a
set-up of at most 2 s.

  python benchmarks/study_throughput.py --steps 200
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import gin
import jax

import uncurl_jax.tasks  # noqa: F401  (registers the seqio tasks)
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import partitioning
from uncurl_jax.model.decoder import SMoEDecoder
from uncurl_jax.study import __main__ as study_main
from uncurl_jax.study import training
from uncurl_jax.study.run import persistent_compilation_cache
from uncurl_jax.train import optim
from uncurl_jax.train import state as state_lib
from uncurl_jax.train import step as step_lib


LOG_EVERY = 25


def _study_config():
  study_main.parse_gin()
  return gin.query_parameter("run_study.config").scoped_configurable_fn()


def _stream(settings, seed: int):
  """The numpy batches of a seed's pretraining stream, as the study reads them."""
  return pipeline.train_dataset(
      mixture_or_task_name=settings.mixture_or_task_name,
      task_feature_lengths=dict(settings.task_feature_lengths),
      global_batch_size=settings.batch_size, seed=seed, pack=settings.pack).as_numpy_iterator()


def bare_steps_per_second(config, settings, steps: int) -> tuple[float, float]:
  """(compile seconds, steps per second) of the jitted step on one batch."""
  model = SMoEDecoder(config)
  tx = settings.make_optimizer()(total_steps=steps)
  mesh = partitioning.make_mesh()
  layout = state_lib.state_layout(model, tx, batch_shape=(settings.batch_size,
                                                          settings.length), mesh=mesh)
  state = state_lib.init_state(model, tx, rng=jax.random.key(0),
                               batch_shape=(settings.batch_size, settings.length),
                               layout=layout)
  step = step_lib.compile_train_step(config, mesh=mesh, state_shardings=layout.shardings,
                                     batch_sharding=partitioning.batch_sharding(mesh))
  batch = next(_stream(settings, seed=0))
  batch = pipeline.to_global(batch, partitioning.batch_sharding(mesh))
  start = time.perf_counter()
  state, _ = step(state, batch, jax.random.key(1))
  jax.block_until_ready(state)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(1))
  jax.block_until_ready(metrics)
  return compile_seconds, steps / (time.perf_counter() - start)


def read_seconds(settings, steps: int, seed: int) -> float:
  """Seconds to read `steps` batches of a seed's pretraining stream (no training), after
  its first batch (the pipeline's start-up)."""
  stream = _stream(settings, seed=seed)
  next(stream)
  start = time.perf_counter()
  for _ in range(steps):
    next(stream)
  return time.perf_counter() - start


def study_stage_seconds(trainer, config, settings, directory, seed=0
                        ) -> tuple[float, list[float]]:
  """(seconds of the stage, seconds at each of its progress reports)."""
  start, reports = time.perf_counter(), []
  trainer.train(directory, config=config, settings=settings, seed=seed,
                task=settings.mixture_or_task_name, init_params=None,
                on_steps=lambda units: reports.append(time.perf_counter() - start))
  return time.perf_counter() - start, reports


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  study = _study_config()
  config = configs.with_expert_counts(study.model, max(study.source_experts))
  settings = dataclasses.replace(study.pretrain, steps=args.steps,
                                 warmup_steps=min(study.pretrain.warmup_steps, args.steps))
  print(f"model: d_model {config.d_model}, {config.num_layers} blocks, "
        f"{config.num_experts} experts, top-{config.top_k}; batch {settings.batch_size} x "
        f"{settings.length}; {args.steps} steps; {jax.device_count()} devices, "
        f"{os.cpu_count()} CPUs")
  with tempfile.TemporaryDirectory() as tmp, persistent_compilation_cache(
      os.path.join(tmp, "cache")):
    compile_seconds, bare = bare_steps_per_second(config, settings, args.steps)
    trainer = training.StageTrainer(mesh=partitioning.make_mesh(),
                                    checkpoint_every_steps=10**9, log_every_steps=LOG_EVERY)
    first, _ = study_stage_seconds(trainer, config, settings, os.path.join(tmp, "a"))
    # Stages of one seed share its batches (the study's models of a seed read them once):
    # a second stage of the same shapes and seed, timed at its progress reports (every
    # LOG_EVERY steps), gives the loop's rate and what the stage spends besides its steps;
    # a stage of another seed adds reading its batches.
    again, reports = study_stage_seconds(trainer, config, settings, os.path.join(tmp, "b"))
    other_seed, _ = study_stage_seconds(trainer, config, settings, os.path.join(tmp, "d"),
                                        seed=1)
    reading = read_seconds(settings, args.steps, seed=2)
  per_step = (reports[-1] - reports[0]) / (LOG_EVERY * (len(reports) - 1))
  setup = again - settings.steps * per_step
  study_rate = 1.0 / per_step
  print(f"bare step:  {bare:8.2f} steps/s  (compile {compile_seconds:.1f} s)")
  print(f"study loop: {study_rate:8.2f} steps/s  ratio bare/study {bare / study_rate:.3f} "
        f"(target <= 1.10)")
  print(f"first stage (compiles, reads its batches): {first:.1f} s; a stage with compiled "
        f"shapes and cached batches: {again:.1f} s, of which {setup:.2f} s besides its steps "
        "(target <= 2 s)")
  print(f"reading a seed's batches alone: {reading / settings.steps * 1e3:.1f} ms per batch; "
        f"a stage of another seed (reads its {settings.steps} batches as it trains): "
        f"{other_seed:.1f} s, {(other_seed - again) / settings.steps * 1e3:.1f} ms per step "
        "more than with cached batches")


if __name__ == "__main__":
  main()
