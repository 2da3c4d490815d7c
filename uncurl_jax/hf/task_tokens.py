"""A task's text as batches for a Hugging Face model, tokenized by its own `tokenizer.json`.

Offline: `tokenizers` reads the checkpoint's `tokenizer.json`; nothing is downloaded. Each
example (a line of a text file, or a seqio task's example decoded by the task's own
vocabulary) becomes one row, truncated to `max_length` and padded on the right; the
padding is marked by `decoder_loss_weights` = 0, so the collectors skip it (the model is
causal, so padding after a row's tokens changes nothing before it).

Example:
  >>> tokenizer = load_tokenizer("Mixtral-8x7B", vocab_size=32000)
  >>> batches = text_batches(tokenizer, open("task.txt").read().splitlines(),
  ...                        batch_size=8, max_length=512)
  >>> logits = collect_router_logits(model, params, batches, max_tokens=65536)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(directory: str | os.PathLike, *, vocab_size: int) -> Any:
  """The checkpoint's `tokenizers.Tokenizer`, checked against the model's vocabulary.

  Raises:
    ValueError: No tokenizer.json, or a tokenizer whose ids exceed `vocab_size` (a
      tokenizer of another model).
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.fspath(directory), TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{directory!r} has no {TOKENIZER_FILE} (the tokenizer the task text is "
                     "tokenized with)")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(path)
  except Exception as error:  # tokenizers raises its own Exception type
    raise ValueError(f"{path}: not a tokenizers file ({error})") from None
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise ValueError(f"{path} has {size} tokens but the model's vocabulary is {vocab_size}: "
                     "the tokenizer does not match the checkpoint")
  return tokenizer


def text_batches(tokenizer: Any, texts: Iterable[str], *, batch_size: int = 8,
                 max_length: int = 512) -> Iterator[dict[str, np.ndarray]]:
  """Batches of t5x features (`decoder_input_tokens`, `decoder_target_tokens`,
  `decoder_loss_weights`) from texts; empty texts are skipped.

  Raises:
    ValueError: No text has a token.
  """
  rows: list[Sequence[int]] = []
  produced = False
  for text in texts:
    ids = tokenizer.encode(text).ids[:max_length]
    if not ids:
      continue
    rows.append(ids)
    if len(rows) == batch_size:
      produced = True
      yield _batch(rows, max_length)
      rows = []
  if rows:
    produced = True
    yield _batch(rows, max_length)
  if not produced:
    raise ValueError("the task text has no tokens")


def _batch(rows: Sequence[Sequence[int]], length: int) -> dict[str, np.ndarray]:
  length = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  weights = np.zeros((len(rows), length), np.float32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
    weights[i, :len(ids)] = 1.0
  return {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
          "decoder_loss_weights": weights}


def seqio_texts(name: str, *, split: str = "validation", max_examples: int | None = None
                ) -> Iterator[str]:
  """The examples of a registered seqio task or mixture as text: its 'inputs' and
  'targets' decoded by the task's own vocabulary and joined by a space.

  Raises:
    ValueError: An unknown task (after importing `uncurl_jax.tasks`, which registers the
      project's).
  """
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":  # TensorFlow's C++ start-up lines
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
  import seqio  # pylint: disable=import-outside-toplevel
  import uncurl_jax.tasks  # pylint: disable=import-outside-toplevel,unused-import
  try:
    task = seqio.get_mixture_or_task(name)
  except ValueError:
    raise ValueError(f"unknown seqio task or mixture {name!r}") from None
  features = task.output_features
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False)
  for count, example in enumerate(dataset.as_numpy_iterator()):
    if max_examples is not None and count >= max_examples:
      return
    parts = [features[key].vocabulary.decode([int(t) for t in example[key]])
             for key in ("inputs", "targets") if key in example and key in features]
    yield " ".join(p for p in parts if p)
