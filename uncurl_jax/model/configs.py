"""Model configuration: one frozen dataclass and a table of size presets.

Example:
  >>> from uncurl_jax import configs
  >>> cfg = configs.get("354m", num_experts=32)
  >>> cfg.moe_layers[:3], len(cfg.moe_layers)
  ((0, 2, 4), 12)
  >>> small = with_expert_counts(cfg, 8)                 # or {layer path: count} per layer
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

DISPATCH_MODES = ("einsum", "gather")
# The fields that determine the parameters' shapes (what a checkpoint must agree with).
ARCHITECTURE_FIELDS = ("vocab_size", "max_length", "d_model", "d_ff", "num_heads", "num_layers",
                       "num_experts", "layer_num_experts", "layer_router_maps", "moe_every",
                       "moe_offset", "tie_embeddings")
EXPERT_PARALLEL_MODES = ("auto", "never")
DTYPES = ("float32", "bfloat16")
CAPACITY_FORMULAS = ("top_k", "t5x")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a GPT-2-style SMoE decoder.

  Attributes:
    vocab_size: Number of token ids.
    max_length: Number of learned positions (longest sequence).
    d_model: Width of the residual stream.
    d_ff: Hidden width of every FFN and of every expert.
    num_heads: Attention heads; must divide d_model.
    num_layers: Transformer blocks.
    num_experts: Experts per MoE layer; 0 gives a dense model (no MoE layer).
    layer_num_experts: Optional per-MoE-layer expert counts (one per entry of
      `moe_layers`, in order) overriding `num_experts`, for models pruned to a
      different count per layer (MC-SMoE, per-layer targets). `num_experts` then
      only says which blocks are MoE (> 0).
    layer_router_maps: Optional router columns bound to experts, one map per MoE layer (in
      `moe_layers` order): column c of that layer's router routes to expert map[c], with
      column c's probability as its gate; -1 marks the column of a dropped expert, never
      chosen (its probability still counts in the softmax, so kept experts keep their
      gates). MC-SMoE's and HC-SMoE's original routers after merging: all E columns kept,
      each bound to its merged expert. None: one column per expert.
    router_map: The map of one MoE layer (set by `layer_config`; use
      `layer_router_maps`).
    top_k: Experts each token is sent to (1 = Switch, 2 = GShard-style).
    moe_every: An MoE FFN every `moe_every` blocks ...
    moe_offset: ... starting at this block (0: blocks 0, 2, 4, ...).
    train_capacity_factor: Expert capacity factor when dropout is enabled.
    eval_capacity_factor: Expert capacity factor in deterministic calls.
    min_capacity: Lower bound on the per-group expert capacity.
    dropless: If True, capacity is large enough that no token is dropped.
    capacity_formula: How a capacity factor f becomes slots per expert for a group of S
      tokens: "top_k" (default) `ceil(f * S * top_k / E)`, room for every choice at
      f = 1; "t5x" `round(f * S / E)` as flaxformer's MoeLayer computes it (top_k does
      not enter), so a t5x/flaxformer capacity factor means the same here. Both are
      raised to `min_capacity`.
    group_size: Tokens per routing group (capacity is per group); None routes
      each sequence as one group.
    dispatch: "einsum" (one-hot dispatch/combine masks, the t5x way) or
      "gather" (index-based scatter into [E, C, d] buffers and gather back).
    expert_parallel: "auto" uses the shard_map all-to-all path when the
      current mesh has an 'expert' axis larger than one; "never" disables it.
    aux_loss_coef: Weight of the Switch load-balancing loss.
    z_loss_coef: Weight of the router z-loss.
    dropout_rate: Dropout on attention output, FFN output and embeddings.
    tie_embeddings: Share the token embedding with the output projection.
    dtype: Compute dtype, "float32" or "bfloat16" (router always float32).
    param_dtype: Storage dtype of parameters.
    layer_norm_epsilon: LayerNorm epsilon.
    init_std: Standard deviation of the normal initializers.
    router_init_std: Standard deviation of the router kernels' initializer (None:
      `init_std`). The router's logits start with std router_init_std * sqrt(d_model);
      `0.02 * sqrt(1024 / d_model)` keeps the UNCURL paper model's initial logit scale
      at any width (docs/study.md: at d_model 32 the default leaves top-1 gates near
      1/E for hundreds of steps).
    inputs_bidirectional_attention: Prefix-LM batches' inputs (`decoder_causal_attention`)
      attend both ways in every forward pass (training, scoring, pruning statistics), as
      t5x's `DecoderOnlyModel(inputs_bidirectional_attention=True)`; False (t5x's
      default): fully causal everywhere (`model.inputs.module_inputs`).
  """

  vocab_size: int = 50257
  max_length: int = 1024
  d_model: int = 1024
  d_ff: int = 4096
  num_heads: int = 16
  num_layers: int = 24
  num_experts: int = 0
  layer_num_experts: tuple[int, ...] | None = None
  layer_router_maps: tuple[tuple[int, ...], ...] | None = None
  router_map: tuple[int, ...] | None = None
  top_k: int = 1
  moe_every: int = 2
  moe_offset: int = 0
  train_capacity_factor: float = 1.2
  eval_capacity_factor: float = 1.0
  min_capacity: int = 4
  dropless: bool = False
  capacity_formula: str = "top_k"
  group_size: int | None = None
  dispatch: str = "einsum"
  expert_parallel: str = "auto"
  aux_loss_coef: float = 0.01
  z_loss_coef: float = 1e-3
  dropout_rate: float = 0.0
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  layer_norm_epsilon: float = 1e-5
  init_std: float = 0.02
  router_init_std: float | None = None
  inputs_bidirectional_attention: bool = False

  def __post_init__(self):
    positive = ("vocab_size", "max_length", "d_model", "d_ff", "num_heads",
                "num_layers", "top_k", "moe_every", "min_capacity")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
    if self.num_experts < 0:
      raise ValueError(f"num_experts must be >= 0 (0 = dense), got {self.num_experts}")
    if self.num_experts and self.top_k > self.num_experts:
      raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if self.layer_num_experts is not None:
      counts = tuple(self.layer_num_experts)
      if self.num_experts < 1 or len(counts) != len(self.moe_layers):
        raise ValueError(f"layer_num_experts={counts} needs num_experts >= 1 and one count per "
                         f"MoE layer {self.moe_layers}")
      if min(counts) < self.top_k:
        raise ValueError(f"layer_num_experts={counts} has a layer with fewer experts than "
                         f"top_k={self.top_k}")
      object.__setattr__(self, "layer_num_experts", counts)
    self._check_router_maps()
    if self.router_init_std is not None and not self.router_init_std > 0:
      raise ValueError(f"router_init_std must be None or > 0, got {self.router_init_std}")
    if not 0 <= self.moe_offset < self.moe_every:
      raise ValueError(f"moe_offset={self.moe_offset} must be in [0, moe_every={self.moe_every})")
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if self.group_size is not None and self.group_size < 1:
      raise ValueError(f"group_size must be None or >= 1, got {self.group_size}")
    _check_choice("capacity_formula", self.capacity_formula, CAPACITY_FORMULAS)
    _check_choice("dispatch", self.dispatch, DISPATCH_MODES)
    _check_choice("expert_parallel", self.expert_parallel, EXPERT_PARALLEL_MODES)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

  def _check_router_maps(self) -> None:
    maps = {}
    if self.layer_router_maps is not None:
      if self.num_experts < 1 or len(self.layer_router_maps) != len(self.moe_layers):
        raise ValueError(f"layer_router_maps needs one map per MoE layer {self.moe_layers}, "
                         f"got {len(self.layer_router_maps)}")
      object.__setattr__(self, "layer_router_maps",
                         tuple(tuple(int(c) for c in m) for m in self.layer_router_maps))
      maps = {i: (m, self.experts_in_layer(i))
              for i, m in zip(self.moe_layers, self.layer_router_maps)}
    if self.router_map is not None:
      object.__setattr__(self, "router_map", tuple(int(c) for c in self.router_map))
      maps["this layer"] = (self.router_map, self.num_experts)
    for where, (expert_map, experts) in maps.items():
      bound = [c for c in expert_map if c != -1]
      if sorted(set(bound)) != list(range(experts)) or len(bound) < self.top_k:
        raise ValueError(f"the router map of MoE layer {where} must bind at least top_k="
                         f"{self.top_k} columns to experts covering [0, {experts}) (-1: a "
                         f"column never chosen), got {list(expert_map)}")

  @property
  def router_columns(self) -> int:
    """Columns of this (layer) config's router: its map's length, else the experts."""
    return len(self.router_map) if self.router_map is not None else self.num_experts

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def is_moe_layer(self, index: int) -> bool:
    """Whether block `index` has an MoE FFN."""
    return self.num_experts > 0 and index % self.moe_every == self.moe_offset

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the blocks with an MoE FFN."""
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  def experts_in_layer(self, index: int) -> int:
    """Experts of block `index` (0 for a dense block)."""
    if not self.is_moe_layer(index):
      return 0
    if self.layer_num_experts is None:
      return self.num_experts
    return self.layer_num_experts[self.moe_layers.index(index)]

  def layer_config(self, index: int) -> "ModelConfig":
    """The config an MoE block sees: that block's expert count and router map."""
    experts = self.experts_in_layer(index)
    if experts == 0 or (self.layer_num_experts is None and self.layer_router_maps is None):
      return self
    router_map = (None if self.layer_router_maps is None
                  else self.layer_router_maps[self.moe_layers.index(index)])
    return dataclasses.replace(self, num_experts=experts, layer_num_experts=None,
                               layer_router_maps=None, router_map=router_map)

  def capacity(self, group_size: int, *, train: bool) -> int:
    """Expert capacity (slots per expert) for a routing group of `group_size` tokens.

    Example: with E=8, top_k=2 and factor 1.0, 64 tokens get 16 slots ("top_k") or 8
    ("t5x"); see `capacity_formula`.
    """
    if self.dropless:
      return group_size * self.top_k
    factor = self.train_capacity_factor if train else self.eval_capacity_factor
    if self.capacity_formula == "t5x":
      # Python's round, as flaxformer (halves go to the even neighbour).
      slots = int(round(factor * group_size / self.num_experts))
    else:
      slots = math.ceil(factor * group_size * self.top_k / self.num_experts)
    return max(self.min_capacity, slots)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {value!r}")


# Size presets. "354m" is the UNCURL paper's backbone (GPT-2 medium width, 24 blocks);
# "354m" with num_experts=E is the paper's 354M+Ee. "dense" is the paper's dense baseline.
PRESETS: dict[str, dict[str, Any]] = {
    "354m": dict(vocab_size=50257, max_length=1024, d_model=1024, d_ff=4096,
                 num_heads=16, num_layers=24, num_experts=32),
    "dense": dict(vocab_size=50257, max_length=1024, d_model=1024, d_ff=4096,
                  num_heads=16, num_layers=24, num_experts=0),
    # For tests and the synthetic study: byte vocabulary (256 bytes + 3 specials, padded).
    "tiny": dict(vocab_size=512, max_length=128, d_model=64, d_ff=128, num_heads=4,
                 num_layers=2, num_experts=8),
}


def get(name: str, **overrides: Any) -> ModelConfig:
  """Returns the preset `name` ("354m", "dense", "tiny") with `overrides` applied.

  Example: `get("354m", num_experts=128)` is the paper's 354M+128e.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})


def from_dict(fields: Mapping[str, Any]) -> ModelConfig:
  """A ModelConfig from `dataclasses.asdict` output read back from JSON (lists -> tuples).

  Example:
    >>> from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    True
  """
  return ModelConfig(**{name: as_tuples(value) for name, value in fields.items()})


def as_tuples(value: Any) -> Any:
  """A config field read back from JSON with its (nested) lists as tuples."""
  return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


def block_index(path: str) -> int:
  """The block of an MoE layer path such as 'layers_4/mlp'."""
  head = str(path).split("/")[0]
  if not head.startswith("layers_") or not head[len("layers_"):].isdigit():
    raise ValueError(f"MoE layer path {path!r} does not start with 'layers_<block>'")
  return int(head[len("layers_"):])


def with_expert_counts(config: ModelConfig,
                       counts: int | Sequence[int] | Mapping[str, int]) -> ModelConfig:
  """`config` with other expert counts: one for every MoE layer, or one per layer.

  The one place that turns expert counts (a pruned checkpoint's, a plan's, progressive
  dropping's) into a model config. Equal counts give `num_experts`; unequal ones
  `layer_num_experts` (MC-SMoE, per-layer targets); no MoE layer gives a dense model.

  Args:
    config: The model; its `moe_every`/`moe_offset` place the MoE blocks (also when it
      is dense).
    counts: An int for every MoE layer (0: dense); a sequence with one count per MoE
      block of the config; or {MoE layer path ('layers_<i>/...'): count} as
      `layout.expert_counts(params)` returns (an empty mapping: dense).

  Raises:
    ValueError: The counts name other blocks than the config's MoE blocks, or a count < 1.

  Example:
    >>> cfg = get("tiny", num_layers=4, num_experts=8)
    >>> with_expert_counts(cfg, {"layers_0/mlp": 4, "layers_2/mlp": 2}).layer_num_experts
    (4, 2)
  """
  # A placeholder count (valid for top_k) places the MoE blocks also for a dense config.
  placed = dataclasses.replace(config, num_experts=max(1, config.top_k, config.num_experts),
                               layer_num_experts=None, layer_router_maps=None)
  blocks = placed.moe_layers
  if isinstance(counts, Mapping):
    if not counts:
      return _same_or(config, dataclasses.replace(config, num_experts=0, layer_num_experts=None,
                                                  layer_router_maps=None))
    by_block = {block_index(path): count for path, count in counts.items()}
    if sorted(by_block) != list(blocks):
      raise ValueError(f"expert counts name MoE blocks {sorted(by_block)}, the model config "
                       f"places them at {list(blocks)} (moe_every={config.moe_every}, "
                       f"moe_offset={config.moe_offset}); use the config the params came from")
    per_layer = [by_block[i] for i in blocks]
  elif isinstance(counts, numbers.Integral) and not isinstance(counts, bool):
    if counts == 0:
      return _same_or(config, dataclasses.replace(config, num_experts=0, layer_num_experts=None,
                                                  layer_router_maps=None))
    per_layer = [int(counts)] * len(blocks)
  else:
    per_layer = list(counts)
    if len(per_layer) != len(blocks):
      raise ValueError(f"expected one expert count per MoE block {list(blocks)}, got "
                       f"{per_layer}")
  if any(int(c) < 1 for c in per_layer):
    raise ValueError(f"expert counts must be >= 1, got {per_layer}")
  per_layer = [int(c) for c in per_layer]
  if config.num_experts and per_layer == [config.experts_in_layer(i) for i in blocks]:
    return config  # the same counts: router maps (if any) stay
  if len(set(per_layer)) <= 1:
    wanted = dataclasses.replace(config, num_experts=per_layer[0] if per_layer else 0,
                                 layer_num_experts=None, layer_router_maps=None)
  else:
    wanted = dataclasses.replace(config, num_experts=max(per_layer),
                                 layer_num_experts=tuple(per_layer), layer_router_maps=None)
  return _same_or(config, wanted)


def _same_or(config: ModelConfig, wanted: ModelConfig) -> ModelConfig:
  """`config` itself when `wanted` equals it (callers may test identity)."""
  return config if wanted == config else wanted

