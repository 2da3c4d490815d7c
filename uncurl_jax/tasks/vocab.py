"""Vocabulary, output features and registration helpers shared by every task.

Offline default: `seqio.ByteVocabulary()` (UTF-8 bytes + 3 specials, 259 ids; the
"tiny" model preset pads it to 512). A SentencePiece model is used instead when
a path is given, either to `get_vocabulary(path)` or through the environment
variable `UNCURL_SENTENCEPIECE_MODEL` (read when `uncurl_jax.tasks` is imported).

Example:
  >>> from uncurl_jax.tasks import vocab
  >>> vocabulary = vocab.get_vocabulary()          # bytes, or $UNCURL_SENTENCEPIECE_MODEL
  >>> features = vocab.prompt_features(vocabulary)  # {"inputs", "targets"}
"""

from __future__ import annotations

import os

import seqio
import tensorflow as tf

SENTENCEPIECE_ENV = "UNCURL_SENTENCEPIECE_MODEL"


def get_vocabulary(path: str | os.PathLike | None = None) -> seqio.Vocabulary:
  """Returns the SentencePiece model at `path` (or $UNCURL_SENTENCEPIECE_MODEL), else bytes.

  Args:
    path: Path of a SentencePiece `.model` file (local or any filesystem
      tf.io.gfile reads, e.g. gs://); None falls back to the environment
      variable, then to `seqio.ByteVocabulary()`.

  Example:
    >>> get_vocabulary().vocab_size
    259
  """
  path = path or os.environ.get(SENTENCEPIECE_ENV) or None
  if path is None:
    return seqio.ByteVocabulary()
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}")
  path = os.fspath(path)
  if not tf.io.gfile.exists(path):
    raise ValueError(f"SentencePiece model {path!r} does not exist; expected a .model file "
                     f"(the argument or ${SENTENCEPIECE_ENV})")
  return seqio.SentencePieceVocabulary(path)


def lm_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """Output features of a language-modelling task: `targets` only.

  Example:
    >>> lm_features(seqio.ByteVocabulary())["targets"].add_eos
    True
  """
  return {"targets": seqio.Feature(vocabulary=vocabulary, add_eos=True)}


def prompt_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """Output features of a prompt task for a decoder-only LM: `inputs` + `targets`.

  The prompt gets no EOS (the answer continues it); the answer ends with EOS.

  Example:
    >>> sorted(prompt_features(seqio.ByteVocabulary()))
    ['inputs', 'targets']
  """
  return {"inputs": seqio.Feature(vocabulary=vocabulary, add_eos=False),
          "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True)}


def add_task(name: str, **task_kwargs) -> seqio.Task:
  """Registers a seqio Task, replacing one of the same name (re-registration is idempotent).

  Example:
    >>> add_task("my_task", source=..., output_features=..., preprocessors=[...])
  """
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **task_kwargs)


def add_mixture(name: str, tasks, **mixture_kwargs) -> seqio.Mixture:
  """Registers a seqio Mixture, replacing one of the same name.

  Example:
    >>> add_mixture("my_mix", [("task_a", 1.0), ("task_b", 2.0)])
  """
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks, **mixture_kwargs)
