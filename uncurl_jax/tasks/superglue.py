"""SuperGLUE in prompt form for a decoder-only LM (`super_glue/<config>:1.0.2`).

For each of BoolQ, CB, COPA, MultiRC, ReCoRD, RTE, WiC and WSC (`wsc.fixed`):

- `super_glue_<name>_v102`: `inputs` = the prompt (ending in "Answer: "),
  `targets` = the answer text; a postprocessor maps generated text back to a
  label; metrics as the benchmark defines them (see `metrics.py`);
- `super_glue_<name>_v102_rank`: the same prompts, one example per answer option,
  scored by the evaluator and classified by the most likely option.

Mixtures: `super_glue_v102_proportional` (the eight prompt tasks, rates by
training-set size) and `super_glue_v102_rank` (the eight rank tasks, for
evaluation). `PAPER_TASKS` lists the six tasks of the UNCURL paper.

Example:
  >>> import seqio, uncurl_jax.tasks
  >>> ds = seqio.get_dataset("super_glue_rte_v102", {"inputs": 224, "targets": 32},
  ...                        dataset_split="validation",
  ...                        feature_converter=seqio.DecoderFeatureConverter())
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import seqio
import tensorflow as tf

from uncurl_jax.tasks import metrics
from uncurl_jax.tasks import preprocessors
from uncurl_jax.tasks import vocab

SUPERGLUE_VERSION = "1.0.2"
SPLITS = ("train", "validation")  # the test split has no labels
PAPER_TASKS = ("rte", "boolq", "copa", "cb", "record", "wsc_fixed")
ANSWER_CUE = "\nAnswer: "


def _labelled(inputs: tf.Tensor, options: list[str] | tf.Tensor, label: tf.Tensor) -> dict:
  options = tf.convert_to_tensor(options)
  label = tf.cast(label, tf.int32)
  return {"inputs": tf.strings.join([inputs, ANSWER_CUE]), "options": options,
          "label": label, "targets": tf.gather(options, tf.maximum(label, 0))}


@seqio.map_over_dataset
def format_boolq(x):
  inputs = preprocessors.format_template("{passage}\nQuestion: {question}?", x)
  return _labelled(inputs, ["no", "yes"], x["label"])


@seqio.map_over_dataset
def format_cb(x):
  inputs = preprocessors.format_template(
      "{premise}\nQuestion: {hypothesis} True, False or Neither?", x)
  return _labelled(inputs, ["true", "false", "neither"], x["label"])


@seqio.map_over_dataset
def format_copa(x):
  connective = tf.where(tf.equal(x["question"], "cause"), "What was the cause of this?",
                        "What happened as a result?")
  inputs = preprocessors.format_template(
      "{premise} {connective}\nOptions:\n- {choice1}\n- {choice2}",
      {**x, "connective": connective})
  return _labelled(inputs, tf.stack([x["choice1"], x["choice2"]]), x["label"])


@seqio.map_over_dataset
def format_multirc(x):
  paragraph = tf.strings.regex_replace(x["paragraph"], r"<b>Sent \d+: </b>", "")
  paragraph = tf.strings.regex_replace(paragraph, r"<br>", " ")
  inputs = preprocessors.format_template(
      "{paragraph}\nQuestion: {question}\nCandidate answer: {answer}\n"
      "Is the candidate answer correct?", {**x, "paragraph": paragraph})
  example = _labelled(inputs, ["no", "yes"], x["label"])
  example["group"] = tf.stack([x["idx"]["paragraph"], x["idx"]["question"]])
  return example


def format_record(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """ReCoRD: options are the passage's entities; several may be right."""

  def format_one(x):
    passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    inputs = preprocessors.format_template(
        "{passage}\nQuery: {query}\nWhich entity does @placeholder stand for?",
        {**x, "passage": passage})
    entities, _ = tf.unique(x["entities"])
    is_correct = tf.reduce_any(tf.equal(entities[:, None], x["answers"][None, :]), axis=1)
    return {"inputs": tf.strings.join([inputs, ANSWER_CUE]), "targets": x["answers"][0],
            "options": entities, "is_correct": is_correct, "answers": x["answers"]}

  dataset = dataset.filter(lambda x: tf.size(x["answers"]) > 0)
  return dataset.map(format_one, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset
def format_rte(x):
  inputs = preprocessors.format_template("{premise}\nQuestion: {hypothesis} True or False?", x)
  return _labelled(inputs, ["true", "false"], x["label"])


@seqio.map_over_dataset
def format_wic(x):
  inputs = preprocessors.format_template(
      "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Is the word \"{word}\" "
      "used with the same meaning in both sentences?", x)
  return _labelled(inputs, ["no", "yes"], x["label"])


@seqio.map_over_dataset
def format_wsc(x):
  inputs = preprocessors.format_template(
      "{text}\nQuestion: In the passage above, does the pronoun \"{span2_text}\" refer to "
      "\"{span1_text}\"?", x)
  return _labelled(inputs, ["no", "yes"], x["label"])


@dataclasses.dataclass(frozen=True)
class SuperGlueTask:
  """How one SuperGLUE task is formatted and scored.

  Attributes:
    name: Short name used in task names ("wsc_fixed" for `wsc.fixed`).
    tfds_config: The `super_glue` builder config.
    formatter: Raw example -> prompt example (see `preprocessors.prompt_pipeline`).
    postprocessor: Generated text -> what `metric` compares.
    metric: `(targets, predictions)` metric of the prompt task.
    rank_metric: `(targets, scores)` metric of the rank task.
  """
  name: str
  tfds_config: str
  formatter: Callable[[tf.data.Dataset], tf.data.Dataset]
  postprocessor: Callable[..., object]
  metric: Callable[..., dict]
  rank_metric: Callable[..., dict]

  @property
  def tfds_name(self) -> str:
    return f"super_glue/{self.tfds_config}:{SUPERGLUE_VERSION}"

  @property
  def task_name(self) -> str:
    return f"super_glue_{self.name}_v102"


SUPERGLUE_TASKS: tuple[SuperGlueTask, ...] = (
    SuperGlueTask("boolq", "boolq", format_boolq, metrics.option_index, metrics.accuracy,
                  metrics.rank_accuracy),
    SuperGlueTask("cb", "cb", format_cb, metrics.option_index, metrics.accuracy_and_macro_f1,
                  metrics.rank_accuracy_and_macro_f1),
    SuperGlueTask("copa", "copa", format_copa, metrics.option_index, metrics.accuracy,
                  metrics.rank_accuracy),
    SuperGlueTask("multirc", "multirc", format_multirc, metrics.multirc_answer,
                  metrics.multirc_f1a_and_em, metrics.rank_multirc),
    SuperGlueTask("record", "record", format_record, metrics.record_answer,
                  metrics.record_max_f1_em, metrics.rank_record),
    SuperGlueTask("rte", "rte", format_rte, metrics.option_index, metrics.accuracy,
                  metrics.rank_accuracy),
    SuperGlueTask("wic", "wic", format_wic, metrics.option_index, metrics.accuracy,
                  metrics.rank_accuracy),
    SuperGlueTask("wsc_fixed", "wsc.fixed", format_wsc, metrics.option_index, metrics.accuracy,
                  metrics.rank_accuracy),
)


def register(vocabulary: seqio.Vocabulary) -> list[str]:
  """Registers the prompt and rank tasks and the two mixtures; returns the task names.

  Example:
    >>> register(seqio.ByteVocabulary())[:2]
    ['super_glue_boolq_v102', 'super_glue_boolq_v102_rank']
  """
  features = vocab.prompt_features(vocabulary)
  names = []
  for spec in SUPERGLUE_TASKS:
    source = seqio.TfdsDataSource(tfds_name=spec.tfds_name, splits=SPLITS)
    vocab.add_task(spec.task_name, source=source, output_features=features,
                   preprocessors=preprocessors.prompt_pipeline(spec.formatter),
                   postprocess_fn=spec.postprocessor, metric_fns=[spec.metric])
    vocab.add_task(spec.task_name + "_rank", source=source, output_features=features,
                   preprocessors=preprocessors.prompt_pipeline(spec.formatter, rank=True),
                   postprocess_fn=metrics.rank_target, metric_fns=[spec.rank_metric])
    names += [spec.task_name, spec.task_name + "_rank"]
  vocab.add_mixture("super_glue_v102_proportional",
                    [spec.task_name for spec in SUPERGLUE_TASKS],
                    default_rate=seqio.mixing_rate_num_examples)
  vocab.add_mixture("super_glue_v102_rank",
                    [spec.task_name + "_rank" for spec in SUPERGLUE_TASKS], default_rate=1.0)
  return names
