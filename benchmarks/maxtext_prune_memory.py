"""Peak memory of `python -m uncurl_jax.maxtext.prune` on a generated scanned checkpoint.

Runs three child processes from a parent that imports nothing but the standard library
(a child's `ru_maxrss` starts from its parent's resident size at fork, so the parent must
stay small): (1) `python -m uncurl_jax.maxtext.example` generates a MaxText checkpoint
(MaxText's paths and shapes, scanned layers on axis 1, float32, random weights) and its
router logits; (2) a process that only imports the command's modules and loads the
checkpoint's params (the floor: the params once, plus jax and orbax); (3) the command.
Each child's peak resident set size comes from `os.wait4` (its own `ru_maxrss`). Prints
both peaks, the sizes of the params and of their MoE part, and the command's time.

  python benchmarks/maxtext_prune_memory.py                # DeepSeek, 8 MoE layers, 0.4 GB
  python benchmarks/maxtext_prune_memory.py --model=mixtral --num_experts=64 --keep=8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_LOAD = """
import json, sys
import numpy as np
from uncurl_jax import pruning
from uncurl_jax.maxtext import checkpoints, prune, reference
params, _ = checkpoints.load_params(sys.argv[1])
block = reference.BLOCK_NAMES[sys.argv[2]].split("/")[-1]
leaves = reference.flax_paths(params)
print(json.dumps({"total": sum(a.nbytes for _, a in leaves),
                  "moe": sum(a.nbytes for p, a in leaves if block in p)}))
"""


def _child(args: list[str]) -> tuple[float, float, str]:
  """(peak RSS in MiB, seconds, stdout) of a child process; raises if it fails."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=out, stderr=err)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
      err.seek(0)
      raise SystemExit(f"{args[:3]} failed:\n{err.read()[-3000:]}")
    out.seek(0)
    return usage.ru_maxrss / 1024, seconds, out.read()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="deepseek", choices=("mixtral", "qwen3", "deepseek"))
  parser.add_argument("--num_experts", type=int, default=32)
  parser.add_argument("--num_layers", type=int, default=9)
  parser.add_argument("--emb_dim", type=int, default=256)
  parser.add_argument("--moe_mlp_dim", type=int, default=512)
  parser.add_argument("--keep", type=int, default=8)
  parser.add_argument("--method", default="uncurl")
  parser.add_argument("--router", default="merge")
  parser.add_argument("--tokens", type=int, default=512)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as root:
    example = os.path.join(root, "example")
    _, made_s, _ = _child([
        sys.executable, "-m", "uncurl_jax.maxtext.example", f"--output_dir={example}",
        f"--model={args.model}", f"--num_experts={args.num_experts}",
        f"--num_layers={args.num_layers}", f"--emb_dim={args.emb_dim}",
        f"--moe_mlp_dim={args.moe_mlp_dim}", f"--tokens={args.tokens}"])
    checkpoint = os.path.join(example, "checkpoint")
    floor, floor_s, sizes = _child([sys.executable, "-c", _LOAD, checkpoint, args.model])
    sizes = {k: v / 2**20 for k, v in json.loads(sizes).items()}
    peak, seconds, _ = _child([
        sys.executable, "-m", "uncurl_jax.maxtext.prune", f"--checkpoint_path={checkpoint}",
        f"--router_logits={os.path.join(example, 'router_logits.npz')}",
        f"--num_experts={args.keep}", f"--method={args.method}", f"--router={args.router}",
        f"--output_dir={os.path.join(root, 'out')}"])
  num_moe = args.num_layers - 1 if args.model == "deepseek" else args.num_layers
  print(f"model {args.model}: {num_moe} scanned MoE layers x {args.num_experts} experts "
        f"(emb {args.emb_dim}, mlp {args.moe_mlp_dim}) -> {args.keep}, method {args.method}, "
        f"router {args.router} (example generated in {made_s:.1f} s)")
  print(f"params: {sizes['total']:.0f} MiB (MoE blocks {sizes['moe']:.0f} MiB, float32); "
        f"pruned MoE blocks: {sizes['moe'] * args.keep / args.num_experts:.0f} MiB")
  print(f"peak RSS, load only:     {floor:.0f} MiB ({floor_s:.1f} s)")
  print(f"peak RSS, prune command: {peak:.0f} MiB ({seconds:.1f} s): {peak - floor:.0f} MiB "
        f"above load only, {(peak - floor) / sizes['total']:.2f}x the params")


if __name__ == "__main__":
  main()
