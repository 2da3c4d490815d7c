"""One MoE layer against a dense FFN with the same active FLOPs, side by side.

Times forward and forward+backward of `uncurl_jax.moe.MoeLayer` (top-1) for several
expert counts and both dispatch implementations, and a dense GELU FFN d -> f -> d over
the same tokens (what a top-1 MoE layer with capacity factor 1 computes per token).
Prints milliseconds and the MoE / dense ratios.

Full size (the 354M shape, for the GPU machine):
  python benchmarks/moe_layer.py
Reduced size for CPU:
  python benchmarks/moe_layer.py --tokens=2048 --d_model=256 --d_ff=1024 --experts=8,32,64 \
      --dtype=float32
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from uncurl_jax.model import configs
from uncurl_jax.model import moe

from timing import time_ms  # benchmarks/timing.py


class DenseFFN(nn.Module):
  d_ff: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.d_ff, dtype=self.dtype)(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype)(h)


def _fwd_and_grad(module, x, call_kw):
  """Params, jitted forward and jitted grad (w.r.t. params and input) of `module`."""
  init = jax.jit(functools.partial(module.init, **call_kw))
  params = init(jax.random.key(0), x)["params"]

  def loss(p, x):
    y = module.apply({"params": p}, x, **call_kw, mutable=["intermediates"])[0]
    return jnp.mean(y.astype(jnp.float32) ** 2)

  fwd = jax.jit(lambda p, x: module.apply({"params": p}, x, **call_kw,
                                          mutable=["intermediates"])[0])
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return params, fwd, bwd


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--d_ff", type=int, default=4096)
  parser.add_argument("--experts", default="8,32,64,128")
  parser.add_argument("--dispatch", default="einsum,gather")
  parser.add_argument("--group_size", type=int, default=1024)
  parser.add_argument("--capacity_factor", type=float, default=1.0)
  parser.add_argument("--dtype", default="bfloat16", choices=configs.DTYPES)
  parser.add_argument("--iters", type=int, default=10)
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  seq = args.group_size
  x = jax.random.normal(jax.random.key(1), (args.tokens // seq, seq, args.d_model), dtype)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  tokens={args.tokens} "
        f"d={args.d_model} f={args.d_ff} dtype={args.dtype} group={seq} "
        f"capacity_factor={args.capacity_factor}")

  dense = DenseFFN(args.d_ff, dtype)
  params, fwd, bwd = _fwd_and_grad(dense, x, {})
  dense_fwd, dense_bwd = time_ms(fwd, params, x, iters=args.iters), time_ms(bwd, params, x,
                                                                          iters=args.iters)
  print(f"{'variant':<22}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd ratio':>11}{'f+b ratio':>11}")
  print(f"{'dense FFN':<22}{dense_fwd:>10.2f}{dense_bwd:>12.2f}{1.0:>11.2f}{1.0:>11.2f}")
  for num_experts in (int(e) for e in args.experts.split(",")):
    for dispatch in args.dispatch.split(","):
      cfg = configs.ModelConfig(vocab_size=8, max_length=seq, d_model=args.d_model,
                                d_ff=args.d_ff, num_heads=1, num_layers=1,
                                num_experts=num_experts, dispatch=dispatch, dtype=args.dtype,
                                train_capacity_factor=args.capacity_factor,
                                eval_capacity_factor=args.capacity_factor)
      params, fwd, bwd = _fwd_and_grad(moe.MoeLayer(cfg), x, {"deterministic": True})
      t_fwd = time_ms(fwd, params, x, iters=args.iters)
      t_bwd = time_ms(bwd, params, x, iters=args.iters)
      print(f"{f'E={num_experts} {dispatch}':<22}{t_fwd:>10.2f}{t_bwd:>12.2f}"
            f"{t_fwd / dense_fwd:>11.2f}{t_bwd / dense_bwd:>11.2f}", flush=True)


if __name__ == "__main__":
  main()
