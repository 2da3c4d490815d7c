"""Collecting each MoE layer's raw router logits on a task's tokens.

Example:
  >>> model = decoder.SMoEDecoder(config)
  >>> logits = collect_router_logits(model, params, batches, max_tokens=100_000)
  >>> logits["layers_0/mlp"].shape                     # [tokens, E], padding excluded
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax
import numpy as np
import tqdm
from absl import logging

from uncurl_jax import checks
from uncurl_jax.model import forward as forward_lib
from uncurl_jax.model import inputs as inputs_lib
from uncurl_jax.model import layout as layout_lib

# Model inputs passed through when a batch has them (t5x DecoderOnlyModel's features).
_REQUIRED_INPUTS = ("decoder_input_tokens", "decoder_target_tokens")
_OPTIONAL_INPUTS = ("decoder_segment_ids", "decoder_positions", "decoder_causal_attention")
_TOKEN_FEATURES = _REQUIRED_INPUTS + _OPTIONAL_INPUTS


def check_batch(batch: Any, index: int, *, vocab_size: int | None = None) -> None:
  """Raises a ValueError/TypeError naming what is wrong with task batch number `index`.

  A batch is a mapping of [B, L] arrays with 'decoder_input_tokens',
  'decoder_target_tokens' (integer ids below `vocab_size`), and 'decoder_loss_weights'
  or 'decoder_segment_ids' to mark padding; the optional features have the same shape.

  Example:
    >>> check_batch({"decoder_input_tokens": np.zeros((2, 3), int)}, 0)
    ValueError: task batch 0 lacks ['decoder_target_tokens'] ...
  """
  if not isinstance(batch, Mapping):
    raise TypeError(f"task batch {index} must be a mapping of [batch, length] arrays, got "
                    f"{type(batch).__name__}")
  missing = [name for name in _REQUIRED_INPUTS if name not in batch]
  if missing or not {"decoder_loss_weights", "decoder_segment_ids"} & set(batch):
    raise ValueError(f"task batch {index} lacks {missing or []} and needs "
                     f"{list(_REQUIRED_INPUTS)} plus 'decoder_loss_weights' or "
                     f"'decoder_segment_ids' (to mark padding); it has {sorted(batch)}")
  shape = np.shape(batch["decoder_input_tokens"])
  if len(shape) != 2:
    raise ValueError(f"task batch {index}: decoder_input_tokens must be [batch, length], got "
                     f"shape {shape}")
  for name in _TOKEN_FEATURES + ("decoder_loss_weights",):
    if name in batch and np.shape(batch[name]) != shape:
      raise ValueError(f"task batch {index}: {name} has shape {np.shape(batch[name])}, "
                       f"expected {shape} like decoder_input_tokens")
  for name in _TOKEN_FEATURES:
    if name in batch and not np.issubdtype(np.asarray(batch[name]).dtype, np.integer):
      raise TypeError(f"task batch {index}: {name} must hold integers, got dtype "
                      f"{np.asarray(batch[name]).dtype}")
  if vocab_size is not None:
    for name in _REQUIRED_INPUTS:
      ids = np.asarray(batch[name])
      if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"task batch {index}: {name} has ids in [{ids.min()}, {ids.max()}], "
                         f"outside the model's vocabulary [0, {vocab_size})")


def check_model_params(model: Any, params: Any, batch_shape: tuple[int, int]) -> None:
  """Raises a ValueError unless `params` has MoE layers and fits `model`'s parameter tree
  (`forward.check_params` on the batches' shape)."""
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a mapping of arrays, got {type(params).__name__}")
  if not layout_lib.has_moe_layers(params):
    raise ValueError("params have no MoE layer (no router kernel); router logits come from "
                     "the MoE layers of an SMoE model")
  forward_lib.check_params(model, params, "the params", batch_shape=tuple(batch_shape))


def as_batches(batches: Any) -> Iterable[Mapping[str, Any]]:
  """`batches`, or `[batches]` when it is one batch (a mapping of arrays) rather than an
  iterable of them. Refuses what is neither (None, a number, a string or bytes)."""
  if isinstance(batches, Mapping):
    return [batches]
  if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
    raise TypeError(f"batches must be an iterable of batches (mappings of [batch, length] "
                    f"arrays) or one batch, got {type(batches).__name__}")
  return batches


def check_model(model: Any) -> None:
  """Raises a TypeError unless `model` is a flax module (it has `init` and `apply`)."""
  if not (callable(getattr(model, "init", None)) and callable(getattr(model, "apply", None))):
    raise TypeError(f"model must be a flax module with t5x's decoder call signature (e.g. "
                    f"SMoEDecoder), got {type(model).__name__}")


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


def model_inputs(batch: Mapping[str, Any], model: Any = None, *,
                 inputs_bidirectional_attention: bool | None = None) -> dict[str, Any]:
  """The decoder call for `batch`: the one every training and scoring pass makes.

  `decoder_causal_attention` reaches the module only with bidirectional inputs
  (`inputs_bidirectional_attention`, default: `model`'s config switch, False for a module
  without one), as t5x's DecoderOnlyModel does (`uncurl_jax.model.inputs`).
  """
  if inputs_bidirectional_attention is None:
    inputs_bidirectional_attention = inputs_lib.bidirectional_inputs(model)
  return inputs_lib.module_inputs(
      batch, inputs_bidirectional_attention=inputs_bidirectional_attention)


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


def collect_router_logits(model: Any, params: Mapping[str, Any],
                          batches: Iterable[Mapping[str, Any]], *,
                          max_tokens: int | None = None,
                          progress: bool = True,
                          inputs_bidirectional_attention: bool | None = None
                          ) -> dict[str, np.ndarray]:
  """Runs `model` over task batches and returns each MoE layer's raw router logits.

  Streams batch by batch (one jitted forward per batch shape), keeping only the real
  tokens' logits on the host, and stops once `max_tokens` tokens are collected, so
  memory stays bounded. Shows a progress bar of the tokens collected (tqdm, on stderr).

  Args:
    model: A flax module with t5x's decoder call signature whose MoE layers sow
      'router_logits'/'logits' ([B, L, E], e.g. `uncurl_jax.SMoEDecoder`).
    params: Its params.
    batches: Iterable of dicts (or one dict: one batch) with 'decoder_input_tokens',
      'decoder_target_tokens' and
      'decoder_loss_weights' or 'decoder_segment_ids' (see `real_token_mask`);
      'decoder_segment_ids' and 'decoder_positions' are passed to the model when
      present, 'decoder_causal_attention' only with bidirectional inputs (below).
      numpy or jax arrays (e.g. `ds.as_numpy_iterator()`).
    max_tokens: Stop after this many real tokens (in batch order); None: all batches.
    progress: Show the progress bar.
    inputs_bidirectional_attention: Whether the prefix-LM inputs attend both ways; None:
      the model config's switch (False, t5x's default, for a module without one). The
      logits are those of the forward the model trains and is scored with
      (`uncurl_jax.model.inputs`).

  Returns:
    {MoE layer path: [tokens, E] float32 numpy array}, padding excluded.

  Raises:
    TypeError, ValueError: Before a batch's forward pass (`check_batch`): a missing
      feature or padding marker, features of other shapes, non-integer ids, ids outside
      the vocabulary; before the first (`check_model_params`): params without MoE layers
      or of another model; before any (`check_model`, `as_batches`): a model that is not
      a flax module, batches that are neither batches nor one batch; max_tokens not an
      int >= 1; after the last batch: no real token in any batch.

  Example:
    >>> logits = collect_router_logits(model, params, task_batches, max_tokens=65536)
    >>> plan = plan_pruning(params, logits, 8)
  """
  check_model(model)
  if max_tokens is not None:
    checks.integer("max_tokens", max_tokens, low=1)
  batches = as_batches(batches)
  forward = forward_lib.sown_forward(model, "router_logits")
  vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
  chunks: dict[str, list[np.ndarray]] = {}
  total = num_batches = 0
  bar = tqdm.tqdm(total=max_tokens, unit="tok", desc="router logits", disable=not progress)
  with bar:
    for batch in batches:
      check_batch(batch, num_batches, vocab_size=vocab_size)
      if num_batches == 0:
        check_model_params(model, params, np.shape(batch["decoder_input_tokens"]))
      mask = real_token_mask(batch)
      if max_tokens is not None:
        mask = first_true(mask, max_tokens - total)
      by_layer = router_logits_by_layer(forward(params, model_inputs(
          batch, model, inputs_bidirectional_attention=inputs_bidirectional_attention)))
      if not by_layer:
        raise ValueError("the model sowed no 'router_logits'/'logits': its MoE layers must "
                         "sow the raw logits when that collection is mutable")
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


def first_true(mask: np.ndarray, limit: int) -> np.ndarray:
  """`mask` with only its first `limit` True entries (row-major) kept."""
  flat = mask.reshape(-1).copy()
  flat[np.flatnonzero(flat)[limit:]] = False
  return flat.reshape(mask.shape)
