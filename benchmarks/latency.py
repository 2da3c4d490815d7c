"""Forward latency of the SMoE LM against expert count under expert parallelism.

For each expert count and each expert-parallel degree (experts sharded over 1, 2, 4, 8
devices of a ('data', 'expert', 'model') mesh, batch over all devices), times the full
forward pass (mean of `--iters` passes after `--warmup` discarded, the paper's protocol)
and splits it into all-to-all, expert compute and the rest: the two all-to-all exchanges
and the local expert FFN of one MoE layer are timed alone on the same buffer shapes
inside `shard_map`, times the number of MoE layers; the rest is the remainder. Also
times a model pruned 32 -> 8 experts against the 8-expert model built from scratch.

On 8 simulated CPU devices (the default here):
  python benchmarks/latency.py
On a GPU machine with 8 GPUs at the paper's size:
  python benchmarks/latency.py --host_devices=0 --preset=354m
Prints a table and writes a plot (`--plot`).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--host_devices", type=int, default=8,
                      help="simulated CPU devices (0: use the real devices)")
  parser.add_argument("--preset", default="cpu", choices=("cpu", "tiny", "354m"))
  parser.add_argument("--experts", default="8,32,64,128")
  parser.add_argument("--shards", default="1,2,4,8")
  parser.add_argument("--batch_per_device", default="2,8",
                      help="the paper's 2 and a larger batch")
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--plot", default="benchmarks/latency.png")
  return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.host_devices:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.host_devices}")

import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from uncurl_jax import model as model_lib
from uncurl_jax import pruning  # noqa: E402
from uncurl_jax.model import configs, moe, partitioning  # noqa: E402
from uncurl_jax.model.decoder import SMoEDecoder  # noqa: E402

from timing import time_ms  # noqa: E402  (benchmarks/timing.py)

# "cpu": a 4-block model small enough for simulated devices on 2 cores.
SIZES = {"cpu": dict(preset="tiny", d_model=256, d_ff=1024, num_heads=4, num_layers=4,
                     max_length=256),
         "tiny": dict(preset="tiny"),
         "354m": dict(preset="354m")}


def _config(size: str, num_experts: int, length: int) -> configs.ModelConfig:
  overrides = dict(SIZES[size])
  preset = overrides.pop("preset")
  overrides["max_length"] = max(overrides.get("max_length", length), length)
  return configs.get(preset, num_experts=num_experts, **overrides)


def forward_ms(cfg, params, mesh, batch: int, length: int, args) -> float:
  model = SMoEDecoder(cfg)
  tokens = jax.device_put(np.ones((batch, length), np.int32), partitioning.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, t, enable_dropout=False))
    return time_ms(fwd, params, tokens, warmup=args.warmup, iters=args.iters,
                   reduce=statistics.mean)


def moe_parts_ms(cfg, mesh, batch: int, length: int, args) -> tuple[float, float]:
  """(all-to-all ms, expert-compute ms) of one MoE layer on this mesh's buffer shapes."""
  shards = mesh.shape["expert"]
  batch_shards = partitioning.num_batch_shards(mesh)
  groups_local = batch // batch_shards  # one sequence per routing group
  capacity = cfg.capacity(length, train=False)
  dtype = jnp.dtype(cfg.dtype)
  e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
  buffers = jnp.ones((e * batch_shards, groups_local, capacity, d), dtype)
  weights = moe.ExpertWeights(jnp.ones((e, d, f), dtype) * 0.01, jnp.zeros((e, f), dtype),
                              jnp.ones((e, f, d), dtype) * 0.01, jnp.zeros((e, d), dtype))
  specs = moe.ExpertWeights(P("expert"), P("expert"), P("expert"), P("expert"))
  batch_axes = partitioning.BATCH_AXES

  def exchange(buf):
    if shards == 1:
      return buf
    there = jax.lax.all_to_all(buf, "expert", 0, 1, tiled=True)
    return jax.lax.all_to_all(there, "expert", 1, 0, tiled=True)

  def compute(buf, w):
    # What each shard computes after the exchange: its E/n experts on n*G groups.
    local = buf.reshape(e // shards, groups_local * shards, capacity, d)
    return moe.expert_ffn(local, w, dtype=dtype)

  with jax.set_mesh(mesh):
    a2a = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=P(batch_axes),
                                out_specs=P(batch_axes)))
    ffn = jax.jit(jax.shard_map(compute, mesh=mesh, in_specs=(P(batch_axes), specs),
                                out_specs=P(batch_axes)))
    buffers = jax.device_put(buffers, jax.sharding.NamedSharding(mesh, P(batch_axes)))
    timing = dict(warmup=args.warmup, iters=args.iters, reduce=statistics.mean)
    t_a2a = time_ms(a2a, buffers, **timing)
    t_ffn = time_ms(ffn, buffers, weights, **timing)
  return t_a2a, t_ffn


def _init(cfg, mesh, batch, length, seed=0):
  return partitioning.init_params(SMoEDecoder(cfg), jax.random.key(seed), (batch, length),
                                  mesh)[0]


def main(args):
  devices = jax.devices()
  print(f"devices: {len(devices)} x {devices[0].device_kind}  preset={args.preset} "
        f"length={args.length}  mean of {args.iters} after {args.warmup} warm-up passes")
  rows = []
  header = (f"{'experts':>8}{'shards':>7}{'batch':>7}{'total ms':>10}{'all2all':>9}"
            f"{'experts':>9}{'rest':>8}")
  print(header)
  for per_device in (int(b) for b in args.batch_per_device.split(",")):
    batch = per_device * len(devices)
    for num_experts in (int(e) for e in args.experts.split(",")):
      cfg = _config(args.preset, num_experts, args.length)
      for shards in (int(s) for s in args.shards.split(",")):
        if num_experts % shards or len(devices) % shards:
          continue
        mesh = partitioning.make_mesh(expert=shards)
        params = _init(cfg, mesh, batch, args.length)
        total = forward_ms(cfg, params, mesh, batch, args.length, args)
        a2a, ffn = moe_parts_ms(cfg, mesh, batch, args.length, args)
        layers = len(cfg.moe_layers)
        rest = total - layers * (a2a + ffn)
        rows.append((num_experts, shards, batch, total, layers * a2a, layers * ffn, rest))
        print(f"{num_experts:>8}{shards:>7}{batch:>7}{total:>10.2f}{layers * a2a:>9.2f}"
              f"{layers * ffn:>9.2f}{rest:>8.2f}", flush=True)
  _pruned_vs_scratch(args)
  if args.plot:
    _plot(rows, args.plot)


def _pruned_vs_scratch(args):
  """A 32 -> 8 pruned model against an 8-expert model from scratch, same mesh."""
  devices = jax.devices()
  shards = min(8, len(devices))
  mesh = partitioning.make_mesh(expert=shards)
  batch = 2 * len(devices)
  source_cfg = _config(args.preset, 32, args.length)
  target_cfg = _config(args.preset, 8, args.length)
  one_device = partitioning.make_mesh(data=1, devices=devices[:1])
  source = jax.device_get(_init(source_cfg, one_device, batch, args.length))
  rng = np.random.default_rng(0)
  logits = {path: rng.normal(size=(4096, 32)).astype(np.float32)
            for path in model_lib.find_moe_layers(source)}
  pruned = pruning.prune_params(source, logits, 8, method="frequency")
  shardings = partitioning.init_params(SMoEDecoder(target_cfg), jax.random.key(1),
                                       (batch, args.length), mesh)[1]
  pruned = jax.device_put(pruned, shardings)
  scratch = _init(target_cfg, mesh, batch, args.length, seed=1)
  t_pruned = forward_ms(target_cfg, pruned, mesh, batch, args.length, args)
  t_scratch = forward_ms(target_cfg, scratch, mesh, batch, args.length, args)
  print(f"pruned 32->8: {t_pruned:.2f} ms, 8 experts from scratch: {t_scratch:.2f} ms, "
        f"ratio {t_pruned / t_scratch:.3f} (target <= 1.05)")


def _plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, batch in zip(axes, sorted({r[2] for r in rows})):
    for shards in sorted({r[1] for r in rows}):
      pts = [(r[0], r[3]) for r in rows if r[1] == shards and r[2] == batch]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=f"{shards} expert shards")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts per MoE layer")
    ax.set_ylabel("forward latency (ms)")
    ax.set_title(f"batch {batch}")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


if __name__ == "__main__":
  main(ARGS)
  sys.exit(0)
