"""The Hugging Face MoE families `uncurl_jax.hf` reads: their names, experts and configs.

A family says where a checkpoint keeps its MoE layers (`model.layers.<i>.<block>`), how
it names the router and the experts on disk (per expert, as every published checkpoint
and `save_pretrained` write them; or fused, as transformers 5 holds them in memory), which
config keys hold the expert count and the top-k, and which layers are MoE.

| family (`model_type`) | MoE block on disk | experts (activated, linear, down) | forward |
|---|---|---|---|
| mixtral | `block_sparse_moe` (or `mlp`) | `w1`, `w3`, `w2` | yes |
| qwen2_moe | `mlp` (+ `shared_expert`, `shared_expert_gate`) | `gate_proj`, `up_proj`, `down_proj` | yes |
| qwen3_moe | `mlp` | `gate_proj`, `up_proj`, `down_proj` | yes |
| olmoe | `mlp` | `gate_proj`, `up_proj`, `down_proj` | yes |
| deepseek_v2, deepseek_v3 | `mlp` (+ `shared_experts`, V3: `gate.e_score_correction_bias`) | `gate_proj`, `up_proj`, `down_proj` | no (prune only) |

Example:
  >>> family = get("mixtral")
  >>> family.moe_layers({"num_hidden_layers": 4, ...})
  (0, 1, 2, 3)
  >>> family.num_experts(config)
  8
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from uncurl_jax.model import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class Family:
  """How one Hugging Face MoE family stores its MoE layers.

  Attributes:
    model_type: `config.json`'s `model_type`.
    blocks: Names of the MoE block under `model.layers.<i>.` on disk; the first is
      written back (Mixtral's checkpoints say `block_sparse_moe`, transformers 5's
      modules `mlp`).
    experts: On-disk names of each expert's (activated, linear, down) projections.
    layout: The `MoeLayout` of the JAX tree `uncurl_jax.hf` builds for this family.
    expert_count_keys: Config keys that may hold the routed expert count (the first
      present is read; every present one is rewritten: transformers 5 writes Qwen3-MoE's
      as `num_local_experts`, published checkpoints as `num_experts`).
    forward: Whether `uncurl_jax.hf` has a JAX forward for the family.
    router_bias: On-disk name (under `gate.`) of a selection bias [E], if the family has
      one (DeepSeek-V3's `e_score_correction_bias`).
  """

  model_type: str
  blocks: tuple[str, ...]
  experts: tuple[str, str, str]
  layout: layout_lib.MoeLayout
  expert_count_keys: tuple[str, ...]
  forward: bool
  router_bias: str | None = None

  def moe_layers(self, config: Mapping[str, Any]) -> tuple[int, ...]:
    """Indices of the decoder layers with routed experts."""
    layers = int(config["num_hidden_layers"])
    if self.model_type in ("mixtral", "olmoe"):
      return tuple(range(layers))
    if self.model_type.startswith("deepseek"):
      dense = int(config.get("first_k_dense_replace", 0))
      every = int(config.get("moe_layer_freq", 1))
      return tuple(i for i in range(layers) if i >= dense and i % every == 0)
    only_mlp = set(config.get("mlp_only_layers") or ())
    step = int(config.get("decoder_sparse_step", 1))
    return tuple(i for i in range(layers)
                 if i not in only_mlp and self.num_experts(config) > 0
                 and (i + 1) % step == 0)

  def num_experts(self, config: Mapping[str, Any]) -> int:
    """The routed expert count of `config`."""
    for key in self.expert_count_keys:
      if key in config:
        return int(config[key])
    raise ValueError(f"{self.model_type} config.json has none of {self.expert_count_keys}")

  def with_num_experts(self, config: Mapping[str, Any], count: int) -> dict[str, Any]:
    """`config` with every expert-count key set to `count` and the top-k at most it."""
    new = dict(config)
    for key in self.expert_count_keys:
      if key in new:
        new[key] = int(count)
    if "num_experts_per_tok" in new:
      new["num_experts_per_tok"] = min(int(new["num_experts_per_tok"]), int(count))
    return new


_QWEN_EXPERTS = ("gate_proj", "up_proj", "down_proj")
_QWEN_LAYOUT = layout_lib.HF_QWEN_MOE_LAYOUT
_QWEN_COUNT = ("num_experts", "num_local_experts")

FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", ("block_sparse_moe", "mlp"), ("w1", "w3", "w2"),
                      layout_lib.HF_MIXTRAL_LAYOUT, ("num_local_experts", "num_experts"), forward=True),
    "qwen2_moe": Family("qwen2_moe", ("mlp",), _QWEN_EXPERTS, _QWEN_LAYOUT, _QWEN_COUNT,
                        forward=True),
    "qwen3_moe": Family("qwen3_moe", ("mlp",), _QWEN_EXPERTS, _QWEN_LAYOUT, _QWEN_COUNT,
                        forward=True),
    "olmoe": Family("olmoe", ("mlp",), _QWEN_EXPERTS, _QWEN_LAYOUT, _QWEN_COUNT,
                    forward=True),
    "deepseek_v2": Family("deepseek_v2", ("mlp",), _QWEN_EXPERTS, _QWEN_LAYOUT,
                          ("n_routed_experts",), forward=False),
    "deepseek_v3": Family("deepseek_v3", ("mlp",), _QWEN_EXPERTS,
                          dataclasses.replace(_QWEN_LAYOUT,
                                              router_bias="gate/e_score_correction_bias"),
                          ("n_routed_experts",), forward=False,
                          router_bias="e_score_correction_bias"),
}


def get(model_type: Any) -> Family:
  """The family of a `model_type`; ValueError naming the supported ones otherwise."""
  if model_type not in FAMILIES:
    raise ValueError(f"unsupported model_type {model_type!r}: uncurl_jax.hf reads "
                     f"{sorted(FAMILIES)}")
  return FAMILIES[model_type]
