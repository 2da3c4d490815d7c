"""Where each MoE layer keeps its router and expert weights in a parameter pytree.

A `MoeLayout` names, relative to an MoE layer's subtree, the paths of the router kernel
and of the stacked expert weights (plain experts `act(x wi) wo`, or gated experts
`act(x wi_0) * (x wi_1) wo`). MoE layers are found as the subtrees holding a router
kernel; each is keyed by its '/'-joined path in `params` ('layers_0/mlp'). A layout
with a `scan_axis` reads scanned blocks (MaxText's `scan_layers`: the L layers of a
block stacked in one array per weight) as L layers keyed 'decoder/layers/MoeBlock_0[3]'
(`scanned_layer_name`). This is the one way the project finds MoE layers: `expert_counts` reads only shapes (params or
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
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np

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
    scan_axis: None for trees with one subtree per layer. For scanned trees (MaxText's
      `scan_layers`, `param_scan_axis`), the position of the layer axis in every weight
      of a scanned block: each weight is its per-layer array with the L layers stacked
      on this axis (`wi_0` [E, L, d, f] and `gate/kernel` [d, L, E] for axis 1). Each
      layer l of a scanned block at path P is the MoE layer 'P[l]'; a block whose router
      kernel has rank 2 is one unscanned layer (e.g. an unscanned block beside scanned
      ones). 0, 1 or 2 (a position in the router kernel [d, E]).
  """

  router_kernel: str = "router/kernel"
  router_bias: str | None = None
  wi_kernel: str = "expert/wi/kernel"
  wi_bias: str | None = "expert/wi/bias"
  wo_kernel: str = "expert/wo/kernel"
  wo_bias: str | None = "expert/wo/bias"
  gate_kernel: str | None = None
  gate_bias: str | None = None
  scan_axis: int | None = None

  def __post_init__(self):
    if self.gate_bias is not None and self.gate_kernel is None:
      raise ValueError(f"MoeLayout names gate_bias={self.gate_bias!r} but no gate_kernel; "
                       "a gate bias needs the gate projection")
    if self.scan_axis is not None and (isinstance(self.scan_axis, bool) or not isinstance(
        self.scan_axis, int) or not 0 <= self.scan_axis <= 2):
      raise ValueError(f"MoeLayout.scan_axis must be None, 0, 1 or 2 (the layer axis of a "
                       f"scanned router kernel [d, E]), got {self.scan_axis!r}")

  def named_paths(self) -> dict[str, str]:
    """Field name -> path, for the fields that name a path."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != "scan_axis" and getattr(self, f.name) is not None}

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

# MaxText's routed MoE block with `scan_layers: true` (MaxText's default) and
# `param_scan_axis: 1`: the same paths under `decoder/layers/` (DeepSeek:
# `decoder/moe_layers/`), every weight with the layer axis at position 1 (`gate/kernel`
# [d, L, E], `wi_0` [E, L, d, f], `gate/bias` [E, L]). For `param_scan_axis: 0`:
# `dataclasses.replace(MAXTEXT_SCANNED_LAYOUT, scan_axis=0)`.
MAXTEXT_SCANNED_LAYOUT = dataclasses.replace(MAXTEXT_LAYOUT, scan_axis=1)

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
    "MAXTEXT_SCANNED_LAYOUT": dataclasses.replace(
        MAXTEXT_SCANNED_LAYOUT, router_bias="gate/bias", gate_bias="wi_0_bias",
        wi_bias="wi_1_bias", wo_bias="wo_bias"),
    "MAXTEXT_SCANNED_LAYOUT(scan_axis=0)": dataclasses.replace(
        MAXTEXT_SCANNED_LAYOUT, router_bias="gate/bias", gate_bias="wi_0_bias",
        wi_bias="wi_1_bias", wo_bias="wo_bias", scan_axis=0),
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


_SCANNED_NAME = re.compile(r"^(.*)\[(\d+)\]$")


def scanned_layer_name(block: str, index: int) -> str:
  """The key of layer `index` of the scanned MoE block at path `block`.

  Example:
    >>> scanned_layer_name("decoder/layers/MoeBlock_0", 3)
    'decoder/layers/MoeBlock_0[3]'
  """
  return f"{block}[{index}]"


def split_scanned_name(name: str) -> tuple[str, int | None]:
  """(block path, layer index) of a scanned layer's key; (name, None) for other keys.

  Example:
    >>> split_scanned_name("decoder/layers/MoeBlock_0[3]")
    ('decoder/layers/MoeBlock_0', 3)
  """
  match = _SCANNED_NAME.match(name)
  return (match.group(1), int(match.group(2))) if match else (name, None)


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
  A scanned block (`layout.scan_axis`) counts as its L layers, 'P[0]' ... 'P[L-1]'.

  Example:
    >>> expert_counts(params)
    {'layers_0/mlp': 8, 'layers_2/mlp': 8}
  """
  flat = flatten_params(params)
  experts = split_path(layout.wi_kernel)
  counts = {}
  for prefix, num_layers in _moe_blocks(flat, layout):
    stacked = flat.get(prefix + experts)
    router_path = prefix + split_path(layout.router_kernel)
    if num_layers is None:
      counts["/".join(prefix)] = (_leaf_shape(prefix + experts, stacked)[0]
                                  if stacked is not None
                                  else _leaf_shape(router_path, flat[router_path])[-1])
      continue
    count = (_unscanned_shape(prefix + experts, stacked, layout.scan_axis)[0]
             if stacked is not None else
             _unscanned_shape(router_path, flat[router_path], layout.scan_axis)[-1])
    for index in range(num_layers):
      counts[scanned_layer_name("/".join(prefix), index)] = count
  return counts


def _moe_blocks(flat: dict[Path, Any], layout: MoeLayout) -> list[tuple[Path, int | None]]:
  """(path, L) of every subtree holding a router kernel: L layers stacked on the layout's
  scan axis (a router kernel of rank 3), or None for one layer."""
  suffix = split_path(layout.router_kernel)
  blocks = []
  for path, leaf in flat.items():
    if path[-len(suffix):] == suffix:
      shape = None if layout.scan_axis is None else _leaf_shape(path, leaf)
      scanned = shape is not None and len(shape) == 3
      blocks.append((path[:-len(suffix)], shape[layout.scan_axis] if scanned else None))
  return blocks


def _unscanned_shape(path: Path, leaf: Any, axis: int) -> tuple[int, ...]:
  """The per-layer shape of a scanned weight: its shape without the layer axis."""
  shape = _leaf_shape(path, leaf)
  if len(shape) <= axis:
    raise ValueError(f"params: scanned MoE weight {'/'.join(path)!r} has shape {shape}, no "
                     f"layer axis {axis}")
  return shape[:axis] + shape[axis + 1:]


def _take_layer(leaf: Any, axis: int, index: int) -> Any:
  """Layer `index` of a scanned weight (a view of a numpy array; a shape struct for shapes)."""
  if isinstance(leaf, (np.ndarray, jax.Array)):
    return leaf[(slice(None),) * axis + (index,)]
  shape = tuple(leaf.shape)
  return jax.ShapeDtypeStruct(shape[:axis] + shape[axis + 1:], getattr(leaf, "dtype", np.float32))


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
    {layer path: MoeLayerWeights}, in the order the layers appear in `params`. Each
    layer l of a scanned block P (`layout.scan_axis`) is 'P[l]', its weights the slices
    of the block's arrays on the scan axis (views of numpy arrays).

  Raises:
    ValueError: No MoE layer found, a named path missing, a leaf of an MoE layer not named
      by the layout, or shapes that disagree (in a scanned block also the layer axes).

  Example:
    >>> layers = find_moe_layers(params)                 # this project's SMoEDecoder
    >>> layers["layers_0/mlp"].num_experts, layers["layers_0/mlp"].d_ff
    (8, 128)
  """
  expert_counts(params, layout)  # refuses expert weights that are not arrays of rank >= 1
  flat = flatten_params(params)
  blocks = _moe_blocks(flat, layout)
  if not blocks:
    raise ValueError(
        f"no MoE layer found: no parameter path ends with {layout.router_kernel!r} "
        f"(layout {layout}); pass the MoeLayout that describes these params")
  layers = {}
  for prefix, num_layers in blocks:
    if num_layers is None:
      layers["/".join(prefix)] = _read_layer(flat, prefix, layout)
    else:
      layers.update(_read_scanned_block(flat, prefix, layout, num_layers))
  return layers


def _read_scanned_block(flat: dict[Path, Any], prefix: Path, layout: MoeLayout,
                        num_layers: int) -> dict[str, MoeLayerWeights]:
  """The L layers of a scanned block, after checking every weight's layer axis."""
  name, axis = "/".join(prefix), layout.scan_axis
  arrays = _block_arrays(flat, prefix, layout)
  for field_name, array in arrays.items():
    _unscanned_shape(prefix + split_path(getattr(layout, field_name)), array, axis)
    if tuple(array.shape)[axis] != num_layers:
      raise ValueError(
          f"scanned MoE block {name!r}: {field_name} has shape {tuple(array.shape)}, "
          f"{tuple(array.shape)[axis]} layers on the scan axis {axis}; the router kernel "
          f"{tuple(arrays['router_kernel'].shape)} has {num_layers}")
  layers = {}
  for index in range(num_layers):
    layer_name = scanned_layer_name(name, index)
    weights = MoeLayerWeights(**{f.name: (None if arrays.get(f.name) is None else
                                          _take_layer(arrays[f.name], axis, index))
                                 for f in dataclasses.fields(MoeLayerWeights)})
    _check_shapes(layer_name, weights)
    layers[layer_name] = weights
  return layers


def _read_layer(flat: dict[Path, Any], prefix: Path, layout: MoeLayout) -> MoeLayerWeights:
  name = "/".join(prefix)
  arrays = _block_arrays(flat, prefix, layout)
  weights = MoeLayerWeights(**{f.name: arrays.get(f.name)
                               for f in dataclasses.fields(MoeLayerWeights)})
  _check_shapes(name, weights)
  return weights


def _block_arrays(flat: dict[Path, Any], prefix: Path, layout: MoeLayout) -> dict[str, Any]:
  """{field: leaf} of the layout's paths under `prefix`; every leaf there must be named."""
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
  return arrays


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


def has_moe_layers(params: Mapping[str, Any]) -> bool:
  """Whether any known layout finds an MoE layer (a router kernel) in `params`, from shapes
  only (a bound router, with more columns than experts, counts too).

  Example:
    >>> has_moe_layers(dense_params), has_moe_layers(hf_mixtral_params)
    (False, True)
  """
  return any(expert_counts(params, layout) for layout in _KNOWN_LAYOUTS.values())


def detect_layout(params: Mapping[str, Any]) -> MoeLayout:
  """The known layout (`DEFAULT_LAYOUT`, `T5X_LAYOUT`, `T5X_GATED_LAYOUT`, `MAXTEXT_LAYOUT`,
  `HF_MIXTRAL_LAYOUT`, `HF_QWEN_MOE_LAYOUT`, `MAXTEXT_SCANNED_LAYOUT` with scan axis 1 or 0)
  that describes `params`, with the optional biases the params have.

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
    try:
      layers = expert_counts(params, full)
    except ValueError as error:
      reasons.append(f"{name}: {error}")
      continue
    if not layers:
      continue
    blocks = {split_scanned_name(layer)[0] if full.scan_axis is not None else layer
              for layer in layers}
    present = {}
    for field_name in _OPTIONAL_FIELDS:
      rel_path = getattr(full, field_name)
      if rel_path is not None and all(split_path(block) + split_path(rel_path) in flat
                                      for block in blocks):
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
    hint = ("; 4-D expert weights look like scanned layers: MAXTEXT_SCANNED_LAYOUT reads "
            "MaxText's with the layer axis at 1 or 0; for another tree pass "
            "dataclasses.replace(MAXTEXT_SCANNED_LAYOUT, scan_axis=..., <its paths>)")
  raise ValueError(
      f"no known MoE layout ({', '.join(_KNOWN_LAYOUTS)}) fits these params{hint}. "
      f"MoE-like paths seen: {shown or 'none'}. "
      + (f"Candidates that matched a router but failed: {reasons}. " if reasons else "")
      + "Describe the tree with a MoeLayout.")
