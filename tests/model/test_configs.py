"""Presets and validation of `ModelConfig`; parameter counts from shapes only."""

import dataclasses

import jax
import jax.numpy as jnp

import pytest

from uncurl_jax.model import configs
from uncurl_jax.model.decoder import SMoEDecoder, param_count


def _hand_count(cfg: configs.ModelConfig) -> int:
  """Parameter count of docs/DESIGN.md's layout, written out by hand."""
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  attention = 4 * d * d + 3 * d + d  # q/k/v/out kernels; [H, dh] biases; out bias
  norms = 2 * 2 * d
  ffn = d * f + f + f * d + d
  total = v * d + cfg.max_length * d + 2 * d
  total += cfg.num_layers * (attention + norms)
  for i in range(cfg.num_layers):
    total += cfg.num_experts * ffn + d * cfg.num_experts if cfg.is_moe_layer(i) else ffn
  if not cfg.tie_embeddings:
    total += d * v
  return total


@pytest.mark.parametrize("num_experts, paper_billions", [(8, 1.05), (64, 6.7), (128, 13.0)])
def test_paper_presets_match_reported_sizes(num_experts, paper_billions):
  cfg = configs.get("354m", num_experts=num_experts)
  count = param_count(cfg)
  assert count == _hand_count(cfg)
  assert abs(count / 1e9 - paper_billions) / paper_billions < 0.02


def test_354m_32e_truncates_to_paper_size():
  # The paper's "3.4B" truncates: the count is ~3.478e9, 2.3% above 3.4e9, so the
  # 2% band used for the other sizes does not apply; the first decimal must match.
  count = param_count(configs.get("354m", num_experts=32))
  assert int(count / 1e8) == 34


def test_dense_preset_is_the_354m_backbone():
  cfg = configs.get("dense")
  assert cfg.num_experts == 0 and cfg.moe_layers == ()
  assert not any(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  count = param_count(cfg)
  assert count == _hand_count(cfg)
  assert 0.35e9 < count < 0.36e9  # GPT-2 medium width with a 1024-position table


def test_untied_embeddings_add_an_output_matrix():
  cfg = configs.get("tiny", tie_embeddings=False)
  assert param_count(cfg) == _hand_count(cfg)
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  assert param_count(cfg) - param_count(tied) == cfg.d_model * cfg.vocab_size


def test_moe_layers_are_every_other_block_from_the_first():
  cfg = configs.get("354m", num_experts=64)
  assert cfg.moe_layers == tuple(range(0, 24, 2))
  assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_layers) == (1024, 4096, 16, 24)
  assert cfg.head_dim == 64
  shifted = dataclasses.replace(cfg, moe_every=4, moe_offset=1)
  assert shifted.moe_layers == (1, 5, 9, 13, 17, 21)


def test_capacity_follows_factors_and_minimum():
  cfg = configs.get("tiny", num_experts=8)  # train 1.2, eval 1.0, min 4
  assert cfg.capacity(64, train=True) == 10  # ceil(1.2 * 64 / 8)
  assert cfg.capacity(64, train=False) == 8
  assert cfg.capacity(16, train=False) == 4  # ceil(2) raised to the minimum
  assert dataclasses.replace(cfg, top_k=2).capacity(64, train=False) == 16
  assert dataclasses.replace(cfg, dropless=True).capacity(64, train=True) == 64


@pytest.mark.parametrize("top_k,factor,tokens,want", [
    (1, 1.0, 64, 8),     # round(1.0 * 64 / 8)
    (2, 1.0, 64, 8),     # top_k does not enter t5x's formula ("top_k" gives 16)
    (2, 1.25, 60, 9),    # round(9.375)
    (1, 1.0, 20, 4),     # round(2.5) = 2 (to even, as Python) raised to the minimum 4
    (1, 1.0, 52, 6),     # round(6.5) = 6
    (1, 1.0, 60, 8),     # round(7.5) = 8
])
def test_capacity_formula_t5x_is_flaxformers_rounding(top_k, factor, tokens, want):
  cfg = configs.get("tiny", num_experts=8, top_k=top_k, eval_capacity_factor=factor,
                    capacity_formula="t5x")
  assert cfg.capacity(tokens, train=False) == want
  assert dataclasses.replace(cfg, dropless=True).capacity(tokens, train=False) == tokens * top_k


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=5), "num_heads=5"),
    (dict(d_model=0), "d_model"),
    (dict(capacity_formula="flaxformer"), "capacity_formula"),
    (dict(num_experts=-1), "num_experts"),
    (dict(num_experts=2, top_k=3), "top_k=3"),
    (dict(moe_offset=2), "moe_offset=2"),
    (dict(train_capacity_factor=0.0), "train_capacity_factor"),
    (dict(group_size=0), "group_size"),
    (dict(dispatch="ragged"), "ragged"),
    (dict(expert_parallel="always"), "always"),
    (dict(dtype="float16"), "float16"),
    (dict(dropout_rate=1.0), "dropout_rate"),
])
def test_invalid_configs_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    configs.get("tiny", **overrides)


def test_unknown_preset_and_non_config_raise():
  with pytest.raises(ValueError, match="'huge'"):
    configs.get("huge")
  with pytest.raises(TypeError, match="ModelConfig"):
    param_count({"d_model": 64})


def test_per_layer_expert_counts():
  cfg = configs.get("tiny", num_layers=4, num_experts=8, layer_num_experts=[4, 2])
  assert cfg.layer_num_experts == (4, 2)
  assert [cfg.experts_in_layer(i) for i in range(4)] == [4, 0, 2, 0]
  assert cfg.layer_config(2).num_experts == 2 and cfg.layer_config(2).layer_num_experts is None
  assert cfg.layer_config(1) is cfg
  shapes = jax.eval_shape(lambda: SMoEDecoder(cfg).init(
      jax.random.key(0), jnp.ones((1, 8)), jnp.ones((1, 8)), enable_dropout=False))["params"]
  assert shapes["layers_0"]["mlp"]["expert"]["wi"]["kernel"].shape[0] == 4
  assert shapes["layers_2"]["mlp"]["router"]["kernel"].shape == (cfg.d_model, 2)
  with pytest.raises(ValueError, match="one count per"):
    configs.get("tiny", num_layers=4, layer_num_experts=(4,))
  with pytest.raises(ValueError, match="top_k"):
    configs.get("tiny", num_layers=4, top_k=2, layer_num_experts=(4, 1))


def test_with_expert_counts_from_ints_sequences_and_layer_paths():
  cfg = configs.get("tiny", num_layers=4, num_experts=8)      # MoE blocks 0 and 2
  assert configs.with_expert_counts(cfg, 8) is cfg
  assert configs.with_expert_counts(cfg, 4).num_experts == 4
  dense = configs.with_expert_counts(cfg, 0)
  assert (dense.num_experts, dense.moe_layers) == (0, ())
  assert configs.with_expert_counts(cfg, {}) == dense
  uneven = configs.with_expert_counts(cfg, {"layers_2/mlp": 2, "layers_0/mlp": 6})
  assert (uneven.num_experts, uneven.layer_num_experts) == (6, (6, 2))
  assert configs.with_expert_counts(cfg, [3, 3]).num_experts == 3
  # A dense config places MoE blocks by moe_every/moe_offset when given counts.
  assert configs.with_expert_counts(dense, {"layers_0/mlp": 2, "layers_2/mlp": 2}) == \
      configs.with_expert_counts(cfg, 2)
  top2_dense = configs.get("tiny", num_layers=4, num_experts=0, top_k=2)
  assert configs.with_expert_counts(top2_dense, {}) is top2_dense
  assert configs.with_expert_counts(top2_dense, 8).num_experts == 8
  with pytest.raises(ValueError, match=r"name MoE blocks \[0, 1\], the model config places "
                                       r"them at \[0, 2\]"):
    configs.with_expert_counts(cfg, {"layers_0/mlp": 2, "layers_1/mlp": 2})
  with pytest.raises(ValueError, match="one expert count per MoE block"):
    configs.with_expert_counts(cfg, [2])
  with pytest.raises(ValueError, match=">= 1"):
    configs.with_expert_counts(cfg, [2, 0])
  with pytest.raises(ValueError, match="does not start with 'layers_<block>'"):
    configs.with_expert_counts(cfg, {"decoder/mlp": 2})


@pytest.mark.parametrize("maps, match", [
    (((0, 1, -1, 2),), "one map per MoE layer"),                     # one map, two layers
    (((0, 1, -1, 2), (0, 1, 2)), "covering \\[0, 4\\)"),              # expert 3 never bound
    (((0, 1, 3, 2), (0, 0, 1, 2, 3)), None),                          # valid, a shared expert
    (((0, 1, 5, 2), (0, 1, 2, 3)), "covering \\[0, 4\\)"),            # an expert outside [0, 4)
    (((-1, -1, -1, -1), (0, 1, 2, 3)), "at least top_k=1"),           # nothing bound
])
def test_router_maps_bind_every_expert_of_every_moe_layer(maps, match):
  """A bound router's map per MoE layer: one per layer, every expert in [0, E) bound by some
  column, at least top_k columns bound (-1: a column never chosen)."""
  make = lambda: configs.get("tiny", num_layers=4, moe_every=2, num_experts=4,
                             layer_router_maps=maps)
  if match is None:
    assert make().layer_router_maps == maps
  else:
    with pytest.raises(ValueError, match=match):
      make()
