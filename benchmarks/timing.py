"""Wall-clock timing of jax calls for the benchmarks (compile happens in the warm-ups)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def time_ms(fn: Callable, *args, warmup: int = 2, iters: int = 10,
            reduce: Callable = statistics.median) -> float:
  """`reduce` (median by default) of the milliseconds of `iters` calls after `warmup`."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append((time.perf_counter() - start) * 1e3)
  return reduce(samples)
