"""Helpers of tests/hf/: the committed fixtures and checkpoints derived from them (numpy
only, no PyTorch)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

from uncurl_jax.hf import checkpoint as checkpoint_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FORWARD_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ALL_FAMILIES = FORWARD_FAMILIES + ("deepseek_v2", "deepseek_v3")


def fixture(family: str) -> str:
  return os.path.join(FIXTURES, family)


def expected(family: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(fixture(family), "expected.npz")) as data:
    return {k: data[k] for k in data.files}


def tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory (single file or shards)."""
  ckpt = checkpoint_lib.Checkpoint(directory)
  out = {}
  for shard in sorted(set(ckpt.files.values())):
    out.update(load_file(os.path.join(directory, shard)))
  return out


def copy_checkpoint(source: str, target: str, *, tensors_out: dict[str, np.ndarray] | None = None,
                    config_updates: dict | None = None) -> str:
  """Copies a checkpoint, optionally with new tensors (one file) and config keys."""
  shutil.copytree(source, target)
  if tensors_out is not None:
    for name in os.listdir(target):
      if name.endswith(".safetensors") or name == checkpoint_lib.INDEX_FILE:
        os.remove(os.path.join(target, name))
    save_file(tensors_out, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
  if config_updates:
    path = os.path.join(target, "config.json")
    with open(path) as f:
      config = json.load(f)
    config.update(config_updates)
    with open(path, "w") as f:
      json.dump(config, f)
  return target


def duplicate_pairs(source: str, target: str, *, seed: int = 0) -> str:
  """A top-1 copy of `source` whose expert 2j+1 (every MoE layer) is expert 2j with its
  hidden units permuted and the same router row; gates renormalized over the top-1
  choice (norm_topk_prob), so merging each pair keeps the function exactly."""
  ckpt = checkpoint_lib.Checkpoint(source)
  out = tensors(source)
  rng = np.random.default_rng(seed)
  proj_in, proj_up, proj_down = ckpt.family.experts
  for layer in ckpt.moe_layers:
    prefix = ckpt.block_prefix(layer)
    gate = out[f"{prefix}.gate.weight"].copy()
    for j in range(0, ckpt.num_experts, 2):
      hidden = out[f"{prefix}.experts.{j}.{proj_down}.weight"].shape[1]
      perm = rng.permutation(hidden)
      for proj in (proj_in, proj_up):
        out[f"{prefix}.experts.{j + 1}.{proj}.weight"] = np.ascontiguousarray(
            out[f"{prefix}.experts.{j}.{proj}.weight"][perm])
      out[f"{prefix}.experts.{j + 1}.{proj_down}.weight"] = np.ascontiguousarray(
          out[f"{prefix}.experts.{j}.{proj_down}.weight"][:, perm])
      gate[j + 1] = gate[j]
    out[f"{prefix}.gate.weight"] = gate
  return copy_checkpoint(source, target, tensors_out=out,
                         config_updates={"num_experts_per_tok": 1, "norm_topk_prob": True})


def fused(source: str, target: str) -> str:
  """`source` with its experts in transformers 5's fused layout (gate_up_proj [E, 2I, H],
  down_proj [E, H, I])."""
  ckpt = checkpoint_lib.Checkpoint(source)
  out = tensors(source)
  proj_in, proj_up, proj_down = ckpt.family.experts
  for layer in ckpt.moe_layers:
    prefix = ckpt.block_prefix(layer)
    pop = lambda proj, j: out.pop(f"{prefix}.experts.{j}.{proj}.weight")
    up = [np.concatenate([pop(proj_in, j), pop(proj_up, j)]) for j in range(ckpt.num_experts)]
    down = [pop(proj_down, j) for j in range(ckpt.num_experts)]
    out[f"{prefix}.experts.gate_up_proj"] = np.stack(up)
    out[f"{prefix}.experts.down_proj"] = np.stack(down)
  return copy_checkpoint(source, target, tensors_out=out)


def task_logits(directory: str, *, tokens: int = 64, seed: int = 0,
                pairs: bool = False) -> dict[str, np.ndarray]:
  """Random router logits of every MoE layer ({'layers_<i>/mlp': [T, E]}); with `pairs`,
  columns 2j and 2j+1 are equal (as a model with duplicate router rows gives)."""
  ckpt = checkpoint_lib.Checkpoint(directory)
  rng = np.random.default_rng(seed)
  logits = {}
  for layer in ckpt.moe_layers:
    value = rng.normal(size=(tokens, ckpt.num_experts)).astype(np.float32)
    if pairs:
      value[:, 1::2] = value[:, 0::2]
    logits[f"layers_{layer}/mlp"] = value
  return logits
