"""Hugging Face checkpoint directories: safetensors in, JAX parameter trees out, and back.

A checkpoint directory holds `config.json`, the weights as one `model.safetensors` or
shards listed by `model.safetensors.index.json`, and usually `tokenizer.json`. Tensors
are read one at a time (`Checkpoint.read`, memory-mapped by safetensors), so a caller
holds only what it asks for: `moe_layer` reads one layer's router and experts, from the
per-expert layout every published checkpoint uses (`experts.<j>.<proj>.weight`) or from
transformers 5's fused one (`experts.gate_up_proj` [E, 2I, H], gate rows first, and
`experts.down_proj` [E, H, I]). `load` reads a whole model for the JAX forward.

Names: on disk `model.layers.<i>.<block>.gate.weight` [E, H] (torch's [out, in]); in the
JAX tree `layers_<i>/mlp/gate/kernel` [H, E], experts stacked as `[E, H, I]` (activated and
linear projections) and `[E, I, H]` (down), see `modeling.py`.

Example:
  >>> ckpt = Checkpoint("Mixtral-8x7B")
  >>> ckpt.family.model_type, ckpt.moe_layers
  ('mixtral', (0, 1, ..., 31))
  >>> layer = ckpt.moe_layer(3)              # {'gate': {'kernel': [H, E]}, 'experts': {...}}
  >>> config, params = load("Mixtral-8x7B")   # the whole model (families with a forward)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import flax
import numpy as np
from safetensors import safe_open

from uncurl_jax.hf import families
from uncurl_jax.hf.config import HfMoeConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class Checkpoint:
  """A Hugging Face checkpoint directory, read lazily tensor by tensor.

  Attributes:
    directory: The directory.
    config: `config.json` as a dict.
    family: Its `families.Family`.
    files: {tensor name: safetensors file name}.
    moe_layers: Indices of the layers with routed experts, per the config.

  Raises (on construction):
    ValueError: Not a directory, no config.json or no safetensors, an unsupported
      `model_type`, or an MoE layer whose tensors are not where the family keeps them.
  """

  def __init__(self, directory: str | os.PathLike):
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
      raise ValueError(f"{directory!r} is not a directory (a Hugging Face checkpoint "
                       "directory with config.json and safetensors)")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
      raise ValueError(f"{directory!r} has no config.json")
    with open(config_path) as f:
      try:
        self.config = json.load(f)
      except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not JSON ({error})") from None
    self.directory = directory
    self.family = families.get(self.config.get("model_type"))
    self.files = _tensor_files(directory)
    self.moe_layers = self.family.moe_layers(self.config)
    self._blocks = {i: self._block_of(i) for i in self.moe_layers}

  @property
  def num_experts(self) -> int:
    return self.family.num_experts(self.config)

  def __repr__(self) -> str:
    return (f"Checkpoint({self.directory!r}: {self.family.model_type}, "
            f"{len(self.moe_layers)} MoE layers x {self.num_experts} experts)")

  def read(self, name: str) -> np.ndarray:
    """One tensor as a numpy array (bfloat16 as `ml_dtypes.bfloat16`)."""
    if name not in self.files:
      raise KeyError(f"{self.directory}: no tensor {name!r}")
    with safe_open(os.path.join(self.directory, self.files[name]), framework="numpy") as f:
      return f.get_tensor(name)

  def shape(self, name: str) -> tuple[int, ...]:
    with safe_open(os.path.join(self.directory, self.files[name]), framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def block_prefix(self, layer: int) -> str:
    """The on-disk prefix of MoE layer `layer`'s block, e.g. 'model.layers.3.mlp'."""
    return f"model.layers.{layer}.{self._blocks[layer]}"

  def moe_tensor_names(self, layer: int) -> list[str]:
    """The on-disk names that `moe_layer(layer)` reads (router, its bias, experts)."""
    prefix = self.block_prefix(layer)
    own = (f"{prefix}.gate.", f"{prefix}.experts.")
    return [n for n in self.files if n.startswith(own)]

  def moe_layer(self, layer: int) -> dict[str, Any]:
    """MoE layer `layer` as a JAX subtree ({'gate': ..., 'experts': ...}, numpy).

    Raises:
      ValueError: Missing experts, or expert tensors of inconsistent shapes.
    """
    prefix = self.block_prefix(layer)
    names = self.family.experts
    tree: dict[str, Any] = {"gate": {"kernel": self.read(f"{prefix}.gate.weight").T}}
    if self.family.router_bias is not None:
      bias_name = f"{prefix}.gate.{self.family.router_bias}"
      if bias_name in self.files:
        tree["gate"][self.family.router_bias] = self.read(bias_name)
    num_experts = tree["gate"]["kernel"].shape[1]
    if f"{prefix}.experts.gate_up_proj" in self.files:  # transformers 5's fused layout
      fused = self.read(f"{prefix}.experts.gate_up_proj")
      down = self.read(f"{prefix}.experts.down_proj")
      half = fused.shape[1] // 2
      experts = {names[0]: fused[:, :half].transpose(0, 2, 1),
                 names[1]: fused[:, half:].transpose(0, 2, 1),
                 names[2]: down.transpose(0, 2, 1)}
    else:
      experts = {}
      for proj in names:
        missing = [j for j in range(num_experts)
                   if f"{prefix}.experts.{j}.{proj}.weight" not in self.files]
        if missing:
          raise ValueError(f"{self.directory}: MoE layer {layer} ({prefix}) lacks experts "
                           f"{missing[:8]} of {proj} (the router has {num_experts} rows)")
        experts[proj] = self._stacked(f"{prefix}.experts.{{}}.{proj}.weight", num_experts)
    if any(a.shape[0] != num_experts for a in experts.values()):
      raise ValueError(f"{self.directory}: MoE layer {layer}: {num_experts} router rows but "
                       f"experts {[a.shape for a in experts.values()]}")
    tree["experts"] = experts
    return tree

  def _stacked(self, pattern: str, num_experts: int) -> np.ndarray:
    """[E, in, out]: expert j's tensor `pattern.format(j)` ([out, in] on disk) transposed,
    filled in place one expert at a time (memory: the result and one expert)."""
    first = self.read(pattern.format(0))
    stacked = np.empty((num_experts,) + first.T.shape, first.dtype)
    stacked[0] = first.T
    for j in range(1, num_experts):
      tensor = self.read(pattern.format(j))
      if tensor.shape != first.shape:
        raise ValueError(f"{self.directory}: {pattern.format(j)} has shape {tensor.shape}, "
                         f"expert 0 has {first.shape}")
      stacked[j] = tensor.T
    return stacked

  def _block_of(self, layer: int) -> str:
    for block in self.family.blocks:
      if f"model.layers.{layer}.{block}.gate.weight" in self.files:
        return block
    raise ValueError(
        f"{self.directory}: layer {layer} should be an MoE layer of this "
        f"{self.family.model_type} model, but no "
        f"{' or '.join(f'model.layers.{layer}.{b}.gate.weight' for b in self.family.blocks)} "
        "is in its safetensors")


def _tensor_files(directory: str) -> dict[str, str]:
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index}: no weight_map")
    missing = sorted({v for v in weight_map.values()
                      if not os.path.isfile(os.path.join(directory, v))})
    if missing:
      raise ValueError(f"{index} lists shards that are not in the directory: {missing[:4]}")
    return dict(weight_map)
  shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  if not shards:
    raise ValueError(f"{directory!r} has no safetensors ({SINGLE_FILE} or shards with "
                     f"{INDEX_FILE})")
  files = {}
  for shard in shards:
    with safe_open(os.path.join(directory, shard), framework="numpy") as f:
      files.update({name: shard for name in f.keys()})
  return files


# ----------------------------------------------------------------------------------------
# Whole models (families with a JAX forward).

_RENAMES = (  # (on-disk pattern after 'model.layers.<i>.', JAX path, transpose)
    (r"(input_layernorm|post_attention_layernorm)\.weight", r"\1/scale", False),
    (r"self_attn\.(q_norm|k_norm)\.weight", r"self_attn/\1/scale", False),
    (r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", r"self_attn/\1/kernel", True),
    (r"self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias", r"self_attn/\1/bias", False),
    (r"mlp\.(gate_proj|up_proj|down_proj)\.weight", r"mlp/\1/kernel", True),
    (r"mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight", r"shared_expert/\1/kernel",
     True),
    (r"mlp\.shared_expert_gate\.weight", r"shared_expert_gate/kernel", True),
)


def _jax_path(name: str) -> tuple[tuple[str, ...], bool] | None:
  """(JAX path, transpose) of a non-expert tensor name, or None if unknown."""
  top = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
         "model.norm.weight": (("norm", "scale"), False),
         "lm_head.weight": (("lm_head", "kernel"), True)}
  if name in top:
    return top[name]
  match = _LAYER.match(name)
  if not match:
    return None
  layer, rest = match.groups()
  for pattern, path, transpose in _RENAMES:
    if re.fullmatch(pattern, rest):
      return (f"layers_{layer}",) + tuple(re.sub(pattern, path, rest).split("/")), transpose
  return None


def load(directory: str | os.PathLike, **config_overrides: Any
         ) -> tuple[HfMoeConfig, dict[str, Any]]:
  """Reads a whole checkpoint: (HfMoeConfig, params as numpy arrays, `modeling.py`'s tree).

  Args:
    directory: The checkpoint directory.
    **config_overrides: `HfMoeConfig` fields to override (e.g. dtype="bfloat16").

  Raises:
    ValueError: A family without a JAX forward (DeepSeek), a tensor this reader does not
      place, or params that do not fit the config (checked by `HfMoeDecoder`'s shapes).

  Example:
    >>> config, params = load("OLMoE-1B-7B-0924")
    >>> logits = HfMoeDecoder(config).apply({"params": params}, tokens)
  """
  ckpt = Checkpoint(directory)
  config = HfMoeConfig.from_hf_config(ckpt.config, **config_overrides)
  flat: dict[tuple[str, ...], Any] = {}
  moe_names = {n for i in ckpt.moe_layers for n in ckpt.moe_tensor_names(i)}
  unknown = []
  for name in ckpt.files:
    if name in moe_names:
      continue
    placed = _jax_path(name)
    if placed is None:
      if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints carry
        continue
      unknown.append(name)
      continue
    path, transpose = placed
    array = ckpt.read(name)
    flat[path] = array.T if transpose else array
  if unknown:
    raise ValueError(f"{ckpt.directory}: tensors this {ckpt.family.model_type} reader does "
                     f"not place: {unknown[:6]}{' ...' if len(unknown) > 6 else ''}")
  for layer in ckpt.moe_layers:
    subtree = flax.traverse_util.flatten_dict(ckpt.moe_layer(layer))
    flat.update({(f"layers_{layer}", "mlp") + k: v for k, v in subtree.items()})
  params = flax.traverse_util.unflatten_dict(flat)
  return config, params

