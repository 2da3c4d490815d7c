"""Peak memory and time of `python -m uncurl_jax.hf.prune` on a generated checkpoint.

Writes a Mixtral-shaped bfloat16 checkpoint (default 8 layers x 32 experts, hidden 1024,
expert width 2816: 4.6 GB, one shard per layer as published checkpoints are sharded) with
random weights, and router logits for its MoE layers, then prunes it to `--num_experts`
with each `--methods` entry in a child process and reads the child's peak resident memory
(`getrusage(RUSAGE_CHILDREN).ru_maxrss`, one fresh process per method). Prints, per
method, seconds, peak RSS, and the bound the issue sets: the largest MoE layer's bytes plus
1 GiB. The baseline RSS of a process that only imports the command is printed beside it.

  python benchmarks/hf_prune_memory.py --directory=/tmp/hf_bench
  python benchmarks/hf_prune_memory.py --directory=/tmp/hf_bench --layers=2 --experts=8  # quick
  (--keep keeps the generated checkpoint, --reuse reuses it)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

GIB = 1 << 30


def make_checkpoint(directory: str, *, layers: int, experts: int, hidden: int, width: int,
                    vocab: int, seed: int = 0) -> int:
  """Writes the checkpoint; returns the bytes of its largest MoE layer."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  heads = hidden // 128
  config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": width,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "num_local_experts": experts,
            "num_experts_per_tok": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 1e6, "sliding_window": None, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  bf16 = lambda *shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(
      ml_dtypes.bfloat16)
  weight_map, shards = {}, layers + 1
  largest = 0
  for layer in range(layers):
    tensors = {}
    prefix = f"model.layers.{layer}"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      tensors[f"{prefix}.self_attn.{name}.weight"] = bf16(hidden, hidden)
    tensors[f"{prefix}.input_layernorm.weight"] = np.ones(hidden, ml_dtypes.bfloat16)
    tensors[f"{prefix}.post_attention_layernorm.weight"] = np.ones(hidden, ml_dtypes.bfloat16)
    moe = f"{prefix}.block_sparse_moe"
    tensors[f"{moe}.gate.weight"] = bf16(experts, hidden)
    for j in range(experts):
      tensors[f"{moe}.experts.{j}.w1.weight"] = bf16(width, hidden)
      tensors[f"{moe}.experts.{j}.w3.weight"] = bf16(width, hidden)
      tensors[f"{moe}.experts.{j}.w2.weight"] = bf16(hidden, width)
    largest = max(largest, sum(a.nbytes for n, a in tensors.items() if n.startswith(moe)))
    name = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
    save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
    weight_map.update({n: name for n in tensors})
    del tensors
  rest = {"model.embed_tokens.weight": bf16(vocab, hidden), "model.norm.weight":
          np.ones(hidden, ml_dtypes.bfloat16), "lm_head.weight": bf16(vocab, hidden)}
  name = f"model-{shards:05d}-of-{shards:05d}.safetensors"
  save_file(rest, os.path.join(directory, name), metadata={"format": "pt"})
  weight_map.update({n: name for n in rest})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return largest


def child_peak(command: list[str]) -> tuple[float, float, str]:
  """(seconds, peak RSS GiB, output) of a child process, started by a small wrapper
  process: a child's ru_maxrss starts from its parent's resident size at fork (Linux keeps
  the larger of the two across exec), so this process, which held a layer while writing
  the checkpoint, must not be the parent. The wrapper's RUSAGE_CHILDREN is the command's."""
  wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.exit(r.returncode)")
  start = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True,
                          text=True)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise SystemExit(f"{command} failed:\n{result.stderr[-3000:]}")
  peak_kb = int(result.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
  return seconds, peak_kb / (1 << 20), result.stdout + result.stderr


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--directory", required=True)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--experts", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--width", type=int, default=2816)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--num_experts", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--methods", default="frequency:anchor,uncurl:merge")
  parser.add_argument("--keep", action="store_true", help="Keep the generated files.")
  parser.add_argument("--reuse", action="store_true",
                      help="Reuse a checkpoint of the same shape kept by --keep.")
  args = parser.parse_args()

  source = os.path.join(args.directory, "source")
  start = time.perf_counter()
  shape = dict(layers=args.layers, experts=args.experts, hidden=args.hidden, width=args.width,
               vocab=args.vocab)
  stamp = os.path.join(args.directory, "shape.json")
  if args.reuse and os.path.isfile(stamp) and json.load(open(stamp))["shape"] == shape:
    largest = json.load(open(stamp))["largest"]
  else:
    shutil.rmtree(args.directory, ignore_errors=True)
    largest = make_checkpoint(source, **shape)
    with open(stamp, "w") as f:
      json.dump({"shape": shape, "largest": largest}, f)
  total = sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source))
  print(f"checkpoint: {total / GIB:.2f} GiB in {args.layers} layers x {args.experts} experts, "
        f"largest MoE layer {largest / GIB:.3f} GiB (written in "
        f"{time.perf_counter() - start:.0f}s)")
  rng = np.random.default_rng(1)
  logits_path = os.path.join(args.directory, "logits.npz")
  np.savez(logits_path, **{f"layers_{i}/mlp": rng.standard_normal(
      (args.tokens, args.experts), np.float32) for i in range(args.layers)})

  _, baseline, _ = child_peak([sys.executable, "-c", "import uncurl_jax.hf.prune"])
  bound = (largest + GIB) / GIB
  print(f"baseline (import only): peak RSS {baseline:.2f} GiB; bound: largest layer + 1 GiB "
        f"= {bound:.2f} GiB")
  print("| method | router | seconds | peak RSS GiB | peak / bound |")
  print("|---|---|---|---|---|")
  for entry in args.methods.split(","):
    method, router = entry.split(":")
    output = os.path.join(args.directory, f"out_{method}")
    seconds, peak, _ = child_peak([
        sys.executable, "-m", "uncurl_jax.hf.prune", f"--model={source}",
        f"--output={output}", f"--logits={logits_path}", f"--num_experts={args.num_experts}",
        f"--method={method}", f"--router={router}"])
    print(f"| {method} | {router} | {seconds:.1f} | {peak:.2f} | {peak / bound:.2f} |",
          flush=True)
    shutil.rmtree(output, ignore_errors=True)
  if not args.keep:
    shutil.rmtree(args.directory, ignore_errors=True)


if __name__ == "__main__":
  main()
