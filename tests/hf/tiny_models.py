"""Tiny random Hugging Face MoE models, made by transformers itself (needs torch).

Used by `tests/hf/` (marker `hf`) and by `make_fixtures.py`, which commits their
checkpoints and transformers' outputs so that the plain suite checks the JAX forward
without PyTorch.

Example:
  >>> model = make_model("qwen3_moe", seed=0)
  >>> model.save_pretrained(directory)
"""

from __future__ import annotations

import numpy as np

VOCAB = 96
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
PRUNE_ONLY = ("deepseek_v2", "deepseek_v3")


def config_for(family: str, *, num_experts: int = 8, top_k: int = 2,
               norm_topk_prob: bool | None = None):
  """A tiny transformers config of `family` (every feature the reader handles used)."""
  import transformers
  common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, num_experts_per_tok=top_k,
                tie_word_embeddings=False, rms_norm_eps=1e-6)
  if family == "mixtral":
    return transformers.MixtralConfig(intermediate_size=24, num_hidden_layers=2,
                                      num_local_experts=num_experts, sliding_window=None,
                                      **common)
  if family == "qwen2_moe":
    return transformers.Qwen2MoeConfig(
        intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=3, num_experts=num_experts, decoder_sparse_step=1,
        mlp_only_layers=[1], use_sliding_window=False,
        norm_topk_prob=bool(norm_topk_prob), **common)
  if family == "qwen3_moe":
    return transformers.Qwen3MoeConfig(
        intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3, head_dim=16,
        num_experts=num_experts, decoder_sparse_step=1, mlp_only_layers=[0],
        norm_topk_prob=True if norm_topk_prob is None else norm_topk_prob, **common)
  if family == "olmoe":
    common["num_key_value_heads"] = 4  # OLMoE's k_norm assumes hidden/heads per kv head
    return transformers.OlmoeConfig(intermediate_size=16, num_hidden_layers=2,
                                    num_experts=num_experts, clip_qkv=2.0,
                                    norm_topk_prob=bool(norm_topk_prob), **common)
  deepseek = dict(common, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16,
                  num_hidden_layers=3, n_routed_experts=num_experts, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
                  q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
  if family == "deepseek_v2":
    return transformers.DeepseekV2Config(**deepseek)
  if family == "deepseek_v3":
    return transformers.DeepseekV3Config(**deepseek)
  raise ValueError(family)


def make_model(family: str, *, seed: int = 0, duplicate_pairs: bool = False, **kwargs):
  """A random tiny model in float32 (weights drawn wider than the default init, norms
  away from 1, so that every piece matters). With `duplicate_pairs`, expert 2j+1 of every
  MoE layer is a copy of expert 2j with its hidden units permuted, and the two router
  rows are equal."""
  import torch
  import transformers
  torch.manual_seed(seed)
  config = config_for(family, **kwargs)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
      else:
        param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    for name, buffer in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias
        buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    if duplicate_pairs:
      _make_duplicate_pairs(model, generator)
  return model


def _make_duplicate_pairs(model, generator) -> None:
  import torch
  for name, module in model.named_modules():
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    if experts is None or gate is None or not hasattr(experts, "gate_up_proj"):
      continue
    up, down = experts.gate_up_proj, experts.down_proj   # [E, 2I, H], [E, H, I]
    hidden = down.shape[-1]
    for j in range(0, up.shape[0], 2):
      perm = torch.randperm(hidden, generator=generator)
      rows = torch.cat([perm, perm + hidden])
      up[j + 1] = up[j][rows]
      down[j + 1] = down[j][:, perm]
      gate.weight[j + 1] = gate.weight[j]


def tokens(seed: int = 0, batch: int = 2, length: int = 12) -> np.ndarray:
  return np.random.default_rng(seed).integers(1, VOCAB, (batch, length)).astype(np.int64)


def reference_outputs(model, ids: np.ndarray) -> dict[str, np.ndarray]:
  """transformers' logits [B, L, V] and router logits per MoE layer [B*L, E]."""
  import torch
  with torch.no_grad():
    out = model(torch.as_tensor(ids), output_router_logits=True)
  result = {"logits": out.logits.float().numpy()}
  for i, layer_logits in enumerate(out.router_logits or ()):
    result[f"router_{i}"] = layer_logits.float().numpy()
  return result
