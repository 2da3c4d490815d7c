"""Pruning with the real SMoEDecoder: logit collection, reduced models, exact outputs."""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.pruning.batches import padded_batches
from uncurl_jax.model import configs
from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.model.decoder import SMoEDecoder

# Blocks 0 and 2 are MoE. Dropless, so no token is dropped for capacity in either model.
CONFIG = configs.get("tiny", vocab_size=64, max_length=16, d_model=32, d_ff=32, num_heads=2,
                     num_layers=3, num_experts=8, dropless=True)
MOE_LAYERS = ("layers_0/mlp", "layers_2/mlp")
BATCH, LENGTH = 4, 16
KEPT = (1, 3, 4, 6)


@functools.cache
def _init(cfg):
  shape = (BATCH, LENGTH)
  init = jax.jit(functools.partial(SMoEDecoder(cfg).init, enable_dropout=False))
  return init(jax.random.key(0), jnp.ones(shape), jnp.ones(shape))["params"]


@functools.cache
def _forward(cfg):
  model = SMoEDecoder(cfg)
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens, tokens,
                                                    enable_dropout=False))


def _batches(num_batches=2, seed=0):
  return padded_batches(vocab_size=CONFIG.vocab_size, batch=BATCH, length=LENGTH,
                        num_batches=num_batches, seed=seed, min_length=4)


def _direct_logits(cfg, params, batch):
  model = SMoEDecoder(cfg)
  _, state = jax.jit(lambda p, t: model.apply({"params": p}, t, t, enable_dropout=False,
                                              mutable=["router_logits"]))(
                                                  params, batch["decoder_input_tokens"])
  mask = batch["decoder_loss_weights"] > 0
  return {name: np.asarray(state["router_logits"][name.split("/")[0]]["mlp"]["logits"])[mask]
          for name in MOE_LAYERS}


def test_collect_router_logits_excludes_padding_and_stops_at_max_tokens():
  params, batches = _init(CONFIG), _batches()
  logits = model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, batches)
  real = int(sum(b["decoder_loss_weights"].sum() for b in batches))
  assert real < 2 * BATCH * LENGTH  # the batches do have padding
  expected = [_direct_logits(CONFIG, params, b) for b in batches]
  assert sorted(logits) == list(MOE_LAYERS)
  for name in MOE_LAYERS:
    assert logits[name].shape == (real, CONFIG.num_experts) and logits[name].dtype == np.float32
    np.testing.assert_allclose(logits[name], np.concatenate([e[name] for e in expected]),
                               rtol=1e-5, atol=1e-6)
  # max_tokens keeps the first real tokens in batch order and stops early.
  first = int(batches[0]["decoder_loss_weights"].sum())
  some = model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, iter(batches),
                                       max_tokens=first + 3)
  np.testing.assert_array_equal(some["layers_2/mlp"], logits["layers_2/mlp"][:first + 3])
  # Packed batches mark padding with segment id 0.
  packed = dict(batches[0], decoder_segment_ids=batches[0]["decoder_loss_weights"].astype(int))
  del packed["decoder_loss_weights"]
  assert model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, [packed])[
      "layers_0/mlp"].shape == (first, CONFIG.num_experts)


def _prefix_lm_batch():
  batch = dict(_batches(1)[0])
  causal = np.zeros((BATCH, LENGTH), np.int32)
  causal[:, :5] = 1                                     # a 5-token prompt per row
  weights = batch["decoder_loss_weights"].copy()
  weights[:, :5] = 0                                    # the prompt carries no loss
  batch.update(decoder_causal_attention=causal, decoder_loss_weights=weights)
  return batch


def _training_forward_logits(cfg, params, batch):
  """Router logits of the train step's own forward (`train.step.apply_model`)."""
  from uncurl_jax.train import step
  _, state = step.apply_model(params, SMoEDecoder(cfg).apply, batch, cfg,
                              mutable=["router_logits"])
  return {name: np.asarray(state["router_logits"][name.split("/")[0]]["mlp"]["logits"])
          for name in MOE_LAYERS}


@pytest.mark.parametrize("bidirectional", [False, True])
def test_collected_logits_are_the_training_forwards(bidirectional):
  """One forward everywhere: the logits collected on a batch equal those of the training
  forward on that batch, with and without decoder_causal_attention in the batch; by
  default (t5x's) the prefix marker does not reach the module, so both batches give the
  same logits. Prompt positions (loss weight 0) count as routed task tokens."""
  cfg = dataclasses.replace(CONFIG, inputs_bidirectional_attention=bidirectional)
  params, model = _init(CONFIG), SMoEDecoder(cfg)
  batch = _prefix_lm_batch()
  plain = {k: v for k, v in batch.items() if k != "decoder_causal_attention"}
  plain["decoder_loss_weights"] = ((batch["decoder_loss_weights"] > 0)
                                   | (batch["decoder_causal_attention"] > 0)).astype(np.float32)
  real = plain["decoder_loss_weights"] > 0
  assert real.sum() > (batch["decoder_loss_weights"] > 0).sum()
  with_marker = model_lib.collect_router_logits(model, params, [batch], progress=False)
  trained = _training_forward_logits(cfg, params, batch)
  for name in MOE_LAYERS:
    np.testing.assert_allclose(with_marker[name], trained[name][real], rtol=1e-6, atol=1e-6)
  if bidirectional:
    with pytest.raises(ValueError, match="decoder_causal_attention"):
      model_lib.collect_router_logits(model, params, [plain], progress=False)
    # The marker changes attention, so the logits differ from the causal forward's.
    causal = _training_forward_logits(CONFIG, params, plain)
    assert not np.allclose(with_marker["layers_2/mlp"], causal["layers_2/mlp"][real],
                           atol=1e-4)
  else:
    without_marker = model_lib.collect_router_logits(model, params, [plain], progress=False)
    stats = pruning.collect_expert_stats(model, params, [batch], progress=False)
    for name in MOE_LAYERS:
      np.testing.assert_array_equal(with_marker[name], without_marker[name])
      np.testing.assert_allclose(stats[name].logits, trained[name][real], rtol=1e-5,
                                 atol=1e-5)


def test_collect_router_logits_errors():
  params = _init(CONFIG)
  batch = _batches(1)[0]
  with pytest.raises(ValueError, match="max_tokens"):
    model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, [batch], max_tokens=0)
  with pytest.raises(ValueError, match="decoder_loss_weights"):
    model_lib.collect_router_logits(SMoEDecoder(CONFIG), params,
                                  [{k: batch[k] for k in ("decoder_input_tokens",
                                                          "decoder_target_tokens")}])
  empty = dict(batch, decoder_loss_weights=np.zeros_like(batch["decoder_loss_weights"]))
  with pytest.raises(ValueError, match="no real tokens"):
    model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, [empty])
  with pytest.raises(ValueError, match="no real tokens in 0 batches"):
    model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, [])


@pytest.mark.parametrize("edit, error, match", [
    (lambda b: {k: v for k, v in b.items() if k != "decoder_input_tokens"}, ValueError,
     r"task batch 0 lacks \['decoder_input_tokens'\]"),
    (lambda b: {k: v for k, v in b.items() if k != "decoder_target_tokens"}, ValueError,
     r"lacks \['decoder_target_tokens'\]"),
    (lambda b: dict(b, decoder_loss_weights=b["decoder_loss_weights"][:, :3]), ValueError,
     r"decoder_loss_weights has shape \(4, 3\), expected \(4, 16\)"),
    (lambda b: dict(b, decoder_input_tokens=b["decoder_input_tokens"][0]), ValueError,
     r"must be \[batch, length\]"),
    (lambda b: dict(b, decoder_input_tokens=b["decoder_input_tokens"] * 1.0), TypeError,
     "decoder_input_tokens must hold integers, got dtype float64"),
    (lambda b: dict(b, decoder_target_tokens=b["decoder_target_tokens"] + 64), ValueError,
     r"outside the model's vocabulary \[0, 64\)"),
    (lambda b: [1, 2], TypeError, "task batch 0 must be a mapping"),
])
def test_bad_batches_are_refused_before_their_forward_pass(edit, error, match):
  with pytest.raises(error, match=match):
    model_lib.collect_router_logits(SMoEDecoder(CONFIG), _init(CONFIG), [edit(_batches(1)[0])],
                                  progress=False)


def test_a_dense_model_and_another_models_params_are_refused():
  batch = _batches(1)[0]
  dense = dataclasses.replace(CONFIG, num_experts=0)
  with pytest.raises(ValueError, match="params have no MoE layer"):
    model_lib.collect_router_logits(SMoEDecoder(dense), _init(dense), [batch], progress=False)
  other = dataclasses.replace(CONFIG, num_experts=4)
  with pytest.raises(ValueError, match=r"the params and the model differ: \d+ parameters, "
                                       r"e.g. layers_0/mlp/expert/wi/bias \(8, 32\) \(model: "
                                       r"\(4, 32\)\)"):
    model_lib.collect_router_logits(SMoEDecoder(other), _init(CONFIG), [batch], progress=False)
  with pytest.raises(TypeError, match="max_tokens must be an int"):
    model_lib.collect_router_logits(SMoEDecoder(CONFIG), _init(CONFIG), [batch], max_tokens=2.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_pruned_params_run_in_the_reduced_model(top_k):
  cfg = dataclasses.replace(CONFIG, top_k=top_k)
  params = _init(cfg)
  logits = model_lib.collect_router_logits(SMoEDecoder(cfg), params, _batches())
  plan = pruning.plan_pruning(params, logits, 4, top_k=top_k, router_init_std=cfg.init_std)
  small = pruning.apply_plan(params, plan)
  small_cfg = pruning.pruned_config(cfg, plan)
  assert small_cfg.num_experts == 4
  expected_shapes = jax.tree_util.tree_map(jnp.shape, _init(small_cfg))
  assert jax.tree_util.tree_map(jnp.shape, small) == expected_shapes
  out = _forward(small_cfg)(small, _batches(1)[0]["decoder_input_tokens"])
  assert out.shape == (BATCH, LENGTH, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(out)))


def test_unevenly_pruned_params_run_in_the_reduced_model():
  params = _init(CONFIG)
  logits = model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, _batches())
  plan = pruning.plan_pruning(params, logits, 3, method="mc_smoe", router="merge")
  small_cfg = pruning.pruned_config(CONFIG, plan)
  small = pruning.apply_plan(params, plan)
  assert sum(small_cfg.layer_num_experts) == 3 * len(CONFIG.moe_layers)
  assert jax.tree_util.tree_map(jnp.shape, small) == jax.tree_util.tree_map(
      jnp.shape, _init(small_cfg))
  out = _forward(small_cfg)(small, _batches(1)[0]["decoder_input_tokens"])
  assert bool(jnp.all(jnp.isfinite(out)))


def _never_route_to_dropped(params):
  """Params in which every token's router logits for experts not in KEPT are ~ -40.

  One residual dimension is made constant 1 after the pre-MLP LayerNorm (scale 0, bias
  1); the dropped experts' router row there is -40. The kept experts get wider router
  columns so that each of them wins tokens. The dropped experts' softmax mass is then
  ~e^-40, so the 8-expert model and the model keeping only KEPT compute the same
  function up to float rounding, even though the gate is the softmax over all experts.
  """
  flat = {k: np.array(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  dropped = [e for e in range(CONFIG.num_experts) if e not in KEPT]
  for name in MOE_LAYERS:
    block = name.split("/")[0]
    flat[(block, "pre_mlp_layer_norm", "scale")][0] = 0.0
    flat[(block, "pre_mlp_layer_norm", "bias")][0] = 1.0
    kernel = flat[(block, "mlp", "router", "kernel")]
    kernel[:, list(KEPT)] *= 50.0
    kernel[0, list(KEPT)] = 0.0
    kernel[0, dropped] = -40.0
  return flax.traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("method", ["frequency", "frequency_merge"])
def test_anchor_router_reproduces_the_original_on_kept_experts(top_k, method):
  cfg = dataclasses.replace(CONFIG, top_k=top_k)
  params = _never_route_to_dropped(_init(cfg))
  batches = _batches()
  logits = model_lib.collect_router_logits(SMoEDecoder(cfg), params, batches)
  plan = pruning.plan_pruning(params, logits, len(KEPT), method=method, router="anchor",
                              top_k=top_k)
  for layer in plan.layers.values():
    assert layer.anchors == KEPT  # every token went to kept experts only
    assert all(layer.frequencies[e] == 0 for e in range(8) if e not in KEPT)
    assert all(layer.frequencies[e] > 0 for e in KEPT)
  small = pruning.apply_plan(params, plan)
  small_cfg = pruning.pruned_config(cfg, plan)
  for batch in batches:
    tokens = batch["decoder_input_tokens"]
    np.testing.assert_allclose(_forward(small_cfg)(small, tokens),
                               _forward(cfg)(params, tokens), rtol=1e-5, atol=1e-5)


def _duplicate_pairs(params):
  """Experts 2k and 2k+1 of every MoE layer identical (router columns untouched)."""
  params = jax.tree.map(np.array, params)
  for name in MOE_LAYERS:
    for leaf in jax.tree.leaves(params[name.split("/")[0]]["mlp"]["expert"]):
      leaf[1::2] = leaf[0::2]
  return params


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("method, options", [
    ("hc_smoe", {}), ("uncurl", {"features": "expert_outputs"}), ("mc_smoe", {})])
def test_bound_router_reproduces_the_original_when_merged_members_are_identical(
    top_k, method, options):
  """MC-SMoE's / HC-SMoE's original router: every column kept, bound to its merged
  expert. Merging identical members and binding their columns changes nothing, while a
  D-column router ('merge') does change the gates (a softmax over fewer columns)."""
  cfg = dataclasses.replace(CONFIG, top_k=top_k)
  params, batches = _duplicate_pairs(_init(cfg)), _batches()
  stats = pruning.collect_expert_stats(SMoEDecoder(cfg), params, batches, progress=False)
  plan = pruning.plan_pruning(params, stats, 4, method=method, router="bind", top_k=top_k,
                              **options)
  small, small_cfg = pruning.apply_plan(params, plan), pruning.pruned_config(cfg, plan)
  for name, layer in plan.layers.items():
    block = name.split("/")[0]
    assert small_cfg.layer_router_maps[small_cfg.moe_layers.index(int(block[7:]))] == \
        layer.labels
    np.testing.assert_array_equal(small[block]["mlp"]["router"]["kernel"],
                                  params[block]["mlp"]["router"]["kernel"])
  if method == "mc_smoe":  # groups by router logits and allocates globally: unlike experts
    return
  for layer in plan.layers.values():  # grouped by what the experts compute: the pairs
    assert sorted(map(sorted, layer.clusters())) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  tokens = batches[0]["decoder_input_tokens"]
  np.testing.assert_allclose(_forward(small_cfg)(small, tokens), _forward(cfg)(params, tokens),
                             rtol=1e-5, atol=1e-5)
  merged = pruning.apply_plan(params, dataclasses.replace(plan, router="merge"))
  plain_cfg = dataclasses.replace(small_cfg, layer_router_maps=None)
  assert not np.allclose(_forward(plain_cfg)(merged, tokens), _forward(cfg)(params, tokens),
                         atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_bound_router_of_a_selection_never_chooses_dropped_experts_and_keeps_gates(top_k):
  """frequency + 'bind': the E-column router stays, dropped experts' columns are never
  chosen, and the gates stay the E-way softmax (no renormalization over the kept ones)."""
  cfg = dataclasses.replace(CONFIG, top_k=top_k)
  params = _never_route_to_dropped(_init(cfg))
  batches = _batches()
  logits = model_lib.collect_router_logits(SMoEDecoder(cfg), params, batches)
  plan = pruning.plan_pruning(params, logits, len(KEPT), method="frequency", router="bind",
                              top_k=top_k)
  small, small_cfg = pruning.apply_plan(params, plan), pruning.pruned_config(cfg, plan)
  for name, layer in plan.layers.items():
    assert layer.anchors == KEPT
    expected_map = tuple(KEPT.index(e) if e in KEPT else -1 for e in range(8))
    assert small_cfg.layer_router_maps[small_cfg.moe_layers.index(
        int(name.split("/")[0][7:]))] == expected_map == layer.labels
  tokens = batches[0]["decoder_input_tokens"]
  np.testing.assert_allclose(_forward(small_cfg)(small, tokens), _forward(cfg)(params, tokens),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_route_tokens_with_unbound_columns_matches_numpy(top_k):
  from uncurl_jax.model import router as router_lib
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 16, 6)).astype(np.float32)
  expert_map = (1, -1, 0, -1, 2, 0)
  routing = router_lib.route_tokens(logits, top_k=top_k, capacity=16, expert_map=expert_map)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  masked = np.where(np.array(expert_map) >= 0, probs, -1.0)
  columns = np.argsort(-masked, axis=-1, kind="stable")[..., :top_k]
  np.testing.assert_array_equal(routing.column_index, columns)
  np.testing.assert_array_equal(routing.expert_index, np.array(expert_map)[columns])
  np.testing.assert_allclose(routing.gate, np.take_along_axis(probs, columns, -1), rtol=1e-6)
  with pytest.raises(ValueError, match="fewer than top_k"):
    router_lib.route_tokens(logits, top_k=3, capacity=4, expert_map=(0, -1, -1, -1, 1, -1))


def test_a_column_mask_is_the_bound_selection_and_the_greedy_oracle_finds_a_planted_set():
  """A 'routing'/'column_mask' evaluates a selection with the gates bound in one compiled
  program: the logits equal those of the pruned model that keeps those experts with its
  router bound (method 'selection'). The greedy oracle, scored through such masks, finds
  the experts a planted score rewards, layer by layer, in sum_d (E - d + 1) calls."""
  params, tokens = _init(CONFIG), _batches(1)[0]["decoder_input_tokens"]
  kept = {"layers_0/mlp": (1, 4, 6), "layers_2/mlp": (0, 7)}
  masks = {name.split("/")[0]: {"mlp": {"column_mask": jnp.zeros(8).at[np.array(e)].set(1.0)}}
           for name, e in kept.items()}
  masked = SMoEDecoder(CONFIG).apply({"params": params, "routing": masks}, tokens, tokens,
                                     enable_dropout=False)
  plan = pruning.plan_pruning(params, None, method="selection", selection=kept)
  small_cfg = pruning.pruned_config(CONFIG, plan)
  small = SMoEDecoder(small_cfg).apply({"params": pruning.apply_plan(params, plan)}, tokens,
                                       tokens, enable_dropout=False)
  np.testing.assert_allclose(masked, small, rtol=1e-5, atol=1e-5)
  full = _forward(CONFIG)(params, tokens)
  assert not np.allclose(masked, full, atol=1e-3)       # the mask does change the routing

  planted = {"layers_0/mlp": {2, 5}, "layers_2/mlp": {3}}
  calls = []

  def score(masks):
    calls.append({k: tuple(np.flatnonzero(v)) for k, v in masks.items()})
    return sum(len(planted[k] & set(np.flatnonzero(m).tolist())) for k, m in masks.items())
  selection, trace = pruning.greedy_selection(score, {"layers_0/mlp": 8, "layers_2/mlp": 8},
                                              {"layers_0/mlp": 2, "layers_2/mlp": 1})
  assert selection == {"layers_0/mlp": (2, 5), "layers_2/mlp": (3,)}
  assert len(calls) == (8 + 7) + 8
  assert calls[0]["layers_2/mlp"] == tuple(range(8))   # unvisited layers keep every expert
  assert calls[-1]["layers_0/mlp"] == (2, 5)            # visited ones keep their choice
  assert [t[:2] for t in trace] == [("layers_0/mlp", 2), ("layers_0/mlp", 5),
                                    ("layers_2/mlp", 3)]
  with pytest.raises(ValueError, match="target"):
    pruning.greedy_selection(score, {"layers_0/mlp": 8}, {"layers_0/mlp": 9})


def test_one_batch_is_taken_as_a_batch_of_its_own():
  """A single batch dict where an iterable of batches is expected is one batch (iterating
  the dict would give its keys: 'task batch 0 must be a mapping ..., got str')."""
  batch, params = _batches(1)[0], _init(CONFIG)
  one = model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, batch, progress=False)
  listed = model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, [batch], progress=False)
  assert one.keys() == listed.keys()
  for name in one:
    np.testing.assert_array_equal(one[name], listed[name])
  stats = pruning.collect_expert_stats(SMoEDecoder(CONFIG), params, batch, progress=False)
  np.testing.assert_array_equal(stats["layers_0/mlp"].logits, listed["layers_0/mlp"])
