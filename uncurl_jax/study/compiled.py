"""Compiled functions kept per model configuration: a bounded number of them.

The study compiles a train step and scorers per model shape. The arms whose router is bound
to experts, the oracle and MC-SMoE's uneven counts have shapes of their own, each used by
one arm of one seed. Kept for the whole run, their executables exhaust a long run's memory
maps: a `full.gin` process aborted after about 1 h 45 min with "LLVM ERROR: Unable to
allocate section memory" (65,530 maps, the kernel's `vm.max_map_count`). A `CompiledCache`
keeps the most recently used ones; evicting one also clears JAX's own caches, so that its
executables are freed (the functions still held are compiled again when next called, from
the study's persistent compilation cache).

  >>> steps = CompiledCache(maxsize=2)
  >>> steps["a"], steps["b"], steps["c"] = 1, 2, 3   # "a" is evicted
  >>> list(steps)
  ['b', 'c']
"""

from __future__ import annotations

import collections
from typing import Any

import jax

MAX_COMPILED = 32  # the default study holds about 20 runs: none is evicted there


class CompiledCache(collections.OrderedDict):
  """A dict of compiled functions (or objects holding them) that keeps the `maxsize` most
  recently used entries; evicting clears JAX's caches (`jax.clear_caches`)."""

  def __init__(self, maxsize: int = MAX_COMPILED):
    if maxsize < 1:
      raise ValueError(f"maxsize must be >= 1, got {maxsize}")
    super().__init__()
    self.maxsize = maxsize

  def __getitem__(self, key: Any) -> Any:
    value = super().__getitem__(key)
    self.move_to_end(key)
    return value

  def __setitem__(self, key: Any, value: Any) -> None:
    super().__setitem__(key, value)
    self.move_to_end(key)
    evicted = len(self) > self.maxsize
    while len(self) > self.maxsize:
      self.popitem(last=False)
    if evicted:
      jax.clear_caches()
