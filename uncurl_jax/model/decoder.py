"""GPT-2-style SMoE decoder-only language model with t5x's DecoderOnlyModel interface.

Pre-LayerNorm blocks with learned token and position embeddings; the FFN of block i is
an `MoeLayer` when `config.is_moe_layer(i)` (blocks 0, 2, 4, ... by default) and a dense
GELU MLP otherwise. The parameter layout and logical axes are those of docs/model.md.

Example:
  >>> cfg = configs.get("tiny", num_experts=8)
  >>> model = SMoEDecoder(cfg)
  >>> variables = model.init(key, jnp.ones((2, 16)), jnp.ones((2, 16)), enable_dropout=False)
  >>> logits, state = model.apply({"params": variables["params"]}, tokens, tokens,
  ...                             enable_dropout=False, mutable=["intermediates"])
  >>> param_count(configs.get("354m", num_experts=32))   # about 3.47e9, nothing allocated
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
from flax.linen import partitioning
import jax
import jax.numpy as jnp

from uncurl_jax.model import moe
from uncurl_jax.model.attention import DenseGeneral, MultiHeadAttention, make_decoder_mask
from uncurl_jax.model.configs import ModelConfig


class Embed(nn.Module):
  """Embedding table `embedding [num_embeddings, features]` with logical `axes`.

  Example:
    >>> embed = Embed(512, 64, axes=("vocab", "embed"))
    >>> x = embed(ids)                                   # lookup
    >>> logits = embed.attend(x)                         # tied output projection
  """

  num_embeddings: int
  features: int
  axes: tuple[str, str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02

  def setup(self):
    self.embedding = partitioning.param_with_axes(
        "embedding", nn.initializers.normal(self.init_std),
        (self.num_embeddings, self.features), self.param_dtype, axes=self.axes, module=self)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Float32 scores `x @ embedding^T`, `[..., num_embeddings]`."""
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class LayerNorm(nn.Module):
  """LayerNorm with `scale`/`bias` on ('embed',), statistics in float32."""

  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    scale = partitioning.param_with_axes("scale", nn.initializers.ones, features,
                                         self.param_dtype, axes=("embed",))
    bias = partitioning.param_with_axes("bias", nn.initializers.zeros, features,
                                        self.param_dtype, axes=("embed",))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    normed = (x - mean) * jax.lax.rsqrt(variance + self.epsilon)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Mlp(nn.Module):
  """Dense FFN `gelu(x @ wi + bi) @ wo + bo` (the same function as one expert)."""

  d_ff: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
    hidden = nn.gelu(DenseGeneral((self.d_ff,), ("embed", "mlp"), name="wi", **common)(x))
    return DenseGeneral((x.shape[-1],), ("mlp", "embed"), name="wo", **common)(hidden)


class DecoderBlock(nn.Module):
  """Pre-LN block: x + drop(attn(LN(x))), then x + drop(mlp(LN(x)))."""

  config: ModelConfig
  use_moe: bool
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, x, mask, *, causal, enable_dropout, decode, prefill, prefill_lengths):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = dict(epsilon=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype)
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=not enable_dropout)

    h = LayerNorm(name="pre_attention_layer_norm", **norm)(x)
    h = MultiHeadAttention(cfg.num_heads, cfg.head_dim, dtype=dtype, param_dtype=param_dtype,
                           init_std=cfg.init_std, implementation=self.attention_implementation,
                           name="attention")(
        h, mask, causal=causal, decode=decode, prefill=prefill, prefill_lengths=prefill_lengths)
    x = x + dropout(h)

    h = LayerNorm(name="pre_mlp_layer_norm", **norm)(x)
    if self.use_moe:
      h = moe.MoeLayer(config=cfg, name="mlp")(h, deterministic=not enable_dropout)
    else:
      h = Mlp(cfg.d_ff, dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std,
              name="mlp")(h)
    return x + dropout(h.astype(x.dtype))


def _check_call_inputs(config, decoder_input_tokens, others, *, decode, prefill,
                       prefill_lengths):
  if not isinstance(config, ModelConfig):
    raise TypeError(f"SMoEDecoder.config must be a ModelConfig, got {type(config).__name__}")
  if decoder_input_tokens.ndim != 2:
    raise ValueError(f"decoder_input_tokens must be [batch, length], got shape "
                     f"{decoder_input_tokens.shape}")
  for name, array in others.items():
    if array is not None and array.shape != decoder_input_tokens.shape:
      raise ValueError(f"{name} has shape {array.shape}, expected {decoder_input_tokens.shape} "
                       f"like decoder_input_tokens")
  if decode and prefill:
    raise ValueError("decode and prefill cannot both be True: prefill first, then decode")
  if prefill and prefill_lengths is None:
    raise ValueError("prefill=True needs prefill_lengths ([batch] ints)")
  length = decoder_input_tokens.shape[1]
  if others["decoder_positions"] is None and length > config.max_length:
    raise ValueError(f"sequence length {length} exceeds config.max_length={config.max_length}")


class SMoEDecoder(nn.Module):
  """Decoder-only SMoE LM called exactly as t5x's DecoderOnlyModel calls its module.

  Packing: `decoder_segment_ids` confine attention to each segment and
  `decoder_positions` restart the learned positions per segment. Keys whose target
  token is 0 are padding (t5x's convention). `decoder_causal_attention` is supported:
  positions marked 1 (the prefix-LM inputs) attend to each other bidirectionally.

  Decoding (module docstring of `attention`): `decode=True` first creates the cache
  (t5x: full-length dummy inputs, `mutable=['cache']`), then takes one token per example
  per call, its position being the cache index; `prefill=True` with `prefill_lengths`
  fills the cache from a prompt. `max_decode_length` is ignored: the cache length is
  the length of the inputs that created it.

  Attributes:
    config: Model hyperparameters.
    attention_implementation: None (cuDNN flash attention on GPU where it applies,
      else XLA), "xla" or "cudnn"; see `attention.dot_product_attention`.

  Example:
    >>> model = SMoEDecoder(configs.get("tiny", num_experts=8))
    >>> variables = model.init(key, jnp.ones((2, 16)), jnp.ones((2, 16)), enable_dropout=False)
    >>> logits = model.apply({"params": variables["params"]}, tokens, targets,
    ...                      rngs={"dropout": key}, mutable=["intermediates"])[0]
  """

  config: ModelConfig
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, decoder_input_tokens, decoder_target_tokens, decoder_segment_ids=None,
               decoder_positions=None, decoder_causal_attention=None, *, enable_dropout=True,
               decode=False, max_decode_length=None, prefill=False, prefill_lengths=None):
    """Returns float32 logits `[batch, length, vocab_size]`.

    Args:
      decoder_input_tokens: `[batch, length]` ids (floats are cast, as t5x inits with ones).
      decoder_target_tokens: `[batch, length]`; only `> 0` is used, as the padding mask.
      decoder_segment_ids: `[batch, length]` packing ids (0 = padding) or None.
      decoder_positions: `[batch, length]` positions within each packed segment, or None.
      decoder_causal_attention: `[batch, length]` prefix-LM input marker, or None.
      enable_dropout: Dropout on, and the MoE layers use the training capacity factor.
      decode: Cached decoding (see class docstring).
      max_decode_length: Ignored (t5x passes it).
      prefill: Fill the cache from full-length inputs.
      prefill_lengths: `[batch]` prompt lengths kept in the cache when prefilling.
    """
    del max_decode_length  # The cache length was fixed when the cache was created.
    cfg = self.config
    # t5x initializes with float ones: every id-like input is cast to int32.
    tokens = jnp.asarray(decoder_input_tokens).astype(jnp.int32)
    others = dict(decoder_target_tokens=decoder_target_tokens,
                  decoder_segment_ids=decoder_segment_ids,
                  decoder_positions=decoder_positions,
                  decoder_causal_attention=decoder_causal_attention)
    others = {k: None if v is None else jnp.asarray(v).astype(jnp.int32)
              for k, v in others.items()}
    _check_call_inputs(cfg, tokens, others, decode=decode, prefill=prefill,
                       prefill_lengths=prefill_lengths)
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.init_std)

    token_embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), name="token_embed",
                        **embed)
    positions, cached_step = self._positions(tokens, others["decoder_positions"],
                                             decode=decode, prefill=prefill,
                                             prefill_lengths=prefill_lengths)
    x = token_embed(tokens) + Embed(cfg.max_length, cfg.d_model, ("abspos_buckets", "embed"),
                                    name="position_embed", **embed)(positions)
    x = nn.Dropout(cfg.dropout_rate, deterministic=not enable_dropout)(x)

    # Cached decode steps get their mask from each layer's cache index instead.
    mask = None if cached_step else make_decoder_mask(
        others["decoder_target_tokens"], others["decoder_segment_ids"],
        others["decoder_causal_attention"], length=tokens.shape[1])
    for i in range(cfg.num_layers):
      x = DecoderBlock(cfg.layer_config(i), use_moe=cfg.is_moe_layer(i),
                       attention_implementation=self.attention_implementation,
                       name=f"layers_{i}")(
          x, mask, causal=decoder_causal_attention is None, enable_dropout=enable_dropout,
          decode=decode, prefill=prefill, prefill_lengths=prefill_lengths)
    x = LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                  name="final_layer_norm")(x)
    if cfg.tie_embeddings:
      return token_embed.attend(x)
    return DenseGeneral((cfg.vocab_size,), ("embed", "vocab"), use_bias=False,
                        output_dtype=jnp.float32, name="logits_dense", **embed)(x)

  def _positions(self, tokens, decoder_positions, *, decode, prefill, prefill_lengths):
    """Positions `[batch, length]` and whether this is a cached one-token decode step.

    The decoder keeps its own 'cache_index' (same semantics as the attention layers'),
    so that t5x's cache utilities expand or reorder it together with theirs.
    """
    batch, length = tokens.shape
    default = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    positions = default if decoder_positions is None else decoder_positions
    if not (decode or prefill):
      return positions, False
    is_initialized = self.has_variable("cache", "cache_index")
    if not is_initialized and not self.is_mutable_collection("cache"):
      raise ValueError("decode/prefill without a cache: create it first with "
                       "apply(..., decode=True, mutable=['cache']) on full-length inputs")
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      return positions, False
    if prefill:
      cache_index.value = jnp.asarray(prefill_lengths, jnp.int32).reshape(batch)
      return positions, False
    if length != 1:
      raise ValueError(f"decode=True takes one token per example, got length {length}")
    index = jnp.reshape(cache_index.value, (-1, 1))
    cache_index.value = cache_index.value + 1
    return jnp.broadcast_to(index, (batch, 1)), True


def param_count(config: ModelConfig) -> int:
  """Number of parameters of `SMoEDecoder(config)`, from shapes only (nothing allocated).

  Example:
    >>> param_count(configs.get("354m", num_experts=8)) / 1e9    # paper: 1.05B
    1.06...
  """
  if not isinstance(config, ModelConfig):
    raise TypeError(f"param_count needs a ModelConfig, got {type(config).__name__}")
  model = SMoEDecoder(config)
  shape = (1, config.max_length)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones(shape), jnp.ones(shape),
                         enable_dropout=False))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
