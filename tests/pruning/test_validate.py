"""Bad input to the pruning API is refused before any work, with our own error types.

Each category of a probe of 93 bad inputs (bad logits, bad scalars, NaN weights, edited
plan JSON) is checked, and property-based tests draw random valid and invalid arguments
for `plan_pruning`, `apply_plan` and `PrunePlan.from_json`: valid ones give valid,
round-tripping plans and pruned trees; invalid ones raise only ValueError or TypeError.
"""

import copy
import dataclasses
import json
import re

from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import numpy as np
import pytest

from tests.pruning.test_plan import D_FF
from tests.pruning.test_plan import D_MODEL
from tests.pruning.test_plan import LAYERS
from tests.pruning.test_plan import _logits
from tests.pruning.test_plan import _params
from tests.pruning.test_plan import _task
from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.pruning import methods

CHECKED = (ValueError, TypeError)


def _refused(error, match, params=None, logits=None, num_experts=3, **kwargs):
  params = _params() if params is None else params
  logits = _logits() if logits is None else logits
  with pytest.raises(error, match=match):
    pruning.plan_pruning(params, logits, num_experts, **kwargs)


@pytest.mark.parametrize("make, error, match", [
    (lambda h: h > 0, TypeError, "real numbers, got dtype bool"),
    (lambda h: h.astype(np.complex64), TypeError, "got dtype complex64"),
    (lambda h: h.astype(str), TypeError, "got dtype <U"),
    (lambda h: np.where(h > 2, 1e39, h.astype(np.float64)), ValueError,
     r"values beyond float32's range \(\|x\| > 3.4e\+38\)"),
    (lambda h: [list(row) for row in h[:3]] + [[0.0]], ValueError, "ragged"),
    (lambda h: np.where(h > 2, np.nan, h), ValueError, "NaN or infinite"),
    (lambda h: h[None], ValueError, r"must be \[tokens, E=8\]"),
    (lambda h: h[:0], ValueError, "has no tokens"),
])
def test_bad_logits_are_refused(make, error, match):
  logits = _logits()
  logits["layers_2/mlp"] = make(logits["layers_2/mlp"])
  _refused(error, match, logits=logits)


def test_integer_logits_are_numbers():
  """Integer router logits are accepted and give the plan of the same logits as floats."""
  logits = {name: np.round(h * 4) for name, h in _logits().items()}
  as_ints = {name: h.astype(np.int64) for name, h in logits.items()}
  assert pruning.plan_pruning(_params(), as_ints, 3) == pruning.plan_pruning(
      _params(), logits, 3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seed=-1), ValueError, r"seed must be in \[0, inf\], got -1"),
    (dict(seed="1"), TypeError, "seed must be an int, got str"),
    (dict(seed=1.0), TypeError, "seed must be an int, got float"),
    (dict(router_init_std=-0.02), ValueError, "router_init_std must be a finite positive"),
    (dict(router_init_std="0.02"), TypeError, "router_init_std must be a real number"),
    (dict(router_init_std=float("inf")), ValueError, "finite positive"),
    (dict(top_k=True), TypeError, "top_k must be an int, got bool"),
    (dict(top_k=9), ValueError, r"top_k must be in \[1, E=8\]"),
    (dict(num_workers=-1), ValueError, "num_workers"),
    (dict(cluster="dbscan"), ValueError, "cluster must be one of"),
    (dict(router="keep"), ValueError, "router must be one of"),
    (dict(method=3), ValueError, "method must be one of"),
    (dict(layout="t5x"), TypeError, "layout must be a MoeLayout"),
    (dict(num_experts=2.0), TypeError, "must be an int, got float"),
    (dict(num_experts=True), TypeError, "must be an int, got bool"),
])
def test_bad_scalars_are_refused(kwargs, error, match):
  _refused(error, match, **kwargs)


@pytest.mark.parametrize("path, value", [
    (("layers_0", "mlp", "expert", "wi", "kernel"), np.nan),
    (("layers_2", "mlp", "expert", "wo", "bias"), -np.inf),
    (("layers_2", "mlp", "router", "kernel"), np.inf),
])
def test_non_finite_moe_weights_are_refused(path, value):
  params = _params()
  leaf = params
  for key in path[:-1]:
    leaf = leaf[key]
  leaf[path[-1]] = leaf[path[-1]].copy()
  leaf[path[-1]].flat[3] = value
  _refused(ValueError, r"(router_kernel|wi_kernel|wo_bias) of MoE layer '.*' has NaN or "
           r"infinite", params=params)
  plan = pruning.plan_pruning(_params(), _logits(), 3)
  with pytest.raises(ValueError, match="NaN or infinite"):
    pruning.apply_plan(params, plan)


def test_params_that_are_not_a_mapping_are_refused():
  _refused(TypeError, "params must be a mapping", params=[1, 2])
  with pytest.raises(TypeError, match="plan must be a PrunePlan"):
    pruning.apply_plan(_params(), {"method": "uncurl"})


def _uneven():
  """Params and logits of 8 experts in layers_0/mlp and 4 in the later layers_2/mlp."""
  params = _params(8)
  params["layers_2"] = _params(4)["layers_2"]
  return params, {"layers_0/mlp": _logits(8)["layers_0/mlp"],
                  "layers_2/mlp": _logits(4)["layers_2/mlp"]}


def test_top_k_is_bounded_by_the_fewest_experts_of_any_layer():
  params, logits = _uneven()
  plan = pruning.plan_pruning(params, logits, 2, top_k=4)
  assert plan.top_k == 4
  # Every token selects all 4 experts of layers_2; 4 of 8 in layers_0.
  np.testing.assert_allclose(plan.layers["layers_2/mlp"].frequencies, [1.0] * 4)
  np.testing.assert_allclose(sum(plan.layers["layers_0/mlp"].frequencies), 4.0)
  for top_k in (5, 8, 0):
    _refused(ValueError, rf"top_k must be in \[1, E=4\], got {top_k}", params=params,
             logits=logits, num_experts=2, top_k=top_k)


@pytest.mark.parametrize("field, shape, match", [
    ("top1_counts", (7,), r"\.top1_counts must be finite with shape \(8,\), got shape \(7,\)"),
    ("topk_counts", (8, 1), r"\.topk_counts must be finite with shape \(8,\), got shape \(8, 1\)"),
    ("reap", (9,), r"\.reap must be finite with shape \(8,\), got shape \(9,\)"),
    ("mean_output", (8, D_FF), rf"\.mean_output must be finite with shape \(8, {D_MODEL}\), got "
     rf"shape \(8, {D_FF}\)"),
    ("mean_output", (7, D_MODEL), rf"\.mean_output must be finite with shape \(8, {D_MODEL}\), "
     rf"got shape \(7, {D_MODEL}\)"),
    ("logits", (200, 7), r" must be \[tokens, E=8\], got shape \(200, 7\)"),
])
def test_expert_stats_of_another_shape_are_refused(field, shape, match):
  stats = _task("hc_smoe", _logits())
  stats["layers_2/mlp"] = dataclasses.replace(stats["layers_2/mlp"], **{field: np.ones(shape)})
  for method in ("hc_smoe", "reap"):
    _refused(ValueError, re.escape("logits['layers_2/mlp']") + match, logits=stats,
             method=method)


def _pretrained(d_model, num_experts, seed=7):
  """Params of `num_experts` experts of width `d_model` in layers_0/mlp and layers_2/mlp."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  layer = lambda: {"router": {"kernel": normal(d_model, num_experts)},
                   "expert": {"wi": {"kernel": normal(num_experts, d_model, D_FF),
                                     "bias": normal(num_experts, D_FF)},
                              "wo": {"kernel": normal(num_experts, D_FF, d_model),
                                     "bias": normal(num_experts, d_model)}}}
  return {"layers_0": {"mlp": layer()}, "layers_2": {"mlp": layer()}}


@pytest.mark.parametrize("d_model, num_experts", [(D_MODEL + 1, 8), (D_MODEL, 6)])
def test_a_pretrained_router_of_another_shape_is_refused(d_model, num_experts):
  pruning.plan_pruning(_params(), None, 3, method="router_norm",
                       pretrained_params=_pretrained(D_MODEL, 8))
  _refused(ValueError, rf"pretrained router of 'layers_0/mlp' has shape \({d_model}, "
           rf"{num_experts}\), finetuned \({D_MODEL}, 8\)", method="router_norm",
           pretrained_params=_pretrained(d_model, num_experts))


# ------------------------------------------------------------------------------------------
# Edited plans.


def _plan_json():
  return json.loads(pruning.plan_pruning(_params(), _logits(), 3, method="uncurl").to_json())


def _edit(path, value):
  data = _plan_json()
  target = data
  for key in path[:-1]:
    target = target[key]
  if value is KeyError:
    del target[path[-1]]
  else:
    target[path[-1]] = value
  return json.dumps(data)


LAYER = ("layers", "layers_0/mlp")


@pytest.mark.parametrize("path, value, error, match", [
    (LAYER + ("anchors", 0), -1, ValueError, r"not an expert in \[0, E=8\)"),
    (LAYER + ("anchors", 0), 8, ValueError, r"not an expert in \[0, E=8\)"),
    (LAYER + ("alignments", 0, "member"), -2, ValueError, r"member must be in \[0, inf\]"),
    (LAYER + ("alignments", 0, "member"), 11, ValueError, r"member 11 is not an expert"),
    (LAYER + ("alignments", 0, "reference"), 12, ValueError, r"reference 12 is not an expert"),
    (LAYER + ("num_experts",), 8.0, TypeError, "num_experts must be an int, got float"),
    (LAYER + ("labels", 1), 1.0, TypeError, r"labels\[1\] must be an int, got float"),
    (LAYER + ("labels",), "0,1", TypeError, "labels must be a sequence of ints"),
    (LAYER + ("member_weights", 0), "x", TypeError, r"member_weights\[0\] must be a real"),
    (LAYER + ("frequencies", 2), float("nan"), ValueError, "finite"),
    (LAYER + ("alignments", 0, "permutation", 0), 99, ValueError, "not a permutation"),
    (LAYER + ("num_experts",), KeyError, ValueError, r"missing fields \['num_experts'\]"),
    (("method",), KeyError, ValueError, r"missing fields \['method'\]"),
    (("extra",), 1, ValueError, r"unknown fields \['extra'\]"),
    (("seed",), "1", TypeError, "PrunePlan.seed must be an int, got str"),
    (("seed",), -3, ValueError, r"PrunePlan.seed must be in \[0, inf\]"),
    (("router_init_std",), 0, ValueError, "finite positive"),
    (("top_k",), 0, ValueError, "top_k must be in"),
    (("cluster",), "dbscan", ValueError, "cluster must be one of"),
    (("layers",), {}, ValueError, "non-empty"),
    (("layout", "wi_kernell"), "expert/wi/kernel", ValueError,
     r"PrunePlan.layout: missing fields \[\], unknown fields \['wi_kernell'\]"),
])
def test_edited_plan_json_is_checked_against_the_schema(path, value, error, match):
  with pytest.raises(error, match=match):
    pruning.PrunePlan.from_json(_edit(path, value))


def test_a_member_aligned_twice_and_text_that_is_not_json_are_refused():
  data = _plan_json()
  alignments = data["layers"]["layers_0/mlp"]["alignments"]
  alignments.append(copy.deepcopy(alignments[0]))
  with pytest.raises(ValueError, match=f"expert {alignments[0]['member']} is aligned twice"):
    pruning.PrunePlan.from_json(json.dumps(data))
  with pytest.raises(ValueError, match="the text is not JSON"):
    pruning.PrunePlan.from_json("{'method': 'uncurl'}")
  with pytest.raises(TypeError, match="needs JSON text"):
    pruning.PrunePlan.from_json(None)


# ------------------------------------------------------------------------------------------
# What the pruned tree holds.


def _with_router_bias(params, scale=1.0):
  params = copy.deepcopy(params)
  for name in LAYERS:
    router = params[name.split("/")[0]]["mlp"]["router"]
    router["bias"] = scale * np.arange(8, dtype=np.float32)
  return params


@pytest.mark.parametrize("router", pruning.ROUTER_MODES)
def test_router_bias_is_pruned_with_its_kernel(router):
  params = _with_router_bias(_params())
  layout = dataclasses.replace(model_lib.DEFAULT_LAYOUT, router_bias="router/bias")
  plan = pruning.plan_pruning(params, _logits(), 3, method="uncurl", router=router,
                              layout=layout)
  out = pruning.apply_plan(params, plan)
  for name, layer_plan in plan.layers.items():
    bias = out[name.split("/")[0]]["mlp"]["router"]["bias"]
    if router == "bind":  # the whole router stays: E columns, each bound to an expert
      np.testing.assert_array_equal(bias, np.arange(8, dtype=np.float32))
      continue
    assert bias.shape == (3,)
    expected = {"reinit": np.zeros(3),
                "anchor": np.asarray(layer_plan.anchors, np.float32),
                "merge": layer_plan.merge_matrix() @ np.arange(8)}[router]
    np.testing.assert_allclose(bias, expected, rtol=1e-6, atol=1e-6)


def test_leaves_outside_moe_layers_are_the_same_objects():
  params = _params()
  out = pruning.prune_params(params, _logits(), 3)
  assert out["token_embed"]["embedding"] is params["token_embed"]["embedding"]
  assert out["layers_1"]["mlp"]["wi"]["kernel"] is params["layers_1"]["mlp"]["wi"]["kernel"]


@pytest.mark.parametrize("method", [m for m in pruning.METHODS
                                    if not methods.get(m).needs_selection])
def test_router_none_takes_each_methods_default(method):
  kwargs = {"pretrained_params": _params(seed=7)} if method == "router_norm" else {}
  plan = pruning.plan_pruning(_params(), _task(method, _logits()), 3, method=method, **kwargs)
  assert plan.router == methods.get(method).default_router
  assert plan.router == ("reinit" if methods.get(method).merges else "anchor")


def test_a_group_never_selected_is_averaged_uniformly():
  labels = np.array([0, 0, 1, 1, 1, -1])
  frequencies = np.array([0.0, 0.0, 0.2, 0.3, 0.5, 0.0])
  weights = methods.merge_weights(labels, frequencies)
  np.testing.assert_allclose(weights, [0.5, 0.5, 0.2, 0.3, 0.5, 0.0])
  np.testing.assert_allclose(methods.merge_weights(labels, None),
                             [0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 0.0])


# ------------------------------------------------------------------------------------------
# Property-based: random valid and invalid arguments.

_SETTINGS = settings(max_examples=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
_BAD_VALUES = [None, -1, 0, 2.5, "3", True, float("nan"), [1, 2], {"a": 1}, np.array([1.0])]


@_SETTINGS
@given(method=st.sampled_from([m for m in pruning.METHODS
                              if not methods.get(m).needs_selection]), target=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 60),
       router=st.sampled_from((None,) + pruning.ROUTER_MODES))
def test_random_valid_arguments_give_valid_round_tripping_plans(method, target, seed, tokens,
                                                                router):
  params = _params()
  logits = {name: h[:tokens] for name, h in _logits().items()}
  kwargs = {"pretrained_params": _params(seed=7)} if method == "router_norm" else {}
  plan = pruning.plan_pruning(params, _task(method, logits), target, method=method, seed=seed,
                              router=router, num_workers=0, **kwargs)
  assert pruning.PrunePlan.from_json(plan.to_json()) == plan
  out = pruning.apply_plan(params, plan)
  for name, count in plan.num_experts.items():
    layer = out[name.split("/")[0]]["mlp"]
    assert layer["expert"]["wi"]["kernel"].shape[0] == count
    assert layer["router"]["kernel"].shape[1] == (8 if plan.router == "bind" else count)
    assert np.all(np.isfinite(layer["expert"]["wo"]["kernel"]))
  if method != "mc_smoe":
    assert set(plan.num_experts.values()) == {target}


@_SETTINGS
@given(argument=st.sampled_from(["num_experts", "seed", "top_k", "router_init_std", "cluster",
                                 "router", "method", "num_workers", "logits"]),
       value=st.sampled_from(_BAD_VALUES))
def test_random_invalid_arguments_raise_only_our_errors(argument, value):
  kwargs = dict(num_experts=3, seed=0, top_k=1, router_init_std=0.02, cluster="spectral",
                router=None, method="uncurl", num_workers=0, logits=_logits())
  kwargs[argument] = value
  params = _params()
  try:
    plan = pruning.plan_pruning(params, **kwargs)
  except CHECKED:
    return
  # The few bad values that are valid for this argument (e.g. router=None) must work.
  pruning.apply_plan(params, plan)


@_SETTINGS
@given(data=st.data())
def test_random_plan_edits_are_refused_or_applied(data):
  plan = _plan_json()
  layer = plan["layers"][data.draw(st.sampled_from(LAYERS))]
  field = data.draw(st.sampled_from(["labels", "anchors", "member_weights", "frequencies",
                                     "num_experts"]))
  value = data.draw(st.sampled_from(_BAD_VALUES + [-1, 7, 8, 100]))
  if isinstance(layer[field], list):
    layer[field][data.draw(st.integers(0, len(layer[field]) - 1))] = value
  else:
    layer[field] = value
  try:
    edited = pruning.PrunePlan.from_json(json.dumps(plan))
  except CHECKED:
    return
  out = pruning.apply_plan(_params(), edited)  # an edit the schema accepts must apply
  assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(out))
