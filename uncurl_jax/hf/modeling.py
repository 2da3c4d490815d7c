"""`HfMoeDecoder`: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE decoders in Flax.

The forward is transformers' (`modeling_mixtral.py`, `modeling_qwen2_moe.py`,
`modeling_qwen3_moe.py`, `modeling_olmoe.py`), checked against it in float32 by
`tests/hf/`: RMSNorm pre-norm blocks, rotary positions, grouped-query attention and, in
MoE layers, the project's one MoE computation (`model.moe.moe_forward`: softmax router,
top-k, gated SiLU experts, dropless) with the gates renormalized where the family does.
Qwen2-MoE adds its shared expert, gated by a sigmoid. The call signature is t5x's
decoder's, so the project's collectors run on it (`collect_router_logits`,
`collect_expert_stats`); the MoE layers sow their raw router logits and inputs as
`MoeLayer` does.

The parameter tree (kernels as `x @ kernel`, experts stacked on a leading axis):
`embed_tokens/embedding`, `layers_<i>/{input_layernorm,post_attention_layernorm}/scale`,
`layers_<i>/self_attn/{q,k,v,o}_proj/{kernel,bias}`, `layers_<i>/self_attn/{q,k}_norm/scale`,
`layers_<i>/mlp/gate/kernel [H, E]` and `layers_<i>/mlp/experts/<name> [E, H, I] / [E, I, H]`
(MoE layers; names per family, `families.py`) or `layers_<i>/mlp/{gate,up,down}_proj/kernel`
(dense layers), `layers_<i>/shared_expert/...`, `layers_<i>/shared_expert_gate/kernel`,
`norm/scale`, `lm_head/kernel` (untied).

Example:
  >>> config, params = checkpoint.load("path/to/Qwen3-30B-A3B")
  >>> model = HfMoeDecoder(config)
  >>> logits = model.apply({"params": params}, tokens, tokens)          # [B, L, vocab]
  >>> router = collect_router_logits(model, params, batches, max_tokens=65536)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uncurl_jax.hf import families
from uncurl_jax.hf.config import HfMoeConfig
from uncurl_jax.model import configs as model_configs
from uncurl_jax.model import moe
from uncurl_jax.model.attention import DenseGeneral


class RMSNorm(nn.Module):
  """`scale * x / sqrt(mean(x^2) + eps)`, normalized in float32 (transformers' RMSNorm)."""

  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rotary_embedding(positions: jax.Array, head_dim: int, theta: float
                     ) -> tuple[jax.Array, jax.Array]:
  """cos, sin `[B, L, head_dim]` of the default RoPE at integer `positions` [B, L]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` [B, L, heads, head_dim] (the halves convention of transformers)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :].astype(x.dtype) + rotated * sin[:, :, None, :].astype(x.dtype)


def _dense(features: int, bias: bool, config: HfMoeConfig, name: str) -> DenseGeneral:
  return DenseGeneral((features,), ("embed", "mlp"), use_bias=bias,
                      dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                      name=name)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary positions and the families' q/k norms."""

  config: HfMoeConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array):
    cfg = self.config
    q = _dense(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, cfg, "q_proj")(x)
    k = _dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, cfg, "k_proj")(x)
    v = _dense(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, cfg, "v_proj")(x)
    if cfg.qk_norm == "full":  # OLMoE: over all heads, before the split
      q = RMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, name="k_norm")(k)
    if cfg.clip_qkv is not None:
      q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    batch, length = x.shape[:2]
    q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)
    k = k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":  # Qwen3: per head
      q = RMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, name="k_norm")(k)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=cfg.head_dim ** -0.5,
                                       implementation="xla")
    return _dense(cfg.hidden_size, cfg.o_bias, cfg, "o_proj")(
        out.reshape(batch, length, cfg.num_heads * cfg.head_dim))


class GatedMlp(nn.Module):
  """Dense SwiGLU MLP: `down(silu(gate(x)) * up(x))` (dense layers, shared experts)."""

  config: HfMoeConfig
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    gate = _dense(self.hidden, False, cfg, "gate_proj")(x)
    up = _dense(self.hidden, False, cfg, "up_proj")(x)
    return _dense(cfg.hidden_size, False, cfg, "down_proj")(nn.silu(gate) * up)


class _Router(nn.Module):
  num_experts: int
  param_dtype: Any

  @nn.compact
  def __call__(self, width: int) -> jax.Array:
    return self.param("kernel", nn.initializers.normal(0.02), (width, self.num_experts),
                      self.param_dtype)


class _Experts(nn.Module):
  names: tuple[str, str, str]
  num_experts: int
  width: int
  hidden: int
  param_dtype: Any

  @nn.compact
  def __call__(self) -> moe.ExpertWeights:
    init = nn.initializers.normal(0.02)
    up_shape = (self.num_experts, self.width, self.hidden)
    gate = self.param(self.names[0], init, up_shape, self.param_dtype)
    up = self.param(self.names[1], init, up_shape, self.param_dtype)
    down = self.param(self.names[2], init, (self.num_experts, self.hidden, self.width),
                      self.param_dtype)
    return moe.ExpertWeights(wi_kernel=up, wi_bias=None, wo_kernel=down, wo_bias=None,
                             gate_kernel=gate)


def moe_layer_config(config: HfMoeConfig) -> model_configs.ModelConfig:
  """The `ModelConfig` that `moe.moe_forward` runs an MoE layer of `config` with: dropless
  (no token is dropped, as in transformers), index dispatch, each sequence one group."""
  return model_configs.ModelConfig(
      vocab_size=config.vocab_size, max_length=config.max_length,
      d_model=config.hidden_size, d_ff=config.expert_size, num_heads=1, num_layers=1,
      num_experts=config.num_experts, top_k=config.top_k, dropless=True,
      dispatch="gather", expert_parallel="never", dtype=config.dtype,
      param_dtype=config.param_dtype)


class SparseMoeBlock(nn.Module):
  """The routed experts of one layer (`moe.moe_forward`); sows logits and inputs."""

  config: HfMoeConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.param_dtype)
    router_kernel = _Router(cfg.num_experts, dtype, name="gate")(cfg.hidden_size)
    experts = _Experts(families.get(cfg.family).experts, cfg.num_experts, cfg.hidden_size,
                       cfg.expert_size, dtype, name="experts")()
    y, logits, _ = moe.moe_forward(x, router_kernel, experts, config=moe_layer_config(cfg),
                                   train=False, activation="silu",
                                   renormalize_gates=cfg.renormalize_gates)
    if self.is_mutable_collection("router_logits") and not self.is_initializing():
      self.sow("router_logits", "logits", logits,
               init_fn=lambda: None, reduce_fn=lambda _, new: new)
    if self.is_mutable_collection("moe_inputs") and not self.is_initializing():
      self.sow("moe_inputs", "inputs", x, init_fn=lambda: None, reduce_fn=lambda _, new: new)
    return y.astype(x.dtype)


class DecoderLayer(nn.Module):
  config: HfMoeConfig
  index: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array):
    cfg = self.config
    h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
    x = x + Attention(cfg, name="self_attn")(h, mask, cos, sin)
    h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x)
    if cfg.is_moe_layer(self.index):
      out = SparseMoeBlock(cfg, name="mlp")(h)
      if cfg.shared_expert_size:
        shared = GatedMlp(cfg, cfg.shared_expert_size, name="shared_expert")(h)
        gate = _dense(1, False, cfg, "shared_expert_gate")(h)
        out = out + nn.sigmoid(gate) * shared
    else:
      out = GatedMlp(cfg, cfg.intermediate_size, name="mlp")(h)
    return x + out


class HfMoeDecoder(nn.Module):
  """A Hugging Face MoE decoder with t5x's decoder call signature.

  `decoder_target_tokens` is accepted for the signature and ignored (every position is
  a real token unless `decoder_segment_ids` says 0); positions default to 0..L-1 per
  row. Attention is causal, within a segment when segments are given. Returns float32
  logits [B, L, vocab].

  Example:
    >>> model = HfMoeDecoder(config)
    >>> logits = model.apply({"params": params}, tokens)
  """

  config: HfMoeConfig

  @nn.compact
  def __call__(self, decoder_input_tokens: jax.Array,
               decoder_target_tokens: jax.Array | None = None,
               decoder_segment_ids: jax.Array | None = None,
               decoder_positions: jax.Array | None = None,
               decoder_causal_attention: jax.Array | None = None,
               enable_dropout: bool = False, decode: bool = False) -> jax.Array:
    del decoder_target_tokens, enable_dropout
    if decode:
      raise ValueError("HfMoeDecoder has no decoding cache; generate with transformers")
    if decoder_causal_attention is not None:
      raise ValueError("HfMoeDecoder is causal: bidirectional prefix inputs are not "
                       "supported")
    cfg = self.config
    tokens = jnp.asarray(decoder_input_tokens)
    batch, length = tokens.shape
    positions = (jnp.broadcast_to(jnp.arange(length), (batch, length))
                 if decoder_positions is None else jnp.asarray(decoder_positions))
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if decoder_segment_ids is not None:
      segments = jnp.asarray(decoder_segment_ids)
      mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
    mask = jnp.broadcast_to(mask, (batch, 1, length, length))
    cos, sin = rotary_embedding(positions, cfg.head_dim, cfg.rope_theta)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                     dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                     name="embed_tokens")
    x = embed(tokens)
    for i in range(cfg.num_layers):
      x = DecoderLayer(cfg, i, name=f"layers_{i}")(x, mask, cos, sin)
    x = RMSNorm(cfg.rms_norm_eps, name="norm")(x)
    if cfg.tie_word_embeddings:
      return jnp.einsum("bld,vd->blv", x, embed.embedding.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return DenseGeneral((cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                        output_dtype=jnp.float32, name="lm_head")(x)
