"""`HfMoeConfig`: the architecture of a Hugging Face MoE decoder, read from `config.json`.

One frozen dataclass for the four families with a JAX forward (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE): RMSNorm pre-norm blocks, rotary positions, grouped-query attention,
SwiGLU experts behind a softmax top-k router. `from_hf_config` reads transformers 4's and
5's config files and refuses what the forward does not implement (sliding windows, RoPE
scaling, other activations) instead of computing something else.

Example:
  >>> config = HfMoeConfig.from_hf_config(json.load(open("Mixtral/config.json")))
  >>> config.num_experts, config.top_k, config.moe_layers[:2]
  (8, 2, (0, 1))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from uncurl_jax.hf import families

QK_NORMS = ("none", "head", "full")


@dataclasses.dataclass(frozen=True)
class HfMoeConfig:
  """Architecture of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE decoder.

  Attributes:
    family: The `model_type` ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe").
    vocab_size: Token ids.
    hidden_size: Width of the residual stream.
    intermediate_size: Hidden width of the dense MLPs (layers without experts).
    expert_size: Hidden width of each routed expert (`moe_intermediate_size`; Mixtral's
      and OLMoE's `intermediate_size`).
    num_layers: Decoder layers.
    num_heads: Query heads.
    num_kv_heads: Key/value heads (grouped-query attention).
    head_dim: Width of one head.
    num_experts: Routed experts per MoE layer.
    top_k: Experts per token.
    renormalize_gates: Divide the top-k probabilities by their sum (Mixtral always;
      `norm_topk_prob` otherwise).
    moe_layers: Indices of the layers with routed experts (the others have a dense MLP).
    shared_expert_size: Hidden width of Qwen2-MoE's shared expert (0: none).
    qkv_bias: Biases on the query, key and value projections.
    o_bias: A bias on the output projection.
    qk_norm: RMSNorm of queries and keys: "none", "head" (per head, Qwen3) or "full"
      (over all heads before the split, OLMoE).
    clip_qkv: OLMoE's clamp of queries, keys and values to [-c, c] (None: none).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: Rotary base.
    tie_word_embeddings: The output projection is the embedding table.
    max_length: `max_position_embeddings`.
    dtype: Compute dtype ("float32" or "bfloat16"); the router and softmaxes run in
      float32.
    param_dtype: Dtype of freshly initialized params (loaded params keep theirs).
  """

  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  expert_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_experts: int
  top_k: int
  renormalize_gates: bool
  moe_layers: tuple[int, ...]
  shared_expert_size: int = 0
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: str = "none"
  clip_qkv: float | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  max_length: int = 4096
  dtype: str = "float32"
  param_dtype: str = "float32"

  # What this project's collectors read from a model's config.
  expert_activation = "silu"
  group_size = None
  inputs_bidirectional_attention = False

  def __post_init__(self):
    if self.family not in families.FAMILIES or not families.FAMILIES[self.family].forward:
      raise ValueError(f"HfMoeConfig.family must be one of "
                       f"{sorted(k for k, f in families.FAMILIES.items() if f.forward)}, "
                       f"got {self.family!r}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "expert_size",
                 "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts",
                 "top_k", "max_length"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"HfMoeConfig.{name} must be an int >= 1, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                       f"num_heads={self.num_heads}")
    if self.top_k > self.num_experts:
      raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (rotary positions)")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
    object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
    if any(not 0 <= i < self.num_layers for i in self.moe_layers):
      raise ValueError(f"moe_layers {self.moe_layers} must lie in [0, {self.num_layers})")

  def is_moe_layer(self, index: int) -> bool:
    return index in self.moe_layers

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], **overrides: Any) -> "HfMoeConfig":
    """Reads a transformers `config.json` (as a dict).

    Raises:
      ValueError: An unsupported family, or a feature the JAX forward does not compute
        (a sliding window, RoPE scaling, an activation other than SiLU), or a missing key.
    """
    if not isinstance(config, Mapping):
      raise TypeError(f"config must be a mapping (config.json), got {type(config).__name__}")
    family = families.get(config.get("model_type"))
    if not family.forward:
      raise ValueError(f"{family.model_type}: uncurl_jax.hf prunes these checkpoints but has "
                       "no JAX forward for them (give router logits or a plan)")
    try:
      return cls(**{**_fields(config, family), **overrides})
    except KeyError as error:
      raise ValueError(f"config.json of a {family.model_type} model lacks {error}") from None


def _rope_theta(config: Mapping[str, Any]) -> float:
  rope = config.get("rope_parameters") or {}
  scaling = config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise ValueError(f"RoPE type {rope_type!r} is not implemented (only 'default')")
  theta = rope.get("rope_theta", config.get("rope_theta"))
  if theta is None:
    raise ValueError("config.json has neither rope_parameters.rope_theta nor rope_theta")
  return float(theta)


def _fields(config: Mapping[str, Any], family: families.Family) -> dict[str, Any]:
  model_type = family.model_type
  if config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {config['hidden_act']!r} is not implemented (only 'silu')")
  if config.get("sliding_window") is not None and (
      model_type == "mixtral" or config.get("use_sliding_window", False)):
    raise ValueError(f"a sliding window ({config['sliding_window']}) is not implemented")
  heads = int(config["num_attention_heads"])
  head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
  fields = dict(
      family=model_type,
      vocab_size=int(config["vocab_size"]),
      hidden_size=int(config["hidden_size"]),
      intermediate_size=int(config["intermediate_size"]),
      expert_size=int(config.get("moe_intermediate_size") or config["intermediate_size"]),
      num_layers=int(config["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(config.get("num_key_value_heads") or heads),
      head_dim=int(head_dim),
      num_experts=family.num_experts(config),
      top_k=int(config["num_experts_per_tok"]),
      renormalize_gates=(True if model_type == "mixtral"
                         else bool(config.get("norm_topk_prob", False))),
      moe_layers=family.moe_layers(config),
      # transformers' defaults where config.json has no value.
      rms_norm_eps=float(config.get("rms_norm_eps",
                                    1e-5 if model_type in ("mixtral", "olmoe") else 1e-6)),
      rope_theta=_rope_theta(config),
      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
      max_length=int(config.get("max_position_embeddings", 4096)),
  )
  if model_type == "mixtral":
    fields["expert_size"] = int(config["intermediate_size"])
  if model_type == "qwen2_moe":
    fields.update(shared_expert_size=int(config.get("shared_expert_intermediate_size") or 0),
                  qkv_bias=bool(config.get("qkv_bias", True)))
  if model_type == "qwen3_moe":
    bias = bool(config.get("attention_bias", False))
    fields.update(qkv_bias=bias, o_bias=bias, qk_norm="head")
  if model_type == "olmoe":
    bias = bool(config.get("attention_bias", False))
    clip = config.get("clip_qkv")
    fields.update(qkv_bias=bias, o_bias=bias, qk_norm="full",
                  clip_qkv=None if clip is None else float(clip))
  return fields
