"""Causal multi-head self-attention with packing masks and a key/value cache.

The attention itself is `jax.nn.dot_product_attention`: on GPU with a 16-bit compute
dtype it asks for cuDNN flash attention, elsewhere (and whenever cuDNN rejects the
shapes) the XLA implementation runs. Masks are boolean `[batch, 1, q_len, kv_len]`
arrays, built once per forward by `make_decoder_mask` and shared by every block.

The cache follows t5x/flaxformer: `decode=True` on a module without a cache creates
`cached_key`, `cached_value` `[batch, length, heads, head_dim]` and a scalar
`cache_index` in the 'cache' collection (t5x does this with full-length dummy inputs);
later `decode=True` calls take one token per example, write its key/value at the
example's index and attend to positions <= index. `prefill=True` runs a whole
sequence, keeps its first `prefill_lengths[b]` keys/values and sets the index to
`prefill_lengths` (a per-example vector from then on).

Example:
  >>> attn = MultiHeadAttention(num_heads=4, head_dim=16, name="attention")
  >>> mask = make_decoder_mask(targets)                     # [B, 1, L, L]
  >>> variables = attn.init(key, x, mask)                   # x: [B, L, 64]
  >>> y = attn.apply(variables, x, mask)                    # [B, L, 64]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax.linen import partitioning
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, "xla", "cudnn")


class DenseGeneral(nn.Module):
  """Affine map over the last `num_contracting` axes, params declared with logical axes.

  `kernel` has shape `x.shape[-num_contracting:] + features` and axes `kernel_axes`;
  `bias` (if `use_bias`) has shape `features` and the trailing axes of `kernel_axes`.

  Example:
    >>> query = DenseGeneral((4, 16), ("embed", "heads", "kv"), name="query")(x)
    >>> out = DenseGeneral((64,), ("heads", "kv", "embed"), num_contracting=2)(query)
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  num_contracting: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  output_dtype: Any = None  # None: the compute dtype; float32 keeps full-precision logits.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if len(self.kernel_axes) != self.num_contracting + len(self.features):
      raise ValueError(f"kernel_axes {self.kernel_axes} must name {self.num_contracting} "
                       f"input axes and the {len(self.features)} axes of {self.features}")
    contracting_shape = x.shape[x.ndim - self.num_contracting:]
    kernel = partitioning.param_with_axes(
        "kernel", nn.initializers.normal(self.init_std),
        contracting_shape + tuple(self.features), self.param_dtype, axes=self.kernel_axes)
    output_dtype = self.output_dtype or self.dtype
    x_axes = tuple(range(x.ndim - self.num_contracting, x.ndim))
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype),
        ((x_axes, tuple(range(self.num_contracting))), ((), ())),
        preferred_element_type=jnp.float32).astype(output_dtype)
    if self.use_bias:
      bias = partitioning.param_with_axes(
          "bias", nn.initializers.zeros, tuple(self.features), self.param_dtype,
          axes=self.kernel_axes[self.num_contracting:])
      y = y + bias.astype(output_dtype)
    return y


def make_decoder_mask(decoder_target_tokens: jax.Array | None,
                      decoder_segment_ids: jax.Array | None = None,
                      decoder_causal_attention: jax.Array | None = None,
                      *, length: int | None = None) -> jax.Array:
  """Boolean self-attention mask `[batch, 1, length, length]` (True = may attend).

  Query i may attend to key j if j <= i (or both lie in the bidirectional prefix
  marked by `decoder_causal_attention`), key j is not padding (target token > 0, as
  t5x's `make_decoder_mask`; segment id > 0) and i, j share a segment. A token may
  always attend to itself, so no softmax row is empty; that only changes the (unused)
  outputs at padding positions.

  Example:
    >>> make_decoder_mask(jnp.array([[5, 6, 0]]))[0, 0].astype(int)
    Array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]], dtype=int32)

  Args:
    decoder_target_tokens: `[batch, length]` ids, 0 = padding; None: no padding.
    decoder_segment_ids: `[batch, length]` packing ids, 0 = padding; None: one segment.
    decoder_causal_attention: `[batch, length]`, 1 on the prefix-LM inputs, which
      attend to each other bidirectionally; None: fully causal.
    length: Sequence length, needed only when every other argument is None.
  """
  given = [a for a in (decoder_target_tokens, decoder_segment_ids,
                       decoder_causal_attention) if a is not None]
  for array in given:
    if array.ndim != 2 or array.shape != given[0].shape:
      raise ValueError(f"mask inputs must all be [batch, length], got shapes "
                       f"{[a.shape for a in given]}")
  if not given and length is None:
    raise ValueError("make_decoder_mask needs at least one [batch, length] array or length")
  batch, length = given[0].shape if given else (1, length)
  positions = jnp.arange(length)
  allowed = jnp.broadcast_to(positions[:, None] >= positions[None, :], (batch, length, length))
  if decoder_causal_attention is not None:
    prefix = decoder_causal_attention > 0
    allowed = allowed | (prefix[:, :, None] & prefix[:, None, :])
  if decoder_target_tokens is not None:
    allowed = allowed & (decoder_target_tokens > 0)[:, None, :]
  if decoder_segment_ids is not None:
    segments = decoder_segment_ids
    allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    allowed = allowed & (segments > 0)[:, None, :]
  allowed = allowed | jnp.eye(length, dtype=bool)[None]
  return allowed[:, None]


def _wants_cudnn(query: jax.Array, implementation: str | None) -> bool:
  if implementation is not None:
    return implementation == "cudnn"
  # cuDNN flash attention: GPU, 16-bit inputs, head_dim a multiple of 8 up to 128.
  head_dim = query.shape[-1]
  return (jax.default_backend() == "gpu"
          and query.dtype in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None, *, causal: bool,
                          implementation: str | None = None) -> jax.Array:
  """`softmax(q k^T / sqrt(dh) + mask) v` through `jax.nn.dot_product_attention`.

  Example: `dot_product_attention(q, k, v, make_decoder_mask(t), causal=True)`.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key, value: `[batch, kv_len, heads, head_dim]`.
    mask: Boolean, broadcastable to `[batch, heads, q_len, kv_len]`; None: no mask.
    causal: The mask is at least as strict as causal (with q_len == kv_len), so
      cuDNN may skip the upper triangle.
    implementation: None (cuDNN on GPU when it supports the inputs, else XLA),
      "xla" or "cudnn".
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if _wants_cudnn(query, implementation):
    try:
      return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=causal,
                                          implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      if implementation == "cudnn":
        raise
      # Auto mode: cuDNN rejected these shapes while tracing; XLA computes the same.
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention with query/key/value/out projections (all with biases).

  Parameters: `{query,key,value}/kernel [d, H, dh]` ('embed', 'heads', 'kv'),
  `{query,key,value}/bias [H, dh]`, `out/kernel [H, dh, d]` ('heads', 'kv', 'embed'),
  `out/bias [d]`. Cache (module docstring): `cached_key`, `cached_value`, `cache_index`.

  Example:
    >>> attn = MultiHeadAttention(num_heads=4, head_dim=16)
    >>> y = attn.apply(variables, x, make_decoder_mask(targets))
  """

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, *, causal: bool = True,
               decode: bool = False, prefill: bool = False,
               prefill_lengths: jax.Array | None = None) -> jax.Array:
    """Attends `x` `[batch, length, d]` to itself; returns `[batch, length, d]`.

    Args:
      x: Inputs (already layer-normed).
      mask: Boolean `[batch, 1, length, length]` from `make_decoder_mask`; ignored in
        cached decode steps, whose mask comes from the cache index.
      causal: `mask` is causal (no prefix-LM region); lets cuDNN skip work.
      decode: Use (or, if absent, create) the key/value cache, one token per call.
      prefill: Run the full sequence and fill the cache up to `prefill_lengths`.
      prefill_lengths: `[batch]` tokens to keep in the cache per example.
    """
    if x.ndim != 3:
      raise ValueError(f"expected x of shape [batch, length, d_model], got {x.shape}")
    if decode and prefill:
      raise ValueError("decode and prefill cannot both be True: prefill first, then decode")
    if prefill and prefill_lengths is None:
      raise ValueError("prefill=True needs prefill_lengths ([batch] ints)")
    projection = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std)
    heads = (self.num_heads, self.head_dim)
    query = DenseGeneral(heads, ("embed", "heads", "kv"), name="query", **projection)(x)
    key = DenseGeneral(heads, ("embed", "heads", "kv"), name="key", **projection)(x)
    value = DenseGeneral(heads, ("embed", "heads", "kv"), name="value", **projection)(x)
    if decode or prefill:
      key, value, mask, causal = self._use_cache(key, value, mask, causal, decode=decode,
                                                 prefill_lengths=prefill_lengths)
    attended = dot_product_attention(query, key, value, mask, causal=causal,
                                     implementation=self.implementation)
    return DenseGeneral((x.shape[-1],), ("heads", "kv", "embed"), num_contracting=2,
                        name="out", **projection)(attended)

  def _use_cache(self, key, value, mask, causal, *, decode, prefill_lengths):
    """Creates, fills (prefill) or extends (decode) the cache; returns k, v, mask, causal."""
    is_initialized = self.has_variable("cache", "cached_key")
    if not is_initialized and not self.is_mutable_collection("cache"):
      raise ValueError("decode/prefill without a cache: create it first with "
                       "apply(..., decode=True, mutable=['cache']) on full-length inputs")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not is_initialized:
      return key, value, mask, causal  # The creating call is an ordinary forward pass.
    batch, cache_length = cached_key.value.shape[:2]
    positions = jnp.arange(cache_length)
    if not decode:  # prefill
      if key.shape != cached_key.value.shape:
        raise ValueError(f"prefill inputs give keys of shape {key.shape}, expected the "
                         f"cache shape {cached_key.value.shape}")
      lengths = jnp.asarray(prefill_lengths, jnp.int32).reshape(batch)
      keep = (positions[None, :] < lengths[:, None])[:, :, None, None]
      cached_key.value = jnp.where(keep, key, jnp.zeros_like(key))
      cached_value.value = jnp.where(keep, value, jnp.zeros_like(value))
      cache_index.value = lengths
      return key, value, mask, causal
    if key.shape != (batch, 1) + cached_key.value.shape[2:]:
      raise ValueError(f"decode takes one token per example: keys of shape {key.shape}, "
                       f"expected {(batch, 1) + cached_key.value.shape[2:]}")
    # The index is a scalar before any prefill and [batch] after; [1] broadcasts.
    index = jnp.reshape(cache_index.value, (-1,))
    # One-hot select instead of a scatter: cheap here and partitions cleanly.
    at_index = (positions[None, :] == index[:, None])[:, :, None, None]
    cached_key.value = jnp.where(at_index, key, cached_key.value)
    cached_value.value = jnp.where(at_index, value, cached_value.value)
    cache_index.value = cache_index.value + 1
    visible = positions[None, :] <= index[:, None]  # [1 or batch, cache_length]
    return cached_key.value, cached_value.value, visible[:, None, None, :], False
