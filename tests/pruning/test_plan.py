"""Tests of plan_pruning / apply_plan / prune_params on small synthetic parameter trees."""

import copy
import dataclasses
import json

import flax
import jax
import numpy as np
import pytest

from uncurl_jax.model import configs
from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.pruning import features
from uncurl_jax.pruning import merge
from uncurl_jax.pruning import methods

D_MODEL, D_FF = 6, 10
LAYERS = ("layers_0/mlp", "layers_2/mlp")


def _layer(rng, num_experts):
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {"router": {"kernel": normal(D_MODEL, num_experts)},
          "expert": {"wi": {"kernel": normal(num_experts, D_MODEL, D_FF),
                            "bias": normal(num_experts, D_FF)},
                     "wo": {"kernel": normal(num_experts, D_FF, D_MODEL),
                            "bias": normal(num_experts, D_MODEL)}}}


def _params(num_experts=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"token_embed": {"embedding": rng.normal(size=(16, D_MODEL)).astype(np.float32)},
          "layers_0": {"mlp": _layer(rng, num_experts)},
          "layers_1": {"mlp": {"wi": {"kernel": np.ones((D_MODEL, D_FF), np.float32)}}},
          "layers_2": {"mlp": _layer(rng, num_experts)}}


def _logits(num_experts=8, tokens=200, seed=0):
  rng = np.random.default_rng(seed + 100)
  return {name: rng.normal(size=(tokens, num_experts)).astype(np.float32) for name in LAYERS}


def _stats(logits, seed=1):
  """ExpertStats around `logits` with random saliencies and mean outputs."""
  rng = np.random.default_rng(seed)
  stats = {}
  for name, h in logits.items():
    counts = np.bincount(np.argmax(h, 1), minlength=h.shape[1])
    stats[name] = features.ExpertStats(
        logits=h, top1_counts=counts, topk_counts=counts, reap=rng.uniform(size=h.shape[1]),
        mean_output=rng.normal(size=(h.shape[1], D_MODEL)), top_k=1)
  return stats


def _task(method, logits):
  """What `method` prunes from: the logits, or ExpertStats for the methods that need them."""
  return _stats(logits) if methods.get(method).needs_stats else logits


def _kwargs(method, params):
  if method == "router_norm":
    return {"pretrained_params": _params(seed=7)}
  return {}


def _expert(params, name, e):
  mlp = params[name.split("/")[0]]["mlp"]["expert"]
  return (mlp["wi"]["kernel"][e], mlp["wi"]["bias"][e], mlp["wo"]["kernel"][e],
          mlp["wo"]["bias"][e])


def _assert_trees_equal(a, b):
  flat_a, flat_b = (flax.traverse_util.flatten_dict(t) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]),
                                  err_msg=str(key))


@pytest.mark.parametrize("method", [m for m in pruning.METHODS
                                    if not pruning.methods.get(m).zero_outputs
                                    and not pruning.methods.get(m).needs_selection])
def test_keeping_every_expert_is_the_identity(method):
  params, logits = _params(), _logits()
  for router in ("anchor", "merge"):
    out = pruning.prune_params(params, _task(method, logits), 8, method=method,
                               router=router, **_kwargs(method, params))
    _assert_trees_equal(out, params)
  # The paper's fresh router: experts unchanged, a new [d, E] router.
  out = pruning.prune_params(params, _task(method, logits), 8, method=method, router="reinit",
                             **_kwargs(method, params))
  out_router = out["layers_0"]["mlp"]["router"]["kernel"]
  assert out_router.shape == (D_MODEL, 8)
  assert not np.array_equal(out_router, params["layers_0"]["mlp"]["router"]["kernel"])
  out["layers_0"]["mlp"]["router"] = params["layers_0"]["mlp"]["router"]
  out["layers_2"]["mlp"]["router"] = params["layers_2"]["mlp"]["router"]
  _assert_trees_equal(out, params)


def test_experts_off_zeroes_every_expert_output_and_keeps_the_rest():
  """The floor arm: the kept experts' output projections are zero (so the MoE layers add
  nothing), everything else is what frequency selection of the first D experts gives."""
  params, logits = _params(), _logits()
  out = pruning.prune_params(params, logits, 3, method="experts_off")
  for name in LAYERS:
    layer, source = out[name.split("/")[0]]["mlp"], params[name.split("/")[0]]["mlp"]
    assert not np.any(np.asarray(layer["expert"]["wo"]["kernel"]))
    np.testing.assert_array_equal(layer["expert"]["wi"]["kernel"],
                                  np.asarray(source["expert"]["wi"]["kernel"])[:3])
    np.testing.assert_array_equal(layer["router"]["kernel"],
                                  np.asarray(source["router"]["kernel"])[:, :3])
    if "bias" in layer["expert"]["wo"]:
      assert not np.any(np.asarray(layer["expert"]["wo"]["bias"]))
  assert out["token_embed"]["embedding"] is params["token_embed"]["embedding"]


def test_selection_keeps_the_named_experts_with_their_bound_columns():
  """Method 'selection' keeps exactly the experts named per layer (in ascending order), by
  default with the whole router bound (column c -> its expert, -1 for the others); its
  count comes from the selection; bad selections are refused by name."""
  params, kept = _params(), {"layers_0/mlp": [6, 1, 3], "layers_2/mlp": [0, 7]}
  plan = pruning.plan_pruning(params, None, method="selection", selection=kept)
  assert plan.router == "bind" and plan.num_experts == {"layers_0/mlp": 3, "layers_2/mlp": 2}
  out = pruning.apply_plan(params, plan)
  for name, experts in kept.items():
    layer, source = out[name.split("/")[0]]["mlp"], params[name.split("/")[0]]["mlp"]
    np.testing.assert_array_equal(layer["expert"]["wo"]["kernel"],
                                  np.asarray(source["expert"]["wo"]["kernel"])[sorted(experts)])
    np.testing.assert_array_equal(layer["router"]["kernel"], source["router"]["kernel"])
  config = pruning.pruned_config(configs.get("tiny", num_layers=3, num_experts=8), plan)
  assert config.layer_router_maps == ((-1, 0, -1, 1, -1, -1, 2, -1),
                                      (0, -1, -1, -1, -1, -1, -1, 1))
  with pytest.raises(ValueError, match="selection"):
    pruning.plan_pruning(params, None, method="selection")
  with pytest.raises(ValueError, match="selection"):
    pruning.plan_pruning(params, _logits(), 3, method="frequency", selection=kept)
  with pytest.raises(ValueError, match=r"selection\['layers_0/mlp'\]"):
    pruning.plan_pruning(params, None, method="selection",
                         selection={"layers_0/mlp": [1, 1], "layers_2/mlp": [0]})
  with pytest.raises(ValueError, match="disagrees"):
    pruning.plan_pruning(params, None, 4, method="selection", selection=kept)


def _permuted_copies(noise, seed=0):
  """6 experts: 0-2 hidden-permuted copies of A, 3-5 of B; logits that group them.

  Returns params, logits, and the source experts A, B. Expert 0 (A) and 3 (B) are
  unpermuted and noiseless, and the most selected of their group (so they anchor).
  """
  rng = np.random.default_rng(seed)
  params = _params(num_experts=6, seed=seed)
  experts = params["layers_0"]["mlp"]["expert"]
  sources = {}
  for anchor in (0, 3):
    sources[anchor] = _expert(params, "layers_0/mlp", anchor)
    for member in (anchor + 1, anchor + 2):
      perm = rng.permutation(D_FF)
      wi, bi, wo, bo = sources[anchor]
      jitter = lambda x: (x + noise * rng.normal(size=x.shape)).astype(np.float32)
      experts["wi"]["kernel"][member] = jitter(wi[:, perm])
      experts["wi"]["bias"][member] = jitter(bi[perm])
      experts["wo"]["kernel"][member] = jitter(wo[perm])
      experts["wo"]["bias"][member] = bo
  tokens = 400
  profiles = rng.normal(size=(tokens, 2)) * 3
  # Within its group, the anchor gets half the tokens' small boost, each member a quarter:
  # selection frequencies 2:1:1, so all three carry weight in the merge.
  boosted = np.array([0, 0, 1, 2])[np.arange(tokens) % 4]
  columns = [profiles[:, e // 3] + 0.05 * rng.normal(size=tokens)
             + 0.5 * (boosted == e % 3) for e in range(6)]
  h = np.stack(columns, 1)
  logits = {name: h.astype(np.float32) for name in LAYERS}
  return params, logits, sources


@pytest.mark.parametrize("cluster", pruning.CLUSTER_METHODS)
def test_merging_permuted_copies_gives_the_expert_back(cluster):
  params, logits, sources = _permuted_copies(noise=0.0)
  plan = pruning.plan_pruning(params, logits, 2, cluster=cluster, router="merge")
  layer = plan.layers["layers_0/mlp"]
  assert layer.clusters() == [[0, 1, 2], [3, 4, 5]]
  assert layer.anchors == (0, 3)
  assert min(layer.member_weights) > 0.2
  assert all(a.score_after == pytest.approx(1.0, abs=1e-5) for a in layer.alignments)
  out = pruning.apply_plan(params, plan)
  for new, anchor in enumerate((0, 3)):
    for got, want in zip(_expert(out, "layers_0/mlp", new), sources[anchor]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_aligned_merge_is_closer_than_unaligned_with_noise():
  params, logits, sources = _permuted_copies(noise=0.1)
  plan = pruning.plan_pruning(params, logits, 2, router="merge")
  aligned = pruning.apply_plan(params, plan)
  layer_plan = plan.layers["layers_0/mlp"]
  unaligned = merge.merge_experts(params["layers_0"]["mlp"]["expert"]["wi"]["kernel"],
                                  layer_plan.merge_matrix())
  for new, anchor in enumerate((0, 3)):
    source_wi = sources[anchor][0]
    aligned_error = np.linalg.norm(_expert(aligned, "layers_0/mlp", new)[0] - source_wi)
    unaligned_error = np.linalg.norm(unaligned[new] - source_wi)
    assert aligned_error < 0.5 * unaligned_error


def test_weighted_average_matches_hand_computation():
  params, logits = _params(), _logits()
  plan = pruning.plan_pruning(params, logits, 3, method="uncurl", router="merge")
  out = pruning.apply_plan(params, plan)
  for name in LAYERS:
    layer = plan.layers[name]
    counts = np.bincount(np.argmax(logits[name], axis=1), minlength=8)
    np.testing.assert_allclose(layer.frequencies, counts / counts.sum())
    perms = {a.member: np.asarray(a.permutation) for a in layer.alignments}
    for c, members in enumerate(layer.clusters()):
      weights = counts[members] / counts[members].sum()
      np.testing.assert_allclose([layer.member_weights[e] for e in members], weights)
      expected_wi = sum(w * _expert(params, name, e)[0][:, perms.get(e, np.arange(D_FF))]
                        for w, e in zip(weights, members))
      expected_wo = sum(w * _expert(params, name, e)[2][perms.get(e, np.arange(D_FF))]
                        for w, e in zip(weights, members))
      expected_router = sum(w * params[name.split("/")[0]]["mlp"]["router"]["kernel"][:, e]
                            for w, e in zip(weights, members))
      got = _expert(out, name, c)
      np.testing.assert_allclose(got[0], expected_wi, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got[2], expected_wo, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(out[name.split("/")[0]]["mlp"]["router"]["kernel"][:, c],
                                 expected_router, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["uncurl", "frequency_merge", "mc_smoe"])
def test_clusters_partition_and_anchors_are_most_frequent(method):
  params, logits = _params(num_experts=16), _logits(num_experts=16, tokens=500)
  plan = pruning.plan_pruning(params, logits, 4, method=method)
  assert sum(plan.num_experts.values()) == 8
  for layer in plan.layers.values():
    clusters = layer.clusters()
    assert sorted(e for members in clusters for e in members) == list(range(16))
    assert all(clusters)
    for c, members in enumerate(clusters):
      assert layer.frequencies[layer.anchors[c]] == max(layer.frequencies[e] for e in members)


def test_selection_methods_keep_experts_and_slice_router():
  params, logits = _params(), _logits()
  plan = pruning.plan_pruning(params, logits, 3, method="frequency")
  assert plan.router == "anchor"
  out = pruning.apply_plan(params, plan)
  for name in LAYERS:
    kept = plan.layers[name].anchors
    counts = np.bincount(np.argmax(logits[name], axis=1), minlength=8)
    assert set(kept) == set(np.argsort(-counts, kind="stable")[:3].tolist())
    block = name.split("/")[0]
    np.testing.assert_array_equal(out[block]["mlp"]["router"]["kernel"],
                                  params[block]["mlp"]["router"]["kernel"][:, list(kept)])
    np.testing.assert_array_equal(out[block]["mlp"]["expert"]["wo"]["bias"],
                                  params[block]["mlp"]["expert"]["wo"]["bias"][list(kept)])


def test_router_norm_prunes_smallest_signed_change():
  params, pretrained = _params(), _params(seed=7)
  plan = pruning.plan_pruning(params, None, 3, method="router_norm",
                              pretrained_params=pretrained)
  for name in LAYERS:
    block = name.split("/")[0]
    delta = (np.linalg.norm(params[block]["mlp"]["router"]["kernel"], axis=0)
             - np.linalg.norm(pretrained[block]["mlp"]["router"]["kernel"], axis=0))
    assert list(plan.layers[name].anchors) == sorted(np.argsort(-delta)[:3].tolist())


def test_mc_smoe_allocates_globally():
  params, logits = _params(), _logits()
  # Layer 0 routes almost everything to expert 5: its other experts are rarely used.
  logits["layers_0/mlp"][:, 5] += 10
  plan = pruning.plan_pruning(params, logits, 3, method="mc_smoe", router="merge")
  counts = plan.num_experts
  assert sum(counts.values()) == 6 and counts["layers_0/mlp"] < counts["layers_2/mlp"]
  for name, layer in plan.layers.items():
    assert int(np.argmax(layer.frequencies)) in layer.anchors
    assert all(a.reference == 0 for a in layer.alignments)
  out = pruning.apply_plan(params, plan)
  assert out["layers_0"]["mlp"]["expert"]["wi"]["kernel"].shape[0] == counts["layers_0/mlp"]
  small_cfg = pruning.pruned_config(configs.get("tiny", num_layers=4), plan)
  assert small_cfg.layer_num_experts == (counts["layers_0/mlp"], counts["layers_2/mlp"])
  with pytest.raises(ValueError, match=r"MoE blocks \[0, 2\], the model config places them at "
                                       r"\[0, 2, 4\]"):
    pruning.pruned_config(configs.get("tiny", num_layers=6), plan)


def test_random_is_seeded():
  params = _params()
  a = pruning.plan_pruning(params, None, 3, method="random", seed=1)
  assert a == pruning.plan_pruning(params, None, 3, method="random", seed=1)
  others = [pruning.plan_pruning(params, None, 3, method="random", seed=s) for s in range(2, 6)]
  assert any(o.layers != a.layers for o in others)


def test_reinit_router_draws_with_router_init_std_seeded_by_layer_name():
  # A wide model so the kernel has 512 * 4 = 2048 entries: its sample std is within ~2%
  # (one standard error) of the true std. The std 0.37 is neither the default 0.02 nor 1.
  width, std = 512, 0.37
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  layer = lambda: {"router": {"kernel": normal(width, 8)},
                   "expert": {"wi": {"kernel": normal(8, width, 2), "bias": normal(8, 2)},
                              "wo": {"kernel": normal(8, 2, width), "bias": normal(8, width)}}}
  params = {"layers_0": {"mlp": layer()}, "layers_2": {"mlp": layer()}}
  prune = lambda seed: pruning.prune_params(params, _logits(), 4, method="frequency",
                                            router="reinit", router_init_std=std, seed=seed)
  kernels = {name: np.asarray(prune(3)[name.split("/")[0]]["mlp"]["router"]["kernel"])
             for name in LAYERS}
  for name, kernel in kernels.items():
    assert kernel.shape == (width, 4)
    np.testing.assert_allclose(kernel.std(), std, rtol=0.1)
    assert abs(kernel.mean()) < 0.1 * std
    # Exactly N(0, 1) * std under the key fold_in(key(seed), layer_seed(layer name)).
    key = jax.random.fold_in(jax.random.key(3), methods.layer_seed(name))
    np.testing.assert_allclose(
        kernel, np.asarray(jax.random.normal(key, (width, 4), np.float32)) * std, rtol=1e-6)
  # Each layer draws its own kernel; the same seed draws the same ones, another seed others.
  assert not np.allclose(kernels["layers_0/mlp"], kernels["layers_2/mlp"])
  again = prune(3)
  for name in LAYERS:
    np.testing.assert_array_equal(again[name.split("/")[0]]["mlp"]["router"]["kernel"],
                                  kernels[name])
  other = np.asarray(prune(4)["layers_0"]["mlp"]["router"]["kernel"])
  assert not np.allclose(other, kernels["layers_0/mlp"])


def test_default_targets_follow_the_paper():
  assert [pruning.default_num_experts(e) for e in (2, 8, 32, 64, 128)] == [1, 2, 8, 32, 64]
  plan = pruning.plan_pruning(_params(num_experts=16), _logits(num_experts=16), method="frequency")
  assert plan.num_experts == {name: 4 for name in LAYERS}
  plan = pruning.plan_pruning(_params(), _logits(), {"layers_0/mlp": 2, "layers_2/mlp": 5})
  assert plan.num_experts == {"layers_0/mlp": 2, "layers_2/mlp": 5}


@pytest.mark.parametrize("method", [m for m in pruning.METHODS
                                    if not pruning.methods.get(m).needs_selection])
def test_plans_are_deterministic_round_trip_json_and_do_not_mutate(method):
  params, logits = _params(), _logits()
  params_copy, logits_copy = copy.deepcopy(params), copy.deepcopy(logits)
  task = _task(method, logits)
  plan = pruning.plan_pruning(params, task, 3, method=method, **_kwargs(method, params))
  again = pruning.plan_pruning(params, task, 3, method=method, **_kwargs(method, params))
  assert plan == again
  assert pruning.PrunePlan.from_json(plan.to_json()) == plan
  out = pruning.apply_plan(params, plan)
  _assert_trees_equal(pruning.apply_plan(params, again), out)
  _assert_trees_equal(params, params_copy)
  for name in LAYERS:
    np.testing.assert_array_equal(logits[name], logits_copy[name])
  frozen = pruning.apply_plan(flax.core.freeze(params), plan)
  assert isinstance(frozen, flax.core.FrozenDict)
  _assert_trees_equal(flax.core.unfreeze(frozen), out)


def test_sharded_params_give_sharded_jax_results():
  params, logits = _params(), _logits()
  mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  expert_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(path, x):
    return jax.device_put(x, expert_sharding if "expert" in str(path) else replicated)

  sharded = jax.tree_util.tree_map_with_path(place, params)
  for router in ("reinit", "merge"):
    plan = pruning.plan_pruning(sharded, logits, 3, router=router)
    assert plan == pruning.plan_pruning(params, logits, 3, router=router)
    out = pruning.apply_plan(sharded, plan)
    expected = pruning.apply_plan(params, plan)
    for leaf in jax.tree_util.tree_leaves(out["layers_0"]):
      assert isinstance(leaf, jax.Array)
      # Computed on the inputs' devices: the mesh's eight, not one default device.
      assert leaf.sharding.device_set == set(mesh.devices.flat)
    assert out["token_embed"]["embedding"] is sharded["token_embed"]["embedding"]
    flat_out = flax.traverse_util.flatten_dict(out)
    for key, want in flax.traverse_util.flatten_dict(expected).items():
      np.testing.assert_allclose(np.asarray(flat_out[key]), want, rtol=1e-6, atol=1e-6)


def _t5x_params(num_experts=8):
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  layer = {"router": {"router_weights": {"w": {"kernel": normal(D_MODEL, num_experts)}}},
           "expert": {"wi": {"kernel": normal(num_experts, D_MODEL, D_FF)},
                      "wo": {"kernel": normal(num_experts, D_FF, D_MODEL)}}}
  return {"decoder": {"layers_0": {"mlp": layer}, "layers_2": {"mlp": copy.deepcopy(layer)}}}


def test_t5x_layout():
  params = _t5x_params()
  logits = {"decoder/" + name: h for name, h in _logits().items()}
  plan = pruning.plan_pruning(params, logits, 2, layout=model_lib.T5X_LAYOUT)
  out = pruning.apply_plan(params, plan)
  layer = out["decoder"]["layers_2"]["mlp"]
  assert layer["router"]["router_weights"]["w"]["kernel"].shape == (D_MODEL, 2)
  assert layer["expert"]["wi"]["kernel"].shape == (2, D_MODEL, D_FF)
  assert pruning.PrunePlan.from_json(plan.to_json()).layout == model_lib.T5X_LAYOUT
  with pytest.raises(ValueError, match="router/kernel"):
    pruning.plan_pruning(params, logits, 2)  # the default layout does not fit


def test_a_registered_method_runs_like_the_built_in_ones():
  def keep_last(inputs, name):
    e, d = inputs.layers[name].num_experts, inputs.targets[name]
    return methods.selection_grouping(np.arange(e - d, e), e)
  method = pruning.Method("keep_last_test", group=methods.per_layer(keep_last), merges=False,
                          needs_logits=False, default_router="anchor")
  pruning.register_method(method)
  try:
    params = _params()
    plan = pruning.plan_pruning(params, None, 3, method="keep_last_test")
    assert plan.router == "anchor"
    assert all(layer.anchors == (5, 6, 7) for layer in plan.layers.values())
    assert pruning.PrunePlan.from_json(plan.to_json()) == plan
    small = pruning.apply_plan(params, plan)
    np.testing.assert_array_equal(small["layers_0"]["mlp"]["router"]["kernel"],
                                  params["layers_0"]["mlp"]["router"]["kernel"][:, 5:])
    with pytest.raises(ValueError, match="already registered"):
      pruning.register_method(method)
  finally:
    del methods._REGISTRY["keep_last_test"]  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="method must be one of"):
    pruning.plan_pruning(params, None, 3, method="keep_last_test")


def test_pruned_config():
  plan = pruning.plan_pruning(_params(), _logits(), 4)  # MoE layers at blocks 0 and 2
  cfg = pruning.pruned_config(configs.get("tiny", num_layers=4, num_experts=8), plan)
  assert (cfg.num_experts, cfg.moe_layers) == (4, (0, 2))
  with pytest.raises(ValueError, match=r"the model config places them at \[0\]"):
    pruning.pruned_config(configs.get("tiny", num_layers=2, num_experts=8), plan)


def test_pruned_config_needs_top_k_kept_experts_in_every_layer():
  plan = pruning.plan_pruning(_params(), _logits(), {"layers_0/mlp": 3, "layers_2/mlp": 2})
  cfg = pruning.pruned_config(configs.get("tiny", num_layers=4, num_experts=8, top_k=2), plan)
  assert cfg.layer_num_experts == (3, 2)
  with pytest.raises(ValueError, match=r"\(3, 2\) has a layer with fewer experts than top_k=3"):
    pruning.pruned_config(configs.get("tiny", num_layers=4, num_experts=8, top_k=3), plan)


def _error(match, params=None, logits=None, num_experts=3, **kwargs):
  params = _params() if params is None else params
  logits = _logits() if logits is None else logits
  with pytest.raises((ValueError, TypeError), match=match):
    pruning.plan_pruning(params, logits, num_experts, **kwargs)


def test_errors_before_any_work():
  _error(r"in \[1, E=8\], got 0", num_experts=0)
  _error(r"in \[1, E=8\], got 9", num_experts=9)
  _error("missing", num_experts={"layers_0/mlp": 2})
  _error(r"missing \['layers_2/mlp'\]", logits={"layers_0/mlp": _logits()["layers_0/mlp"]})
  _error(r"extra \['layers_4/mlp'\]", logits={**_logits(), "layers_4/mlp": np.zeros((3, 8))})
  _error(r"\[tokens, E=8\]", logits={**_logits(), "layers_0/mlp": np.zeros((3, 7))})
  _error(r"\[tokens, E=8\]", logits={**_logits(), "layers_0/mlp": np.zeros((3, 2, 8))})
  bad = _logits()
  bad["layers_2/mlp"][3, 1] = np.nan
  _error("NaN or infinite", logits=bad)
  bad["layers_2/mlp"][3, 1] = np.inf
  _error("NaN or infinite", logits=bad)
  _error("no tokens", logits={**_logits(), "layers_0/mlp": np.zeros((0, 8))})
  _error("needs pretrained_params", method="router_norm")
  _error("pretrained_params is only used by methods that need it, not 'uncurl'",
         pretrained_params=_params())
  with pytest.raises(ValueError, match="needs router logits"):
    pruning.plan_pruning(_params(), None, 3, method="uncurl")
  _error("method must be one of", method="magic")
  _error("cluster must be one of", cluster="dbscan")
  _error("router must be one of", router="keep")
  _error("top_k", top_k=9)
  # Layout mismatches name the missing or undescribed path.
  params = _params()
  del params["layers_2"]["mlp"]["expert"]["wi"]["bias"]
  _error("layers_2/mlp/expert/wi/bias", params=params)
  params = _params()
  params["layers_0"]["mlp"]["expert"]["scale"] = np.ones(8)
  _error("layers_0/mlp/expert/scale", params=params)
  _error("no MoE layer found", params={"layers_0": {"mlp": {"wi": np.ones(3)}}})
  params = _params()
  params["layers_0"]["mlp"]["expert"]["wo"]["kernel"] = np.ones((8, D_FF, 5), np.float32)
  _error("wo_kernel has shape", params=params)
  with pytest.raises(ValueError, match="disagree on MoE layers"):
    plan = pruning.plan_pruning(_params(), _logits(), 3)
    pruning.apply_plan(_params(), dataclasses.replace(
        plan, layers={"layers_0/mlp": plan.layers["layers_0/mlp"]}))


def test_edited_plans_are_validated():
  plan = pruning.plan_pruning(_params(), _logits(), 3, method="uncurl")
  original = json.loads(plan.to_json())

  def load(edit):
    data = copy.deepcopy(original)
    edit(data, data["layers"]["layers_0/mlp"])
    return pruning.PrunePlan.from_json(json.dumps(data))

  def bump_weight(_, layer):
    layer["member_weights"][0] += 0.5

  def move_anchor(_, layer):
    layer["anchors"][0] = layer["anchors"][1]

  def bad_router(data, _):
    data["router"] = "keep"

  def bad_permutation(_, layer):
    layer["alignments"][0]["permutation"][0] = layer["alignments"][0]["permutation"][1]

  with pytest.raises(ValueError, match="sum to"):
    load(bump_weight)
  with pytest.raises(ValueError, match="repeat an expert"):
    load(move_anchor)
  with pytest.raises(ValueError, match="router must be one of"):
    load(bad_router)
  with pytest.raises(ValueError, match="not a permutation"):
    load(bad_permutation)
