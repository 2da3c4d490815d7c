"""Task features of the experts of one MoE layer: similarity, usage, `ExpertStats`.

The functions take the raw router logits H of one layer on the task's tokens,
[tokens, E] (padding already excluded), or the experts' mean outputs [E, d], and return
numpy arrays. `ExpertStats` holds what `stats.collect_expert_stats` measures.

Example:
  >>> h = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
  >>> s = router_similarity(h)                  # [8, 8], in [0, 1], ones on the diagonal
  >>> f = selection_frequencies(h, top_k=1)     # [8], sums to 1
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ExpertStats:
  """Task statistics of one MoE layer's E experts (numpy arrays).

  Attributes:
    logits: [tokens, E] raw router logits of the real task tokens.
    top1_counts: [E] tokens whose first choice is each expert.
    topk_counts: [E] tokens with each expert among their `top_k` choices.
    reap: [E] REAP saliency (0 for an expert no token chose).
    mean_output: [E, d] each expert's output averaged over all task tokens.
    top_k: The router choices per token counted in `topk_counts` and `reap`.
  """

  logits: np.ndarray
  top1_counts: np.ndarray
  topk_counts: np.ndarray
  reap: np.ndarray
  mean_output: np.ndarray
  top_k: int

  @property
  def num_tokens(self) -> int:
    return int(self.logits.shape[0])

  @property
  def num_experts(self) -> int:
    return int(self.logits.shape[1])


def cosine_affinity(vectors: np.ndarray) -> np.ndarray:
  """(1 + cos) / 2 of every pair of rows of `vectors` [n, k]; 0.5 for a zero row.

  Example:
    >>> cosine_affinity(np.array([[1., 0.], [-1., 0.]]))
    array([[1., 0.], [0., 1.]])
  """
  rows = np.asarray(vectors, np.float64)
  gram = rows @ rows.T
  norms = np.sqrt(np.diag(gram))
  safe = np.where(norms > 0, norms, 1.0)
  cosine = np.clip(gram / np.outer(safe, safe), -1.0, 1.0)
  similarity = (1.0 + cosine) / 2.0
  np.fill_diagonal(similarity, 1.0)
  return similarity


def output_similarity(mean_output: np.ndarray) -> np.ndarray:
  """(1 + cos) / 2 similarity of the experts' mean outputs [E, d] (UNCURL on outputs)."""
  return cosine_affinity(mean_output)


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
  return cosine_affinity(np.asarray(logits, np.float64).T)


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
