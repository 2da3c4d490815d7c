"""Where each MoE layer keeps its router and expert weights in a parameter pytree.

A `MoeLayout` names, relative to an MoE layer's subtree, the paths of the router kernel
and of the stacked expert weights (plain experts `act(x wi) wo`, or gated experts
`act(x wi_0) * (x wi_1) wo`). MoE layers are found as the subtrees holding a router
kernel; each is keyed by its '/'-joined path in `params` ('layers_0/mlp'). This is the
one way the project finds MoE layers: `expert_counts` reads only shapes (params or
`jax.ShapeDtypeStruct`s, e.g. of a checkpoint), `find_moe_layers` reads and checks the
weights, `detect_layout` tells which known layout a tree has.

Example:
  >>> from uncurl_jax.model import layout as layout_lib
  >>> layers = layout_lib.find_moe_layers(params)          # this project's models
  >>> sorted(layers)
  ['layers_0/mlp', 'layers_2/mlp']
  >>> layers["layers_0/mlp"].wi_kernel.shape                # [E, d, f]
  >>> layout_lib.expert_counts(params)                      # {'layers_0/mlp': 8, ...}
  >>> t5x_layers = layout_lib.find_moe_layers(t5x_params, layout_lib.T5X_LAYOUT)
  >>> layout_lib.detect_layout(flaxformer_geglu_params) == layout_lib.T5X_GATED_LAYOUT
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MoeLayout:
  """Paths, relative to an MoE layer's subtree, of the weights pruning reads and writes.

  Every field is a '/'-separated path; a bias field may be None when the model has no
  such bias. A named path must exist in every MoE layer, and every leaf of an MoE layer's
  subtree must be named here (an unnamed leaf would keep E experts after pruning).

  An expert is `act(x @ wi + wi_bias) @ wo + wo_bias`, or, when `gate_kernel` is named
  (gated experts: GeGLU, SwiGLU), `(act(x @ gate + gate_bias) * (x @ wi + wi_bias)) @ wo
  + wo_bias`. Pruning needs no activation: it only keeps the hidden units of the gate, the
  up projection and the down projection together.

  Attributes:
    router_kernel: Router kernel, [d, E] (logits = x @ kernel).
    router_bias: Router bias, [E], or None.
    wi_kernel: First expert projection, [E, d, f]; for gated experts the linear (up)
      projection (flaxformer's and MaxText's `wi_1`).
    wi_bias: First projection bias, [E, f], or None.
    wo_kernel: Second expert projection, [E, f, d].
    wo_bias: Second projection bias, [E, d], or None.
    gate_kernel: Gated experts only: the projection the activation is applied to
      (flaxformer's and MaxText's `wi_0`), [E, d, f]; None for plain experts.
    gate_bias: Its bias, [E, f], or None.
  """

  router_kernel: str = "router/kernel"
  router_bias: str | None = None
  wi_kernel: str = "expert/wi/kernel"
  wi_bias: str | None = "expert/wi/bias"
  wo_kernel: str = "expert/wo/kernel"
  wo_bias: str | None = "expert/wo/bias"
  gate_kernel: str | None = None
  gate_bias: str | None = None

  def __post_init__(self):
    if self.gate_bias is not None and self.gate_kernel is None:
      raise ValueError(f"MoeLayout names gate_bias={self.gate_bias!r} but no gate_kernel; "
                       "a gate bias needs the gate projection")

  def named_paths(self) -> dict[str, str]:
    """Field name -> path, for the fields that name a path."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}

  def to_dict(self) -> dict[str, str | None]:
    return dataclasses.asdict(self)


# This project's SMoEDecoder (docs/model.md).
DEFAULT_LAYOUT = MoeLayout()

# t5x / flaxformer MoE checkpoints: router under router/router_weights/w, experts without
# biases. flaxformer's RouterWeights may carry a bias: describe it with
# `dataclasses.replace(T5X_LAYOUT, router_bias="router/router_weights/w/bias")`.
T5X_LAYOUT = MoeLayout(
    router_kernel="router/router_weights/w/kernel", router_bias=None,
    wi_kernel="expert/wi/kernel", wi_bias=None,
    wo_kernel="expert/wo/kernel", wo_bias=None)

# flaxformer's gated experts (GeGLU, `activations=('gelu', 'linear')`, the expert of its
# MoE gin files): `expert/wi_0` gets the activation, `expert/wi_1` stays linear.
T5X_GATED_LAYOUT = MoeLayout(
    router_kernel="router/router_weights/w/kernel", router_bias=None,
    gate_kernel="expert/wi_0/kernel", gate_bias=None,
    wi_kernel="expert/wi_1/kernel", wi_bias=None,
    wo_kernel="expert/wo/kernel", wo_bias=None)

# MaxText's routed MoE block (Mixtral, Qwen3-MoE, DeepSeek's routed experts; unscanned
# layers): router `gate/kernel` [d, E], experts as bare arrays `wi_0` (activated),
# `wi_1`, `wo`. Biases `gate/bias`, `wi_0_bias`, `wi_1_bias`, `wo_bias` exist only in
# some models; `detect_layout` adds those it finds.
MAXTEXT_LAYOUT = MoeLayout(
    router_kernel="gate/kernel", router_bias=None,
    gate_kernel="wi_0", gate_bias=None,
    wi_kernel="wi_1", wi_bias=None,
    wo_kernel="wo", wo_bias=None)

# Hugging Face MoE models as `uncurl_jax.hf` reads them (per layer `layers_<i>/mlp`,
# per-expert tensors stacked, kernels transposed to x @ W): Mixtral's `block_sparse_moe`
# (w1 activated, w3 linear, w2 down) ...
HF_MIXTRAL_LAYOUT = MoeLayout(
    router_kernel="gate/kernel", router_bias=None,
    gate_kernel="experts/w1", gate_bias=None,
    wi_kernel="experts/w3", wi_bias=None,
    wo_kernel="experts/w2", wo_bias=None)

# ... and Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2/V3 (`gate_proj` activated, `up_proj`,
# `down_proj`; DeepSeek-V3's `gate/e_score_correction_bias` is the router bias). Shared
# experts are not under `mlp` in these trees (`layers_<i>/shared_expert*`): pruning leaves
# them alone.
HF_QWEN_MOE_LAYOUT = MoeLayout(
    router_kernel="gate/kernel", router_bias=None,
    gate_kernel="experts/gate_proj", gate_bias=None,
    wi_kernel="experts/up_proj", wi_bias=None,
    wo_kernel="experts/down_proj", wo_bias=None)

# The layouts `detect_layout` tries, each with every optional bias named.
_KNOWN_LAYOUTS = {
    "DEFAULT_LAYOUT": DEFAULT_LAYOUT,
    "T5X_LAYOUT": dataclasses.replace(
        T5X_LAYOUT, router_bias="router/router_weights/w/bias", wi_bias="expert/wi/bias",
        wo_bias="expert/wo/bias"),
    "T5X_GATED_LAYOUT": dataclasses.replace(
        T5X_GATED_LAYOUT, router_bias="router/router_weights/w/bias",
        gate_bias="expert/wi_0/bias", wi_bias="expert/wi_1/bias", wo_bias="expert/wo/bias"),
    "MAXTEXT_LAYOUT": dataclasses.replace(
        MAXTEXT_LAYOUT, router_bias="gate/bias", gate_bias="wi_0_bias", wi_bias="wi_1_bias",
        wo_bias="wo_bias"),
    "HF_MIXTRAL_LAYOUT": HF_MIXTRAL_LAYOUT,
    "HF_QWEN_MOE_LAYOUT": dataclasses.replace(
        HF_QWEN_MOE_LAYOUT, router_bias="gate/e_score_correction_bias"),
}
_OPTIONAL_FIELDS = ("router_bias", "gate_bias", "wi_bias", "wo_bias")
_MOE_WORDS = ("expert", "router", "moe", "gate", "wi_0", "wi_1")


@dataclasses.dataclass(frozen=True)
class MoeLayerWeights:
  """The arrays of one MoE layer (numpy or jax arrays, as stored in the params)."""

  router_kernel: Any
  router_bias: Any
  wi_kernel: Any
  wi_bias: Any
  wo_kernel: Any
  wo_bias: Any
  gate_kernel: Any = None
  gate_bias: Any = None

  @property
  def num_experts(self) -> int:
    return self.wi_kernel.shape[0]

  @property
  def d_ff(self) -> int:
    return self.wi_kernel.shape[2]


def split_path(path: str) -> Path:
  return tuple(part for part in path.split("/") if part)


def flatten_params(params: Mapping[str, Any]) -> dict[Path, Any]:
  """Flat {path tuple: leaf} view of a nested mapping (dict or FrozenDict)."""
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a nested mapping of arrays, got {type(params).__name__}")
  return flax.traverse_util.flatten_dict(params)


def expert_counts(params: Mapping[str, Any],
                  layout: MoeLayout = DEFAULT_LAYOUT) -> dict[str, int]:
  """{MoE layer path: its expert count}, from shapes only.

  MoE layers are the subtrees with a router kernel; a layer's count is the leading axis
  of its stacked experts (`wi_kernel`), else its router's columns (a router bound to
  fewer experts has more columns than experts). Works on params and on shape trees
  (`jax.ShapeDtypeStruct`, a checkpoint's metadata); an empty dict means a dense model.

  Example:
    >>> expert_counts(params)
    {'layers_0/mlp': 8, 'layers_2/mlp': 8}
  """
  flat = flatten_params(params)
  suffix, experts = split_path(layout.router_kernel), split_path(layout.wi_kernel)
  counts = {}
  for path, leaf in flat.items():
    if path[-len(suffix):] == suffix:
      prefix = path[:-len(suffix)]
      stacked = flat.get(prefix + experts)
      counts["/".join(prefix)] = (_leaf_shape(prefix + experts, stacked)[0]
                                  if stacked is not None else _leaf_shape(path, leaf)[-1])
  return counts


def _leaf_shape(path: Path, leaf: Any) -> tuple[int, ...]:
  """The shape of an MoE weight (an array or shape struct of rank >= 1)."""
  if not hasattr(leaf, "shape"):
    raise TypeError(f"params: MoE weight {'/'.join(path)!r} must be an array, got "
                    f"{type(leaf).__name__}")
  if not len(leaf.shape):
    raise ValueError(f"params: MoE weight {'/'.join(path)!r} must be an array of rank >= 1, "
                     "got a scalar")
  return tuple(leaf.shape)


def find_moe_layers(params: Mapping[str, Any],
                    layout: MoeLayout = DEFAULT_LAYOUT) -> dict[str, MoeLayerWeights]:
  """Finds the MoE layers of `params` described by `layout` and checks their shapes.

  Args:
    params: Nested mapping of arrays (the model's 'params' collection).
    layout: Where each MoE layer keeps its weights.

  Returns:
    {layer path: MoeLayerWeights}, in the order the layers appear in `params`.

  Raises:
    ValueError: No MoE layer found, a named path missing, a leaf of an MoE layer not named
      by the layout, or shapes that disagree.

  Example:
    >>> layers = find_moe_layers(params)                 # this project's SMoEDecoder
    >>> layers["layers_0/mlp"].num_experts, layers["layers_0/mlp"].d_ff
    (8, 128)
  """
  names = expert_counts(params, layout)
  if not names:
    raise ValueError(
        f"no MoE layer found: no parameter path ends with {layout.router_kernel!r} "
        f"(layout {layout}); pass the MoeLayout that describes these params")
  flat = flatten_params(params)
  return {name: _read_layer(flat, split_path(name), layout) for name in names}


def _read_layer(flat: dict[Path, Any], prefix: Path, layout: MoeLayout) -> MoeLayerWeights:
  name = "/".join(prefix)
  named = layout.named_paths()
  arrays = {}
  for field_name, rel_path in named.items():
    path = prefix + split_path(rel_path)
    if path not in flat:
      raise ValueError(f"MoE layer {name!r}: layout names {rel_path!r} ({field_name}) but "
                       f"params have no {'/'.join(path)!r}")
    arrays[field_name] = flat[path]
  known = {prefix + split_path(p) for p in named.values()}
  for path in flat:
    if path[:len(prefix)] == prefix and path not in known:
      raise ValueError(
          f"MoE layer {name!r}: parameter {'/'.join(path)!r} is not described by the "
          f"layout (it would keep all experts after pruning); name it in the MoeLayout")
  weights = MoeLayerWeights(**{f.name: arrays.get(f.name)
                               for f in dataclasses.fields(MoeLayerWeights)})
  _check_shapes(name, weights)
  return weights


def _check_shapes(name: str, w: MoeLayerWeights) -> None:
  for field in dataclasses.fields(w):
    if getattr(w, field.name) is not None and not hasattr(getattr(w, field.name), "shape"):
      raise TypeError(f"MoE layer {name!r}: {field.name} must be an array, got "
                      f"{type(getattr(w, field.name)).__name__}")
  if len(w.router_kernel.shape) != 2:
    raise ValueError(f"MoE layer {name!r}: router kernel must be [d, E], got shape "
                     f"{tuple(w.router_kernel.shape)}")
  d, num_experts = w.router_kernel.shape
  if len(w.wi_kernel.shape) != 3:
    raise ValueError(f"MoE layer {name!r}: wi kernel must be [E, d, f], got shape "
                     f"{tuple(w.wi_kernel.shape)}")
  f = w.wi_kernel.shape[2]
  expected = {"router_bias": (num_experts,), "wi_kernel": (num_experts, d, f),
              "wi_bias": (num_experts, f), "wo_kernel": (num_experts, f, d),
              "wo_bias": (num_experts, d), "gate_kernel": (num_experts, d, f),
              "gate_bias": (num_experts, f)}
  for field_name, shape in expected.items():
    array = getattr(w, field_name)
    if array is not None and tuple(array.shape) != shape:
      raise ValueError(f"MoE layer {name!r}: {field_name} has shape {tuple(array.shape)}, "
                       f"expected {shape} from the router kernel {(d, num_experts)} and "
                       f"d_ff={f}")


def detect_layout(params: Mapping[str, Any]) -> MoeLayout:
  """The known layout (`DEFAULT_LAYOUT`, `T5X_LAYOUT`, `T5X_GATED_LAYOUT`, `MAXTEXT_LAYOUT`,
  `HF_MIXTRAL_LAYOUT`, `HF_QWEN_MOE_LAYOUT`) that describes `params`, with the optional biases the params have.

  Args:
    params: Parameter pytree (arrays or shape structs).

  Returns:
    A MoeLayout for which `find_moe_layers(params, layout)` succeeds.

  Raises:
    ValueError: No known layout fits; the message lists the MoE-like paths seen (paths
      naming an expert, router, gate or moe) and why each candidate did not fit.

  Example:
    >>> detect_layout(flaxformer_geglu_params) == T5X_GATED_LAYOUT
    True
    >>> plan = plan_pruning(params, logits, 8, layout=detect_layout(params))
  """
  flat = flatten_params(params)
  reasons = []
  for name, full in _KNOWN_LAYOUTS.items():
    layers = expert_counts(params, full)
    if not layers:
      continue
    present = {}
    for field_name in _OPTIONAL_FIELDS:
      rel_path = getattr(full, field_name)
      if rel_path is not None and all(split_path(layer) + split_path(rel_path) in flat
                                      for layer in layers):
        present[field_name] = rel_path
    layout = dataclasses.replace(full, **{f: present.get(f) for f in _OPTIONAL_FIELDS})
    try:
      find_moe_layers(params, layout)
    except ValueError as error:
      reasons.append(f"{name}: {error}")
      continue
    return layout
  moe_like = ["/".join(path) + f" {tuple(leaf.shape)}" for path, leaf in flat.items()
              if any(word in "/".join(path).lower() for word in _MOE_WORDS)]
  shown = moe_like[:30] + ([f"... ({len(moe_like) - 30} more)"] if len(moe_like) > 30 else [])
  hint = ""
  if any(len(flat[path].shape) == 4 for path in flat if path[-1] in ("wi_0", "wi_1")):
    hint = ("; 4-D expert weights look like MaxText's scanned layers ([E, layers, d, f]): "
            "convert the checkpoint to unscanned layers first")
  raise ValueError(
      f"no known MoE layout ({', '.join(_KNOWN_LAYOUTS)}) fits these params{hint}. "
      f"MoE-like paths seen: {shown or 'none'}. "
      + (f"Candidates that matched a router but failed: {reasons}. " if reasons else "")
      + "Describe the tree with a MoeLayout.")
