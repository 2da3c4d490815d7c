"""Weight-matching alignment of an expert's hidden units to a reference expert.

An expert is x -> act(x @ wi + wi_bias) @ wo + wo_bias, or, gated (GeGLU, SwiGLU),
x -> (act(x @ gate + gate_bias) * (x @ wi + wi_bias)) @ wo + wo_bias; permuting its d_ff
hidden units (columns of gate and wi, entries of their biases, rows of wo) leaves its
function unchanged. Before averaging two experts we find the permutation P of the
member's hidden units that best matches the reference (anchor) expert's: maximize over P
the sum over hidden units j of <in_a[j], in_m[P j]> + <out_a[j], out_m[P j]>, where
in[j] = (wi[:, j], wi_bias[j], gate[:, j], gate_bias[j]) and out[j] = wo[j, :]. That is
a linear assignment on the [f, f] cost
  C = wi_a^T wi_m + wi_bias_a wi_bias_m^T + gate_a^T gate_m + gate_bias_a gate_bias_m^T
      + wo_a wo_m^T,
solved exactly by `scipy.optimize.linear_sum_assignment(C, maximize=True)`; the gate and
up projections of a hidden unit move together.

Cost matrices are computed with jax in float32 (on the accelerator when there is one);
the assignments run in a thread pool: scipy's assignment solver releases the GIL
(measured: 2 threads solve 4 2048x2048 problems 1.5x faster than 1 on a busy 2-core
machine), so threads parallelize it without copying cost matrices between processes.
`align_experts` overlaps cost matrices and assignments when an accelerator computes the
former, and alternates between them on a CPU backend (see its docstring).

Example:
  >>> tasks = [AlignmentTask("layers_0/mlp", reference=3, member=5)]
  >>> [alignment] = align_experts(moe_layers, tasks)
  >>> alignment.permutation.shape, alignment.score_before, alignment.score_after
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from absl import logging

from uncurl_jax.model import layout as layout_lib


@dataclasses.dataclass(frozen=True)
class AlignmentTask:
  """Align expert `member` of MoE layer `layer` to expert `reference` of that layer."""

  layer: str
  reference: int
  member: int


@dataclasses.dataclass(frozen=True)
class Alignment:
  """Result of aligning one expert to a reference.

  Attributes:
    permutation: [f] ints; hidden unit j of the aligned member is the member's unit
      permutation[j].
    score_before: Cosine similarity of the two experts' hidden-unit weights (wi, wo, the
      gate and the biases of the hidden units, flattened) before alignment.
    score_after: The same after permuting the member's hidden units.
  """

  permutation: np.ndarray
  score_before: float
  score_after: float


@jax.jit
def _stacked_matching_cost(inputs, wo, reference, member):
  """Cost matrix and weight norms for experts `reference` and `member` of a stack.

  `inputs` holds the stacks whose last axis is the hidden units ([E, d, f] kernels, [E, f]
  biases; None entries are skipped), `wo` is [E, f, d].
  """
  highest = jax.lax.Precision.HIGHEST
  f32 = lambda x: x.astype(jnp.float32)
  wo_r, wo_m = f32(wo[reference]), f32(wo[member])
  cost = jnp.einsum("jd,kd->jk", wo_r, wo_m, precision=highest)
  sq_r, sq_m = jnp.sum(wo_r ** 2), jnp.sum(wo_m ** 2)
  for stack in inputs:
    if stack is None:
      continue
    # [d, f] kernels, or [f] biases seen as [1, f].
    in_r, in_m = f32(stack[reference]).reshape(-1, stack.shape[-1]), f32(
        stack[member]).reshape(-1, stack.shape[-1])
    cost = cost + jnp.einsum("dj,dk->jk", in_r, in_m, precision=highest)
    sq_r, sq_m = sq_r + jnp.sum(in_r ** 2), sq_m + jnp.sum(in_m ** 2)
  return cost, jnp.sqrt(sq_r), jnp.sqrt(sq_m)


def matching_cost(weights: layout_lib.MoeLayerWeights, reference: int,
                  member: int) -> tuple[np.ndarray, float, float]:
  """The [f, f] matching cost of `member` against `reference`, and their weight norms.

  Args:
    weights: The layer's stacked expert weights (numpy or jax arrays).
    reference: Index of the expert to align to.
    member: Index of the expert to permute.

  Returns:
    (cost, norm_reference, norm_member): cost[j, k] is the inner product of the
    reference's hidden unit j and the member's unit k (float32 numpy).

  Example:
    >>> cost, _, _ = matching_cost(layers["layers_0/mlp"], 0, 1)
  """
  inputs = (weights.wi_kernel, weights.wi_bias, weights.gate_kernel, weights.gate_bias)
  wo = weights.wo_kernel
  if isinstance(wo, np.ndarray):  # host arrays: only the two experts go to the device
    pick = lambda x: None if x is None else x[[reference, member]]
    inputs, wo, reference, member = tuple(pick(x) for x in inputs), pick(wo), 0, 1
  cost, norm_r, norm_m = _stacked_matching_cost(inputs, wo, reference, member)
  return np.asarray(cost), float(norm_r), float(norm_m)


def solve_alignment(cost: np.ndarray, norm_reference: float, norm_member: float) -> Alignment:
  """Solves the assignment on `cost` (maximizing) and scores before and after.

  Example:
    >>> solve_alignment(np.array([[0., 1.], [1., 0.]]), 1., 1.).permutation
    array([1, 0])
  """
  rows, permutation = scipy.optimize.linear_sum_assignment(cost, maximize=True)
  del rows  # arange(f) for a square cost matrix
  scale = norm_reference * norm_member
  scale = scale if scale > 0 else 1.0
  before = float(np.trace(cost, dtype=np.float64)) / scale
  after = float(cost[np.arange(cost.shape[0]), permutation].sum(dtype=np.float64)) / scale
  return Alignment(permutation.astype(np.int64), before, after)


def default_num_workers() -> int:
  """Assignment threads: one per core the process may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def align_experts(layers: Mapping[str, layout_lib.MoeLayerWeights],
                  tasks: Sequence[AlignmentTask], *, num_workers: int | None = None,
                  overlap: bool | None = None,
                  timings: dict[str, float] | None = None) -> list[Alignment]:
  """Aligns every task's member to its reference, in parallel.

  The calling thread computes the cost matrices with jax and hands them to a pool of
  `num_workers` threads running the assignment solver, at most 4 * num_workers cost
  matrices at a time. With `overlap`, cost matrices of the next tasks are computed while
  the pool solves (right when an accelerator computes them); without, batches of
  4 * num_workers cost matrices are computed, then solved by the pool, in turn (right on
  a CPU backend, where XLA's multithreaded matmuls and the solver threads would compete
  for the same cores: overlapping was slower than the sequential path there).

  Args:
    layers: {layer: stacked expert weights}, as from `layout.find_moe_layers`.
    tasks: What to align.
    num_workers: Solver threads; None uses every available core; 0 solves in the calling
      thread, one task after the other (the sequential reference path).
    overlap: See above; None: overlap unless the weights live on CPU devices.
    timings: If given, receives "cost_matrices" seconds, and "assignments" seconds on the
      sequential path or "alignment" wall seconds (costs and assignments) on the
      parallel path.

  Returns:
    One Alignment per task, in task order.

  Example:
    >>> align_experts(layers, [AlignmentTask("layers_0/mlp", 0, 1)], num_workers=2)
  """
  num_workers = default_num_workers() if num_workers is None else num_workers
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  for task in tasks:
    if task.layer not in layers:
      raise ValueError(f"alignment task names unknown layer {task.layer!r}")
  # On an accelerator, one device copy of each layer's stacks: numpy inputs are transferred
  # once, not per task. On CPU, numpy stays where it is (each task reads its two experts),
  # so memory holds the layer once.
  on_cpu = jax.default_backend() == "cpu"
  device_layers = {name: layers[name] if on_cpu else _on_device(layers[name])
                   for name in {t.layer for t in tasks}}
  timings = {} if timings is None else timings
  if num_workers == 0:
    return _align_sequentially(device_layers, tasks, timings)
  if overlap is None:
    overlap = not on_cpu and not all(device.platform == "cpu"
                                     for weights in device_layers.values()
                                     for device in weights.wi_kernel.devices())
  return _align_in_pool(device_layers, tasks, num_workers, overlap, timings)


def _on_device(weights: layout_lib.MoeLayerWeights) -> layout_lib.MoeLayerWeights:
  as_jax = lambda x: None if x is None else jnp.asarray(x)
  return dataclasses.replace(weights, wi_kernel=as_jax(weights.wi_kernel),
                             wi_bias=as_jax(weights.wi_bias),
                             wo_kernel=as_jax(weights.wo_kernel),
                             gate_kernel=as_jax(weights.gate_kernel),
                             gate_bias=as_jax(weights.gate_bias))


def _align_sequentially(layers, tasks, timings) -> list[Alignment]:
  results, cost_seconds, solve_seconds = [], 0.0, 0.0
  for task in tasks:
    start = time.perf_counter()
    cost = matching_cost(layers[task.layer], task.reference, task.member)
    cost_seconds += time.perf_counter() - start
    start = time.perf_counter()
    results.append(solve_alignment(*cost))
    solve_seconds += time.perf_counter() - start
  timings.update(cost_matrices=cost_seconds, assignments=solve_seconds)
  return results


def _align_in_pool(layers, tasks, num_workers, overlap, timings) -> list[Alignment]:
  start, cost_seconds = time.perf_counter(), 0.0
  batch_size = 4 * num_workers  # cost matrices held in memory at a time
  results: list[Alignment] = []
  waiting: collections.deque[concurrent.futures.Future[Alignment]] = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for batch_start in range(0, len(tasks), batch_size):
      batch = tasks[batch_start:batch_start + batch_size]
      costs = []
      for task in batch:
        if overlap:
          while len(waiting) >= batch_size:
            results.append(waiting.popleft().result())
        cost_start = time.perf_counter()
        cost = matching_cost(layers[task.layer], task.reference, task.member)
        cost_seconds += time.perf_counter() - cost_start
        if overlap:  # solve it now, while the next cost matrices are computed
          waiting.append(pool.submit(solve_alignment, *cost))
        else:
          costs.append(cost)
      if not overlap:  # solve the batch with every core, then compute the next one
        results.extend(pool.map(lambda c: solve_alignment(*c), costs))
      logging.info("alignment: %d / %d experts", batch_start + len(batch), len(tasks))
    results.extend(future.result() for future in waiting)
  timings.update(cost_matrices=cost_seconds, alignment=time.perf_counter() - start)
  return results
