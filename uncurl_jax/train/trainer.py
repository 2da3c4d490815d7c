"""The model, optimizer and compiled steps of a run, across phases and expert counts.

A run trains one model family whose expert count may change (a pruned checkpoint,
progressive expert dropping) through phases with different optimizers (router-only
warm-up, then full training). `Trainer` builds one `Variant` (model, optimizer, state
layout, jitted train/eval steps) per (model config, phase) and moves a state from one
variant to the next; `loop.train_loop` drives it step by step.

Example:
  >>> run = Trainer(config=cfg, mesh=mesh, batch_shape=(8, 128),
  ...               phases=schedules.training_phases(train_steps=100, router_warmup_steps=10),
  ...               make_optimizer=functools.partial(optim.make_optimizer, warmup_steps=10))
  >>> state = run.initial_state(manager, init_checkpoint=None, rng=jax.random.key(0))
  >>> state = run.advance(state, probe_batches=None)     # phase changes, expert drops
  >>> state, metrics = run.variant_of(state).train_step(state, batch, dropout_rng)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from absl import logging
import jax
from jax.sharding import Mesh
import optax
import orbax.checkpoint as ocp

from uncurl_jax.model import collect as collect_lib
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import forward as forward_lib
from uncurl_jax.model import layout as layout_lib
from uncurl_jax.model import partitioning
from uncurl_jax.train import checkpoints
from uncurl_jax.train import schedules
from uncurl_jax.train import state as state_lib
from uncurl_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Variant:
  """Everything compiled for one (model config, phase) of a run."""

  config: configs.ModelConfig
  phase_index: int
  model: decoder.SMoEDecoder
  tx: optax.GradientTransformation
  layout: state_lib.StateLayout
  train_step: Callable  # (state, batch, rng) -> (state, metrics)
  eval_step: Callable  # (params, batch) -> metrics
  init_state: Callable  # rng -> a freshly initialized state (traced once)
  state_from_params: Callable  # (params, step=0) -> a state around params (traced once)


def config_for_params(config: configs.ModelConfig, params: Any, *, adapt: bool,
                      saved_config: dict | None = None) -> configs.ModelConfig:
  """`config` with the expert counts of `params` (a pruned checkpoint has fewer experts).

  Uneven counts (pruned per layer, e.g. MC-SMoE) become `layer_num_experts`; router maps
  (a router bound to merged experts) come from the checkpoint's saved config.

  Args:
    config: The run's config (from gin: NUM_EXPERTS).
    params: Params or params shapes (e.g. `checkpoints.params_shapes(...)`).
    adapt: Take the checkpoint's counts when they differ; False raises instead.
    saved_config: The checkpoint's saved ModelConfig fields, if it has them.
  """
  counts = layout_lib.expert_counts(params)
  if not counts and config.num_experts:
    raise ValueError(f"the checkpoint has no MoE layer, the model config has MoE layers at "
                     f"blocks {list(config.moe_layers)}; use the model file the checkpoint "
                     "was trained with")
  wanted = configs.with_expert_counts(config, counts)
  maps = (saved_config or {}).get("layer_router_maps")
  if maps is not None and wanted.num_experts:
    wanted = dataclasses.replace(wanted, layer_router_maps=maps)  # normalized by the config
  if wanted != config and not adapt:
    raise ValueError(f"the checkpoint has {tuple(counts.values())} experts in its MoE layers "
                     f"but the model config has num_experts={config.num_experts}; set "
                     "NUM_EXPERTS to match (or let the run adapt to the checkpoint)")
  return wanted


class Trainer:
  """Builds and caches a `Variant` per (model config, phase); moves states between them.

  Args:
    config: Model config; a checkpoint's expert counts replace its own (see
      `config_for_params`).
    mesh: Device mesh ('data', 'expert', 'model').
    batch_shape: (global batch size, length) of training batches.
    phases: `schedules.training_phases(...)`.
    make_optimizer: Called as `make_optimizer(total_steps=..., [warmup_steps=0,
      trainable=...])` per phase (gin binds its other hyperparameters).
    router_warmup_learning_rate: Peak learning rate of the router-only phase; None keeps
      the optimizer's.
    dropping: Progressive expert dropping, or None.
    adapt_experts_to_checkpoint: Let the initial params' expert counts (an init
      checkpoint's, a pruned model's) replace the config's; else a mismatch raises.
  """

  def __init__(self, *, config: configs.ModelConfig, mesh: Mesh, batch_shape: tuple[int, int],
               phases: Sequence[schedules.TrainingPhase], make_optimizer: Callable[..., Any],
               router_warmup_learning_rate: float | None = None,
               dropping: schedules.ProgressiveDropping | None = None,
               adapt_experts_to_checkpoint: bool = False):
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
      layout = state_lib.state_layout(model, tx, batch_shape=self.batch_shape, mesh=self.mesh)
      step = step_lib.compile_train_step(
          config, mesh=self.mesh, state_shardings=layout.shardings,
          batch_sharding=partitioning.batch_sharding(self.mesh))
      eval_step = step_lib.compile_eval_step(config, model.apply, mesh=self.mesh)
      self._variants[key] = Variant(
          config, phase_index, model, tx, layout, step, eval_step,
          init_state=state_lib.init_state_fn(model, tx, batch_shape=self.batch_shape,
                                             layout=layout),
          state_from_params=state_lib.state_from_params_fn(model, tx, layout=layout))
    return self._variants[key]

  def variant_of(self, state: step_lib.TrainState) -> Variant:
    """The variant that made `state` (its expert counts, the same optimizer object)."""
    config = config_for_params(self.config, state.params, adapt=True)
    for (variant_config, _), variant in self._variants.items():
      if variant.tx is state.tx and variant_config == config:
        return variant
    raise ValueError(f"the state at step {int(state.step)} was not made by this Trainer")

  # ------------------------------------------------------------------------------------
  # Starting states.

  def initial_state(self, manager: ocp.CheckpointManager, *, rng: jax.Array,
                    init_checkpoint: str | None = None, init_checkpoint_step: int | None = None,
                    init_params: Any = None) -> step_lib.TrainState:
    """The state training starts from, in this order of preference:

    1. `manager`'s newest checkpoint (a resumed run);
    2. `init_params` (params in memory, e.g. a pruned model) or `init_checkpoint`'s params
       (a run's MODEL_DIR or a checkpoint root), with a fresh optimizer at step 0;
    3. a random initialization from `rng`.

    A checkpoint of another model is refused with a ValueError naming what differs. The
    run's config takes the expert counts of the starting params only when
    `adapt_experts_to_checkpoint` was given (finetuning a pruned model); resumed or not,
    the dropping schedule counts from them.
    """
    if init_checkpoint is not None and init_params is not None:
      raise ValueError("give init_checkpoint or init_params, not both")
    directory = None
    if init_checkpoint is not None:
      directory = checkpoints.resolve_checkpoint_dir(init_checkpoint)
      step = checkpoints.resolve_step(directory, step=init_checkpoint_step)
      self._adapt_config(checkpoints.params_shapes(directory, step=step),
                         f"the init checkpoint {directory} (step {step})",
                         checkpoints.read_metadata(directory, step=step).get("model_config"))
    elif init_params is not None:
      self._adapt_config(init_params, "the initial params")
    self._check_config()
    latest = checkpoints.latest_step(manager)
    if latest is not None:
      return self._resume(manager, latest)
    variant = self.variant(self.config, 0)
    if directory is not None:
      logging.info("Initializing params from %s.", directory)
      init_params = checkpoints.restore_params(directory, step=init_checkpoint_step,
                                               abstract_params=variant.layout.abstract.params)
    if init_params is not None:
      return variant.state_from_params(init_params, step=0)
    return variant.init_state(rng)

  def _adapt_config(self, params: Any, what: str, saved_config: dict | None = None) -> None:
    """Takes the expert counts of `params` if allowed; refuses other architectures."""
    adapted = config_for_params(self.config, params, adapt=True, saved_config=saved_config)
    if adapted != self.config and not self._adapt:
      raise ValueError(
          f"{what} has {adapted.layer_num_experts or adapted.num_experts} experts per MoE "
          f"layer, the model config {self.config.layer_num_experts or self.config.num_experts}; "
          "set NUM_EXPERTS to match, or adapt_experts_to_checkpoint=True to take the "
          "checkpoint's counts (finetuning a pruned model)")
    forward_lib.check_params(decoder.SMoEDecoder(adapted), params, what,
                             saved_config=saved_config)
    if adapted != self.config:
      logging.info("%s has %s experts per MoE layer (config: %d).", what,
                   adapted.layer_num_experts or adapted.num_experts, self.config.num_experts)
    self.config = adapted

  def _resume(self, manager: ocp.CheckpointManager, step: int) -> step_lib.TrainState:
    """Restores the run's newest checkpoint, refusing one of another model."""
    expected = self.config
    if self.dropping is not None and step > 0:  # the drops up to the last trained step
      expected = configs.with_expert_counts(
          expected, self.dropping.experts_at(step - 1, num_experts=self.config.num_experts))
    what = f"the checkpoint of step {step} in {manager.directory}"
    shapes = checkpoints.params_shapes(manager.directory, step=step)
    counts = layout_lib.expert_counts(shapes)
    if configs.with_expert_counts(expected, counts) != expected:
      raise ValueError(f"{what} has {tuple(counts.values())} experts per MoE layer, this run "
                       f"expects {expected.layer_num_experts or expected.num_experts} at that "
                       "step: it is another model's checkpoint; use another MODEL_DIR or the "
                       "model it was trained with")
    forward_lib.check_params(decoder.SMoEDecoder(expected), shapes, what,
                             saved_config=checkpoints.read_metadata(
                                 manager.directory, step=step).get("model_config"))
    variant = self.variant(expected, schedules.checkpoint_phase_index(self.phases, step))
    logging.info("Resuming from %s at step %d.", manager.directory, step)
    return checkpoints.restore_state(manager, abstract_state=variant.layout.abstract, step=step)

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

  def advance(self, state: step_lib.TrainState, *,
              probe_batches: Callable[[], Sequence[Any]] | None,
              step: int | None = None) -> step_lib.TrainState:
    """Applies a phase change or an expert drop due at `state.step` (idempotent).

    Args:
      state: The state before training step `state.step + 1`.
      probe_batches: Returns the fixed training batches on which expert proficiency is
        measured; needed when progressive dropping is on.
      step: `state.step` if the caller knows it: reading it from the device would wait
        for the previous step, so the host could not prepare the next batch meanwhile.
    """
    step = int(state.step) if step is None else step
    current = self.variant_of(state)
    wanted = schedules.phase_index(self.phases, step)
    if wanted != current.phase_index:
      variant = self.variant(current.config, wanted)
      logging.info("Step %d: phase %r -> %r.", step, self.phases[current.phase_index].name,
                   self.phases[wanted].name)
      state = variant.state_from_params(state.params, step=step)
    if self.dropping is not None:
      target = self.dropping.experts_at(step, num_experts=self.config.num_experts)
      if target < self.variant_of(state).config.num_experts:
        state = self._drop_experts(state, target, probe_batches())
    return state

  def _drop_experts(self, state, target: int, batches) -> step_lib.TrainState:
    variant = self.variant_of(state)
    router_logits = collect_lib.collect_router_logits(variant.model, state.params, batches,
                                                  progress=False)
    keep = schedules.experts_to_keep(router_logits, target)
    logging.info("Step %d: dropping to %d experts per layer, keeping %s.", int(state.step),
                 target, {k: v.tolist() for k, v in keep.items()})
    smaller = self.variant(configs.with_expert_counts(variant.config, target),
                           variant.phase_index)
    shardings = smaller.layout.shardings
    return state.replace(
        apply_fn=smaller.model.apply, tx=smaller.tx,
        params=jax.device_put(schedules.keep_experts(state.params, keep), shardings.params),
        opt_state=jax.device_put(schedules.keep_experts(state.opt_state, keep),
                                 shardings.opt_state))
