"""Gated experts (flaxformer GeGLU, MaxText SwiGLU) in pruning, and `detect_layout`.

The trees are shaped as flaxformer's `MoeLayer` with `activations=('gelu', 'linear')` and
as MaxText's routed MoE block name and shape their parameters (docs/pruning.md). The
forward passes are numpy references of those layers: an expert is
`(act(x wi_0 + b_0) * (x wi_1 + b_1)) wo + b_o`, flaxformer weights the top-k experts by
their softmax probabilities, MaxText by a softmax over the k selected logits.
"""

import dataclasses

import flax
import numpy as np
import pytest

from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.pruning import alignment
from uncurl_jax.model import layout as layout_lib

D_MODEL, D_FF = 6, 10


def _normal(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


def _flaxformer_layer(rng, e, biases=False, router_bias=False):
  def dense(d_in, d_out):
    leaf = {"kernel": _normal(rng, e, d_in, d_out)}
    if biases:
      leaf["bias"] = _normal(rng, e, d_out)
    return leaf
  router = {"kernel": _normal(rng, D_MODEL, e)}
  if router_bias:
    router["bias"] = _normal(rng, e)
  return {"router": {"router_weights": {"w": router}},
          "expert": {"wi_0": dense(D_MODEL, D_FF), "wi_1": dense(D_MODEL, D_FF),
                     "wo": dense(D_FF, D_MODEL)}}


def flaxformer_params(e=8, seed=0, **kwargs):
  """A flaxformer decoder with GeGLU MoE blocks 0 and 2 and a dense block 1."""
  rng = np.random.default_rng(seed)
  return {"decoder": {
      "layers_0": {"mlp": _flaxformer_layer(rng, e, **kwargs)},
      "layers_1": {"mlp": {"wi_0": {"kernel": _normal(rng, D_MODEL, D_FF)},
                           "wi_1": {"kernel": _normal(rng, D_MODEL, D_FF)},
                           "wo": {"kernel": _normal(rng, D_FF, D_MODEL)}}},
      "layers_2": {"mlp": _flaxformer_layer(rng, e, **kwargs)}}}


def maxtext_params(e=8, seed=0, biases=False, routed_bias=False):
  """MaxText's unscanned decoder: layers_{i}/MoeBlock_0 with bare expert arrays."""
  rng = np.random.default_rng(seed)
  def block():
    out = {"gate": {"kernel": _normal(rng, D_MODEL, e)}, "wi_0": _normal(rng, e, D_MODEL, D_FF),
           "wi_1": _normal(rng, e, D_MODEL, D_FF), "wo": _normal(rng, e, D_FF, D_MODEL)}
    if routed_bias:
      out["gate"]["bias"] = _normal(rng, e)
    if biases:
      out.update(wi_0_bias=_normal(rng, e, D_FF), wi_1_bias=_normal(rng, e, D_FF),
                 wo_bias=_normal(rng, e, D_MODEL))
    return out
  decoder = {f"layers_{i}": {"MoeBlock_0": block(),
                             "self_attention": {"query": {"kernel": _normal(rng, D_MODEL, 2, 3)}}}
             for i in range(2)}
  decoder["decoder_norm"] = {"scale": np.ones(D_MODEL, np.float32)}
  return {"params": {"decoder": decoder}}


def _gelu(h):
  return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))


def _silu(h):
  return h / (1 + np.exp(-h))


def gated_moe(weights, x, top_k, act, renormalize):
  """numpy reference of a dropless gated MoE layer on tokens x [T, d]."""
  w = {k: (None if v is None else np.asarray(v, np.float64))
       for k, v in dataclasses.asdict(weights).items()}
  zero = lambda bias, e: 0.0 if bias is None else bias[e]
  logits = x @ w["router_kernel"] + (0.0 if w["router_bias"] is None else w["router_bias"])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  chosen = np.argsort(-logits, -1)[:, :top_k]
  y = np.zeros_like(x, np.float64)
  for t in range(x.shape[0]):
    gates = probs[t, chosen[t]]
    if renormalize:
      gates = gates / gates.sum()
    for e, g in zip(chosen[t], gates):
      hidden = (act(x[t] @ w["gate_kernel"][e] + zero(w["gate_bias"], e))
                * (x[t] @ w["wi_kernel"][e] + zero(w["wi_bias"], e)))
      y[t] += g * (hidden @ w["wo_kernel"][e] + zero(w["wo_bias"], e))
  return y


FORWARDS = {"flaxformer": dict(top_k=2, act=_gelu, renormalize=False),
            "maxtext": dict(top_k=2, act=_silu, renormalize=True)}
BUILDERS = {"flaxformer": flaxformer_params, "maxtext": maxtext_params}


def _logits(params, layout, tokens=300, seed=1):
  rng = np.random.default_rng(seed)
  return {name: _normal(rng, tokens, e)
          for name, e in layout_lib.expert_counts(params, layout).items()}


def _assert_trees_equal(a, b):
  flat_a, flat_b = (flax.traverse_util.flatten_dict(t) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]),
                                  err_msg=str(key))


@pytest.mark.parametrize("params,want", [
    (lambda: flaxformer_params(), model_lib.T5X_GATED_LAYOUT),
    (lambda: flaxformer_params(biases=True, router_bias=True), dataclasses.replace(
        model_lib.T5X_GATED_LAYOUT, router_bias="router/router_weights/w/bias",
        gate_bias="expert/wi_0/bias", wi_bias="expert/wi_1/bias", wo_bias="expert/wo/bias")),
    (lambda: maxtext_params(), model_lib.MAXTEXT_LAYOUT),
    (lambda: maxtext_params(biases=True, routed_bias=True), dataclasses.replace(
        model_lib.MAXTEXT_LAYOUT, router_bias="gate/bias", gate_bias="wi_0_bias",
        wi_bias="wi_1_bias", wo_bias="wo_bias")),
    (lambda: {"mlp": {"router": {"router_weights": {"w": {"kernel": np.zeros((4, 2))}}},
                      "expert": {"wi": {"kernel": np.zeros((2, 4, 3))},
                                 "wo": {"kernel": np.zeros((2, 3, 4))}}}},
     model_lib.T5X_LAYOUT),
    (lambda: {"mlp": {"router": {"kernel": np.zeros((4, 2))},
                      "expert": {"wi": {"kernel": np.zeros((2, 4, 3)), "bias": np.zeros((2, 3))},
                                 "wo": {"kernel": np.zeros((2, 3, 4)),
                                        "bias": np.zeros((2, 4))}}}},
     model_lib.DEFAULT_LAYOUT),
])
def test_detect_layout_finds_the_layout_of_each_known_tree(params, want):
  tree = params()
  assert model_lib.detect_layout(tree) == want
  model_lib.find_moe_layers(tree, want)


def test_detect_layout_lists_moe_like_paths_when_nothing_fits():
  hf_style = {"model": {"layers_0": {"block_sparse_moe": {
      "gate": {"weight": np.zeros((4, 6))},
      "experts": {"w1": np.zeros((4, 8, 6)), "w2": np.zeros((4, 6, 8))}}},
      "embed": np.zeros((10, 6))}}
  with pytest.raises(ValueError, match=r"block_sparse_moe/experts/w1 \(4, 8, 6\)") as error:
    model_lib.detect_layout(hf_style)
  assert "embed" not in str(error.value)
  # Scanned MaxText blocks are a known layout (tests/pruning/test_maxtext.py); one whose
  # weights disagree on the number of layers is not, and the message says why.
  scanned = maxtext_params()
  block = scanned["params"]["decoder"]["layers_0"]["MoeBlock_0"]
  block.update({k: np.stack([block[k]] * 3, 1) for k in ("wi_0", "wi_1")})
  block["wo"] = np.stack([block["wo"]] * 2, 1)
  block["gate"]["kernel"] = np.stack([block["gate"]["kernel"]] * 3, 1)
  with pytest.raises(ValueError, match=r"scanned layers(.|\n)*MAXTEXT_SCANNED_LAYOUT: scanned "
                     r"MoE block 'params/decoder/layers_0/MoeBlock_0': wo_kernel has shape "
                     r"\(8, 2, 10, 6\), 2 layers on the scan axis 1"):
    model_lib.detect_layout(scanned)


def test_gate_bias_needs_a_gate_kernel():
  with pytest.raises(ValueError, match="gate_bias"):
    model_lib.MoeLayout(gate_bias="expert/wi_0/bias")


def test_cost_matrix_includes_the_gate_projection():
  weights = model_lib.find_moe_layers(flaxformer_params(biases=True),
                                    model_lib.detect_layout(flaxformer_params(biases=True)))
  layer = weights["decoder/layers_0/mlp"]
  cost, norm_r, norm_m = alignment.matching_cost(layer, 2, 5)
  w = {k: np.asarray(v, np.float64) for k, v in dataclasses.asdict(layer).items()}
  want = (w["wi_kernel"][2].T @ w["wi_kernel"][5] + np.outer(w["wi_bias"][2], w["wi_bias"][5])
          + w["gate_kernel"][2].T @ w["gate_kernel"][5]
          + np.outer(w["gate_bias"][2], w["gate_bias"][5]) + w["wo_kernel"][2] @ w["wo_kernel"][5].T)
  np.testing.assert_allclose(cost, want, rtol=1e-5, atol=1e-5)
  hidden = lambda e: np.concatenate([w[k][e].ravel() for k in (
      "wi_kernel", "wi_bias", "gate_kernel", "gate_bias", "wo_kernel")])
  np.testing.assert_allclose([norm_r, norm_m],
                             [np.linalg.norm(hidden(2)), np.linalg.norm(hidden(5))], rtol=1e-5)


def _gated_permuted_copies(kind, layout):
  """6 experts in two groups of permuted copies of experts 0 and 3, told apart only by
  the gate: every hidden unit has the same up and down weights, so an alignment that
  ignored the gate could not find the permutations."""
  params = BUILDERS[kind](e=6, biases=True)
  layers = model_lib.find_moe_layers(params, layout)
  rng = np.random.default_rng(3)
  name = next(iter(layers))
  arrays = {f: getattr(layers[name], f) for f in ("gate_kernel", "gate_bias", "wi_kernel",
                                                  "wi_bias", "wo_kernel")}
  arrays["wi_kernel"][:] = arrays["wi_kernel"][:, :, :1]   # identical up columns
  arrays["wi_bias"][:] = arrays["wi_bias"][:, :1]
  arrays["wo_kernel"][:] = arrays["wo_kernel"][:, :1, :]   # identical down rows
  arrays["wo_bias"] = layers[name].wo_bias
  for anchor in (0, 3):
    for member in (anchor + 1, anchor + 2):
      perm = rng.permutation(D_FF)
      arrays["gate_kernel"][member] = arrays["gate_kernel"][anchor][:, perm]
      arrays["gate_bias"][member] = arrays["gate_bias"][anchor][perm]
      for field in ("wi_kernel", "wi_bias", "wo_kernel", "wo_bias"):
        arrays[field][member] = arrays[field][anchor]
  profiles = rng.normal(size=(400, 2)) * 3
  boost = np.array([0, 0, 1, 2])[np.arange(400) % 4]
  h = np.stack([profiles[:, e // 3] + 0.05 * rng.normal(size=400) + 0.5 * (boost == e % 3)
                for e in range(6)], 1).astype(np.float32)
  return params, {n: h for n in layers}, name


@pytest.mark.parametrize("kind", ["flaxformer", "maxtext"])
def test_permuted_gated_copies_merge_back_exactly(kind):
  params = BUILDERS[kind](e=6, biases=True)
  layout = model_lib.detect_layout(params)
  params, logits, name = _gated_permuted_copies(kind, layout)
  source = model_lib.find_moe_layers(params, layout)[name]
  plan = pruning.plan_pruning(params, logits, 2, layout=layout, router="merge")
  assert plan.layers[name].clusters() == [[0, 1, 2], [3, 4, 5]]
  assert all(a.score_after == pytest.approx(1.0, abs=1e-5) for a in plan.layers[name].alignments)
  merged = model_lib.find_moe_layers(pruning.apply_plan(params, plan), layout)[name]
  for new, anchor in enumerate((0, 3)):
    for field in ("gate_kernel", "gate_bias", "wi_kernel", "wi_bias", "wo_kernel", "wo_bias"):
      np.testing.assert_allclose(getattr(merged, field)[new], getattr(source, field)[anchor],
                                 rtol=1e-5, atol=1e-6, err_msg=field)


@pytest.mark.parametrize("kind", ["flaxformer", "maxtext"])
@pytest.mark.parametrize("method", ["uncurl", "frequency", "mc_smoe", "random"])
def test_pruning_gated_experts_to_e_is_the_identity(kind, method):
  params = BUILDERS[kind](biases=True)
  layout = model_lib.detect_layout(params)
  for router in ("anchor", "merge"):
    out = pruning.prune_params(params, _logits(params, layout), 8, method=method,
                               router=router, layout=layout)
    _assert_trees_equal(out, params)


@pytest.mark.parametrize("kind", ["flaxformer", "maxtext"])
def test_pruned_gated_tree_runs_and_keeps_the_kept_experts(kind):
  params = BUILDERS[kind]()
  layout = model_lib.detect_layout(params)
  logits = _logits(params, layout)
  plan = pruning.plan_pruning(params, logits, 3, layout=layout, method="frequency")
  small = pruning.apply_plan(params, plan)
  assert model_lib.expert_counts(small, layout) == {name: 3 for name in logits}
  x = np.random.default_rng(5).normal(size=(12, D_MODEL))
  for name, layer in model_lib.find_moe_layers(small, layout).items():
    assert layer.gate_kernel.shape == (3, D_MODEL, D_FF)
    y = gated_moe(layer, x, **FORWARDS[kind])
    assert y.shape == x.shape and np.all(np.isfinite(y))
    # Selection keeps whole experts: the pruned layer equals the source layer whose
    # router can choose only the kept experts.
    kept = np.asarray(plan.layers[name].anchors)
    source = model_lib.find_moe_layers(params, layout)[name]
    sliced = layout_lib.MoeLayerWeights(**{
        f: None if v is None else (v[:, kept] if f == "router_kernel" else v[kept])
        for f, v in dataclasses.asdict(source).items()})
    np.testing.assert_allclose(y, gated_moe(sliced, x, **FORWARDS[kind]), rtol=1e-6)


def test_gated_plan_round_trips_json():
  params = flaxformer_params()
  plan = pruning.plan_pruning(params, _logits(params, model_lib.T5X_GATED_LAYOUT), 2,
                              layout=model_lib.T5X_GATED_LAYOUT)
  again = pruning.PrunePlan.from_json(plan.to_json())
  assert again == plan and again.layout == model_lib.T5X_GATED_LAYOUT
