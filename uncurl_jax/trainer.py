"""The model, optimizer and compiled steps of a run, across phases and expert counts.

A run trains one model family whose expert count may change (a pruned checkpoint,
progressive expert dropping) through phases with different optimizers (router-only
warm-up, then full training). `Trainer` builds one `Variant` (model, optimizer, state
layout, jitted train/eval steps) per (model config, phase) and moves a state from one
variant to the next; `train.py` drives it step by step.

Example:
  >>> run = Trainer(config=cfg, mesh=mesh, batch_shape=(8, 128),
  ...               phases=finetune.training_phases(train_steps=100, router_warmup_steps=10),
  ...               make_optimizer=functools.partial(optim.make_optimizer, warmup_steps=10))
  >>> state = run.initial_state(manager, init_checkpoint=None, rng=jax.random.key(0))
  >>> state = run.advance(state, probe_batches=None)     # phase changes, expert drops
  >>> state, metrics = run.variant_of(state).train_step(state, batch, dropout_rng)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.sharding import Mesh
import optax
import orbax.checkpoint as ocp

from uncurl_jax import checkpoints
from uncurl_jax import configs
from uncurl_jax import decoder
from uncurl_jax import finetune
from uncurl_jax import partitioning
from uncurl_jax import pruning
from uncurl_jax import sharded_state
from uncurl_jax import train_step


@dataclasses.dataclass(frozen=True)
class Variant:
  """Everything compiled for one (model config, phase) of a run."""

  config: configs.ModelConfig
  phase_index: int
  model: decoder.SMoEDecoder
  tx: optax.GradientTransformation
  layout: sharded_state.StateLayout
  train_step: Callable  # (state, batch, rng) -> (state, metrics)
  eval_step: Callable  # (params, batch) -> metrics


def config_for_params(config: configs.ModelConfig, params: Any, *,
                      adapt: bool) -> configs.ModelConfig:
  """`config` with the expert counts of `params` (a pruned checkpoint has fewer experts).

  Uneven counts (pruned per layer, e.g. MC-SMoE) become `layer_num_experts`.

  Args:
    config: The run's config (from gin: NUM_EXPERTS).
    params: Params or params shapes (e.g. `checkpoints.params_shapes(...)`).
    adapt: Take the checkpoint's counts when they differ; False raises instead.
  """
  counts = finetune.experts_per_layer(params)
  blocks = {int(path.split("/")[0].removeprefix("layers_")): count
            for path, count in counts.items()}
  if sorted(blocks) != list(config.moe_layers):
    raise ValueError(f"the checkpoint has MoE layers at blocks {sorted(blocks)}, the model config "
                     f"at {list(config.moe_layers)} (num_experts={config.num_experts}); use the "
                     "model file the checkpoint was trained with")
  per_layer = tuple(blocks[i] for i in config.moe_layers)
  if not per_layer or len(set(per_layer)) == 1:
    wanted = dataclasses.replace(config, num_experts=per_layer[0] if per_layer else 0,
                                 layer_num_experts=None)
  else:
    wanted = dataclasses.replace(config, num_experts=max(per_layer), layer_num_experts=per_layer)
  if wanted == config:
    return config
  if not adapt:
    raise ValueError(f"the checkpoint has {per_layer} experts in its MoE layers but the model "
                     f"config has num_experts={config.num_experts}; set NUM_EXPERTS to match "
                     "(or let the run adapt to the checkpoint)")
  return wanted


def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
  """A run's MODEL_DIR (holding 'checkpoints/') or a checkpoint root, as a checkpoint root."""
  path = os.fspath(path)
  nested = os.path.join(path, "checkpoints")
  return nested if os.path.isdir(nested) else path


class Trainer:
  """Builds and caches a `Variant` per (model config, phase); moves states between them.

  Args:
    config: Model config; a checkpoint's expert counts replace its own (see
      `config_for_params`).
    mesh: Device mesh ('data', 'expert', 'model').
    batch_shape: (global batch size, length) of training batches.
    phases: `finetune.training_phases(...)`.
    make_optimizer: Called as `make_optimizer(total_steps=..., [warmup_steps=0,
      trainable=...])` per phase (gin binds its other hyperparameters).
    router_warmup_learning_rate: Peak learning rate of the router-only phase; None keeps
      the optimizer's.
    dropping: Progressive expert dropping, or None.
    adapt_experts_to_checkpoint: Let an init checkpoint's expert counts replace the
      config's (else a mismatch raises).
  """

  def __init__(self, *, config: configs.ModelConfig, mesh: Mesh, batch_shape: tuple[int, int],
               phases: Sequence[finetune.TrainingPhase], make_optimizer: Callable[..., Any],
               router_warmup_learning_rate: float | None = None,
               dropping: finetune.ProgressiveDropping | None = None,
               adapt_experts_to_checkpoint: bool = True):
    self.config, self.mesh, self.batch_shape = config, mesh, batch_shape
    self.phases, self.dropping = tuple(phases), dropping
    self._make_optimizer = make_optimizer
    self._router_lr = router_warmup_learning_rate
    self._adapt = adapt_experts_to_checkpoint
    self._variants: dict[tuple[configs.ModelConfig, int], Variant] = {}
    self._optimizers: dict[int, optax.GradientTransformation] = {}

  # ------------------------------------------------------------------------------------
  # Variants.

  def _optimizer(self, phase_index: int) -> optax.GradientTransformation:
    # One optimizer object per phase: it is static data of the TrainState, and the
    # variants of one phase (expert counts) share it.
    if phase_index not in self._optimizers:
      phase = self.phases[phase_index]
      kwargs = dict(total_steps=phase.num_steps)
      if phase.trainable is not None:
        kwargs.update(warmup_steps=0, trainable=phase.trainable)
        if self._router_lr is not None:
          kwargs["peak_learning_rate"] = self._router_lr
      self._optimizers[phase_index] = self._make_optimizer(**kwargs)
    return self._optimizers[phase_index]

  def variant(self, config: configs.ModelConfig, phase_index: int) -> Variant:
    """The (cached) variant of model `config` in phase `phase_index`."""
    key = (config, phase_index)
    if key not in self._variants:
      model = decoder.SMoEDecoder(config)
      tx = self._optimizer(phase_index)
      layout = sharded_state.state_layout(model, tx, batch_shape=self.batch_shape, mesh=self.mesh)
      step = train_step.compile_train_step(
          config, mesh=self.mesh, state_shardings=layout.shardings,
          batch_sharding=partitioning.batch_sharding(self.mesh))
      eval_step = train_step.compile_eval_step(config, model.apply, mesh=self.mesh)
      self._variants[key] = Variant(config, phase_index, model, tx, layout, step, eval_step)
    return self._variants[key]

  def variant_of(self, state: train_step.TrainState) -> Variant:
    """The variant that made `state` (its expert counts, the same optimizer object)."""
    config = config_for_params(self.config, state.params, adapt=True)
    for (variant_config, _), variant in self._variants.items():
      if variant.tx is state.tx and variant_config == config:
        return variant
    raise ValueError(f"the state at step {int(state.step)} was not made by this Trainer")

  # ------------------------------------------------------------------------------------
  # Starting states.

  def initial_state(self, manager: ocp.CheckpointManager, *, init_checkpoint: str | None,
                    rng: jax.Array, init_checkpoint_step: int | None = None
                    ) -> train_step.TrainState:
    """Resumes from `manager`'s newest checkpoint, else starts from `init_checkpoint`'s
    params (fresh optimizer, step 0), else from a random initialization."""
    directory = None if init_checkpoint is None else resolve_checkpoint_dir(init_checkpoint)
    if directory is not None:
      # The run's starting config is the init checkpoint's, resumed or not: the dropping
      # schedule counts from it.
      shapes = checkpoints.params_shapes(directory, step=init_checkpoint_step)
      adapted = config_for_params(self.config, shapes, adapt=self._adapt)
      if adapted != self.config:
        logging.info("The init checkpoint has %s experts per MoE layer (config: %d).",
                     adapted.layer_num_experts or adapted.num_experts, self.config.num_experts)
      self.config = adapted
    self._check_config()
    latest = checkpoints.latest_step(manager)
    if latest is not None:
      shapes = checkpoints.params_shapes(manager.directory, step=latest)
      variant = self.variant(config_for_params(self.config, shapes, adapt=True),
                             finetune.checkpoint_phase_index(self.phases, latest))
      logging.info("Resuming from %s at step %d.", manager.directory, latest)
      return checkpoints.restore_state(manager, abstract_state=variant.layout.abstract, step=latest)
    variant = self.variant(self.config, 0)
    if directory is not None:
      logging.info("Initializing params from %s.", directory)
      params = checkpoints.restore_params(directory, step=init_checkpoint_step,
                                          abstract_params=variant.layout.abstract.params)
      return sharded_state.state_from_params(variant.model, variant.tx, params,
                                             layout=variant.layout, step=0)
    return sharded_state.init_state(variant.model, variant.tx, rng=rng,
                                    batch_shape=self.batch_shape, layout=variant.layout)

  def _check_config(self) -> None:
    if self.config.num_experts == 0 and any(p.trainable is not None for p in self.phases):
      raise ValueError("a router-only warm-up needs an MoE model; the config is dense "
                       "(num_experts=0)")
    if self.dropping is None:
      return
    if self.config.layer_num_experts is not None:
      raise ValueError(f"progressive dropping needs one expert count in every layer, got "
                       f"{self.config.layer_num_experts}")
    expert_axis = self.mesh.shape["expert"]
    counts = [count for _, count in self.dropping.schedule(num_experts=self.config.num_experts)]
    if any(count % expert_axis for count in counts):
      raise ValueError(f"progressive dropping goes through {counts} experts; each must be "
                       f"divisible by the mesh's expert axis ({expert_axis})")

  # ------------------------------------------------------------------------------------
  # Moving between variants.

  def advance(self, state: train_step.TrainState, *,
              probe_batches: Callable[[], Sequence[Any]] | None) -> train_step.TrainState:
    """Applies a phase change or an expert drop due at `state.step` (idempotent).

    Args:
      state: The state before training step `state.step + 1`.
      probe_batches: Returns the fixed training batches on which expert proficiency is
        measured; needed when progressive dropping is on.
    """
    step = int(state.step)
    current = self.variant_of(state)
    wanted = finetune.phase_index(self.phases, step)
    if wanted != current.phase_index:
      variant = self.variant(current.config, wanted)
      logging.info("Step %d: phase %r -> %r.", step, self.phases[current.phase_index].name,
                   self.phases[wanted].name)
      state = sharded_state.state_from_params(variant.model, variant.tx, state.params,
                                              layout=variant.layout, step=step)
    if self.dropping is not None:
      target = self.dropping.experts_at(step, num_experts=self.config.num_experts)
      if target < finetune.num_experts_of(state.params):
        state = self._drop_experts(state, target, probe_batches())
    return state

  def _drop_experts(self, state, target: int, batches) -> train_step.TrainState:
    variant = self.variant_of(state)
    router_logits = pruning.collect_router_logits(variant.model, state.params, batches)
    keep = finetune.experts_to_keep(router_logits, target)
    logging.info("Step %d: dropping to %d experts per layer, keeping %s.", int(state.step),
                 target, {k: v.tolist() for k, v in keep.items()})
    smaller = self.variant(dataclasses.replace(variant.config, num_experts=target),
                           variant.phase_index)
    shardings = smaller.layout.shardings
    return state.replace(
        apply_fn=smaller.model.apply, tx=smaller.tx,
        params=jax.device_put(finetune.keep_experts(state.params, keep), shardings.params),
        opt_state=jax.device_put(finetune.keep_experts(state.opt_state, keep),
                                 shardings.opt_state))
