"""seqio preprocessors shared by the C4, SuperGLUE, FLAN and synthetic tasks.

Two pipelines end every task:

- language modelling (`lm_pipeline`): rekey text -> targets, tokenize, cache
  placeholder, EOS after each document, documents concatenated and split into
  pieces of exactly the `targets` length (the last one shorter), as T5's
  `full_lm` does, so packing wastes nothing;
- prompts (`prompt_pipeline`): a task-specific formatter makes `inputs` (the
  prompt) and `targets` (the answer text) plus `options`/`label` (or
  `is_correct`) for postprocessing; then tokenize, cache placeholder, left
  truncation of the prompt (a decoder-only model must keep the answer cue at
  its end), EOS after the answer. `rank=True` first expands every example into
  one example per answer option (T5's `rank_classification` preprocessor), so an
  evaluator scores each option and the metric picks the most likely one.

Example:
  >>> preprocessors = lm_pipeline("text")
  >>> preprocessors = prompt_pipeline(format_rte, rank=True)
"""

from __future__ import annotations

import functools
import string
from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

Features = Mapping[str, tf.Tensor]


def format_template(template: str, fields: Features) -> tf.Tensor:
  """Fills a Python format string with scalar string tensors.

  Args:
    template: e.g. "Premise: {premise}\\nHypothesis: {hypothesis}".
    fields: Values of the named fields (tf.string scalars).

  Example:
    >>> format_template("Q: {q}?", {"q": tf.constant("why")}).numpy()
    b'Q: why?'
  """
  pieces = []
  for literal, name, _, _ in string.Formatter().parse(template):
    if literal:
      pieces.append(tf.constant(literal))
    if name is not None:
      if name not in fields:
        raise ValueError(f"template field {name!r} not in {sorted(fields)}: {template!r}")
      pieces.append(fields[name])
  return tf.strings.join(pieces)


def options_text(options: tf.Tensor, prefix: str = "\n- ") -> tf.Tensor:
  """Joins a vector of option strings into one listing, each after `prefix`.

  Example:
    >>> options_text(tf.constant(["yes", "no"])).numpy()
    b'\\n- yes\\n- no'
  """
  return tf.strings.reduce_join(tf.strings.join([prefix, options]))


def concatenate_and_split(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                          batch_size: int = 128) -> tf.data.Dataset:
  """Concatenates token sequences of `batch_size` examples and splits them into pieces.

  Every piece has exactly `sequence_length["targets"]` tokens except the last
  piece of each batch (T5's `reduce_concat_tokens` + `split_tokens`). Without
  a sequence length (e.g. when caching) the dataset is returned unchanged.

  Example:
    >>> documents = [[5, 1], [6, 7, 1]]  # token ids, each ending in EOS = 1
    >>> ds = tf.data.Dataset.from_generator(lambda: ({"targets": d} for d in documents),
    ...     output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    >>> [list(x["targets"]) for x in concatenate_and_split(ds, {"targets": 2})]
    [[5, 1], [6, 7], [1]]
  """
  if not sequence_length or "targets" not in sequence_length:
    return dataset
  length = int(sequence_length["targets"])
  if length <= 0:
    raise ValueError(f"targets length must be positive, got {length}")

  def split(tokens: tf.Tensor) -> tf.data.Dataset:
    num_tokens = tf.size(tokens)
    num_pieces = (num_tokens + length - 1) // length
    padded = tf.pad(tokens, [[0, num_pieces * length - num_tokens]])
    lengths = tf.minimum(length, num_tokens - tf.range(num_pieces) * length)
    pieces = tf.RaggedTensor.from_tensor(tf.reshape(padded, [num_pieces, length]), lengths=lengths)
    return tf.data.Dataset.from_tensor_slices({"targets": pieces})

  dataset = dataset.map(lambda x: {"targets": x["targets"]})
  dataset = dataset.ragged_batch(batch_size)
  return dataset.flat_map(lambda x: split(x["targets"].flat_values))


def add_empty_inputs(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Adds an empty `inputs`, so an LM task mixes with prompt tasks.

  seqio mixtures need equal feature keys; with an empty prompt the prefix-LM
  conversion of DecoderFeatureConverter trains on every target token, i.e. plain LM.
  """
  return dataset.map(lambda x: {**x, "inputs": tf.zeros([0], x["targets"].dtype)})


def lm_pipeline(text_key: str, *, empty_inputs: bool = False) -> list:
  """Preprocessors of a full-LM task over the string feature `text_key`.

  Example:
    >>> seqio.Task("c4", source, output_features=lm_features(vocab),
    ...            preprocessors=lm_pipeline("text"))
  """
  steps = [
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      seqio.preprocessors.append_eos,
      concatenate_and_split,
  ]
  return steps + [add_empty_inputs] if empty_inputs else steps


def rank_classification(dataset: tf.data.Dataset, mode: str = "eval") -> tf.data.Dataset:
  """Expands each prompt example into one example per answer option.

  Input examples hold `inputs`, `options` ([K] strings) and either `label` (index
  of the right option) or `is_correct` ([K] bools, for several right options).
  Output examples hold `idx` = [example index, option index], `inputs`,
  `targets` = that option, `is_correct`, and `group` when the input has one.

  Args:
    dataset: Examples as above, in a fixed order (the example index is their
      position).
    mode: "eval" keeps every option; "train" keeps only the right ones.

  Example:
    >>> ds = rank_classification(tf.data.Dataset.from_tensors(
    ...     {"inputs": "2+2=", "options": ["4", "5"], "label": 0}))
    >>> [x["is_correct"] for x in ds.as_numpy_iterator()]
    [True, False]
  """
  if mode not in ("eval", "train"):
    raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")

  def expand(index: tf.Tensor, ex: Features) -> tf.data.Dataset:
    num_options = tf.shape(ex["options"])[0]
    option_index = tf.range(num_options)
    if "is_correct" in ex:
      is_correct = tf.cast(ex["is_correct"], tf.bool)
    else:
      is_correct = tf.equal(option_index, tf.cast(ex["label"], tf.int32))
    expanded = {
        "idx": tf.stack([tf.fill([num_options], tf.cast(index, tf.int32)), option_index], 1),
        "inputs": tf.fill([num_options], ex["inputs"]),
        "targets": ex["options"],
        "is_correct": is_correct,
    }
    if "group" in ex:
      expanded["group"] = tf.tile(ex["group"][tf.newaxis], [num_options, 1])
    return tf.data.Dataset.from_tensor_slices(expanded)

  dataset = dataset.enumerate().flat_map(expand)
  if mode == "train":
    dataset = dataset.filter(lambda x: x["is_correct"])
  return dataset


def prompt_pipeline(formatter: Callable[[tf.data.Dataset], tf.data.Dataset] | None, *,
                    rank: bool = False) -> list:
  """Preprocessors of a prompt task: formatter, [rank expansion], tokenize, trims, EOS.

  Args:
    formatter: Maps raw examples to `inputs`/`targets` strings plus the
      `options`/`label` (or `is_correct`) that postprocessors and rank
      classification use; None when the source yields that format already.
    rank: Expand into one example per option (evaluation by scoring).

  Example:
    >>> prompt_pipeline(format_boolq, rank=True)
  """
  steps = [] if formatter is None else [formatter]
  if rank:
    steps.append(rank_classification)
  steps += [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder()]
  steps += [seqio.preprocessors.truncate_inputs_left,
            seqio.preprocessors.append_eos_after_trim]
  return steps


def choose_template(example_fields: Features,
                    templates: Sequence[tuple[str, str]]) -> dict[str, tf.Tensor]:
  """Formats one (inputs, targets) template pair, chosen by a hash of the example.

  The choice depends only on the example's content, so it is the same in every
  epoch, on every host and for every seed, and spreads evenly over templates.

  Example:
    >>> choose_template({"q": tf.constant("why"), "answer": tf.constant("because")},
    ...                 [("Q: {q}", "{answer}"), ("{q}?", "{answer}")])
  """
  if not templates:
    raise ValueError("need at least one template")
  inputs = tf.stack([format_template(t, example_fields) for t, _ in templates])
  targets = tf.stack([format_template(t, example_fields) for _, t in templates])
  choice = tf.strings.to_hash_bucket_fast(inputs[0], len(templates))
  return {"inputs": inputs[choice], "targets": targets[choice]}
