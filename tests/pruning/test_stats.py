"""Task statistics from the experts (collect_expert_stats) and the methods that use them:
REAP, HC-SMoE and UNCURL clustering on expert outputs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.cluster import hierarchy

from tests.pruning import test_plan
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


def _hand_stats(counts, mean_output):
  """ExpertStats of test_plan's layers: `counts` top-1 choices of each expert (one-hot
  logits) and the experts' mean outputs [E, d]."""
  counts = np.asarray(counts)
  logits = np.repeat(np.eye(len(counts), dtype=np.float32), counts, axis=0)
  stats = features.ExpertStats(logits=logits, top1_counts=counts, topk_counts=counts,
                               reap=np.ones(len(counts)), mean_output=np.asarray(mean_output),
                               top_k=1)
  return {name: stats for name in test_plan.LAYERS}


def _leaves(params, name):
  expert = params[name.split("/")[0]]["mlp"]["expert"]
  return {(leaf, kind): np.asarray(expert[leaf][kind]) for leaf in ("wi", "wo")
          for kind in ("kernel", "bias")}


def test_hc_smoe_clusters_by_average_linkage_like_scipy():
  # Mean outputs that every other linkage cuts into other 3 clusters than average linkage.
  points = np.random.default_rng(22).normal(size=(8, test_plan.D_MODEL))

  def scipy_clusters(method):
    labels = hierarchy.fcluster(hierarchy.linkage(points, method=method), 3, criterion="maxclust")
    return sorted(np.flatnonzero(labels == c).tolist() for c in set(labels))

  want = scipy_clusters("average")
  assert want == [[0, 1, 3, 6], [2, 4, 5], [7]]
  for other in ("single", "complete", "ward", "weighted", "centroid", "median"):
    assert scipy_clusters(other) != want, other
  plan = pruning.plan_pruning(test_plan._params(), _hand_stats(np.ones(8, int), points), 3,
                              method="hc_smoe")
  for name in test_plan.LAYERS:
    assert sorted(plan.layers[name].clusters()) == want


def test_hc_smoe_anchor_is_the_most_selected_member_and_orders_the_new_experts():
  # Clusters {0, 3, 6}, {1, 2}, {4, 5, 7}; their most selected members 6, 1, 5 are neither
  # the lowest nor the highest index of their cluster.
  points = 0.1 * np.random.default_rng(0).normal(size=(8, test_plan.D_MODEL))
  points[[1, 2], 0] += 10
  points[[4, 5, 7], 1] += 10
  counts = np.array([1, 4, 3, 2, 2, 6, 5, 3])
  params = test_plan._params()
  plan = pruning.plan_pruning(params, _hand_stats(counts, points), 3, method="hc_smoe",
                              router="anchor")
  small = pruning.apply_plan(params, plan)
  for name in test_plan.LAYERS:
    assert plan.layers[name].anchors == (1, 5, 6)
    assert plan.layers[name].clusters() == [[1, 2], [4, 5, 7], [0, 3, 6]]
    block = name.split("/")[0]
    np.testing.assert_array_equal(small[block]["mlp"]["router"]["kernel"],
                                  params[block]["mlp"]["router"]["kernel"][:, [1, 5, 6]])
    before, after = _leaves(params, name), _leaves(small, name)
    for key in before:
      for c, members in enumerate(([1, 2], [4, 5, 7], [0, 3, 6])):
        weights = counts[members] / counts[members].sum()
        np.testing.assert_allclose(after[key][c], np.tensordot(weights, before[key][members], 1),
                                   rtol=1e-5, atol=1e-6, err_msg=f"{key} {c}")


def test_hc_smoe_merges_without_aligning_hidden_units():
  # Expert 1 is expert 0 with its hidden units permuted: the same function, the same mean
  # output. HC-SMoE averages the weights as they are (an alignment would give expert 0).
  rng = np.random.default_rng(5)
  params = test_plan._params()
  for name in test_plan.LAYERS:
    expert = params[name.split("/")[0]]["mlp"]["expert"]
    perm = rng.permutation(test_plan.D_FF)
    expert["wi"]["kernel"][1] = expert["wi"]["kernel"][0][:, perm]
    expert["wi"]["bias"][1] = expert["wi"]["bias"][0][perm]
    expert["wo"]["kernel"][1] = expert["wo"]["kernel"][0][perm]
    expert["wo"]["bias"][1] = expert["wo"]["bias"][0]
  points = rng.normal(size=(8, test_plan.D_MODEL))
  points[1] = points[0]
  counts = np.array([3, 1, 1, 1, 1, 1, 1, 1])
  plan = pruning.plan_pruning(params, _hand_stats(counts, points), 7, method="hc_smoe")
  small = pruning.apply_plan(params, plan)
  for name in test_plan.LAYERS:
    assert plan.layers[name].clusters() == [[0, 1]] + [[e] for e in range(2, 8)]
    assert plan.layers[name].alignments == ()
    before, after = _leaves(params, name), _leaves(small, name)
    for key in before:
      want = 0.75 * before[key][0] + 0.25 * before[key][1]
      np.testing.assert_allclose(after[key][0], want, rtol=1e-5, atol=1e-6, err_msg=str(key))
      np.testing.assert_array_equal(after[key][1:], before[key][2:])
    assert not np.allclose(after[("wi", "kernel")][0], before[("wi", "kernel")][0], atol=1e-2)


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
