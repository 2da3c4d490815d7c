"""MaxText MoE trees in pruning: Mixtral, Qwen3-MoE and DeepSeek blocks, scanned and not.

MaxText's own modules need Python >= 3.12 and aqt, qwix and tokamax, which this project
does not install, so the trees are built by `uncurl_jax.maxtext.reference` (Flax modules
named, shaped and scanned as MaxText's). `EXPECTED_SHAPES` is the other side of that
claim: the paths and shapes of MaxText's checkpoints, written from MaxText's source
(commit e591f30cbbf217ed67ef71263ec0538239f9c3b8, version 0.2.4):
`src/maxtext/layers/moe.py` (`GateLogit`: kernel [emb, E], bias [E] when `routed_bias`;
`RoutedMoE`: wi_0, wi_1 [E, emb, mlp], wo [E, mlp, emb]; `RoutedAndSharedMoE`:
`MoeBlock_0` and `shared_experts`), `layers/decoders.py` (`scan_decoder_layers`:
`nn.scan(..., variable_axes={'params': param_scan_axis})` named `layers`, `dense_layers`,
`moe_layers`; unscanned `layers_{i}`, `dense_layers_{i}`, `moe_layers_{i}`), and the
converters `checkpoint_conversion/standalone_scripts/convert_qwen3_moe.py` (`gate/kernel`
transposed to [emb, L, E], experts [E, L, emb, mlp]) and
`convert_deepseek_family_ckpt.py` (`gate/bias` [E, L], `shared_experts/wi_0/kernel`
[emb, L, mlp]).

The forward passes are a numpy reference of MaxText's routed MoE (`_np_forward`), checked
once against the Flax modules' own (scanned, through `nn.scan`).
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.maxtext import reference as ref
from uncurl_jax.model import layout as layout_lib
from uncurl_jax.pruning import alignment as alignment_lib
from uncurl_jax.pruning import features as features_lib
from uncurl_jax.pruning import merge as merge_lib
from uncurl_jax.pruning import prune as prune_lib

E, L, EMB, MLP, SHARED = 8, 3, 16, 32, 24
MT = model_lib.MAXTEXT_LAYOUT
SCANNED = model_lib.MAXTEXT_SCANNED_LAYOUT


def _config(model, scan="axis1", **kwargs):
  return ref.MoeDecoderConfig(
      model=model, num_experts=kwargs.pop("num_experts", E), num_layers=L, emb_dim=EMB,
      moe_mlp_dim=MLP, shared_mlp_dim=SHARED, scan_layers=scan != "unscanned",
      param_scan_axis=0 if scan == "axis0" else 1, **kwargs)


def _flat(tree):
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


# MaxText's paths and shapes (module docstring) for E=8, L=3 (DeepSeek: 1 dense + 2 MoE
# layers), emb 16, mlp 32, shared/dense mlp 24, with param_scan_axis 1.
_DS = "moe_layers/DeepSeekMoeBlock_0"
EXPECTED_SHAPES = {
    "mixtral": {"layers/MoeBlock_0/gate/kernel": (EMB, L, E),
                "layers/MoeBlock_0/wi_0": (E, L, EMB, MLP),
                "layers/MoeBlock_0/wi_1": (E, L, EMB, MLP),
                "layers/MoeBlock_0/wo": (E, L, MLP, EMB)},
    "qwen3": {"layers/moe_block/gate/kernel": (EMB, L, E),
              "layers/moe_block/wi_0": (E, L, EMB, MLP),
              "layers/moe_block/wi_1": (E, L, EMB, MLP),
              "layers/moe_block/wo": (E, L, MLP, EMB)},
    "deepseek": {f"{_DS}/MoeBlock_0/gate/kernel": (EMB, L - 1, E),
                 f"{_DS}/MoeBlock_0/gate/bias": (E, L - 1),
                 f"{_DS}/MoeBlock_0/wi_0": (E, L - 1, EMB, MLP),
                 f"{_DS}/MoeBlock_0/wi_1": (E, L - 1, EMB, MLP),
                 f"{_DS}/MoeBlock_0/wo": (E, L - 1, MLP, EMB),
                 f"{_DS}/shared_experts/wi_0/kernel": (EMB, L - 1, SHARED),
                 f"{_DS}/shared_experts/wi_1/kernel": (EMB, L - 1, SHARED),
                 f"{_DS}/shared_experts/wo/kernel": (SHARED, L - 1, EMB),
                 "dense_layers/mlp/wi_0/kernel": (EMB, 1, SHARED),
                 "dense_layers/mlp/wo/kernel": (SHARED, 1, EMB)},
}


def _unscanned_expected(model):
  """The same parameters per layer (`layers_{i}`, `dense_layers_{i}`, `moe_layers_{i}`):
  the scanned shapes without their layer axis 1."""
  out = {}
  for path, shape in EXPECTED_SHAPES[model].items():
    group, rest = path.split("/", 1)
    for i in range(shape[1]):
      out[f"{group}_{i}/{rest}"] = shape[:1] + shape[2:]
  return out


@pytest.mark.parametrize("model", ref.MODELS)
def test_the_reference_trees_have_maxtexts_paths_and_shapes(model):
  routed_bias = model == "deepseek"
  scanned = _flat(ref.init_params(_config(model, routed_bias=routed_bias))["decoder"])
  for path, shape in EXPECTED_SHAPES[model].items():
    assert scanned[path].shape == shape, path
  unscanned = _flat(ref.init_params(_config(model, "unscanned",
                                            routed_bias=routed_bias))["decoder"])
  for path, shape in _unscanned_expected(model).items():
    assert unscanned[path].shape == shape, path
  axis0 = _flat(ref.init_params(_config(model, "axis0", routed_bias=routed_bias))["decoder"])
  for path, shape in EXPECTED_SHAPES[model].items():  # the layer axis moved to the front
    assert axis0[path].shape == (shape[1], shape[0]) + shape[2:], path


# ------------------------------------------------------------------------------------------
# detect_layout.

SCAN_FORMS = ("axis1", "axis0", "unscanned")


def _full(layout, **biases):
  return dataclasses.replace(layout, **biases)


@pytest.mark.parametrize("model", ref.MODELS)
@pytest.mark.parametrize("scan", SCAN_FORMS)
@pytest.mark.parametrize("routed_bias,mlp_bias", [(False, False), (True, False), (True, True)])
def test_detect_layout_names_every_maxtext_tree(model, scan, routed_bias, mlp_bias):
  params = ref.init_params(_config(model, scan, routed_bias=routed_bias, mlp_bias=mlp_bias))
  want = {"axis1": SCANNED, "axis0": dataclasses.replace(SCANNED, scan_axis=0),
          "unscanned": MT}[scan]
  want = dataclasses.replace(
      want, router_bias="gate/bias" if routed_bias else None,
      **(dict(gate_bias="wi_0_bias", wi_bias="wi_1_bias", wo_bias="wo_bias") if mlp_bias
         else {}))
  assert model_lib.detect_layout(params) == want
  # ... also from shapes alone (a checkpoint's metadata), as it reads the layers' names.
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  assert model_lib.detect_layout(shapes) == want
  block = "decoder/" + {"mixtral": "layers{}/MoeBlock_0", "qwen3": "layers{}/moe_block",
                        "deepseek": "moe_layers{}/DeepSeekMoeBlock_0/MoeBlock_0"}[model]
  num_moe = L - 1 if model == "deepseek" else L
  names = ([f"{block.format('')}[{i}]" for i in range(num_moe)] if scan != "unscanned"
           else [block.format(f"_{i}") for i in range(num_moe)])
  assert model_lib.expert_counts(params, want) == {name: E for name in names}
  layers = model_lib.find_moe_layers(params, want)
  assert list(layers) == names
  assert layers[names[1]].wi_kernel.shape == (E, EMB, MLP)


def test_scanned_layers_are_views_of_the_stacked_arrays():
  params = ref.init_params(_config("deepseek", routed_bias=True))
  block = params["decoder"]["moe_layers"]["DeepSeekMoeBlock_0"]["MoeBlock_0"]
  layers = model_lib.find_moe_layers(params, model_lib.detect_layout(params))
  layer = layers[f"decoder/{_DS}/MoeBlock_0[1]"]
  np.testing.assert_array_equal(layer.router_kernel, block["gate"]["kernel"][:, 1])
  np.testing.assert_array_equal(layer.router_bias, block["gate"]["bias"][:, 1])
  np.testing.assert_array_equal(layer.wo_kernel, block["wo"][:, 1])
  assert np.shares_memory(layer.gate_kernel, block["wi_0"])


def test_a_scanned_layout_reads_an_unscanned_block_beside_scanned_ones():
  """DeepSeek's multi-token-prediction block stays unscanned when the decoder is scanned
  (convert_deepseek_family_ckpt.py: `mtp_block.mtp_layer_1.mtp_1_transformer_layer.
  DeepSeekMoeBlock_0.MoeBlock_0`)."""
  params = ref.init_params(_config("deepseek", routed_bias=True))
  unscanned = ref.init_params(_config("deepseek", "unscanned", routed_bias=True), seed=1)
  params["mtp_block"] = {"mtp_layer_1": {"mtp_1_transformer_layer": (
      unscanned["decoder"]["moe_layers_0"])}}
  layout = model_lib.detect_layout(params)
  assert layout == dataclasses.replace(SCANNED, router_bias="gate/bias")
  mtp = "mtp_block/mtp_layer_1/mtp_1_transformer_layer/DeepSeekMoeBlock_0/MoeBlock_0"
  assert list(model_lib.expert_counts(params, layout)) == [
      f"decoder/{_DS}/MoeBlock_0[0]", f"decoder/{_DS}/MoeBlock_0[1]", mtp]
  small = pruning.prune_params(params, _random_logits(params, layout), 3, layout=layout,
                               method="frequency")
  assert set(model_lib.expert_counts(small, layout).values()) == {3}
  assert small["mtp_block"]["mtp_layer_1"]["mtp_1_transformer_layer"]["DeepSeekMoeBlock_0"][
      "MoeBlock_0"]["wi_0"].shape == (3, EMB, MLP)


# ------------------------------------------------------------------------------------------
# The numpy reference of MaxText's routed MoE decoder.


def _rms(x, scale):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def _silu(h):
  return h / (1 + np.exp(-h))


def _np_moe(cfg, block, x):
  """MaxText's routed MoE on tokens x [T, emb] (dropless): (output, selected [T, k])."""
  logits = x @ block["gate"]["kernel"]
  bias = block["gate"].get("bias")
  k = cfg.num_experts_per_tok
  if cfg.model == "deepseek":
    scores = 1 / (1 + np.exp(-logits))
    chosen = np.argsort(-(scores if bias is None else scores + bias), -1, kind="stable")[:, :k]
    weights = np.take_along_axis(scores, chosen, -1)
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
  else:
    selection = logits if bias is None else logits + bias
    chosen = np.argsort(-selection, -1, kind="stable")[:, :k]
    top = np.take_along_axis(selection, chosen, -1)
    weights = np.exp(top - top.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
  zero = lambda name, shape: block.get(name, np.zeros(shape))
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for e, g in zip(chosen[t], weights[t]):
      hidden = (_silu(x[t] @ block["wi_0"][e] + zero("wi_0_bias", (len(chosen), 1))[e])
                * (x[t] @ block["wi_1"][e] + zero("wi_1_bias", (len(chosen), 1))[e]))
      y[t] += g * (hidden @ block["wo"][e] + zero("wo_bias", (len(chosen), 1))[e])
  return y, chosen


def _np_mlp(mlp, x):
  return (_silu(x @ mlp["wi_0"]["kernel"]) * (x @ mlp["wi_1"]["kernel"])) @ mlp["wo"]["kernel"]


def _np_forward(cfg, params, x, inputs=None):
  """The decoder in float64 numpy, layer by layer (a scanned group sliced on its scan
  axis): (output, {routed block path: [L, T, k] chosen experts}). `inputs`, if given,
  receives {MoE layer name: the routed block's input [T, emb]}."""
  decoder = jax.tree.map(lambda a: np.asarray(a, np.float64), params["decoder"])
  groups = ([("dense_layers", "dense", cfg.first_num_dense_layers),
             ("moe_layers", "deepseek", cfg.num_moe_layers)] if cfg.model == "deepseek"
            else [("layers", cfg.model, cfg.num_layers)])
  chosen = {}
  x = np.asarray(x, np.float64)
  for prefix, kind, length in groups:
    for i in range(length):
      if cfg.scan_layers:
        layer = jax.tree.map(lambda a: np.take(a, i, cfg.param_scan_axis), decoder[prefix])
      else:
        layer = decoder[f"{prefix}_{i}"]
      h = _rms(x, layer["post_self_attention_layer_norm"]["scale"])
      if kind == "dense":
        x = x + _np_mlp(layer["mlp"], h)
        continue
      block_name = ref.BLOCK_NAMES[kind].split("/")[0]
      block = layer[block_name]
      routed = block["MoeBlock_0"] if kind == "deepseek" else block
      out, picked = _np_moe(cfg, routed, h)
      if kind == "deepseek":
        out = out + _np_mlp(block["shared_experts"], h)
      path = (f"decoder/{prefix}/{ref.BLOCK_NAMES[kind]}" if cfg.scan_layers
              else f"decoder/{prefix}_{i}/{ref.BLOCK_NAMES[kind]}")
      chosen.setdefault(path, []).append(picked)
      if inputs is not None:
        inputs[f"{path}[{i}]" if cfg.scan_layers else path] = h
      x = x + out
  return _rms(x, decoder["decoder_norm"]["scale"]), {k: np.stack(v) for k, v in chosen.items()}


def test_the_numpy_reference_equals_the_scanned_flax_modules():
  cfg = _config("deepseek", routed_bias=True, mlp_bias=True)
  params = ref.init_params(cfg)
  x = np.random.default_rng(0).normal(size=(6, EMB)).astype(np.float32)
  y, logits = ref.forward(cfg, params, x)
  want, _ = _np_forward(cfg, params, x)
  np.testing.assert_allclose(y, want, rtol=2e-4, atol=2e-5)
  assert logits[f"decoder/{_DS}/MoeBlock_0"].shape == (L - 1, 6, E)


# ------------------------------------------------------------------------------------------
# Pruning: the invariants.


def _random_logits(params, layout, tokens=120, seed=1):
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=(tokens, e)).astype(np.float32)
          for name, e in model_lib.expert_counts(params, layout).items()}


def _assert_trees_equal(a, b):
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=key)


@pytest.mark.parametrize("model", ref.MODELS)
@pytest.mark.parametrize("scan", SCAN_FORMS)
def test_pruning_to_e_experts_is_the_identity(model, scan):
  params = ref.init_params(_config(model, scan, routed_bias=True, mlp_bias=model == "qwen3"))
  layout = model_lib.detect_layout(params)
  logits = _random_logits(params, layout)
  for method, router in (("uncurl", "merge"), ("frequency", "anchor"), ("random", "merge")):
    out = pruning.prune_params(params, logits, E, method=method, router=router,
                               layout=layout)
    _assert_trees_equal(out, params)


def _permuted_copies(params, layout, rng):
  """Every layer: experts 1, 2 hidden-unit permutations of expert 0, experts 4, 5 of 3
  (all their weights and biases), written through the layers' views into the scanned
  arrays; logits that cluster {0, 1, 2} and {3, 4, 5} with 0 and 3 chosen most."""
  layers = model_lib.find_moe_layers(params, layout)
  hidden = ("gate_kernel", "wi_kernel", "wo_kernel", "gate_bias", "wi_bias")
  axes = {"gate_kernel": 1, "wi_kernel": 1, "wo_kernel": 0, "gate_bias": 0, "wi_bias": 0}
  logits = {}
  for name, layer in layers.items():
    for anchor in (0, 3):
      for member in (anchor + 1, anchor + 2):
        perm = rng.permutation(MLP)
        for field in hidden:
          array = getattr(layer, field)
          if array is not None:
            array[member] = np.take(array[anchor], perm, axes[field])
        if layer.wo_bias is not None:
          layer.wo_bias[member] = layer.wo_bias[anchor]
    profiles = rng.normal(size=(400, 2)) * 3
    boost = np.array([0, 0, 1, 2])[np.arange(400) % 4]
    logits[name] = np.stack([profiles[:, e // 3] + 0.05 * rng.normal(size=400)
                             + 0.5 * (boost == e % 3) for e in range(6)], 1).astype(np.float32)
  return layers, logits


@pytest.mark.parametrize("model,scan", [("mixtral", "axis1"), ("qwen3", "axis0"),
                                        ("deepseek", "axis1"), ("deepseek", "unscanned")])
def test_permuted_copies_merge_back_exactly_and_the_routed_bias_merges_with_the_router(
    model, scan):
  params = ref.init_params(_config(model, scan, num_experts=6, routed_bias=True,
                                   mlp_bias=True))
  layout = model_lib.detect_layout(params)
  source, logits = _permuted_copies(params, layout, np.random.default_rng(3))
  source = {name: jax.tree.map(np.copy, dataclasses.asdict(layer))
            for name, layer in source.items()}
  plan = pruning.plan_pruning(params, logits, 2, layout=layout, router="merge")
  merged = model_lib.find_moe_layers(pruning.apply_plan(params, plan), layout)
  anchored = model_lib.find_moe_layers(
      pruning.apply_plan(params, dataclasses.replace(plan, router="anchor")), layout)
  assert list(merged) == list(source)
  for name, layer_plan in plan.layers.items():
    assert layer_plan.clusters() == [[0, 1, 2], [3, 4, 5]]
    assert layer_plan.anchors == (0, 3)
    m = layer_plan.merge_matrix()
    for new, anchor in enumerate((0, 3)):
      for field in ("gate_kernel", "gate_bias", "wi_kernel", "wi_bias", "wo_kernel", "wo_bias"):
        np.testing.assert_allclose(getattr(merged[name], field)[new],
                                   source[name][field][anchor], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name} {field}")
    # The router and its routed bias: the merge-weighted mean of the members' columns ...
    np.testing.assert_allclose(merged[name].router_kernel, source[name]["router_kernel"] @ m.T,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged[name].router_bias, m @ source[name]["router_bias"],
                               rtol=1e-5, atol=1e-6)
    # ... or the anchors' columns.
    np.testing.assert_array_equal(anchored[name].router_kernel,
                                  source[name]["router_kernel"][:, [0, 3]])
    np.testing.assert_array_equal(anchored[name].router_bias,
                                  source[name]["router_bias"][[0, 3]])


def _never_chosen(cfg, params, rng, kept):
  """Makes the experts outside kept[l] of every MoE layer l never chosen: for DeepSeek by
  the routed bias (its selection adds it), else by the router row of feature 0 (kept +5,
  others -5) with tokens whose feature 0 stays 4 (no layer writes it). Returns tokens."""
  layout = model_lib.detect_layout(params)
  for i, layer in enumerate(model_lib.find_moe_layers(params, layout).values()):
    dropped = np.setdiff1d(np.arange(cfg.num_experts), kept[i])
    if cfg.model == "deepseek":
      layer.router_bias[dropped] = -10.0
    else:
      layer.router_kernel[0, kept[i]] = 5.0
      layer.router_kernel[0, dropped] = -5.0
  for path, leaf in flax.traverse_util.flatten_dict(params["decoder"]).items():
    if path[-1] in ("wo", "wo_bias") or path[-2:] == ("wo", "kernel"):  # every layer output
      leaf[..., 0] = 0
  x = rng.normal(size=(48, EMB)).astype(np.float32)
  x[:, 0] = 4.0
  return x


@pytest.mark.parametrize("model,scan", [("mixtral", "axis1"), ("qwen3", "axis0"),
                                        ("deepseek", "axis1"), ("mixtral", "unscanned")])
def test_the_pruned_scanned_decoder_computes_what_the_unpruned_did(model, scan):
  """Each MoE layer's tokens only ever choose 4 of its 8 experts (different ones per
  layer); frequency pruning to 4 on the layers' own selection values, with the router
  sliced, must leave the decoder's output unchanged."""
  cfg = _config(model, scan, routed_bias=model == "deepseek", mlp_bias=True)
  params = ref.init_params(cfg)
  rng = np.random.default_rng(7)
  kept = [np.sort(rng.choice(E, 4, replace=False)) for _ in range(cfg.num_moe_layers)]
  x = _never_chosen(cfg, params, rng, kept)
  want, chosen = _np_forward(cfg, params, x)
  picked = np.concatenate([c.reshape(-1, *c.shape[-2:]) for c in chosen.values()])
  for i, per_layer in enumerate(picked):
    assert set(per_layer.ravel()) <= set(kept[i])  # the premise
  layout = model_lib.detect_layout(params)
  # The values each layer selects by: gate logits (DeepSeek: sigmoid scores + routed bias),
  # given per scanned block as one [L, T, E] array.
  selection = _selection_values(cfg, params, layout, x)
  plan = pruning.plan_pruning(params, selection, 4, method="frequency", router="anchor",
                              top_k=cfg.num_experts_per_tok, layout=layout)
  small = pruning.apply_plan(params, plan)
  small_cfg = dataclasses.replace(cfg, num_experts=4)
  got, _ = _np_forward(small_cfg, small, x)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
  sources = model_lib.find_moe_layers(params, layout)
  for i, (name, layer) in enumerate(model_lib.find_moe_layers(small, layout).items()):
    anchors = list(plan.layers[name].anchors)  # every chosen expert, in its old order
    assert set(picked[i].ravel()) <= set(anchors)
    np.testing.assert_array_equal(layer.gate_kernel, sources[name].gate_kernel[anchors])
    np.testing.assert_array_equal(layer.wo_bias, sources[name].wo_bias[anchors])


def _selection_values(cfg, params, layout, x):
  """Per MoE layer the [T, E] values its router selects by, on the layer's own inputs
  (gate logits; DeepSeek: sigmoid scores + routed bias); a scanned block's as one
  [L, T, E] array keyed by the block."""
  inputs = {}
  _np_forward(cfg, params, x, inputs)
  values = {}
  for name, layer in model_lib.find_moe_layers(params, layout).items():
    logits = inputs[name] @ np.asarray(layer.router_kernel, np.float64)
    if cfg.model == "deepseek":
      logits = 1 / (1 + np.exp(-logits)) + np.asarray(layer.router_bias, np.float64)
    block, index = layout_lib.split_scanned_name(name)
    values.setdefault(block, []).append(logits.astype(np.float32))
  return {block: np.stack(v) if cfg.scan_layers else v[0] for block, v in values.items()}


def test_scanned_jax_arrays_give_the_numpy_result_as_jax_arrays():
  params = ref.init_params(_config("deepseek", routed_bias=True))
  layout = model_lib.detect_layout(params)
  logits = _random_logits(params, layout)
  plan = pruning.plan_pruning(params, logits, 3, layout=layout, router="merge", seed=2)
  want = pruning.apply_plan(params, plan)
  got = pruning.apply_plan(jax.tree.map(jnp.asarray, params), plan)
  block = got["decoder"]["moe_layers"]["DeepSeekMoeBlock_0"]["MoeBlock_0"]
  assert isinstance(block["wi_0"], jax.Array) and block["wi_0"].shape == (3, L - 1, EMB, MLP)
  for key, value in _flat(want).items():
    np.testing.assert_allclose(np.asarray(_flat(got)[key]), value, rtol=1e-6, atol=1e-6,
                               err_msg=key)


def test_a_scanned_plan_survives_json_and_a_block_may_name_its_layers_count():
  params = ref.init_params(_config("qwen3"))
  layout = model_lib.detect_layout(params)
  block = "decoder/layers/moe_block"
  logits = {block: np.random.default_rng(0).normal(size=(L, 90, E)).astype(np.float32)}
  plan = pruning.plan_pruning(params, logits, {block: 5}, layout=layout)
  assert plan.num_experts == {f"{block}[{i}]": 5 for i in range(L)}
  again = pruning.PrunePlan.from_json(plan.to_json())
  assert again == plan and again.layout.scan_axis == 1
  _assert_trees_equal(pruning.apply_plan(params, again), pruning.apply_plan(params, plan))
  # The [L, T, E] array is the per-layer entries stacked.
  per_layer = {f"{block}[{i}]": logits[block][i] for i in range(L)}
  assert pruning.plan_pruning(params, per_layer, 5, layout=layout) == plan


# ------------------------------------------------------------------------------------------
# Refusals, before any work.


class WorkStarted(Exception):
  pass


@pytest.fixture
def no_work(monkeypatch):
  def boom(*args, **kwargs):
    raise WorkStarted("work started before the input was refused")
  monkeypatch.setattr(features_lib, "selection_frequencies", boom)
  monkeypatch.setattr(prune_lib, "_alignments", boom)
  monkeypatch.setattr(alignment_lib, "align_experts", boom)
  monkeypatch.setattr(prune_lib, "_pruned_layer", boom)
  monkeypatch.setattr(merge_lib, "merge_experts", boom)


BLOCK = "decoder/layers/MoeBlock_0"


def _scanned():
  params = ref.init_params(_config("mixtral"))
  layout = model_lib.detect_layout(params)
  return params, layout, _random_logits(params, layout)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: dict(a, num_experts={f"{BLOCK}[0]": 2, f"{BLOCK}[1]": 3, f"{BLOCK}[2]": 3}),
     ValueError, r"num_experts keeps uneven expert counts in the scanned block "
     r"'decoder/layers/MoeBlock_0': \{'decoder/layers/MoeBlock_0\[0\]': 2, "),
    (lambda a: dict(a, num_experts={BLOCK: 2, f"{BLOCK}[1]": 2}), ValueError,
     r"num_experts has the scanned block 'decoder/layers/MoeBlock_0' and also its layers"),
    (lambda a: dict(a, method="mc_smoe"), ValueError,
     r"method 'mc_smoe' keeps a different number of experts in each layer, which the "
     r"scanned blocks \['decoder/layers/MoeBlock_0'\] cannot hold"),
    (lambda a: dict(a, logits=None, method="selection", num_experts=None, selection={
        f"{BLOCK}[0]": [0, 1], f"{BLOCK}[1]": [0, 1, 2], f"{BLOCK}[2]": [3, 4]}),
     ValueError, r"num_experts keeps uneven expert counts in the scanned block"),
    (lambda a: dict(a, logits={BLOCK: np.zeros((L - 1, 50, E), np.float32)}), ValueError,
     r"logits\['decoder/layers/MoeBlock_0'\] of the scanned block must be \[L=3, tokens, E\]"
     r" \(the router logits of its layers in order\), got shape \(2, 50, 8\)"),
    (lambda a: dict(a, logits={BLOCK: np.zeros((50, E), np.float32)}), ValueError,
     r"must be \[L=3, tokens, E\] .*got shape \(50, 8\)"),
    (lambda a: dict(a, logits={BLOCK: np.zeros((L, 50, E), np.float32),
                               f"{BLOCK}[1]": np.zeros((50, E), np.float32)}), ValueError,
     r"logits has the scanned block 'decoder/layers/MoeBlock_0' \(\[L, tokens, E\]\) and "
     r"also its layers \['decoder/layers/MoeBlock_0\[1\]'\]"),
    (lambda a: dict(a, logits={BLOCK: np.zeros((L, 50, E - 1), np.float32)}), ValueError,
     r"logits\['decoder/layers/MoeBlock_0\[0\]'\] must be \[tokens, E=8\], got shape "
     r"\(50, 7\)"),
    (lambda a: dict(a, logits={k: v for k, v in a["logits"].items() if not k.endswith("[2]")}),
     ValueError, r"missing \['decoder/layers/MoeBlock_0\[2\]'\]"),
    (lambda a: dict(a, logits={BLOCK: features_lib.ExpertStats(
        logits=np.zeros((5, E)), top1_counts=np.zeros(E), topk_counts=np.zeros(E),
        reap=np.zeros(E), mean_output=np.zeros((E, EMB)), top_k=1)}), TypeError,
     r"logits\['decoder/layers/MoeBlock_0'\]: a scanned block takes one \[L=3, tokens, E\] "
     r"array; give ExpertStats per layer"),
    (lambda a: dict(a, layout=dataclasses.replace(a["layout"], scan_axis=0)), ValueError,
     r"scanned MoE block 'decoder/layers/MoeBlock_0': wi_kernel has shape \(8, 3, 16, 32\), "
     r"8 layers on the scan axis 0; the router kernel \(16, 3, 8\) has 16"),
])
def test_bad_scanned_input_is_refused_before_any_work(no_work, change, error, match):
  params, layout, logits = _scanned()
  args = change(dict(params=params, logits=logits, num_experts=2, layout=layout))
  with pytest.raises(error, match=match):
    pruning.plan_pruning(args.pop("params"), args.pop("logits"), args.pop("num_experts"),
                         **args)


def test_apply_plan_refuses_uneven_counts_in_a_scanned_block(monkeypatch):
  params, layout, logits = _scanned()
  two = pruning.plan_pruning(params, logits, 2, layout=layout, method="frequency")
  three = pruning.plan_pruning(params, logits, 3, layout=layout, method="frequency")
  mixed = dataclasses.replace(two, layers=dict(two.layers, **{
      f"{BLOCK}[1]": three.layers[f"{BLOCK}[1]"]}))
  monkeypatch.setattr(prune_lib, "_pruned_layer", lambda *a, **k: (_ for _ in ()).throw(
      WorkStarted("work started")))
  with pytest.raises(ValueError, match=r"the plan keeps uneven expert counts in the scanned "
                     r"block 'decoder/layers/MoeBlock_0': .*\[1\]': 3"):
    pruning.apply_plan(params, mixed)


@pytest.mark.parametrize("axis", [3, -1, True, 1.0])
def test_a_scan_axis_is_a_position_in_the_router_kernel(axis):
  with pytest.raises(ValueError, match="MoeLayout.scan_axis must be None, 0, 1 or 2"):
    dataclasses.replace(SCANNED, scan_axis=axis)


def test_a_scanned_weight_without_the_layer_axis_is_named():
  params, layout, _ = _scanned()
  block = params["decoder"]["layers"]["MoeBlock_0"]
  block["gate"]["bias"] = np.zeros((E,), np.float32)  # [E], not [E, L]
  with pytest.raises(ValueError, match=r"scanned MoE weight 'decoder/layers/MoeBlock_0/gate/"
                     r"bias' has shape \(8,\), no layer axis 1"):
    model_lib.find_moe_layers(params, dataclasses.replace(layout, router_bias="gate/bias"))
