"""The synthetic multi-domain corpus (`uncurl_jax.data.corpus`, `uncurl_jax.data.corpus_tasks`) as seqio tasks.

Generated on the fly through `seqio.FunctionDataSource` (no download, the same
examples on every run), with the same preprocessing as the C4 and SuperGLUE
tasks. The project's default data for the README's main command and for tests.

- `synthetic_lm`: language modelling over all domains (documents interleaved
  round-robin), full-LM chunking as for C4; `synthetic_lm_<domain>` per domain;
  `synthetic_lm_empty_inputs` for mixing with prompt tasks.
- `synthetic_<task>` for each task of `uncurl_jax.data.corpus_tasks.TASKS`: prompt form
  with accuracy; `synthetic_<task>_rank`: rank classification over its options.
- Mixtures: `synthetic_tasks` (all prompt tasks, equal rates),
  `synthetic_tasks_rank` (evaluation) and `synthetic_prefinetune` (all prompt
  tasks plus a 10% share of `synthetic_lm_empty_inputs`).

Example:
  >>> import seqio, uncurl_jax.tasks
  >>> ds = seqio.get_dataset("synthetic_lm", {"targets": 128}, dataset_split="train",
  ...                        feature_converter=seqio.DecoderFeatureConverter(pack=True))
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import seqio
import tensorflow as tf

from uncurl_jax.data import corpus
from uncurl_jax.data import corpus_tasks
from uncurl_jax.tasks import metrics
from uncurl_jax.tasks import preprocessors
from uncurl_jax.tasks import vocab

# Documents per domain and examples per task in each split.
LM_DOCUMENTS_PER_DOMAIN = {"train": 100_000, "validation": 1_000}
TASK_EXAMPLES = {"train": 20_000, "validation": 1_000}
CHUNK = 256  # documents (examples) generated per call
LM_SHARE = 0.1  # of `synthetic_prefinetune`
LM_TASK = "synthetic_lm"


def _chunk_seed(split: str, chunk: int) -> int:
  """Seeds that differ across splits and chunks."""
  return 2 * chunk + corpus.SPLITS.index(split)


def _documents(split: str, domains: Sequence[str]) -> Iterator[dict[str, str]]:
  total = LM_DOCUMENTS_PER_DOMAIN[split]
  for chunk, start in enumerate(range(0, total, CHUNK)):
    count = min(CHUNK, total - start)
    batches = [corpus.generate_documents(d, count, _chunk_seed(split, chunk)) for d in domains]
    for documents in zip(*batches):
      for text in documents:
        yield {"text": text}


def _examples(split: str, task: str) -> Iterator[dict]:
  total = TASK_EXAMPLES[split]
  for chunk, start in enumerate(range(0, total, CHUNK)):
    count = min(CHUNK, total - start)
    for example in corpus_tasks.task_examples(task, split, count, _chunk_seed(split, chunk)):
      yield {"inputs": example.prompt, "targets": example.answer,
             "options": list(example.options), "label": example.label}


def _check_split(split: str) -> None:
  if split not in corpus.SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {corpus.SPLITS}")


def lm_dataset(split: str, shuffle_files: bool, seed: int | None = None,
               domains: Sequence[str] = corpus.DOMAINS) -> tf.data.Dataset:
  """Documents of `domains` as a dataset of {"text"} (a `FunctionDataSource` function).

  The content of a split is fixed: `seed` (seqio's shuffle seed) is unused and
  the order is fixed (seqio shuffles examples).

  Example:
    >>> next(iter(lm_dataset("validation", False, domains=["code"])))["text"]
  """
  del shuffle_files, seed
  _check_split(split)
  return tf.data.Dataset.from_generator(
      functools.partial(_documents, split, tuple(domains)),
      output_signature={"text": tf.TensorSpec((), tf.string)})


def task_dataset(split: str, shuffle_files: bool, seed: int | None = None, *,
                 task: str) -> tf.data.Dataset:
  """Examples of one synthetic task in the prompt format of `preprocessors.prompt_pipeline`.

  Example:
    >>> next(iter(task_dataset("train", False, task="dna_motif")))["targets"]
  """
  del shuffle_files, seed  # fixed content and order, as `lm_dataset`
  _check_split(split)
  return tf.data.Dataset.from_generator(
      functools.partial(_examples, split, task),
      output_signature={"inputs": tf.TensorSpec((), tf.string),
                        "targets": tf.TensorSpec((), tf.string),
                        "options": tf.TensorSpec([None], tf.string),
                        "label": tf.TensorSpec((), tf.int32)})


def _lm_source(domains: Sequence[str]) -> seqio.FunctionDataSource:
  return seqio.FunctionDataSource(
      functools.partial(lm_dataset, domains=tuple(domains)), splits=corpus.SPLITS,
      num_input_examples={s: n * len(domains) for s, n in LM_DOCUMENTS_PER_DOMAIN.items()})


def register(vocabulary: seqio.Vocabulary) -> list[str]:
  """Registers the synthetic LM and prompt tasks and mixtures; returns the task names.

  Example:
    >>> "synthetic_city_country_rank" in register(seqio.ByteVocabulary())
    True
  """
  lm_features, prompt_features = vocab.lm_features(vocabulary), vocab.prompt_features(vocabulary)
  names = [LM_TASK, LM_TASK + "_empty_inputs"]
  vocab.add_task(LM_TASK, source=_lm_source(corpus.DOMAINS), output_features=lm_features,
                 preprocessors=preprocessors.lm_pipeline("text"), metric_fns=[])
  vocab.add_task(LM_TASK + "_empty_inputs", source=_lm_source(corpus.DOMAINS),
                 output_features=prompt_features,
                 preprocessors=preprocessors.lm_pipeline("text", empty_inputs=True),
                 metric_fns=[])
  for domain in corpus.DOMAINS:
    vocab.add_task(f"{LM_TASK}_{domain}", source=_lm_source([domain]),
                   output_features=lm_features, preprocessors=preprocessors.lm_pipeline("text"),
                   metric_fns=[])
    names.append(f"{LM_TASK}_{domain}")
  task_names = [f"synthetic_{task}" for task in corpus_tasks.TASKS]
  for task, name in zip(corpus_tasks.TASKS, task_names):
    source = seqio.FunctionDataSource(functools.partial(task_dataset, task=task),
                                      splits=corpus.SPLITS, num_input_examples=TASK_EXAMPLES)
    vocab.add_task(name, source=source, output_features=prompt_features,
                   preprocessors=preprocessors.prompt_pipeline(None),
                   postprocess_fn=metrics.option_index, metric_fns=[metrics.accuracy])
    vocab.add_task(name + "_rank", source=source, output_features=prompt_features,
                   preprocessors=preprocessors.prompt_pipeline(None, rank=True),
                   postprocess_fn=metrics.rank_target, metric_fns=[metrics.rank_accuracy])
    names += [name, name + "_rank"]
  vocab.add_mixture("synthetic_tasks", task_names, default_rate=1.0)
  vocab.add_mixture("synthetic_tasks_rank", [n + "_rank" for n in task_names], default_rate=1.0)
  lm_rate = LM_SHARE / (1.0 - LM_SHARE) * len(task_names)
  vocab.add_mixture("synthetic_prefinetune",
                    [(n, 1.0) for n in task_names] + [(LM_TASK + "_empty_inputs", lm_rate)])
  return names
