"""Mixture-of-experts FFN layer: router + stacked GELU experts, two dispatch forms.

The layer routes tokens in groups (see `router.py`), places them in per-expert buffers
`[E, G, C, d]`, runs every expert on its buffer with one batched matmul, and combines
the outputs weighted by the gates. Dispatch is either one-hot einsum masks (t5x /
flaxformer) or an index scatter/gather; both give the same numbers. Under a mesh with
an 'expert' axis larger than one, the same computation runs inside `jax.shard_map`
with `jax.lax.all_to_all` exchanging the buffers between expert shards.

Example:
  >>> cfg = configs.get("tiny", num_experts=8)
  >>> layer = MoeLayer(config=cfg)
  >>> variables = layer.init(key, x, deterministic=True)      # x: [B, L, d]
  >>> y, state = layer.apply(variables, x, deterministic=True, mutable=["intermediates"])
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from absl import logging
import flax.linen as nn
from flax.linen import partitioning
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from uncurl_jax.model import router
from uncurl_jax.model.configs import ModelConfig
from uncurl_jax.model.partitioning import BATCH_AXES

# The first five are the names t5x's MoeDecoderOnlyModel reads (flaxformer's definitions).
INTERMEDIATE_NAMES = ("auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind",
                      "expert_usage", "router_confidence", "routed_probability")


class ExpertWeights(NamedTuple):
  """Stacked expert parameters; the leading axis indexes experts.

  Plain experts (this project's): `act(x wi + bi) wo + bo`. Gated experts (SwiGLU, GeGLU:
  Mixtral, Qwen-MoE, OLMoE, flaxformer's and MaxText's): `(act(x gate + bg) * (x wi + bi))
  wo + bo`, with `gate_kernel` given. A bias may be None (no bias).
  """

  wi_kernel: jax.Array  # [E, d, f]
  wi_bias: jax.Array | None  # [E, f]
  wo_kernel: jax.Array  # [E, f, d]
  wo_bias: jax.Array | None  # [E, d]
  gate_kernel: jax.Array | None = None  # [E, d, f], gated experts only
  gate_bias: jax.Array | None = None  # [E, f]


# Expert activations: GELU (tanh approximation, GPT-2 and this project's models) and SiLU
# (the SwiGLU experts of Mixtral, Qwen-MoE, OLMoE, DeepSeek).
ACTIVATIONS = {"gelu": nn.gelu, "silu": nn.silu}


# ----------------------------------------------------------------------------------------
# Parameter holders. They only declare parameters (with logical axes) so that the layer
# can hand plain arrays to the pure functions below and to shard_map.


class _RouterWeights(nn.Module):
  num_experts: int
  init_std: float
  param_dtype: str

  @nn.compact
  def __call__(self, d_model: int) -> jax.Array:
    return partitioning.param_with_axes(
        "kernel", nn.initializers.normal(self.init_std), (d_model, self.num_experts),
        jnp.dtype(self.param_dtype), axes=("embed", "unmodeled"))


class _StackedDense(nn.Module):
  num_experts: int
  features_in: int
  features_out: int
  axes_in: str
  axes_out: str
  init_std: float
  param_dtype: str

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    dtype = jnp.dtype(self.param_dtype)
    kernel = partitioning.param_with_axes(
        "kernel", nn.initializers.normal(self.init_std),
        (self.num_experts, self.features_in, self.features_out), dtype,
        axes=("expert", self.axes_in, self.axes_out))
    bias = partitioning.param_with_axes(
        "bias", nn.initializers.zeros, (self.num_experts, self.features_out), dtype,
        axes=("expert", self.axes_out))
    return kernel, bias


class _Experts(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self) -> ExpertWeights:
    cfg = self.config
    common = dict(num_experts=cfg.num_experts, init_std=cfg.init_std,
                  param_dtype=cfg.param_dtype)
    wi_kernel, wi_bias = _StackedDense(features_in=cfg.d_model, features_out=cfg.d_ff,
                                       axes_in="embed", axes_out="expert_mlp",
                                       name="wi", **common)()
    wo_kernel, wo_bias = _StackedDense(features_in=cfg.d_ff, features_out=cfg.d_model,
                                       axes_in="expert_mlp", axes_out="embed",
                                       name="wo", **common)()
    return ExpertWeights(wi_kernel, wi_bias, wo_kernel, wo_bias)


# ----------------------------------------------------------------------------------------
# Pure pieces: experts, dispatch, combine.


def _projection(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
  y = jnp.einsum("egcd,edf->egcf", x, kernel.astype(dtype))
  return y if bias is None else y + bias.astype(dtype)[:, None, None, :]


def expert_ffn(buffers: jax.Array, weights: ExpertWeights, *, dtype,
               model_axis: str | None = None, activation: str = "gelu") -> jax.Array:
  """Runs expert e on `buffers[e]`: `act(x @ wi[e] + bi[e]) @ wo[e] + bo[e]`, or for gated
  experts `(act(x @ gate[e] + bg[e]) * (x @ wi[e] + bi[e])) @ wo[e] + bo[e]`.

  Example: `expert_ffn(jnp.zeros((E, G, C, d)), weights, dtype=jnp.float32)`.

  Args:
    buffers: `[E, G, C, d]` tokens per expert.
    weights: Stacked weights; under shard_map possibly a d_ff shard of them.
    dtype: Compute dtype.
    model_axis: Mesh axis over which d_ff is split; the partial second projections are
      summed over it before the (unsplit) output bias is added once.
    activation: A key of `ACTIVATIONS` ("gelu", "silu").
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
  act = ACTIVATIONS[activation]
  x = buffers.astype(dtype)
  hidden = _projection(x, weights.wi_kernel, weights.wi_bias, dtype)
  if weights.gate_kernel is None:
    hidden = act(hidden)
  else:
    hidden = act(_projection(x, weights.gate_kernel, weights.gate_bias, dtype)) * hidden
  out = jnp.einsum("egcf,efd->egcd", hidden, weights.wo_kernel.astype(dtype))
  if model_axis is not None:
    out = jax.lax.psum(out, model_axis)
  return out if weights.wo_bias is None else out + weights.wo_bias.astype(dtype)[:, None, None, :]


def _token_coordinates(routing: router.Routing) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(expert, group, slot) index triples `[G, S, k]` of every choice."""
  groups = jnp.broadcast_to(
      jnp.arange(routing.slot.shape[0])[:, None, None], routing.slot.shape)
  return routing.expert_index, groups, routing.slot


def dispatch_tokens(x: jax.Array, routing: router.Routing, *, capacity: int, mode: str,
                    num_experts: int | None = None) -> jax.Array:
  """Places tokens `[G, S, d]` in expert buffers `[E, G, C, d]` (empty slots are zero).

  `num_experts` defaults to one expert per router column.

  Example: `dispatch_tokens(x, routing, capacity=4, mode="gather")`.
  """
  num_experts = routing.probs.shape[-1] if num_experts is None else num_experts
  if mode == "einsum":
    dispatch, _ = router.dispatch_and_combine_masks(routing, capacity, num_experts)
    return jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)
  if mode == "gather":
    groups, tokens, top_k = routing.slot.shape
    buffers = jnp.zeros((num_experts, groups, capacity, x.shape[-1]), x.dtype)
    rows = jnp.broadcast_to(x[:, :, None, :], (groups, tokens, top_k, x.shape[-1]))
    # Dropped choices carry slot == capacity: out of bounds, so mode="drop" skips them.
    # Kept (expert, group, slot) triples are unique, so add == set, and add has the
    # cheaper transpose.
    return buffers.at[_token_coordinates(routing)].add(rows, mode="drop")
  raise ValueError(f"dispatch mode must be 'einsum' or 'gather', got {mode!r}")


def combine_outputs(outputs: jax.Array, routing: router.Routing, *, capacity: int,
                    mode: str) -> jax.Array:
  """Sums each token's expert outputs `[E, G, C, d]` weighted by gates -> `[G, S, d]`.

  Example: `combine_outputs(expert_ffn(buffers, w, dtype=dt), routing, capacity=4,
  mode="einsum")`.
  """
  if mode == "einsum":
    _, combine = router.dispatch_and_combine_masks(routing, capacity, outputs.shape[0])
    return jnp.einsum("gsec,egcd->gsd", combine.astype(outputs.dtype), outputs)
  if mode == "gather":
    picked = outputs.at[_token_coordinates(routing)].get(mode="fill", fill_value=0)
    weights = jnp.where(routing.kept, routing.gate, 0.0).astype(outputs.dtype)
    return jnp.einsum("gskd,gsk->gsd", picked, weights)
  raise ValueError(f"dispatch mode must be 'einsum' or 'gather', got {mode!r}")


def group_tokens(x: jax.Array, group_size: int | None) -> jax.Array:
  """`[B, L, d]` -> `[G, S, d]`: one sequence per group, or `group_size` tokens each."""
  batch, length, width = x.shape
  if group_size is None:
    return x
  if (batch * length) % group_size:
    raise ValueError(f"group_size={group_size} must divide the {batch}x{length}="
                     f"{batch * length} tokens of the batch")
  return x.reshape(batch * length // group_size, group_size, width)


def moe_forward(x: jax.Array, router_kernel: jax.Array, experts: ExpertWeights, *,
                config: ModelConfig, train: bool, expert_axis: str | None = None,
                model_axis: str | None = None, column_mask: jax.Array | None = None,
                activation: str = "gelu", renormalize_gates: bool = False):
  """The MoE FFN on a `[B, L, d]` batch, as a pure function of the weights.

  With `expert_axis` (inside shard_map) the local buffers are exchanged with
  all_to_all so that each shard runs only its own experts on every shard's tokens.
  `activation` is the experts' (`expert_ffn`); `renormalize_gates` divides each token's
  top-k gates by their sum (Mixtral; Qwen-MoE and OLMoE with `norm_topk_prob`), which
  this project's models do not.

  Example: `y, logits, stats = moe_forward(x, kernel, experts, config=cfg, train=False)`.

  Returns:
    y `[B, L, d]` in the compute dtype, raw router logits `[B, L, E]` (float32), and a
    dict of the scalar losses and diagnostics named as in `INTERMEDIATE_NAMES`.
  """
  dtype = jnp.dtype(config.dtype)
  grouped = group_tokens(x.astype(dtype), config.group_size)
  capacity = config.capacity(grouped.shape[1], train=train)
  logits = router.router_logits(grouped, router_kernel)
  routing = router.route_tokens(logits, top_k=config.top_k, capacity=capacity,
                                expert_map=config.router_map, column_mask=column_mask)
  if renormalize_gates:
    routing = routing._replace(gate=routing.gate / jnp.sum(routing.gate, -1, keepdims=True))

  buffers = dispatch_tokens(grouped, routing, capacity=capacity, mode=config.dispatch,
                            num_experts=config.num_experts)
  if expert_axis is None:
    outputs = expert_ffn(buffers, experts, dtype=dtype, model_axis=model_axis,
                         activation=activation)
  else:
    # [E, G, C, d] -> [E/n, n*G, C, d]: this shard's experts, every shard's groups.
    buffers = jax.lax.all_to_all(buffers, expert_axis, 0, 1, tiled=True)
    outputs = expert_ffn(buffers, experts, dtype=dtype, model_axis=model_axis,
                         activation=activation)
    outputs = jax.lax.all_to_all(outputs, expert_axis, 1, 0, tiled=True)
  y = combine_outputs(outputs, routing, capacity=capacity, mode=config.dispatch)

  # A bound router's losses count only its bound columns (router.load_balancing_loss).
  bound_map = config.router_map
  balanced_probs = routing.probs if bound_map is None else router.bound_softmax(logits, bound_map)
  stats = {
      "auxiliary_loss": router.load_balancing_loss(balanced_probs, routing.column_index,
                                                   bound_map),
      "router_z_loss": router.router_z_loss(logits, bound_map),
      # Slots exist per expert: usage divides by E experts, not by the router's columns.
      **router.routing_diagnostics(routing, capacity, config.num_experts),
  }
  return y.reshape(x.shape), logits.reshape(*x.shape[:2], -1), stats


# ----------------------------------------------------------------------------------------
# Expert parallelism.


def _expert_parallel_mesh(config: ModelConfig):
  """The current abstract mesh if the expert-parallel path applies, else None."""
  if config.expert_parallel == "never":
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get("expert", 1) <= 1:
    return None
  return mesh


def _mean_over_shards(stats: dict[str, jax.Array], axes) -> dict[str, jax.Array]:
  """Batch-shard means of the scalars, which equal the unsharded values.

  Every shard holds as many groups, so plain means are exact except for
  `router_confidence`, a ratio over dispatched choices: it is weighted by each shard's
  dispatched count, which is proportional to its `expert_usage`.
  """
  weighted = jax.lax.pmean(stats["router_confidence"] * stats["expert_usage"], axes)
  stats = jax.lax.pmean(stats, axes)
  usage = stats["expert_usage"]
  confidence = jnp.where(usage > 0, weighted / jnp.where(usage > 0, usage, 1.0), 0.0)
  return {**stats, "router_confidence": confidence}


def expert_parallel_forward(x: jax.Array, router_kernel: jax.Array, experts: ExpertWeights,
                            *, config: ModelConfig, train: bool, mesh):
  """`moe_forward` under `jax.shard_map`, experts split over the mesh axis 'expert'.

  The batch is split over ('expert', 'data'), expert weights over 'expert' (and d_ff
  over 'model' when that axis is larger than one). Scalars are averaged over the batch
  shards, so they equal the unsharded values (every shard holds as many groups).

  Example:
    >>> with jax.set_mesh(mesh):
    ...   y, logits, stats = expert_parallel_forward(x, kernel, experts, config=cfg,
    ...                                              train=False, mesh=mesh)
  """
  sizes = dict(mesh.shape)
  num_expert_shards = sizes["expert"]
  batch_axes = tuple(a for a in BATCH_AXES if a in sizes)
  batch_shards = 1
  for axis in batch_axes:
    batch_shards *= sizes[axis]
  model_axis = "model" if sizes.get("model", 1) > 1 else None
  batch, length, _ = x.shape
  if config.num_experts % num_expert_shards:
    raise ValueError(f"num_experts={config.num_experts} must be divisible by the "
                     f"'expert' mesh axis size {num_expert_shards}")
  if batch % batch_shards:
    raise ValueError(f"batch size {batch} must be divisible by the {batch_shards} batch "
                     f"shards of mesh axes {batch_axes}")
  if config.group_size is not None and (batch // batch_shards * length) % config.group_size:
    raise ValueError(f"group_size={config.group_size} must divide the "
                     f"{batch // batch_shards}x{length} tokens of each batch shard")
  if model_axis and config.d_ff % sizes["model"]:
    raise ValueError(f"d_ff={config.d_ff} must be divisible by the 'model' mesh axis "
                     f"size {sizes['model']}")

  expert_specs = ExpertWeights(wi_kernel=P("expert", None, model_axis),
                               wi_bias=P("expert", model_axis),
                               wo_kernel=P("expert", model_axis, None),
                               wo_bias=P("expert", None))

  def local_forward(x_local, kernel, experts_local):
    y, logits, stats = moe_forward(x_local, kernel, experts_local, config=config,
                                   train=train, expert_axis="expert", model_axis=model_axis)
    return y, logits, _mean_over_shards(stats, batch_axes)

  sharded = jax.shard_map(
      local_forward, mesh=mesh,
      in_specs=(P(batch_axes), P(), expert_specs),
      out_specs=(P(batch_axes), P(batch_axes), P()))
  return sharded(x, router_kernel, experts)


# ----------------------------------------------------------------------------------------
# The layer.


class MoeLayer(nn.Module):
  """Sparse MoE FFN with `config.num_experts` GELU experts and a top-k router.

  Parameters (relative to this module): `router/kernel [d, E]`,
  `expert/wi/{kernel [E, d, f], bias [E, f]}`, `expert/wo/{kernel [E, f, d], bias [E, d]}`.
  Sows the scalars of `INTERMEDIATE_NAMES` into 'intermediates', the raw router logits
  `[B, L, E]` into 'router_logits'/'logits' and its input `[B, L, d]` into
  'moe_inputs'/'inputs' when those collections are mutable. A variable
  'routing'/'column_mask' `[E]` passed to `apply` (e.g. `{"params": p, "routing":
  {"layers_0": {"mlp": {"column_mask": m}}}}`) restricts the choice to its columns with
  the gates kept (`router.route_tokens`); not on the expert-parallel path.

  Example:
    >>> layer = MoeLayer(config=configs.get("tiny", num_experts=8), name="mlp")
    >>> y = layer.apply(variables, x, deterministic=False)
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    cfg = self.config
    if cfg.num_experts < 1:
      raise ValueError(f"MoeLayer needs config.num_experts >= 1, got {cfg.num_experts}")
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
      raise ValueError(f"expected input [batch, length, {cfg.d_model}], got {x.shape}")
    router_kernel = _RouterWeights(cfg.router_columns, cfg.router_init_std or cfg.init_std,
                                   cfg.param_dtype, name="router")(cfg.d_model)
    experts = _Experts(cfg, name="expert")()

    column_mask = (self.get_variable("routing", "column_mask")
                   if self.has_variable("routing", "column_mask") else None)
    forward = functools.partial(moe_forward, config=cfg, train=not deterministic,
                                column_mask=column_mask)
    mesh = _expert_parallel_mesh(cfg)
    if mesh is not None and column_mask is not None:
      raise ValueError("a 'routing'/'column_mask' is not supported on the expert-parallel "
                       "path; evaluate it without an 'expert' mesh axis")
    if mesh is not None:
      # Once per trace: tells a run (e.g. under t5x) that the all-to-all path is taken.
      logging.info("MoE layer %s: expert-parallel over %d expert shards (all-to-all)",
                   "/".join(self.scope.path), mesh.shape["expert"])
      forward = functools.partial(expert_parallel_forward, config=cfg,
                                  train=not deterministic, mesh=mesh)
    y, logits, stats = forward(x, router_kernel, experts)

    for name in INTERMEDIATE_NAMES:
      self.sow("intermediates", name, stats[name])
    # `init` makes every collection mutable; only a caller's explicit request counts.
    if self.is_mutable_collection("router_logits") and not self.is_initializing():
      # Stored as the plain array (not a sown tuple): pruning reads [B, L, E] directly.
      self.sow("router_logits", "logits", logits,
               init_fn=lambda: None, reduce_fn=lambda _, new: new)
    if self.is_mutable_collection("moe_inputs") and not self.is_initializing():
      # The layer's input [B, L, d]: task statistics run every expert on it.
      self.sow("moe_inputs", "inputs", x, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    return y
