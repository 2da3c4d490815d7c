"""SMoEDecoder and attention: t5x contract, layout, packing, cached decoding, dtypes."""

import dataclasses
import functools
import inspect
import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncurl_jax.model import configs
from uncurl_jax.model.attention import MultiHeadAttention, dot_product_attention, make_decoder_mask
from uncurl_jax.model.decoder import SMoEDecoder

INTERMEDIATE_NAMES = {"auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind",
                      "expert_usage", "router_confidence", "routed_probability"}
# Blocks 0 and 2 are MoE (dropless, so routing never depends on the batch), block 1 dense.
MOE = configs.get("tiny", vocab_size=97, max_length=24, d_model=32, d_ff=64, num_heads=4,
                  num_layers=3, num_experts=4, dropless=True)
DENSE = dataclasses.replace(MOE, num_experts=0)
LENGTH = 12

# docs/DESIGN.md's table: path pattern -> logical axes.
EXPECTED_AXES = {
    r"token_embed/embedding": ("vocab", "embed"),
    r"position_embed/embedding": ("abspos_buckets", "embed"),
    r"(layers_\d+/pre_(attention|mlp)_layer_norm|final_layer_norm)/(scale|bias)": ("embed",),
    r"layers_\d+/attention/(query|key|value)/kernel": ("embed", "heads", "kv"),
    r"layers_\d+/attention/(query|key|value)/bias": ("heads", "kv"),
    r"layers_\d+/attention/out/kernel": ("heads", "kv", "embed"),
    r"layers_\d+/attention/out/bias": ("embed",),
    r"layers_\d+/mlp/wi/kernel": ("embed", "mlp"),
    r"layers_\d+/mlp/wi/bias": ("mlp",),
    r"layers_\d+/mlp/wo/kernel": ("mlp", "embed"),
    r"layers_\d+/mlp/wo/bias": ("embed",),
    r"layers_\d+/mlp/router/kernel": ("embed", "unmodeled"),
    r"layers_\d+/mlp/expert/wi/kernel": ("expert", "embed", "expert_mlp"),
    r"layers_\d+/mlp/expert/wi/bias": ("expert", "expert_mlp"),
    r"layers_\d+/mlp/expert/wo/kernel": ("expert", "expert_mlp", "embed"),
    r"layers_\d+/mlp/expert/wo/bias": ("expert", "embed"),
    r"logits_dense/kernel": ("embed", "vocab"),
}


# Everything runs under jax.jit (eager flax compiles every op on its own, slower still),
# and initializers, slow to compile on CPU, run once per config.


@functools.cache
def _init(cfg):
  """Initializes as t5x does: float ones, dropout off."""
  shape = (2, LENGTH)
  init = jax.jit(functools.partial(SMoEDecoder(cfg).init, enable_dropout=False))
  return init(jax.random.key(0), jnp.ones(shape), jnp.ones(shape))


@pytest.fixture(scope="module")
def moe_params():
  return _init(MOE)["params"]


@pytest.fixture(scope="module")
def dense_params():
  return _init(DENSE)["params"]


def _tokens(seed, shape, vocab=MOE.vocab_size):
  # Ids >= 1: a 0 target would mark the key as padding.
  return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


@functools.cache
def _jitted_forward(cfg, mutable):
  def forward(params, tokens, *features):
    return SMoEDecoder(cfg).apply({"params": params}, tokens, tokens, *features,
                                  enable_dropout=False, mutable=mutable or False)
  return jax.jit(forward)


def _forward(cfg, params, tokens, *features, mutable=()):
  """Logits (and the mutated collections if `mutable`) of a deterministic forward."""
  return _jitted_forward(cfg, tuple(mutable))(params, tokens, *features)


def test_call_signature_is_t5x_decoder_only():
  params = list(inspect.signature(SMoEDecoder.__call__).parameters.values())
  names = [p.name for p in params]
  assert names == ["self", "decoder_input_tokens", "decoder_target_tokens",
                   "decoder_segment_ids", "decoder_positions", "decoder_causal_attention",
                   "enable_dropout", "decode", "max_decode_length", "prefill",
                   "prefill_lengths"]
  assert all(p.kind == p.KEYWORD_ONLY for p in params[6:])


def test_t5x_init_and_train_apply_with_dropout():
  variables = _init(MOE)  # What the moe_params fixture holds.
  assert set(variables) == {"params", "params_axes"}
  # The dropout rate does not change the parameters; one block keeps compilation short.
  cfg = dataclasses.replace(MOE, dropout_rate=0.2, num_layers=1)
  params = {k: v for k, v in variables["params"].items() if k not in ("layers_1", "layers_2")}
  model = SMoEDecoder(cfg)
  tokens = _tokens(1, (2, LENGTH))

  @jax.jit
  def train_logits(seed):
    return model.apply({"params": params}, tokens, tokens, enable_dropout=True,
                       rngs={"dropout": jax.random.key(seed)}, mutable=["intermediates"])

  logits, state = train_logits(3)
  assert logits.shape == (2, LENGTH, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  other, _ = train_logits(4)
  no_dropout = _forward(cfg, params, tokens)
  assert not np.allclose(logits, other) and not np.allclose(logits, no_dropout)
  assert set(state["intermediates"]) == {"layers_0"}


def _abstract_init(cfg):
  """Shapes and axis metadata of `init`, without running (or compiling) it."""
  return jax.eval_shape(lambda: _init.__wrapped__(cfg))


def test_every_param_has_design_axes():
  cfg = dataclasses.replace(MOE, tie_embeddings=False)
  variables = _abstract_init(cfg)
  params = traverse_util.flatten_dict(variables["params"], sep="/")
  axes = traverse_util.flatten_dict(variables["params_axes"], sep="/")
  assert set(axes) == {f"{path}_axes" for path in params}
  for path, value in params.items():
    expected = [a for pattern, a in EXPECTED_AXES.items() if re.fullmatch(pattern, path)]
    assert len(expected) == 1, path
    assert axes[f"{path}_axes"].names == expected[0], path
    assert value.ndim == len(expected[0]), path
  assert params["logits_dense/kernel"].shape == (cfg.d_model, cfg.vocab_size)
  assert params["layers_0/mlp/expert/wi/kernel"].shape == (4, cfg.d_model, cfg.d_ff)
  assert "layers_1/mlp/wi/kernel" in params  # block 1 is dense


def test_only_expert_weights_have_expert_in_path(moe_params):
  params = traverse_util.flatten_dict(moe_params, sep="/")
  with_expert = {p for p in params if "expert" in p}
  assert with_expert == {f"layers_{i}/mlp/expert/{w}/{k}" for i in (0, 2)
                         for w in ("wi", "wo") for k in ("kernel", "bias")}
  assert "layers_0/mlp/router/kernel" in params


def test_intermediates_per_moe_layer(moe_params):
  _, state = _forward(MOE, moe_params, _tokens(2, (2, LENGTH)), mutable=["intermediates"])
  intermediates = state["intermediates"]
  assert set(intermediates) == {"layers_0", "layers_2"}
  for layer in ("layers_0", "layers_2"):
    assert set(intermediates[layer]["mlp"]) == INTERMEDIATE_NAMES


def test_make_decoder_mask_matches_hand_reference():
  targets = np.array([[4, 5, 6, 7, 8, 9, 0, 0]])
  segments = np.array([[1, 1, 1, 2, 2, 2, 0, 0]])
  prefix = np.array([[1, 1, 0, 1, 1, 0, 0, 0]])
  mask = np.asarray(make_decoder_mask(jnp.asarray(targets), jnp.asarray(segments),
                                      jnp.asarray(prefix)))[0, 0]
  expected = np.zeros((8, 8), bool)
  for q in range(8):
    for k in range(8):
      visible = k <= q or (prefix[0, q] and prefix[0, k])
      expected[q, k] = (q == k) or (visible and targets[0, k] > 0 and segments[0, k] > 0
                                    and segments[0, q] == segments[0, k])
  np.testing.assert_array_equal(mask, expected)


def test_attention_matches_numpy_reference():
  attn = MultiHeadAttention(num_heads=2, head_dim=4, implementation="xla")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  mask = make_decoder_mask(jnp.array([[3, 3, 3, 3, 0], [3, 3, 3, 3, 3]]))
  # Random (not initial) weights, so that zero biases cannot hide a bias bug.
  p = {n: {"kernel": rng.normal(size=(8, 2, 4)).astype(np.float32),
           "bias": rng.normal(size=(2, 4)).astype(np.float32)}
       for n in ("query", "key", "value")}
  p["out"] = {"kernel": rng.normal(size=(2, 4, 8)).astype(np.float32),
              "bias": rng.normal(size=(8,)).astype(np.float32)}
  got = jax.jit(attn.apply)({"params": p}, x, mask)
  q, k, v = (np.einsum("bld,dhk->blhk", x, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(4)
  scores = np.where(np.asarray(mask), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum("bhqs,bshk->bqhk", weights, v)
  expected = np.einsum("bqhk,hkd->bqd", heads, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="implementation"):
    dot_product_attention(x[..., None], x[..., None], x[..., None], None, causal=True,
                          implementation="flash")


@pytest.mark.parametrize("cfg_name", ["dense", "moe"])
def test_packed_sequences_match_separate_runs(cfg_name, dense_params, moe_params):
  cfg, params = (DENSE, dense_params) if cfg_name == "dense" else (MOE, moe_params)
  first, second = _tokens(7, (5,)), _tokens(8, (6,))
  packed = jnp.zeros((1, LENGTH), jnp.int32).at[0, :5].set(first).at[0, 5:11].set(second)
  segments = jnp.array([[1] * 5 + [2] * 6 + [0]])
  positions = jnp.array([list(range(5)) + list(range(6)) + [0]])
  packed_logits = _forward(cfg, params, packed, segments, positions)
  # Run alone as one unpacked batch; the trailing 0 (padding) cannot affect the rest.
  alone = _forward(cfg, params, jnp.stack([jnp.append(first, 0), second]))
  np.testing.assert_allclose(packed_logits[0, :5], alone[0, :5], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed_logits[0, 5:11], alone[1], atol=1e-5, rtol=1e-5)


def _decode_step(cfg, params):
  model = SMoEDecoder(cfg)

  @jax.jit
  def step(cache, token):
    logits, state = model.apply({"params": params, "cache": cache}, token, token,
                                enable_dropout=False, decode=True, max_decode_length=LENGTH,
                                mutable=["cache"])
    return logits[:, 0], state["cache"]

  return step


def _empty_cache(cfg, params, batch):
  """Creates the cache as t5x does: decode=True on full-length dummy inputs."""
  ones = jnp.ones((batch, LENGTH))
  create = jax.jit(functools.partial(SMoEDecoder(cfg).apply, enable_dropout=False,
                                     decode=True, mutable=["cache"]))
  return create({"params": params}, ones, ones)[1]["cache"]


def test_token_by_token_decoding_matches_full_forward(moe_params):
  tokens = _tokens(9, (2, LENGTH))
  full = _forward(MOE, moe_params, tokens)
  cache = _empty_cache(MOE, moe_params, batch=2)
  assert cache["layers_0"]["attention"]["cached_key"].shape == (2, LENGTH, 4, 8)
  # `init(..., decode=True)` creates the same cache.
  ones = jnp.ones((2, LENGTH))
  created = jax.eval_shape(lambda: SMoEDecoder(MOE).init(
      jax.random.key(0), ones, ones, decode=True, enable_dropout=False))["cache"]
  assert jax.tree.map(jnp.shape, created) == jax.tree.map(jnp.shape, cache)
  step = _decode_step(MOE, moe_params)
  for t in range(LENGTH):
    logits, cache = step(cache, tokens[:, t:t + 1])
    np.testing.assert_allclose(logits, full[:, t], atol=1e-4, rtol=1e-4, err_msg=f"step {t}")
  np.testing.assert_array_equal(cache["cache_index"], LENGTH)


def test_prefill_then_decode_matches_full_forward(moe_params):
  tokens = _tokens(10, (2, LENGTH))
  full = _forward(MOE, moe_params, tokens)
  prompt_lengths = jnp.array([3, 6])
  cache = _empty_cache(MOE, moe_params, batch=2)
  prefill = jax.jit(functools.partial(SMoEDecoder(MOE).apply, enable_dropout=False,
                                      prefill=True, mutable=["cache"]))
  prefill_logits, state = prefill({"params": moe_params, "cache": cache}, tokens, tokens,
                                  prefill_lengths=prompt_lengths)
  np.testing.assert_allclose(prefill_logits, full, atol=1e-5, rtol=1e-5)
  cache = state["cache"]
  cached_key = np.asarray(cache["layers_1"]["attention"]["cached_key"])
  assert not cached_key[0, 3:].any() and not cached_key[1, 6:].any()
  assert cached_key[0, :3].all() and cached_key[1, :6].all()
  step = _decode_step(MOE, moe_params)
  rows = jnp.arange(2)
  for s in range(LENGTH - 6):
    # Each example continues from its own index: its last prompt token comes first.
    index = prompt_lengths + s
    logits, cache = step(cache, tokens[rows, index][:, None])
    np.testing.assert_allclose(logits, full[rows, index], atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache["layers_2"]["attention"]["cache_index"],
                                prompt_lengths + LENGTH - 6)


def test_prefix_lm_inputs_attend_bidirectionally(dense_params):
  tokens = _tokens(11, (1, LENGTH))
  # Row 1 differs from row 0 only in token 3.
  pair = jnp.concatenate([tokens, tokens.at[0, 3].set(tokens[0, 3] % 96 + 1)])
  prefix = jnp.array([[1] * 4 + [0] * (LENGTH - 4)] * 2)
  with_prefix = _forward(DENSE, dense_params, pair, None, None, prefix)
  causal = _forward(DENSE, dense_params, pair)
  # Token 3 reaches position 0 only inside a bidirectional prefix.
  assert not np.allclose(with_prefix[0, 0], with_prefix[1, 0])
  np.testing.assert_allclose(causal[0, :3], causal[1, :3], atol=1e-6)


def test_bfloat16_is_close_to_float32(dense_params, moe_params):
  tokens = _tokens(12, (2, LENGTH))
  for cfg, params in ((DENSE, dense_params), (MOE, moe_params)):
    reference = _forward(cfg, params, tokens)
    low = _forward(dataclasses.replace(cfg, dtype="bfloat16"), params, tokens)
    assert low.dtype == jnp.float32
    error = np.abs(np.asarray(low) - np.asarray(reference))
    scale = np.abs(np.asarray(reference)).mean()
    assert 0 < error.mean() < 0.05 * scale, (cfg.num_experts, error.mean(), scale)


def test_untied_output_projection(moe_params):
  cfg = dataclasses.replace(MOE, tie_embeddings=False)
  untied = _abstract_init(cfg)["params"]
  assert untied["logits_dense"]["kernel"].shape == (cfg.d_model, cfg.vocab_size)
  # With the tied model's weights and the embedding as output kernel, both agree.
  params = dict(moe_params, logits_dense={"kernel": moe_params["token_embed"]["embedding"].T})
  tokens = _tokens(13, (2, LENGTH))
  np.testing.assert_allclose(_forward(cfg, params, tokens), _forward(MOE, moe_params, tokens),
                             atol=1e-5, rtol=1e-5)


def test_bad_calls_raise(dense_params):
  model = SMoEDecoder(DENSE)
  tokens = _tokens(14, (2, LENGTH))
  variables = {"params": dense_params}
  with pytest.raises(ValueError, match="decoder_segment_ids has shape"):
    model.apply(variables, tokens, tokens, tokens[:, :4], enable_dropout=False)
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model.apply(variables, tokens[0], tokens[0], enable_dropout=False)
  with pytest.raises(ValueError, match="exceeds config.max_length=24"):
    long = _tokens(14, (1, 30))
    model.apply(variables, long, long, enable_dropout=False)
  with pytest.raises(ValueError, match="cannot both be True"):
    model.apply(variables, tokens, tokens, enable_dropout=False, decode=True, prefill=True)
  with pytest.raises(ValueError, match="prefill_lengths"):
    model.apply(variables, tokens, tokens, enable_dropout=False, prefill=True)
  with pytest.raises(ValueError, match="create it first"):
    model.apply(variables, tokens[:, :1], tokens[:, :1], enable_dropout=False, decode=True)
  cache = _empty_cache(DENSE, dense_params, batch=2)
  with pytest.raises(ValueError, match="one token per example"):
    model.apply({"params": dense_params, "cache": cache}, tokens[:, :2], tokens[:, :2],
                enable_dropout=False, decode=True, mutable=["cache"])
  with pytest.raises(TypeError, match="ModelConfig"):
    SMoEDecoder(dataclasses.asdict(DENSE)).init(jax.random.key(0), tokens, tokens)
