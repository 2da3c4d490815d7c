"""Training: losses, optimizer, steps, sharded state, checkpoints, the loop, evaluation.

Modules: `losses`, `optim`, `step` (pure train/eval steps), `state` (the train state on a
mesh), `checkpoints` (orbax), `schedules` (router-only warm-up phases, progressive expert
dropping), `trainer` (compiled variants per model and phase), `loop` (the one training
loop), `evaluation`, `metrics` (TensorBoard, progress), `run` (the gin-configured `train`
and `evaluate` procedures; `python -m uncurl_jax.train`).

This package imports no module eagerly: `evaluation` and `run` load seqio/TensorFlow.

Example:
  >>> from uncurl_jax.train import optim, step
  >>> state = step.create_state(model, params, optim.make_optimizer(total_steps=100))
"""
