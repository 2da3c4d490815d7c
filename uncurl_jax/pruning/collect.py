"""Collecting each MoE layer's raw router logits on a task's tokens.

Example:
  >>> model = decoder.SMoEDecoder(config)
  >>> logits = collect_router_logits(model, params, batches, max_tokens=100_000)
  >>> logits["layers_0/mlp"].shape                     # [tokens, E], padding excluded
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import jax
import numpy as np
import tqdm
from absl import logging

# Model inputs passed through when a batch has them (t5x DecoderOnlyModel's features).
_OPTIONAL_INPUTS = ("decoder_segment_ids", "decoder_positions", "decoder_causal_attention")


def real_token_mask(batch: Mapping[str, Any]) -> np.ndarray:
  """[B, L] bool: which positions of a batch are real tokens (not padding).

  Packed batches: segment id > 0. Otherwise: loss weight > 0, or, in prefix-LM batches,
  a position marked by `decoder_causal_attention` (its inputs have loss weight 0 but are
  real task tokens routed by the model).

  Example:
    >>> real_token_mask({"decoder_loss_weights": np.array([[1, 1, 0]])})
    array([[ True,  True, False]])
  """
  if "decoder_segment_ids" in batch:
    return np.asarray(batch["decoder_segment_ids"]) > 0
  if "decoder_loss_weights" in batch:
    mask = np.asarray(batch["decoder_loss_weights"]) > 0
    if "decoder_causal_attention" in batch:
      mask |= np.asarray(batch["decoder_causal_attention"]) > 0
    return mask
  raise ValueError(f"a batch needs 'decoder_loss_weights' or 'decoder_segment_ids' to mark "
                   f"padding; got keys {sorted(batch)}")


def router_logits_by_layer(collection: Mapping[str, Any]) -> dict[str, list[Any]]:
  """{MoE layer path: [[B, L, E] arrays]} from a 'router_logits' collection.

  The MoE layer sows under the name 'logits' in its own scope, so the layer's path in the
  collection is its path in `params`. A sown tuple (several calls) gives several arrays.
  """
  by_layer = {}
  for path, value in flax.traverse_util.flatten_dict(collection).items():
    if path[-1] != "logits":
      continue
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    by_layer["/".join(path[:-1])] = values
  return by_layer


def _make_forward(model):
  def forward(params, inputs):
    _, state = model.apply({"params": params}, **inputs, enable_dropout=False,
                           mutable=["router_logits"])
    return state["router_logits"]
  return jax.jit(forward)


# Equal modules (same config) share one jitted forward, so that collecting for several
# tasks compiles once per batch shape.
_cached_forward = functools.lru_cache(maxsize=8)(_make_forward)


def _jitted_forward(model):
  try:
    return _cached_forward(model)
  except TypeError:  # an unhashable module
    return _make_forward(model)


def collect_router_logits(model: Any, params: Mapping[str, Any],
                          batches: Iterable[Mapping[str, Any]], *,
                          max_tokens: int | None = None,
                          progress: bool = True) -> dict[str, np.ndarray]:
  """Runs `model` over task batches and returns each MoE layer's raw router logits.

  Streams batch by batch (one jitted forward per batch shape), keeping only the real
  tokens' logits on the host, and stops once `max_tokens` tokens are collected, so
  memory stays bounded. Shows a progress bar of the tokens collected (tqdm, on stderr).

  Args:
    model: A flax module with t5x's decoder call signature whose MoE layers sow
      'router_logits'/'logits' ([B, L, E], e.g. `uncurl_jax.SMoEDecoder`).
    params: Its params.
    batches: Iterable of dicts with 'decoder_input_tokens', 'decoder_target_tokens' and
      'decoder_loss_weights' or 'decoder_segment_ids' (see `real_token_mask`);
      'decoder_segment_ids', 'decoder_positions', 'decoder_causal_attention' are passed
      to the model when present. numpy or jax arrays (e.g. `ds.as_numpy_iterator()`).
    max_tokens: Stop after this many real tokens (in batch order); None: all batches.
    progress: Show the progress bar.

  Returns:
    {MoE layer path: [tokens, E] float32 numpy array}, padding excluded.

  Raises:
    ValueError: max_tokens < 1, a batch without a padding marker, the model sowing no
      router logits, or no real token in any batch.

  Example:
    >>> logits = collect_router_logits(model, params, task_batches, max_tokens=65536)
    >>> plan = plan_pruning(params, logits, 8)
  """
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens must be None or >= 1, got {max_tokens}")
  forward = _jitted_forward(model)
  chunks: dict[str, list[np.ndarray]] = {}
  total = num_batches = 0
  bar = tqdm.tqdm(total=max_tokens, unit="tok", desc="router logits", disable=not progress)
  with bar:
    for batch in batches:
      mask = real_token_mask(batch)
      if max_tokens is not None:
        mask = _first_true(mask, max_tokens - total)
      inputs = {name: batch[name] for name in ("decoder_input_tokens", "decoder_target_tokens")}
      inputs.update({name: batch[name] for name in _OPTIONAL_INPUTS if name in batch})
      by_layer = router_logits_by_layer(forward(params, inputs))
      if not by_layer:
        raise ValueError("the model sowed no 'router_logits'/'logits'; is it an MoE model?")
      for name, values in by_layer.items():
        chunks.setdefault(name, []).extend(np.asarray(v, np.float32)[mask] for v in values)
      count = int(mask.sum())
      total, num_batches = total + count, num_batches + 1
      bar.update(count)
      bar.set_postfix(batches=num_batches)
      if max_tokens is not None and total >= max_tokens:
        break
  if total == 0:
    raise ValueError(f"no real tokens in {num_batches} batches (all padding, or no batch)")
  logging.info("collect_router_logits: %d tokens from %d batches", total, num_batches)
  return {name: np.concatenate(parts, axis=0) for name, parts in chunks.items()}


def _first_true(mask: np.ndarray, limit: int) -> np.ndarray:
  """`mask` with only its first `limit` True entries (row-major) kept."""
  flat = mask.reshape(-1).copy()
  flat[np.flatnonzero(flat)[limit:]] = False
  return flat.reshape(mask.shape)
