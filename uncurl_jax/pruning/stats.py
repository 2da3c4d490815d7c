"""Task statistics from the experts themselves: one streaming pass over task batches.

`collect_expert_stats` runs the model over task batches and, per MoE layer, keeps the raw
router logits of the real tokens and accumulates what the experts compute on them:

* selection counts (top-1 and the model's top-k);
* REAP saliency (Lasby et al. 2025, arXiv 2510.13999): for expert j, the mean over the
  tokens routed to j (j among their top-k) of gate_j(x) * ||f_j(x)||, with gate_j the
  router's softmax probability (this model does not renormalize over the k choices) and
  f_j(x) the expert's output before gating;
* each expert's mean output over all task tokens, [E, d] (HC-SMoE, Chen et al. 2025,
  arXiv 2410.08589, clusters experts on it).

Every expert runs on every real token (one expert at a time, so memory stays one batch
plus the accumulators); routing ignores capacity (the statistics are about the router's
choices and the experts' functions, not about a batch's overflow).

Example:
  >>> stats = collect_expert_stats(model, params, task_batches, max_tokens=65536)
  >>> stats["layers_0/mlp"].reap                      # [E]
  >>> plan = plan_pruning(params, stats, 8, method="reap")
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from uncurl_jax import checks
from uncurl_jax.model import moe
from uncurl_jax.model import collect
from uncurl_jax.model import forward as forward_lib
from uncurl_jax.pruning.features import ExpertStats
from uncurl_jax.model import layout as layout_lib


def _expert_weights(weights: layout_lib.MoeLayerWeights) -> moe.ExpertWeights:
  return moe.ExpertWeights(wi_kernel=weights.wi_kernel, wi_bias=weights.wi_bias,
                           wo_kernel=weights.wo_kernel, wo_bias=weights.wo_bias,
                           gate_kernel=weights.gate_kernel, gate_bias=weights.gate_bias)


@functools.partial(jax.jit, static_argnames=("top_k", "dtype", "activation",
                                             "renormalize_gates"))
def layer_sums(x: jax.Array, mask: jax.Array, router_kernel: jax.Array,
               experts: moe.ExpertWeights, *, top_k: int, dtype: str,
               activation: str = "gelu", renormalize_gates: bool = False
               ) -> dict[str, jax.Array]:
  """One batch's contributions to a layer's statistics (real tokens: `mask`).

  Args:
    x: [B, L, d] the MoE layer's input.
    mask: [B, L] bool, the tokens counted.
    router_kernel: [d, E].
    experts: Stacked expert weights.
    top_k: Router choices per token.
    dtype: Compute dtype of the experts.
    activation: The experts' activation (`moe.ACTIVATIONS`); gated experts when
      `experts.gate_kernel` is given.
    renormalize_gates: The gate in REAP's saliency is the probability renormalized over
      the token's top-k choices (models that route so: Mixtral, `norm_topk_prob`).

  Returns:
    logits [B, L, E] and the sums over counted tokens: top1 [E], topk [E], reap [E]
    (of gate * ||f(x)|| over routed tokens), output [E, d] (of f(x) over all tokens).
  """
  logits = jnp.einsum("bld,de->ble", x.astype(jnp.float32), router_kernel.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  probs = jax.nn.softmax(logits, axis=-1)
  num_experts = probs.shape[-1]
  top_probs, chosen = jax.lax.top_k(probs, top_k)
  gates = probs / jnp.sum(top_probs, -1, keepdims=True) if renormalize_gates else probs
  weight = mask.astype(jnp.float32)
  routed = jnp.max(jax.nn.one_hot(chosen, num_experts), axis=-2) * weight[..., None]
  first = jax.nn.one_hot(chosen[..., 0], num_experts) * weight[..., None]

  def one_expert(e):
    single = jax.tree.map(lambda w: jax.lax.dynamic_slice_in_dim(w, e, 1, 0), experts)
    out = moe.expert_ffn(x[None], single, dtype=jnp.dtype(dtype),
                         activation=activation)[0].astype(jnp.float32)
    norm = jnp.linalg.norm(out, axis=-1)                     # [B, L]
    return (jnp.sum(routed[..., e] * gates[..., e] * norm),
            jnp.einsum("bl,bld->d", weight, out))

  reap, output = jax.lax.map(one_expert, jnp.arange(num_experts))
  return {"logits": logits, "top1": first.sum((0, 1)), "topk": routed.sum((0, 1)),
          "reap": reap, "output": output}


class _Accumulator:
  """Running sums of one layer's statistics (logits kept on the host)."""

  def __init__(self):
    self.logits: list[np.ndarray] = []
    self.sums: dict[str, np.ndarray] = {}

  def add(self, sums: Mapping[str, Any], mask: np.ndarray) -> None:
    sums = jax.device_get(sums)
    self.logits.append(np.asarray(sums["logits"], np.float32)[mask])
    for name in ("top1", "topk", "reap", "output"):
      value = np.asarray(sums[name], np.float64)
      self.sums[name] = value if name not in self.sums else self.sums[name] + value

  def stats(self, top_k: int) -> ExpertStats:
    counts = self.sums["topk"]
    reap = np.divide(self.sums["reap"], counts, out=np.zeros_like(counts), where=counts > 0)
    logits = np.concatenate(self.logits, axis=0)
    return ExpertStats(logits=logits, top1_counts=self.sums["top1"].astype(np.int64),
                       topk_counts=counts.astype(np.int64), reap=reap,
                       mean_output=self.sums["output"] / max(len(logits), 1), top_k=top_k)


def collect_expert_stats(model: Any, params: Mapping[str, Any],
                         batches: Iterable[Mapping[str, Any]], *,
                         max_tokens: int | None = None,
                         progress: bool = True,
                         inputs_bidirectional_attention: bool | None = None
                         ) -> dict[str, ExpertStats]:
  """Runs `model` over task batches and returns each MoE layer's `ExpertStats`.

  One streaming pass: batch by batch, keeping the real tokens' router logits on the
  host and sums of the rest, until `max_tokens` real tokens (in batch order). Batches and
  params are checked as in `collect_router_logits`. For models whose MoE layers sow their
  inputs into 'moe_inputs' and whose experts are `moe.expert_ffn`: this project's
  `SMoEDecoder` and `uncurl_jax.hf`'s models (gated SiLU experts; the layout is
  `detect_layout`'s, the activation and gate renormalization the config's
  `expert_activation` and `renormalize_gates`).

  Args:
    model: The SMoEDecoder (or an `uncurl_jax.hf` model).
    params: Its params.
    batches: Task batches (see `collect_router_logits`).
    max_tokens: Stop after this many real tokens; None: all batches.
    progress: Show a progress bar of the tokens (tqdm, on stderr).
    inputs_bidirectional_attention: As in `collect_router_logits` (None: the config's).

  Returns:
    {MoE layer path: ExpertStats}.

  Example:
    >>> stats = collect_expert_stats(model, params, batches, max_tokens=8192)
    >>> small = prune_params(params, stats, 8, method="hc_smoe")
  """
  collect.check_model(model)
  if max_tokens is not None:
    checks.integer("max_tokens", max_tokens, low=1)
  batches = collect.as_batches(batches)
  config = getattr(model, "config", None)
  top_k = int(getattr(config, "top_k", 1))
  vocab_size = getattr(config, "vocab_size", None)
  dtype = str(getattr(config, "dtype", "float32"))
  activation = str(getattr(config, "expert_activation", "gelu"))
  renormalize_gates = bool(getattr(config, "renormalize_gates", False))
  forward = forward_lib.sown_forward(model, "moe_inputs")
  accumulators: dict[str, _Accumulator] = {}
  total = num_batches = 0
  layers = None
  with tqdm.tqdm(total=max_tokens, unit="tok", desc="expert stats", disable=not progress) as bar:
    for batch in batches:
      collect.check_batch(batch, num_batches, vocab_size=vocab_size)
      if layers is None:
        collect.check_model_params(model, params, np.shape(batch["decoder_input_tokens"]))
        layers = layout_lib.find_moe_layers(params, layout_lib.detect_layout(params))
      mask = collect.real_token_mask(batch)
      if max_tokens is not None:
        mask = collect.first_true(mask, max_tokens - total)
      inputs = {"/".join(path[:-1]): value for path, value in
                flax.traverse_util.flatten_dict(forward(params, collect.model_inputs(
                    batch, model,
                    inputs_bidirectional_attention=inputs_bidirectional_attention))).items()}
      for name, weights in layers.items():
        sums = layer_sums(inputs[name], jnp.asarray(mask), weights.router_kernel,
                          _expert_weights(weights), top_k=top_k, dtype=dtype,
                          activation=activation, renormalize_gates=renormalize_gates)
        accumulators.setdefault(name, _Accumulator()).add(sums, mask)
      count = int(mask.sum())
      total, num_batches = total + count, num_batches + 1
      bar.update(count)
      if max_tokens is not None and total >= max_tokens:
        break
  if total == 0:
    raise ValueError(f"no real tokens in {num_batches} batches (all padding, or no batch)")
  return {name: accumulators[name].stats(top_k) for name in layers}
