"""One decoder call for every forward pass: training, scoring and the pruning statistics.

t5x's `DecoderOnlyModel` passes `decoder_causal_attention` to its module only when it is
built with `inputs_bidirectional_attention=True`; by default every position attends
causally, even in prefix-LM batches that carry the feature. This project follows that
switch (`ModelConfig.inputs_bidirectional_attention`, default False), and every pass that
runs the module (the train and eval steps, the scorers, `collect_router_logits`,
`collect_expert_stats`, progressive dropping's router probe) builds its call here, so the
router logits a pruning method sees are those of the forward the model trains and is
scored with.

Example:
  >>> batch = {"decoder_input_tokens": x, "decoder_target_tokens": y,
  ...          "decoder_causal_attention": prefix, "decoder_loss_weights": w}
  >>> sorted(module_inputs(batch))                     # causal, as t5x by default
  ['decoder_input_tokens', 'decoder_target_tokens']
  >>> sorted(module_inputs(batch, inputs_bidirectional_attention=True))
  ['decoder_causal_attention', 'decoder_input_tokens', 'decoder_target_tokens']
  >>> logits = model.apply({"params": params}, **module_inputs(batch), enable_dropout=False)
"""

from __future__ import annotations

from typing import Any, Mapping

# The batch features the decoder always receives when present (t5x's names).
MODULE_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                   "decoder_positions")
PREFIX_FEATURE = "decoder_causal_attention"


def module_inputs(batch: Mapping[str, Any], *, inputs_bidirectional_attention: bool = False
                  ) -> dict[str, Any]:
  """The keyword arguments of the decoder call for `batch`, as t5x's DecoderOnlyModel.

  Args:
    batch: Features by t5x's names ([batch, length] arrays); extra features (loss
      weights, ...) are left out.
    inputs_bidirectional_attention: Pass `decoder_causal_attention` (the prefix-LM
      inputs then attend to each other both ways). False: fully causal, whatever the
      batch carries (t5x's default).

  Raises:
    ValueError: `decoder_input_tokens` or `decoder_target_tokens` missing, or
      bidirectional inputs asked for and the batch has no `decoder_causal_attention`.
  """
  missing = [name for name in MODULE_FEATURES[:2] if name not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; it has {sorted(batch)}")
  inputs = {name: batch[name] for name in MODULE_FEATURES
            if name in batch and batch[name] is not None}
  if inputs_bidirectional_attention:
    if batch.get(PREFIX_FEATURE) is None:
      raise ValueError(f"inputs_bidirectional_attention=True needs '{PREFIX_FEATURE}' in the "
                       f"batch (t5x's DecoderOnlyModel requires it too); it has {sorted(batch)}")
    inputs[PREFIX_FEATURE] = batch[PREFIX_FEATURE]
  return inputs


def bidirectional_inputs(source: Any) -> bool:
  """The switch of a config, of a module (its `config`) or of a module's bound `apply`;
  False when it has none (t5x's default, e.g. a flaxformer decoder).

  Example:
    >>> bidirectional_inputs(model.apply) == model.config.inputs_bidirectional_attention
    True
  """
  module = getattr(source, "__self__", source)  # a bound method's module
  config = getattr(module, "config", module)
  return bool(getattr(config, "inputs_bidirectional_attention", False))
