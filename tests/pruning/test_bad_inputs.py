"""The public pruning API refuses every kind of bad input before any work, naming the problem.

One table of bad calls, each with the exception type (ValueError or TypeError, never a raw
numpy/jax KeyError, IndexError or AttributeError) and a pattern the message must match: it
names the argument or field and what was expected. While a bad call runs, the first
step of real work (selection frequencies, alignment, merging, a forward pass, a score) is
replaced by a sentinel that raises `WorkStarted`, so a check that comes too late fails.
A shorter table of valid edge inputs must be accepted, each with a check of the result.
"""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.pruning.batches import padded_batches
from tests.pruning.test_plan import D_FF
from tests.pruning.test_plan import D_MODEL
from tests.pruning.test_plan import LAYERS
from tests.pruning.test_plan import _logits
from tests.pruning.test_plan import _params
from tests.pruning.test_plan import _stats
import uncurl_jax
from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.model import configs
from uncurl_jax.model import forward as forward_lib
from uncurl_jax.model.decoder import SMoEDecoder
from uncurl_jax.pruning import alignment as alignment_lib
from uncurl_jax.pruning import features as features_lib
from uncurl_jax.pruning import merge as merge_lib
from uncurl_jax.pruning import methods
from uncurl_jax.pruning import prune as prune_lib
from uncurl_jax.pruning import stats as stats_lib

E = 8  # experts per MoE layer of `_params()`
# A tiny SMoEDecoder for the collectors: blocks 0 and 2 are MoE.
CONFIG = configs.get("tiny", vocab_size=32, max_length=8, d_model=16, d_ff=16, num_heads=2,
                     num_layers=3, num_experts=4, dropless=True)
BATCH, LENGTH = 2, 8


class WorkStarted(Exception):
  """Raised by the sentinels: a bad input reached real work."""


def _boom(*args, **kwargs):
  raise WorkStarted("work started before the input was refused")


def _install_sentinels(monkeypatch):
  monkeypatch.setattr(features_lib, "selection_frequencies", _boom)
  monkeypatch.setattr(prune_lib, "_alignments", _boom)
  monkeypatch.setattr(alignment_lib, "align_experts", _boom)
  monkeypatch.setattr(prune_lib, "_pruned_layer", _boom)
  monkeypatch.setattr(merge_lib, "merge_experts", _boom)
  monkeypatch.setattr(forward_lib, "sown_forward", lambda *a, **k: _boom)
  monkeypatch.setattr(stats_lib, "layer_sums", _boom)


# ------------------------------------------------------------------------------------------
# Inputs.


@functools.cache
def _plan():
  """A valid plan of `_params()` (uncurl, 8 -> 3, with alignments)."""
  return pruning.plan_pruning(_params(), _logits(), 3, method="uncurl")


@functools.cache
def _model_params():
  shape = (BATCH, LENGTH)
  init = jax.jit(functools.partial(SMoEDecoder(CONFIG).init, enable_dropout=False))
  return jax.device_get(init(jax.random.key(0), jnp.ones(shape, jnp.int32),
                             jnp.ones(shape, jnp.int32))["params"])


def _batch(**changes):
  (batch,) = padded_batches(vocab_size=CONFIG.vocab_size, batch=BATCH, length=LENGTH,
                            num_batches=1, seed=0, min_length=3)
  batch.update(changes)
  return {k: v for k, v in batch.items() if v is not None}


def _with(tree, path, value):
  """A copy of the nested dict `tree` with `path` set to `value` (None deletes it)."""
  tree = flax.traverse_util.flatten_dict(tree)
  if value is None:
    del tree[path]
  else:
    tree[path] = value
  return flax.traverse_util.unflatten_dict(tree)


def _leaf(tree, path):
  return flax.traverse_util.flatten_dict(tree)[path]


def _set(array, index, value):
  array = np.array(array, dtype=np.float64 if abs(value) > 3e38 else None)
  array[index] = value
  return array


def _logits_with(name, value):
  logits = _logits()
  logits[name] = value(logits[name]) if callable(value) else value
  return logits


def _plan_pruning(params=None, logits=None, num_experts=3, **kwargs):
  return pruning.plan_pruning(_params() if params is None else params,
                              _logits() if logits is None else logits, num_experts, **kwargs)


def _prune(params=None, logits=None, num_experts=3, **kwargs):
  return pruning.prune_params(_params() if params is None else params,
                              _logits() if logits is None else logits, num_experts, **kwargs)


def _narrow_d_ff():
  """`_params()` with one hidden unit less per expert (d_ff 9, the plan permutes 10)."""
  params = _params()
  for name in LAYERS:
    expert = params[name.split("/")[0]]["mlp"]["expert"]
    expert["wi"] = {k: v[..., :-1] for k, v in expert["wi"].items()}
    expert["wo"] = {"kernel": expert["wo"]["kernel"][:, :-1], "bias": expert["wo"]["bias"]}
  return params


def _router_norm(pretrained):
  return _plan_pruning(method="router_norm", pretrained_params=pretrained)


def _select(selection, num_experts=None):
  return pruning.plan_pruning(_params(), None, num_experts, method="selection",
                              selection=selection)


def _greedy(score=None, num_experts=None, targets=None):
  score = _boom if score is None else score
  num_experts = {"a": 4, "b": 4} if num_experts is None else num_experts
  targets = {"a": 2, "b": 1} if targets is None else targets
  return pruning.greedy_selection(score, num_experts, targets)


COLLECTORS = {"router_logits": model_lib.collect_router_logits,
              "expert_stats": pruning.collect_expert_stats}


_DEFAULT = object()


def _collect(which, batches, params=_DEFAULT, model=_DEFAULT, **kwargs):
  return COLLECTORS[which](SMoEDecoder(CONFIG) if model is _DEFAULT else model,
                           _model_params() if params is _DEFAULT else params, batches,
                           progress=False, **kwargs)


# Paths of layers_0/mlp's weights in `_params()`.
ROUTER = ("layers_0", "mlp", "router", "kernel")
WI = ("layers_0", "mlp", "expert", "wi", "kernel")
WO = ("layers_0", "mlp", "expert", "wo", "kernel")
NAME0 = r"logits\['layers_0/mlp'\]"

# ------------------------------------------------------------------------------------------
# The bad calls: (id, call, exception, pattern naming the problem).

BAD = []


def bad(case_id, error, match, call):
  BAD.append(pytest.param(call, error, match, id=case_id))


# params (plan_pruning / prune_params)
bad("params-None", TypeError, "params must be a mapping, got NoneType",
    lambda: pruning.plan_pruning(None, _logits(), 3))
bad("params-str", TypeError, "params must be a mapping, got str",
    lambda: pruning.plan_pruning("params", _logits(), 3))
bad("params-list", TypeError, "params must be a mapping, got list",
    lambda: pruning.prune_params([_params()], _logits(), 3))
bad("params-empty", ValueError, "no MoE layer found",
    lambda: pruning.plan_pruning({}, _logits(), 3))
bad("params-no-moe-layer", ValueError, "no MoE layer found",
    lambda: pruning.plan_pruning({"layers_1": _params()["layers_1"]}, _logits(), 3))
bad("params-other-layout", ValueError, "no MoE layer found.*MoeLayout",
    lambda: _plan_pruning(layout=model_lib.layout.MAXTEXT_LAYOUT))
bad("params-moe-layer-missing-wo", ValueError, "MoE layer 'layers_0/mlp': layout names "
    "'expert/wo/kernel' .*params have no 'layers_0/mlp/expert/wo/kernel'",
    lambda: _plan_pruning(params=_with(_params(), WO, None)))
bad("params-expert-count-disagrees", ValueError, r"MoE layer 'layers_0/mlp': wi_kernel has "
    r"shape \(7, 6, 10\), expected \(8, 6, 10\)",
    lambda: _plan_pruning(params=_with(_params(), WI, np.ones((E - 1, D_MODEL, D_FF)))))
bad("params-nan-weight", ValueError, "wi_kernel of MoE layer 'layers_0/mlp' has NaN",
    lambda: _prune(params=_with(_params(), WI, _set(_leaf(_params(), WI), (0, 0, 0), np.nan))))
bad("params-inf-router", ValueError, "router_kernel of MoE layer 'layers_0/mlp' has NaN or inf",
    lambda: _prune(params=_with(_params(), ROUTER, np.full((D_MODEL, E), np.inf, np.float32))))
bad("params-str-router", TypeError, "MoE layer 'layers_0/mlp': router_kernel must be an array, "
    "got str", lambda: _plan_pruning(params=_with(_params(), ROUTER, "kernel")))
bad("params-list-wi", TypeError, "MoE weight 'layers_0/mlp/expert/wi/kernel' must be an array, "
    "got list", lambda: _plan_pruning(params=_with(_params(), WI, [[[0.0]]])))
bad("params-scalar-wi", ValueError, "MoE weight 'layers_0/mlp/expert/wi/kernel' must be an array "
    "of rank >= 1", lambda: _prune(params=_with(_params(), WI, np.float32(1))))
bad("params-router-rank-1", ValueError, r"MoE layer 'layers_0/mlp': router kernel must be "
    r"\[d, E\]", lambda: _prune(params=_with(_params(), ROUTER, np.ones(E, np.float32))))

# logits: the container
bad("logits-list", TypeError, r"logits must be a mapping \{layer path: .*\}, got list",
    lambda: _plan_pruning(logits=list(_logits().values())))
bad("logits-str", TypeError, "logits must be a mapping .*got str",
    lambda: _plan_pruning(logits="logits"))
bad("logits-array", TypeError, "logits must be a mapping .*got ndarray",
    lambda: _plan_pruning(logits=_logits()[LAYERS[0]]))
bad("logits-empty-dict", ValueError,
    r"logits must have one entry per MoE layer .*missing \['layers_0/mlp', 'layers_2/mlp'\]",
    lambda: _plan_pruning(logits={}))
bad("logits-missing-layer", ValueError, r"logits must have one entry .*missing \['layers_2/mlp'\]",
    lambda: _plan_pruning(logits={LAYERS[0]: _logits()[LAYERS[0]]}))
bad("logits-extra-layer", ValueError, r"logits must have one entry .*extra \['layers_1/mlp'\]",
    lambda: _plan_pruning(logits=dict(_logits(), **{"layers_1/mlp": _logits()[LAYERS[0]]})))
bad("logits-renamed-layer", ValueError, r"missing \['layers_2/mlp'\], extra \['layers_3/mlp'\]",
    lambda: _plan_pruning(logits={LAYERS[0]: _logits()[LAYERS[0]],
                                  "layers_3/mlp": _logits()[LAYERS[1]]}))
bad("logits-int-keys", ValueError, r"logits must have one entry .*extra \[0, 1\]",
    lambda: _plan_pruning(logits=dict(enumerate(_logits().values()))))
bad("logits-None-for-uncurl", ValueError, "method 'uncurl' needs router logits",
    lambda: pruning.plan_pruning(_params(), None, 3))
# logits: one layer's entry
bad("logits-entry-None", TypeError, NAME0 + " must hold real numbers, got dtype object",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], None)))
bad("logits-entry-str", TypeError, NAME0 + " must hold real numbers, got dtype <U",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], "logits")))
bad("logits-entry-dict", TypeError, NAME0 + " must hold real numbers, got dtype object",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], {"a": 1.0})))
bad("logits-entry-list-of-str", TypeError, NAME0 + " must hold real numbers",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], [["a"] * E] * 4)))
bad("logits-entry-ragged", ValueError, NAME0 + r" must be a \[tokens, E\] array, got a ragged",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], [[0.0] * E, [0.0] * (E - 1)])))
bad("logits-entry-scalar", ValueError, NAME0 + r" must be \[tokens, E=8\], got shape \(\)",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], 3.0)))
bad("logits-entry-1d", ValueError, NAME0 + r" must be \[tokens, E=8\], got shape \(200,\)",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: h[:, 0])))
bad("logits-entry-3d", ValueError, NAME0 + r" must be \[tokens, E=8\], got shape \(1, 200, 8\)",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: h[None])))
bad("logits-entry-transposed", ValueError,
    NAME0 + r" must be \[tokens, E=8\], got shape \(8, 200\)",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: h.T)))
bad("logits-too-few-experts", ValueError, NAME0 + r" must be \[tokens, E=8\], got shape \(200, 7\)",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: h[:, :-1])))
bad("logits-too-many-experts", ValueError, r"logits\['layers_2/mlp'\] must be \[tokens, E=8\]",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[1], lambda h: np.hstack([h, h[:, :1]]))))
bad("logits-no-tokens", ValueError, NAME0 + " has no tokens",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: h[:0])))
bad("logits-nan", ValueError, NAME0 + " has 1 NaN or infinite values",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: _set(h, (3, 3), np.nan))))
bad("logits-inf", ValueError, NAME0 + " has 1 NaN or infinite values",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: _set(h, (3, 3), np.inf))))
bad("logits-minus-inf-jax", ValueError, NAME0 + " has 1 NaN or infinite values",
    lambda: _plan_pruning(logits=_logits_with(
        LAYERS[0], lambda h: jnp.asarray(_set(h, (0, 0), -np.inf)))))
bad("logits-float64-beyond-float32", ValueError, NAME0 + " has 1 values beyond float32's range",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: _set(h, (0, 0), 1e39))))
bad("logits-bool", TypeError, NAME0 + " must hold real numbers, got dtype bool",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: h > 0)))
bad("logits-complex", TypeError, NAME0 + " must hold real numbers, got dtype complex",
    lambda: _plan_pruning(logits=_logits_with(LAYERS[0], lambda h: h + 1j)))
# logits: ExpertStats
bad("stats-mixed-with-arrays", TypeError,
    r"logits\['layers_2/mlp'\] must be ExpertStats like the other layers', got ndarray",
    lambda: _plan_pruning(logits=dict(_stats(_logits()), **{LAYERS[1]: _logits()[LAYERS[1]]}),
                          method="reap"))
bad("stats-reap-wrong-shape", ValueError, NAME0 + r"\.reap must be finite with shape \(8,\)",
    lambda: _plan_pruning(logits=dict(_stats(_logits()), **{LAYERS[0]: dataclasses.replace(
        _stats(_logits())[LAYERS[0]], reap=np.ones(E - 1))}), method="reap"))
bad("stats-mean-output-nan", ValueError, NAME0 + r"\.mean_output must be finite",
    lambda: _plan_pruning(logits=dict(_stats(_logits()), **{LAYERS[0]: dataclasses.replace(
        _stats(_logits())[LAYERS[0]], mean_output=np.full((E, D_MODEL), np.nan))}),
        method="hc_smoe"))
bad("stats-logits-nan", ValueError, NAME0 + " has 1 NaN or infinite",
    lambda: _plan_pruning(logits=dict(_stats(_logits()), **{LAYERS[0]: dataclasses.replace(
        _stats(_logits())[LAYERS[0]], logits=_set(_logits()[LAYERS[0]], (0, 0), np.nan))}),
        method="reap"))
bad("reap-with-plain-logits", ValueError, "method 'reap' .*needs expert statistics",
    lambda: _plan_pruning(method="reap"))
bad("expert-outputs-with-plain-logits", ValueError, "features='expert_outputs'.*needs expert "
    "statistics", lambda: _plan_pruning(features="expert_outputs"))

# num_experts
for value, error, match in [
    (0, ValueError, r"num_experts for layer 'layers_0/mlp' must be in \[1, E=8\], got 0"),
    (-1, ValueError, r"num_experts for layer 'layers_0/mlp' must be in \[1, E=8\], got -1"),
    (E + 1, ValueError, r"num_experts for layer 'layers_0/mlp' must be in \[1, E=8\], got 9"),
    (2.0, TypeError, "num_experts for layer 'layers_0/mlp' must be an int, got float"),
    (np.float32(2), TypeError, "num_experts for layer 'layers_0/mlp' must be an int, got float32"),
    (True, TypeError, "num_experts for layer 'layers_0/mlp' must be an int, got bool"),
    ("3", TypeError, "num_experts for layer 'layers_0/mlp' must be an int, got str"),
    ([3, 3], TypeError, "num_experts for layer 'layers_0/mlp' must be an int, got list"),
    ({LAYERS[0]: 3}, ValueError, r"num_experts must have one entry per MoE layer: missing "
     r"\['layers_2/mlp'\]"),
    ({**{n: 3 for n in LAYERS}, "layers_1/mlp": 3}, ValueError,
     r"num_experts must have one entry .*extra \['layers_1/mlp'\]"),
    ({}, ValueError, r"num_experts must have one entry .*missing \['layers_0/mlp', "),
    ({LAYERS[0]: 3, LAYERS[1]: 0}, ValueError,
     r"num_experts for layer 'layers_2/mlp' must be in \[1, E=8\], got 0"),
    ({LAYERS[0]: 9, LAYERS[1]: 3}, ValueError,
     r"num_experts for layer 'layers_0/mlp' must be in \[1, E=8\], got 9"),
    ({LAYERS[0]: 3, LAYERS[1]: 1.5}, TypeError,
     "num_experts for layer 'layers_2/mlp' must be an int, got float"),
    ({LAYERS[0]: None, LAYERS[1]: 3}, TypeError,
     "num_experts for layer 'layers_0/mlp' must be an int, got NoneType"),
]:
  bad(f"num_experts-{type(value).__name__}-{value!r}"[:60], error, match,
      functools.partial(_prune, num_experts=value))

# options: method, cluster, router, features
for kwargs, error, match in [
    (dict(method="uncurl2"), ValueError, r"method must be one of \('uncurl', .*got 'uncurl2'"),
    (dict(method=None), ValueError, "method must be one of .*got None"),
    (dict(method=3), ValueError, "method must be one of .*got 3"),
    (dict(method="UNCURL"), ValueError, "method must be one of .*got 'UNCURL'"),
    (dict(cluster="dbscan"), ValueError, r"cluster must be one of \('spectral'.*got 'dbscan'"),
    (dict(cluster=None), ValueError, "cluster must be one of .*got None"),
    (dict(router="keep"), ValueError, r"router must be one of \(.*got 'keep'"),
    (dict(router=1), ValueError, "router must be one of .*got 1"),
    (dict(features="weights"), ValueError, r"features must be one of \('router_logits', "
     r"'expert_outputs'\), got 'weights'"),
    (dict(features=None), ValueError, "features must be one of .*got None"),
]:
  bad("option-" + "-".join(f"{k}={v!r}" for k, v in kwargs.items()), error, match,
      functools.partial(_prune, **kwargs))

# scalars: seed, top_k, router_init_std, num_workers, layout, timings
for kwargs, error, match in [
    (dict(seed=-1), ValueError, r"seed must be in \[0, inf\], got -1"),
    (dict(seed="1"), TypeError, "seed must be an int, got str"),
    (dict(seed=1.0), TypeError, "seed must be an int, got float"),
    (dict(seed=None), TypeError, "seed must be an int, got NoneType"),
    (dict(seed=True), TypeError, "seed must be an int, got bool"),
    (dict(seed=2**32), ValueError, "seed must be at most 4294967295 .*got 4294967296"),
    (dict(top_k=0), ValueError, r"top_k must be in \[1, E=8\], got 0"),
    (dict(top_k=E + 1), ValueError, r"top_k must be in \[1, E=8\], got 9"),
    (dict(top_k=True), TypeError, "top_k must be an int, got bool"),
    (dict(top_k=1.5), TypeError, "top_k must be an int, got float"),
    (dict(top_k=None), TypeError, "top_k must be an int, got NoneType"),
    (dict(router_init_std=0.0), ValueError, "router_init_std must be a finite positive number"),
    (dict(router_init_std=-0.02), ValueError, "router_init_std must be a finite positive"),
    (dict(router_init_std=float("nan")), ValueError, "router_init_std must be a finite positive"),
    (dict(router_init_std="0.02"), TypeError, "router_init_std must be a real number, got str"),
    (dict(num_workers=-1), ValueError, r"num_workers must be in \[0, inf\], got -1"),
    (dict(num_workers="2"), TypeError, "num_workers must be an int, got str"),
    (dict(layout="t5x"), TypeError, "layout must be a MoeLayout, got str"),
    (dict(layout=None), TypeError, "layout must be a MoeLayout, got NoneType"),
    (dict(timings=[]), TypeError, "timings must be None or a dict, got list"),
]:
  bad("scalar-" + "-".join(f"{k}={v!r}" for k, v in kwargs.items()), error, match,
      functools.partial(_prune, **kwargs))

# pretrained_params (router_norm)
bad("router_norm-without-pretrained", ValueError, "method 'router_norm' needs pretrained_params",
    lambda: _plan_pruning(method="router_norm"))
bad("pretrained-given-to-uncurl", ValueError, "pretrained_params is only used by methods that "
    "need it, not 'uncurl'", lambda: _plan_pruning(pretrained_params=_params(seed=7)))
bad("pretrained-list", TypeError, "pretrained_params must be a mapping, got list",
    lambda: _router_norm([_params(seed=7)]))
bad("pretrained-no-moe-layer", ValueError, "no MoE layer found",
    lambda: _router_norm({"layers_1": _params()["layers_1"]}))
bad("pretrained-other-layers", ValueError, r"pretrained_params has MoE layers \['layers_0/mlp'\], "
    r"params have \['layers_0/mlp', 'layers_2/mlp'\]",
    lambda: _router_norm({"layers_0": _params(seed=7)["layers_0"]}))
bad("pretrained-router-other-E", ValueError, r"pretrained router of 'layers_0/mlp' has shape "
    r"\(6, 6\), finetuned \(6, 8\)", lambda: _router_norm(_params(6, seed=7)))
bad("pretrained-router-nan", ValueError, "pretrained_params: the router of 'layers_0/mlp' has NaN",
    lambda: _router_norm(_with(_params(seed=7), ROUTER, np.full((D_MODEL, E), np.nan))))

# selection (method "selection")
bad("selection-with-uncurl", ValueError, r"selection= .*got method 'uncurl' with a selection",
    lambda: _plan_pruning(selection={n: [0] for n in LAYERS}))
bad("selection-method-without-selection", ValueError, "got method 'selection' without a selection",
    lambda: pruning.plan_pruning(_params(), None, 3, method="selection"))
bad("selection-list", TypeError, r"selection must be a mapping \{layer path: expert indices\}, "
    "got list", lambda: _select([[0, 1], [0, 1]]))
bad("selection-missing-layer", ValueError, r"selection must have one entry per MoE layer .*"
    r"missing \['layers_2/mlp'\]", lambda: _select({LAYERS[0]: [0, 1]}))
bad("selection-index-out-of-range", ValueError, r"selection\['layers_0/mlp'\] must be distinct "
    r"expert indices in \[0, 8\)", lambda: _select({LAYERS[0]: [0, 8], LAYERS[1]: [1]}))
bad("selection-negative-index", ValueError, r"selection\['layers_2/mlp'\] must be distinct",
    lambda: _select({LAYERS[0]: [0], LAYERS[1]: [-1, 2]}))
bad("selection-repeated-index", ValueError, r"selection\['layers_0/mlp'\] must be distinct",
    lambda: _select({LAYERS[0]: [1, 1], LAYERS[1]: [1]}))
bad("selection-empty", ValueError, r"selection\['layers_0/mlp'\] .*at least one",
    lambda: _select({LAYERS[0]: [], LAYERS[1]: [1]}))
bad("selection-float-indices", ValueError, r"selection\['layers_0/mlp'\] must be distinct expert "
    "indices", lambda: _select({LAYERS[0]: [0.0, 1.0], LAYERS[1]: [1]}))
bad("selection-str", ValueError, r"selection\['layers_0/mlp'\] must be distinct expert indices",
    lambda: _select({LAYERS[0]: "01", LAYERS[1]: [1]}))
bad("selection-disagrees-with-num_experts", ValueError, "num_experts 3 disagrees with the "
    "selection's counts", lambda: _select({n: [0, 1] for n in LAYERS}, 3))

# apply_plan
bad("plan-None", TypeError, "plan must be a PrunePlan, got NoneType",
    lambda: pruning.apply_plan(_params(), None))
bad("plan-dict", TypeError, "plan must be a PrunePlan, got dict",
    lambda: pruning.apply_plan(_params(), {"method": "uncurl"}))
bad("plan-json-text", TypeError, "plan must be a PrunePlan, got str",
    lambda: pruning.apply_plan(_params(), _plan().to_json()))
bad("apply-params-None", TypeError, "params must be a mapping, got NoneType",
    lambda: pruning.apply_plan(None, _plan()))
bad("apply-params-no-moe-layer", ValueError, "no MoE layer found",
    lambda: pruning.apply_plan({"layers_1": _params()["layers_1"]}, _plan()))
bad("apply-params-missing-layer", ValueError, r"plan and params disagree on MoE layers: plan "
    r"layers not in params \['layers_2/mlp'\]",
    lambda: pruning.apply_plan({"layers_0": _params()["layers_0"]}, _plan()))
bad("apply-params-other-E", ValueError, r"plan for 'layers_0/mlp' expects E=8, params have 6",
    lambda: pruning.apply_plan(_params(6), _plan()))
bad("apply-params-other-d_ff", ValueError, r"permutes 10 hidden units, the layer has d_ff=9",
    lambda: pruning.apply_plan(_narrow_d_ff(), _plan()))
bad("apply-params-nan", ValueError, "router_kernel of MoE layer 'layers_0/mlp' has NaN",
    lambda: pruning.apply_plan(_with(_params(), ROUTER, np.full((D_MODEL, E), np.nan)), _plan()))
bad("plan-seed-beyond-32-bit", ValueError, "PrunePlan.seed must be at most 4294967295",
    lambda: pruning.apply_plan(_params(), dataclasses.replace(_plan(), seed=2**40)))
bad("plan-from-json-None", TypeError, "PrunePlan.from_json needs JSON text, got NoneType",
    lambda: pruning.PrunePlan.from_json(None))
bad("plan-from-json-not-json", ValueError, "PrunePlan.from_json: the text is not JSON",
    lambda: pruning.PrunePlan.from_json("{method: uncurl"))
bad("plan-from-json-missing-fields", ValueError, r"PrunePlan: missing fields \['layers', "
    r"'method', 'router'\]", lambda: pruning.PrunePlan.from_json("{}"))

# pruned_config, default_num_experts
bad("pruned_config-config-None", TypeError, "config must be a ModelConfig, got NoneType",
    lambda: pruning.pruned_config(None, _plan()))
bad("pruned_config-plan-None", TypeError, "plan must be a PrunePlan, got NoneType",
    lambda: pruning.pruned_config(configs.get("tiny", num_layers=3, num_experts=E), None))
bad("pruned_config-other-blocks", ValueError, r"expert counts name MoE blocks \[0, 2\]",
    lambda: pruning.pruned_config(configs.get("tiny", num_layers=6, num_experts=E), _plan()))
bad("default_num_experts-0", ValueError, r"num_experts must be in \[1, inf\], got 0",
    lambda: pruning.default_num_experts(0))
bad("default_num_experts-float", TypeError, "num_experts must be an int, got float",
    lambda: pruning.default_num_experts(8.0))
bad("default_num_experts-str", TypeError, "num_experts must be an int, got str",
    lambda: pruning.default_num_experts("8"))

# the methods registry
bad("methods-get-unknown", ValueError, r"method must be one of \('uncurl', .*got 'nope'",
    lambda: methods.get("nope"))
bad("methods-get-None", ValueError, "method must be one of .*got None", lambda: methods.get(None))
bad("register-not-a-Method", TypeError, "register needs a Method, got dict",
    lambda: pruning.register_method({"name": "mine"}))
bad("register-existing-name", ValueError, "a pruning method named 'uncurl' is already registered",
    lambda: pruning.register_method(dataclasses.replace(methods.get("uncurl"), paper_role="")))
bad("Method-bad-paper_role", ValueError, "Method.paper_role must be one of",
    lambda: pruning.Method("mine", group=_boom, merges=False, paper_role="best"))

# greedy_selection
bad("greedy-score-not-callable", TypeError, "score must be callable, got int",
    lambda: _greedy(score=3))
bad("greedy-num_experts-int", TypeError, r"num_experts must be a mapping \{layer: E\}, got int",
    lambda: _greedy(num_experts=4))
bad("greedy-targets-list", TypeError, r"targets must be a mapping \{layer: D\}, got list",
    lambda: _greedy(targets=[2, 1]))
bad("greedy-targets-other-layers", ValueError, r"targets \['a', 'c'\] and num_experts \['a', "
    r"'b'\] must name the same layers", lambda: _greedy(targets={"a": 2, "c": 1}))
bad("greedy-target-0", ValueError, r"target for 'a' must be in \[1, 4\], got 0",
    lambda: _greedy(targets={"a": 0, "b": 1}))
bad("greedy-target-too-large", ValueError, r"target for 'b' must be in \[1, 4\], got 5",
    lambda: _greedy(targets={"a": 2, "b": 5}))
bad("greedy-target-float", TypeError, "target for 'a' must be an int, got float",
    lambda: _greedy(targets={"a": 1.5, "b": 1}))
bad("greedy-target-str", TypeError, "target for 'a' must be an int, got str",
    lambda: _greedy(targets={"a": "2", "b": 1}))
bad("greedy-num_experts-0", ValueError, r"num_experts for 'a' must be in \[1, inf\], got 0",
    lambda: _greedy(num_experts={"a": 0, "b": 4}))
bad("greedy-num_experts-str", TypeError, "num_experts for 'b' must be an int, got str",
    lambda: _greedy(num_experts={"a": 4, "b": "4"}))

# the collectors (collect_router_logits, collect_expert_stats)
for which in COLLECTORS:
  for case_id, error, match, call in [
      ("batches-None", TypeError, "batches must be an iterable of batches .*got NoneType",
       lambda w: _collect(w, None)),
      ("batches-str", TypeError, "batches must be an iterable of batches .*got str",
       lambda w: _collect(w, "batches.tfrecord")),
      ("batches-int", TypeError, "batches must be an iterable of batches .*got int",
       lambda w: _collect(w, 3)),
      ("batches-empty", ValueError, "no real tokens in 0 batches",
       lambda w: _collect(w, [])),
      ("batch-None", TypeError, "task batch 0 must be a mapping of .*got NoneType",
       lambda w: _collect(w, [None])),
      ("batch-missing-targets", ValueError,
       r"task batch 0 lacks \['decoder_target_tokens'\]",
       lambda w: _collect(w, _batch(decoder_target_tokens=None))),
      ("batch-missing-inputs", ValueError, r"task batch 0 lacks \['decoder_input_tokens'\]",
       lambda w: _collect(w, [_batch(decoder_input_tokens=None)])),
      ("batch-no-padding-marker", ValueError,
       "task batch 0 .*needs .*'decoder_loss_weights' or 'decoder_segment_ids'",
       lambda w: _collect(w, _batch(decoder_loss_weights=None))),
      ("batch-tokens-1d", ValueError,
       r"task batch 0: decoder_input_tokens must be \[batch, length\], got shape \(8,\)",
       lambda w: _collect(w, _batch(decoder_input_tokens=np.ones(LENGTH, int)))),
      ("batch-targets-other-shape", ValueError,
       r"task batch 0: decoder_target_tokens has shape \(2, 7\), expected \(2, 8\)",
       lambda w: _collect(w, _batch(decoder_target_tokens=np.ones((BATCH, LENGTH - 1), int)))),
      ("batch-weights-other-shape", ValueError,
       r"task batch 0: decoder_loss_weights has shape \(2,\)",
       lambda w: _collect(w, _batch(decoder_loss_weights=np.ones(BATCH)))),
      ("batch-float-tokens", TypeError,
       "task batch 0: decoder_input_tokens must hold integers, got dtype float",
       lambda w: _collect(w, _batch(decoder_input_tokens=np.ones((BATCH, LENGTH))))),
      ("batch-ids-beyond-vocab", ValueError,
       r"task batch 0: decoder_target_tokens has ids in \[\d+, 32\], outside the model's "
       r"vocabulary \[0, 32\)",
       lambda w: _collect(w, _batch(decoder_target_tokens=_set(
           _batch()["decoder_target_tokens"], (0, 0), 32)))),
      ("batch-negative-ids", ValueError, r"task batch 0: decoder_input_tokens has ids in \[-1",
       lambda w: _collect(w, _batch(decoder_input_tokens=-np.ones((BATCH, LENGTH), int)))),
      ("max_tokens-0", ValueError, r"max_tokens must be in \[1, inf\], got 0",
       lambda w: _collect(w, _batch(), max_tokens=0)),
      ("max_tokens-negative", ValueError, r"max_tokens must be in \[1, inf\], got -5",
       lambda w: _collect(w, _batch(), max_tokens=-5)),
      ("max_tokens-float", TypeError, "max_tokens must be an int, got float",
       lambda w: _collect(w, _batch(), max_tokens=10.0)),
      ("max_tokens-str", TypeError, "max_tokens must be an int, got str",
       lambda w: _collect(w, _batch(), max_tokens="10")),
      ("params-None", TypeError, "params must be a mapping of arrays, got NoneType",
       lambda w: _collect(w, _batch(), params=None)),
      ("params-dense", ValueError, "params have no MoE layer",
       lambda w: _collect(w, _batch(), params={"layers_1": _params()["layers_1"]})),
      ("params-of-another-model", ValueError, "the params and the model differ",
       lambda w: _collect(w, _batch(), params=_params())),
      ("model-None", TypeError, "model must be a flax module .*got NoneType",
       lambda w: _collect(w, _batch(), model=None)),
  ]:
    bad(f"{which}-{case_id}", error, match, functools.partial(call, which))


@pytest.mark.parametrize("which", COLLECTORS)
def test_a_bad_later_batch_is_refused_before_its_own_pass(which, monkeypatch):
  """Batches stream (a generator can be read once): batch 1 is checked after batch 0's
  pass, before its own."""
  _model_params()
  passes = []
  real_forward = forward_lib.sown_forward
  monkeypatch.setattr(forward_lib, "sown_forward", lambda *a: lambda *b: passes.append(1) or
                      real_forward(*a)(*b))
  with pytest.raises(TypeError, match="task batch 1 must be a mapping of .*got ndarray"):
    _collect(which, iter([_batch(), np.zeros((BATCH, LENGTH), int)]))
  assert len(passes) == 1


@pytest.mark.parametrize("which", COLLECTORS)
def test_batches_of_padding_only_are_refused_after_the_pass(which):
  """Streaming cannot know before the end that no batch has a real token."""
  batch = _batch()
  batch["decoder_loss_weights"] = np.zeros_like(batch["decoder_loss_weights"])
  with pytest.raises(ValueError, match=r"no real tokens in 2 batches \(all padding"):
    _collect(which, [batch, batch])


@pytest.mark.parametrize("call, error, match", BAD)
def test_bad_input_is_refused_before_any_work_naming_the_problem(call, error, match,
                                                                 monkeypatch):
  _plan(), _model_params()  # made before the sentinels replace the work they do
  _install_sentinels(monkeypatch)
  with pytest.raises(error, match=match):
    call()


def test_the_table_covers_the_public_pruning_api():
  ids = {p.id for p in BAD}
  assert len(ids) == len(BAD) >= 90
  for entry in ("plan_pruning", "prune_params", "apply_plan", "collect_router_logits",
                "collect_expert_stats", "greedy_selection", "pruned_config",
                "default_num_experts", "register_method", "PrunePlan"):
    assert entry in pruning.__all__ or entry in uncurl_jax.__all__, entry


# ------------------------------------------------------------------------------------------
# Valid edge inputs: accepted, with a check of the result.


def _kernel_shapes(params):
  return {name: (params[name.split("/")[0]]["mlp"]["expert"]["wi"]["kernel"].shape,
                 params[name.split("/")[0]]["mlp"]["router"]["kernel"].shape) for name in LAYERS}


def _pruned_to(counts):
  counts = dict(zip(LAYERS, counts)) if isinstance(counts, tuple) else dict.fromkeys(LAYERS,
                                                                                     counts)
  return {name: ((d, D_MODEL, D_FF), (D_MODEL, d)) for name, d in counts.items()}


def _same_plan(logits, **kwargs):
  return _plan_pruning(logits=logits, **kwargs) == _plan_pruning(**kwargs)


def _assert_trees_equal(a, b):
  flat_a, flat_b = (flax.traverse_util.flatten_dict(t) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]))
  return True


def _logits_as(convert):
  return {name: convert(h) for name, h in _logits().items()}


VALID = [
    pytest.param(lambda: _kernel_shapes(_prune(logits=_logits_as(
        lambda h: np.round(h * 4).astype(np.int32)))) == _pruned_to(3), id="int32-logits"),
    pytest.param(lambda: _plan_pruning(logits=_logits_as(lambda h: np.round(h * 4).astype(
        np.int64))) == _plan_pruning(logits=_logits_as(lambda h: np.round(h * 4))),
        id="int64-logits-are-their-float-values"),
    pytest.param(lambda: _kernel_shapes(_prune(logits=_logits_as(
        lambda h: h.astype(np.float16)))) == _pruned_to(3), id="float16-logits"),
    pytest.param(lambda: _same_plan(_logits_as(lambda h: h.astype(np.float64))),
                 id="float64-logits-within-float32"),
    pytest.param(lambda: _same_plan(_logits_as(jnp.asarray)), id="jax-logits"),
    pytest.param(lambda: _same_plan(_logits_as(lambda h: h.tolist())), id="nested-list-logits"),
    pytest.param(lambda: _same_plan(_stats(_logits())), id="expert-stats-for-uncurl"),
    pytest.param(lambda: _kernel_shapes(_prune(logits=_logits_as(lambda h: h[:1]))) ==
                 _pruned_to(3), id="one-token"),
    pytest.param(lambda: _assert_trees_equal(_prune(num_experts=E, router="anchor"), _params()),
                 id="num_experts-E-is-identity"),
    pytest.param(lambda: _kernel_shapes(_prune(num_experts=1)) == _pruned_to(1),
                 id="num_experts-1"),
    pytest.param(lambda: _kernel_shapes(_prune(num_experts=None)) == _pruned_to(2),
                 id="num_experts-None-default"),
    pytest.param(lambda: _kernel_shapes(_prune(num_experts=np.int64(3))) == _pruned_to(3),
                 id="num_experts-numpy-int"),
    pytest.param(lambda: _kernel_shapes(_prune(num_experts={LAYERS[1]: 2, LAYERS[0]: E})) ==
                 _pruned_to((E, 2)), id="num_experts-per-layer"),
    pytest.param(lambda: _kernel_shapes(_prune(top_k=E, seed=2**32 - 1)) == _pruned_to(3),
                 id="top_k-E-largest-seed"),
    pytest.param(lambda: isinstance(_prune(params=flax.core.freeze(_params())),
                                    flax.core.FrozenDict), id="frozen-params"),
    pytest.param(lambda: isinstance(_prune(params=jax.tree.map(jnp.asarray, _params()))
                                    ["layers_0"]["mlp"]["router"]["kernel"], jax.Array),
                 id="jax-params"),
    pytest.param(lambda: _assert_trees_equal(
        pruning.apply_plan(_params(), pruning.PrunePlan.from_json(_plan().to_json())),
        pruning.apply_plan(_params(), _plan())), id="plan-through-json"),
    pytest.param(lambda: _select({LAYERS[0]: np.array([7, 0]), LAYERS[1]: (3,)}, None)
                 .num_experts == {LAYERS[0]: 2, LAYERS[1]: 1}, id="selection-array-and-tuple"),
    pytest.param(lambda: [pruning.default_num_experts(e) for e in (1, np.int64(8), 64)] ==
                 [1, 2, 32], id="default_num_experts-edges"),
    pytest.param(lambda: pruning.greedy_selection(
        lambda masks: -sum(float(m.sum()) for m in masks.values()), {"a": 2},
        {"a": np.int64(2)})[0] == {"a": (0, 1)}, id="greedy-target-E"),
]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # e.g. float16 logits overflowing a check
@pytest.mark.parametrize("check", VALID)
def test_valid_edge_inputs_are_accepted(check):
  assert check()


def test_one_batch_dict_and_a_generator_are_accepted_by_both_collectors():
  batch = _batch()
  real = int((batch["decoder_loss_weights"] > 0).sum())
  logits = _collect("router_logits", batch)
  assert {n: h.shape for n, h in logits.items()} == {n: (real, CONFIG.num_experts)
                                                       for n in LAYERS}
  streamed = _collect("router_logits", (b for b in [batch, batch]), max_tokens=real + 1)
  for name in LAYERS:
    np.testing.assert_array_equal(streamed[name][:real], logits[name])
    np.testing.assert_array_equal(streamed[name][real:], logits[name][:1])
  stats = _collect("expert_stats", {k: jnp.asarray(v) for k, v in batch.items()})
  for name in LAYERS:
    assert stats[name].mean_output.shape == (CONFIG.num_experts, CONFIG.d_model)
    np.testing.assert_allclose(stats[name].logits, logits[name], rtol=1e-5, atol=1e-5)
  small = pruning.prune_params(_model_params(), logits, 2)
  assert model_lib.expert_counts(small) == {name: 2 for name in LAYERS}
