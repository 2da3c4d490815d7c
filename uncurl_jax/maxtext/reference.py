"""MaxText's MoE decoders in miniature: its parameter trees and its routed-MoE arithmetic.

MaxText's own modules need Python >= 3.12 and packages this project does not install
(aqt, qwix, tokamax), so they are not imported here. These Flax modules name and shape
every MoE parameter as MaxText does (checked against its source; docs/pruning.md names
the commit) and are scanned as its decoder scans them, so `init` gives trees with
MaxText's paths and shapes and `apply` computes its routed MoE (dense, dropless):

- `MoeBlock_0` (Mixtral, `maxtext/models/mixtral.py`), `moe_block` (Qwen3-MoE,
  `models/qwen3.py`) and `DeepSeekMoeBlock_0/MoeBlock_0` beside `shared_experts`
  (`models/deepseek.py`, `layers/moe.py: RoutedAndSharedMoE`) are `RoutedMoE`
  (`layers/moe.py`): `gate/kernel` [emb, E], `gate/bias` [E] when `routed_bias`, the
  experts' bare arrays `wi_0`, `wi_1` [E, emb, mlp] and `wo` [E, mlp, emb], and
  `wi_0_bias`, `wi_1_bias` [E, mlp], `wo_bias` [E, emb] when `mlp_bias`.
- Routing (`RoutedMoE.get_topk`): Mixtral and Qwen3 take the top-k gate logits and weight
  the chosen experts by a softmax over those k logits; DeepSeek-V3 scores experts with
  sigmoid(logits), selects the top-k of score + routed bias (`deepseek_routing`, without
  expert groups) and weights them by their scores normalized to sum 1, times
  `routed_scaling_factor`. An expert is silu(x wi_0 + b0) * (x wi_1 + b1) wo + bo.
- Decoder (`layers/decoders.py`): layers `layers_{i}` (DeepSeek: `dense_layers_{i}`,
  `moe_layers_{i}`), or with `scan_layers` one `nn.scan` named `layers` (DeepSeek:
  `dense_layers`, `moe_layers`) with `variable_axes={'params': param_scan_axis}`, which
  puts the layer axis at `param_scan_axis` of every parameter.

Attention is left out (each layer is `x + mlp(rms_norm(x))`, norms named as MaxText's
`post_self_attention_layer_norm`): the trees are for pruning, which reads only the MoE
blocks and must leave everything else as it is.

Example:
  >>> config = MoeDecoderConfig(model="deepseek", num_experts=8, num_layers=4)
  >>> params = init_params(config, seed=0)   # {'decoder': ..., 'token_embedder': ...}
  >>> params["decoder"]["moe_layers"]["DeepSeekMoeBlock_0"]["MoeBlock_0"]["wi_0"].shape
  (8, 3, 16, 32)
  >>> y, logits = forward(config, params, x)   # logits: {block path: [L, T, E] gate logits}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODELS = ("mixtral", "qwen3", "deepseek")
# The name of the routed MoE block in a decoder layer of each model.
BLOCK_NAMES = {"mixtral": "MoeBlock_0", "qwen3": "moe_block",
               "deepseek": "DeepSeekMoeBlock_0/MoeBlock_0"}


@dataclasses.dataclass(frozen=True)
class MoeDecoderConfig:
  """The MaxText settings the trees depend on (MaxText's config names).

  Attributes:
    model: "mixtral" (`MoeBlock_0`), "qwen3" (`moe_block`) or "deepseek" (dense layers,
      then MoE layers with `DeepSeekMoeBlock_0`: routed `MoeBlock_0` + `shared_experts`).
    num_experts, num_experts_per_tok, emb_dim, moe_mlp_dim: MaxText's names.
    num_layers: `num_decoder_layers`.
    first_num_dense_layers: DeepSeek's leading dense layers.
    scan_layers, param_scan_axis: MaxText's (defaults: true, 1).
    routed_bias: `gate/bias` (DeepSeek-V3's selection bias).
    mlp_bias: expert biases `wi_0_bias`, `wi_1_bias`, `wo_bias`.
    routed_scaling_factor: DeepSeek's weight scale.
    shared_mlp_dim: DeepSeek's shared experts' hidden size (and its dense layers').
    vocab_size: of `token_embedder/embedding`.
  """

  model: str = "mixtral"
  num_experts: int = 8
  num_experts_per_tok: int = 2
  emb_dim: int = 16
  moe_mlp_dim: int = 32
  num_layers: int = 3
  first_num_dense_layers: int = 1
  scan_layers: bool = True
  param_scan_axis: int = 1
  routed_bias: bool = False
  mlp_bias: bool = False
  routed_scaling_factor: float = 2.5
  shared_mlp_dim: int = 24
  vocab_size: int = 64

  def __post_init__(self):
    if self.model not in MODELS:
      raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
    if self.model == "deepseek" and not 0 <= self.first_num_dense_layers < self.num_layers:
      raise ValueError("deepseek needs 0 <= first_num_dense_layers < num_layers")

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers - (self.first_num_dense_layers if self.model == "deepseek" else 0)


def _normal(stddev: float):
  return nn.initializers.normal(stddev)


class GateLogit(nn.Module):
  """MaxText's `GateLogit` parameters: `kernel` [emb, E], `bias` [E] when routed_bias."""

  config: MoeDecoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kernel = self.param("kernel", _normal(cfg.emb_dim ** -0.5), (cfg.emb_dim, cfg.num_experts))
    logits = jnp.dot(x, kernel, precision=jax.lax.Precision.HIGHEST)
    bias = (self.param("bias", _normal(0.1), (cfg.num_experts,)) if cfg.routed_bias
            else None)
    return logits, bias


class RoutedMoE(nn.Module):
  """MaxText's `RoutedMoE` parameters and routed arithmetic on tokens x [T, emb]."""

  config: MoeDecoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    e, d, f = cfg.num_experts, cfg.emb_dim, cfg.moe_mlp_dim
    logits, bias = GateLogit(cfg, name="gate")(x)
    self.sow("intermediates", "gate_logits", logits)
    init = _normal(d ** -0.5)
    wi_0, wi_1 = self.param("wi_0", init, (e, d, f)), self.param("wi_1", init, (e, d, f))
    wo = self.param("wo", _normal(f ** -0.5), (e, f, d))
    zeros = lambda shape: jnp.zeros(shape, x.dtype)
    b0, b1, bo = ((self.param("wi_0_bias", _normal(0.1), (e, f)),
                   self.param("wi_1_bias", _normal(0.1), (e, f)),
                   self.param("wo_bias", _normal(0.1), (e, d)))
                  if cfg.mlp_bias else (zeros((e, f)), zeros((e, f)), zeros((e, d))))
    weights = routing_weights(cfg, logits, bias)  # [T, E], zero off the chosen experts
    hp = jax.lax.Precision.HIGHEST
    hidden = (jax.nn.silu(jnp.einsum("td,edf->tef", x, wi_0, precision=hp) + b0)
              * (jnp.einsum("td,edf->tef", x, wi_1, precision=hp) + b1))
    outputs = jnp.einsum("tef,efd->ted", hidden, wo, precision=hp) + bo
    return jnp.einsum("te,ted->td", weights, outputs, precision=hp)


def routing_weights(cfg: MoeDecoderConfig, logits: jax.Array, bias: jax.Array | None
                    ) -> jax.Array:
  """[T, E] weight of each expert per token (0 off the top-k), as `RoutedMoE.get_topk`."""
  k = cfg.num_experts_per_tok
  if cfg.model == "deepseek":  # deepseek3: sigmoid scores, selection biased, weights not
    scores = jax.nn.sigmoid(logits)
    selection = scores if bias is None else scores + bias
    _, chosen = jax.lax.top_k(selection, k)
    picked = jnp.take_along_axis(scores, chosen, -1)
    picked = picked / (picked.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
  else:
    top, chosen = jax.lax.top_k(logits if bias is None else logits + bias, k)
    picked = jax.nn.softmax(top, -1)
  return (jax.nn.one_hot(chosen, logits.shape[-1], dtype=picked.dtype)
          * picked[..., None]).sum(-2)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


class _Kernel(nn.Module):
  """A dense layer whose only parameter is `kernel` (MlpBlock's sub-layers' naming)."""

  shape: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    return x @ self.param("kernel", _normal(self.shape[0] ** -0.5), self.shape)


class GatedMlp(nn.Module):
  """`MlpBlock` as it is stored: `wi_0/kernel`, `wi_1/kernel`, `wo/kernel`."""

  emb_dim: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    d, f = self.emb_dim, self.mlp_dim
    hidden = (jax.nn.silu(_Kernel((d, f), name="wi_0")(x)) * _Kernel((d, f), name="wi_1")(x))
    return _Kernel((f, d), name="wo")(hidden)


class RoutedAndSharedMoE(nn.Module):
  """DeepSeek's block: routed `MoeBlock_0` plus `shared_experts` (an MlpBlock)."""

  config: MoeDecoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    return (RoutedMoE(cfg, name="MoeBlock_0")(x)
            + GatedMlp(cfg.emb_dim, cfg.shared_mlp_dim, name="shared_experts")(x))


class DecoderLayer(nn.Module):
  """One decoder layer: x + mlp(rms_norm(x)), the mlp as in `kind`'s layer."""

  config: MoeDecoderConfig
  kind: str  # "mixtral", "qwen3", "deepseek_dense", "deepseek_moe"

  @nn.compact
  def __call__(self, x, _=None):
    cfg = self.config
    h = RMSNorm(name="post_self_attention_layer_norm")(x)
    if self.kind == "mixtral":
      out = RoutedMoE(cfg, name="MoeBlock_0")(h)
    elif self.kind == "qwen3":
      out = RoutedMoE(cfg, name="moe_block")(h)
    elif self.kind == "deepseek_moe":
      out = RoutedAndSharedMoE(cfg, name="DeepSeekMoeBlock_0")(h)
    else:
      out = GatedMlp(cfg.emb_dim, cfg.shared_mlp_dim, name="mlp")(h)
    return x + out, None


class Decoder(nn.Module):
  """The decoder stack, scanned or not, named as MaxText's `Decoder` names it."""

  config: MoeDecoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    if cfg.model == "deepseek":
      groups = [("dense_layers", "deepseek_dense", cfg.first_num_dense_layers),
                ("moe_layers", "deepseek_moe", cfg.num_moe_layers)]
    else:
      groups = [("layers", cfg.model, cfg.num_layers)]
    for prefix, kind, length in groups:
      if not length:
        continue
      if cfg.scan_layers:  # decoders.py: scan_decoder_layers
        scanned = nn.scan(DecoderLayer, variable_axes={"params": cfg.param_scan_axis,
                                                       "intermediates": 0},
                          split_rngs={"params": True}, in_axes=(nn.broadcast,), length=length,
                          metadata_params={nn.PARTITION_NAME: prefix})
        x, _ = scanned(cfg, kind, name=prefix)(x, None)
      else:
        for i in range(length):
          x, _ = DecoderLayer(cfg, kind, name=f"{prefix}_{i}")(x)
    return RMSNorm(name="decoder_norm")(x)


class Transformer(nn.Module):
  """`token_embedder` and `decoder`: the top of MaxText's params collection."""

  config: MoeDecoderConfig

  @nn.compact
  def __call__(self, tokens):
    cfg = self.config
    x = nn.Embed(cfg.vocab_size, cfg.emb_dim, name="token_embedder")(tokens)
    return Decoder(cfg, name="decoder")(x)


def init_params(config: MoeDecoderConfig, seed: int = 0) -> dict[str, Any]:
  """The params collection of a MaxText MoE model: the tree `Transformer(config).init` makes
  (its paths and shapes, from `jax.eval_shape`: nothing is compiled), filled with numpy
  float32 draws: norm scales near 1, every other weight N(0, 0.2^2)."""
  shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0),
                          jnp.zeros((4,), jnp.int32))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    return (0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return flax_unfreeze(jax.tree_util.tree_map_with_path(draw, shapes))


def flax_unfreeze(tree: Any) -> Any:
  """Nested dicts of a nested mapping (FrozenDict included)."""
  return {k: flax_unfreeze(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def forward(config: MoeDecoderConfig, params: Any, x: Any
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The decoder on embedded tokens x [T, emb]: (output [T, emb], gate logits per block).

  The gate logits (x @ gate/kernel, before any bias or score function) are keyed by the
  routed block's path in `params` ('decoder/layers/MoeBlock_0'): [L, T, E] for a scanned
  block, [T, E] for an unscanned layer.
  """
  y, state = Decoder(config).apply({"params": params["decoder"]}, jnp.asarray(x),
                                   mutable=["intermediates"])
  logits = {}
  for path, value in flax_paths(state["intermediates"]):
    # .../<block>/gate_logits: a tuple of sown values (one per call).
    block = "/".join(("decoder",) + path[:-1])
    logits[block] = np.asarray(value[0])
  return np.asarray(y), logits


def flax_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
  """[(path, leaf)] of a nested mapping, tuples kept as leaves."""
  if hasattr(tree, "items"):
    return [item for key, value in tree.items() for item in flax_paths(value, prefix + (key,))]
  return [(prefix, tree)]
