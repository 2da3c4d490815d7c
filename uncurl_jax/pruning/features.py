"""Router-logit features of the experts of one MoE layer: similarity and usage.

All functions take the raw router logits H of one layer on the task's tokens,
[tokens, E] (padding already excluded), and return numpy arrays.

Example:
  >>> h = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
  >>> s = router_similarity(h)                  # [8, 8], in [0, 1], ones on the diagonal
  >>> f = selection_frequencies(h, top_k=1)     # [8], sums to 1
"""

from __future__ import annotations

import numpy as np


def router_similarity(logits: np.ndarray) -> np.ndarray:
  """(1 + cos) / 2 similarity of the experts' router-logit columns (UNCURL step 1).

  S[i, j] = (1 + cos(H[:, i], H[:, j])) / 2. A column of zeros has no direction: its
  similarity to every other expert is 0.5 (cosine 0).

  Args:
    logits: [tokens, E] raw router logits.

  Returns:
    [E, E] float64 symmetric affinity with entries in [0, 1] and ones on the diagonal.

  Example:
    >>> router_similarity(np.array([[1., 2.], [1., 2.]]))
    array([[1., 1.], [1., 1.]])
  """
  columns = np.asarray(logits, np.float64)
  gram = columns.T @ columns
  norms = np.sqrt(np.diag(gram))
  safe = np.where(norms > 0, norms, 1.0)
  cosine = np.clip(gram / np.outer(safe, safe), -1.0, 1.0)
  similarity = (1.0 + cosine) / 2.0
  np.fill_diagonal(similarity, 1.0)
  return similarity


def selection_counts(logits: np.ndarray, top_k: int = 1) -> np.ndarray:
  """How many tokens select each expert among their top-k router logits.

  Ties between logits go to the lower expert index, as in `jax.lax.top_k`.

  Args:
    logits: [tokens, E] raw router logits.
    top_k: Experts each token selects.

  Returns:
    [E] int64 counts, summing to tokens * top_k.

  Example:
    >>> selection_counts(np.array([[0., 1.], [2., 0.], [0., 3.]]))
    array([1, 2])
  """
  logits = np.asarray(logits)
  num_experts = logits.shape[1]
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, E={num_experts}], got {top_k}")
  counts = np.zeros(num_experts, np.int64)
  remaining = np.array(logits, np.float64)
  rows = np.arange(remaining.shape[0])
  # k passes of argmax (first maximum wins) instead of a full sort: k is small, E is not.
  for _ in range(top_k):
    chosen = np.argmax(remaining, axis=1)
    counts += np.bincount(chosen, minlength=num_experts)
    remaining[rows, chosen] = -np.inf
  return counts


def selection_frequencies(logits: np.ndarray, top_k: int = 1) -> np.ndarray:
  """Share of the task's tokens that select each expert (top-k counts / tokens).

  With top_k=1 this is the paper's selection frequency; for a top-k model pass its k so
  that every routed choice counts. The shares sum to top_k.

  Example:
    >>> selection_frequencies(np.array([[0., 1.], [2., 0.], [0., 3.], [0., 4.]]))
    array([0.25, 0.75])
  """
  logits = np.asarray(logits)
  return selection_counts(logits, top_k) / float(logits.shape[0])
