"""Task statistics from the experts (collect_expert_stats) and the methods that use them:
REAP, HC-SMoE and UNCURL clustering on expert outputs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.pruning.batches import padded_batches
from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.model import configs
from uncurl_jax.model.decoder import SMoEDecoder
from uncurl_jax.pruning import features

# Blocks 0 and 2 are MoE; top-2 routing; dropless (statistics ignore capacity anyway).
CONFIG = configs.get("tiny", vocab_size=64, max_length=16, d_model=32, d_ff=32, num_heads=2,
                     num_layers=3, num_experts=6, top_k=2, dropless=True)
LAYERS = ("layers_0/mlp", "layers_2/mlp")
BATCH, LENGTH = 4, 16


@functools.cache
def _init(seed=0):
  shape = (BATCH, LENGTH)
  init = jax.jit(functools.partial(SMoEDecoder(CONFIG).init, enable_dropout=False))
  return jax.device_get(init(jax.random.key(seed), jnp.ones(shape), jnp.ones(shape))["params"])


def _batches(num_batches=3, seed=0):
  return padded_batches(vocab_size=CONFIG.vocab_size, batch=BATCH, length=LENGTH,
                        num_batches=num_batches, seed=seed, min_length=5)


def _reference(params, batches):
  """Numpy statistics from the layers' inputs (sown into 'moe_inputs') and the weights."""
  model = SMoEDecoder(CONFIG)
  out = {}
  for batch in batches:
    _, state = model.apply({"params": params}, batch["decoder_input_tokens"],
                           batch["decoder_target_tokens"], enable_dropout=False,
                           mutable=["moe_inputs"])
    real = batch["decoder_loss_weights"] > 0
    for name in LAYERS:
      layer = params[name.split("/")[0]]["mlp"]
      x = np.asarray(state["moe_inputs"][name.split("/")[0]]["mlp"]["inputs"], np.float64)[real]
      logits = x @ layer["router"]["kernel"]
      probs = np.exp(logits - logits.max(1, keepdims=True))
      probs /= probs.sum(1, keepdims=True)
      top2 = np.argsort(-probs, 1, kind="stable")[:, :2]
      expert = layer["expert"]
      hidden = np.einsum("td,edf->tef", x, expert["wi"]["kernel"]) + expert["wi"]["bias"]
      hidden = np.asarray(jax.nn.gelu(hidden))
      outputs = np.einsum("tef,efd->ted", hidden, expert["wo"]["kernel"]) + expert["wo"]["bias"]
      routed = np.zeros_like(probs)
      np.put_along_axis(routed, top2, 1.0, 1)
      acc = out.setdefault(name, {"logits": [], "reap": 0, "count": 0, "output": 0})
      acc["logits"].append(logits)
      acc["reap"] = acc["reap"] + (routed * probs * np.linalg.norm(outputs, axis=-1)).sum(0)
      acc["count"] = acc["count"] + routed.sum(0)
      acc["output"] = acc["output"] + outputs.sum(0)
  return {name: dict(logits=np.concatenate(a["logits"]), reap=a["reap"] / a["count"],
                     count=a["count"], mean_output=a["output"] / sum(len(h) for h in
                                                                     a["logits"]))
          for name, a in out.items()}


def test_streaming_statistics_equal_a_one_shot_numpy_computation():
  params, batches = _init(), _batches()
  stats = pruning.collect_expert_stats(SMoEDecoder(CONFIG), params, batches, progress=False)
  reference = _reference(params, batches)
  one_shot = pruning.collect_expert_stats(
      SMoEDecoder(CONFIG), params,
      [{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}], progress=False)
  for name in LAYERS:
    got, want = stats[name], reference[name]
    assert got.top_k == 2 and got.num_tokens == len(want["logits"])
    np.testing.assert_allclose(got.logits, want["logits"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got.topk_counts, want["count"])
    np.testing.assert_array_equal(got.top1_counts, np.bincount(
        np.argmax(want["logits"], 1), minlength=CONFIG.num_experts))
    np.testing.assert_allclose(got.reap, want["reap"], rtol=1e-4)
    np.testing.assert_allclose(got.mean_output, want["mean_output"], rtol=1e-4, atol=1e-6)
    for field in ("logits", "topk_counts", "reap", "mean_output"):
      np.testing.assert_allclose(getattr(one_shot[name], field), getattr(got, field),
                                 rtol=1e-5, atol=1e-6)
  # max_tokens keeps the first real tokens, as collect_router_logits does.
  some = pruning.collect_expert_stats(SMoEDecoder(CONFIG), params, batches, max_tokens=30,
                                      progress=False)
  np.testing.assert_array_equal(some["layers_0/mlp"].logits, stats["layers_0/mlp"].logits[:30])
  assert some["layers_0/mlp"].topk_counts.sum() == 60
  # A limit inside the second batch: all of the first batch's real tokens, 3 of the second.
  first = int(np.sum(np.asarray(batches[0]["decoder_loss_weights"]) > 0))
  across = pruning.collect_expert_stats(SMoEDecoder(CONFIG), params, batches,
                                        max_tokens=first + 3, progress=False)
  for name in stats:
    np.testing.assert_array_equal(across[name].logits, stats[name].logits[:first + 3])
    assert across[name].topk_counts.sum() == 2 * (first + 3)
    assert across[name].top1_counts.sum() == first + 3


def test_reap_removes_the_most_chosen_expert_whose_output_is_zero_and_frequency_keeps_it():
  params = jax.tree.map(np.array, _init())
  rng = np.random.default_rng(5)
  for name in LAYERS:
    block = name.split("/")[0]
    layer = params[block]["mlp"]
    for leaf in jax.tree.leaves(layer["expert"]):
      leaf[0] = 0.0                                          # expert 0 outputs zero
    # Second choices spread over experts 1-5 (distinct directions) ...
    layer["router"]["kernel"][:, 1:] = rng.normal(size=(CONFIG.d_model, 5))
    layer["router"]["kernel"][:, 0] = 0.0
    # ... and every token's first choice is expert 0 (a large logit through the LN bias).
    ln = params[block]["pre_mlp_layer_norm"]
    ln["bias"][:] = 0.0
    ln["bias"][0] = 5.0
    layer["router"]["kernel"][0, 0] = 4.0
  stats = pruning.collect_expert_stats(SMoEDecoder(CONFIG), params, _batches(),
                                       progress=False)
  for name in LAYERS:
    assert np.argmax(stats[name].top1_counts) == 0 and stats[name].reap[0] == 0.0
    assert np.all(stats[name].reap[1:] > 0)
  reap = pruning.plan_pruning(params, stats, 5, method="reap")
  frequency = pruning.plan_pruning(params, stats, 1, method="frequency")
  for name in LAYERS:
    assert 0 not in reap.layers[name].anchors and len(reap.layers[name].anchors) == 5
    assert frequency.layers[name].anchors == (0,)
  small = pruning.apply_plan(params, reap)
  np.testing.assert_array_equal(small["layers_0"]["mlp"]["router"]["kernel"],
                                params["layers_0"]["mlp"]["router"]["kernel"][:, 1:])


def _duplicated(params):
  """Experts 2k and 2k+1 identical; the router kernel random (logits unrelated)."""
  params = jax.tree.map(np.array, params)
  rng = np.random.default_rng(3)
  for name in LAYERS:
    layer = params[name.split("/")[0]]["mlp"]
    for leaf in jax.tree.leaves(layer["expert"]):
      leaf[1::2] = leaf[0::2]
    layer["router"]["kernel"][:] = rng.normal(size=layer["router"]["kernel"].shape)
  return params


@pytest.mark.parametrize("method, kwargs", [
    ("hc_smoe", {}),
    ("uncurl", {"features": "expert_outputs", "router": "merge"}),
])
def test_exact_duplicates_are_grouped_by_their_outputs_and_merge_back_exactly(method, kwargs):
  params = _duplicated(_init())
  stats = pruning.collect_expert_stats(SMoEDecoder(CONFIG), params, _batches(),
                                       progress=False)
  plan = pruning.plan_pruning(params, stats, 3, method=method, **kwargs)
  small = pruning.apply_plan(params, plan)
  for name in LAYERS:
    layer_plan = plan.layers[name]
    assert sorted(map(sorted, layer_plan.clusters())) == [[0, 1], [2, 3], [4, 5]]
    merged = small[name.split("/")[0]]["mlp"]["expert"]
    original = params[name.split("/")[0]]["mlp"]["expert"]
    for c, anchor in enumerate(layer_plan.anchors):
      for leaf in ("wi", "wo"):
        for kind in ("kernel", "bias"):
          np.testing.assert_allclose(merged[leaf][kind][c], original[leaf][kind][anchor],
                                     rtol=1e-6, atol=1e-7)
  assert plan.features == kwargs.get("features")


def test_methods_that_need_statistics_refuse_plain_logits_and_bad_statistics():
  params, batches = _init(), _batches(1)
  logits = model_lib.collect_router_logits(SMoEDecoder(CONFIG), params, batches, progress=False)
  for method, kwargs in (("reap", {}), ("hc_smoe", {}),
                         ("uncurl", {"features": "expert_outputs"})):
    with pytest.raises(ValueError, match="needs expert statistics"):
      pruning.plan_pruning(params, logits, 3, method=method, **kwargs)
  stats = pruning.collect_expert_stats(SMoEDecoder(CONFIG), params, batches, progress=False)
  with pytest.raises(ValueError, match="features must be one of"):
    pruning.plan_pruning(params, stats, 3, features="weights")
  bad = dict(stats, **{"layers_2/mlp": dataclasses.replace(
      stats["layers_2/mlp"], reap=np.full(6, np.nan))})
  with pytest.raises(ValueError, match=r"logits\['layers_2/mlp'\].reap must be finite"):
    pruning.plan_pruning(params, bad, 3, method="reap")
  mixed = dict(stats, **{"layers_2/mlp": logits["layers_2/mlp"]})
  with pytest.raises(TypeError, match="must be ExpertStats like the other layers'"):
    pruning.plan_pruning(params, mixed, 3, method="reap")
  with pytest.raises(ValueError, match="lacks"):
    pruning.collect_expert_stats(SMoEDecoder(CONFIG), params,
                                 [{"decoder_input_tokens": batches[0]["decoder_input_tokens"]}])
  # Router-logit methods take statistics too (their logits).
  assert pruning.plan_pruning(params, stats, 3) == pruning.plan_pruning(params, logits, 3)
  assert isinstance(stats["layers_0/mlp"], features.ExpertStats)
