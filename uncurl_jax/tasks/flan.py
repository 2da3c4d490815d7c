"""A FLAN-style instruction mixture for pre-finetuning, without the evaluation tasks.

`FLAN_DATASETS` lists the member TFDS datasets (all buildable by TFDS 4.9.10):
natural language inference, answer entailment, paraphrase, sentiment, topic
classification, extractive and closed-book QA, and commonsense multiple choice.
Each becomes the task `flan_<name>`: instruction templates (`flan_templates.py`)
turn an example into `inputs` (instruction) and `targets` (answer text); the
template is picked per example by a hash of its content (deterministic).

As in the UNCURL paper, the SuperGLUE evaluation tasks COPA, BoolQ, RTE, CB,
ReCoRD and WSC are left out, and so are their copies elsewhere in TFDS
(`glue/rte`, `wsc273`, and `glue/wnli`, which is built from WSC): `FLAN_EXCLUDED`.

Mixtures: `flan_prefinetune` (members at FLAN's examples-proportional rates capped
at 3,000, plus a 10% share of C4 language modelling against forgetting) and
`flan_prefinetune_no_c4`; `register_flan_mixture(name, c4_share=...)` makes
others.

Example:
  >>> import uncurl_jax.tasks
  >>> from uncurl_jax.tasks import flan
  >>> flan.register_flan_mixture("flan_prefinetune_c4_25pct", c4_share=0.25)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import seqio
import tensorflow as tf

from uncurl_jax.tasks import c4
from uncurl_jax.tasks import flan_templates
from uncurl_jax.tasks import preprocessors
from uncurl_jax.tasks import vocab

FLAN_MAX_RATE = 3000  # FLAN's examples-proportional mixing cap
DEFAULT_C4_SHARE = 0.1
FLAN_EXCLUDED: dict[str, str] = {
    "super_glue/copa": "COPA", "super_glue/boolq": "BoolQ", "super_glue/rte": "RTE",
    "glue/rte": "RTE", "super_glue/cb": "CB", "super_glue/record": "ReCoRD",
    "super_glue/wsc": "WSC", "super_glue/wsc.fixed": "WSC", "wsc273": "WSC",
    "glue/wnli": "WSC",
}
Fields = dict[str, tf.Tensor]


def _choice(options: tf.Tensor | list[str], label: tf.Tensor) -> Fields:
  """Template fields of a classification example; `valid` is False for bad labels."""
  options = tf.convert_to_tensor(options)
  label = tf.cast(label, tf.int32)
  num_options = tf.shape(options)[0]
  valid = tf.logical_and(label >= 0, label < num_options)
  with_blank = tf.concat([options, [""]], 0)  # a safe index for invalid labels
  return {"options": preprocessors.options_text(options), "valid": valid,
          "answer": with_blank[tf.where(valid, label, num_options)]}


def _nli(premise_key: str) -> Callable[[Fields], Fields]:
  return lambda x: {"premise": x[premise_key], "hypothesis": x["hypothesis"],
                    **_choice(["yes", "it is not possible to tell", "no"], x["label"])}


def _paraphrase(first: str, second: str) -> Callable[[Fields], Fields]:
  return lambda x: {"sentence1": x[first], "sentence2": x[second],
                    **_choice(["no", "yes"], x["label"])}


def _sentiment(text_key: str) -> Callable[[Fields], Fields]:
  return lambda x: {"text": x[text_key], **_choice(["negative", "positive"], x["label"])}


def _qnli(x: Fields) -> Fields:
  return {"question": x["question"], "sentence": x["sentence"],
          **_choice(["yes", "no"], x["label"])}


def _ag_news(x: Fields) -> Fields:
  return {"text": tf.strings.join([x["title"], ". ", x["description"]]),
          **_choice(["World", "Sports", "Business", "Science and technology"], x["label"])}


def _trec(x: Fields) -> Fields:
  kinds = ["description", "entity", "abbreviation", "person", "number", "location"]
  return {"text": x["text"], **_choice(kinds, x["label-coarse"])}


def _squad(x: Fields) -> Fields:
  answers = x["answers"]["text"]
  return {"context": x["context"], "question": x["question"], "valid": tf.size(answers) > 0,
          "answer": tf.concat([answers, [""]], 0)[0]}


def _trivia_qa(x: Fields) -> Fields:
  return {"question": x["question"], "answer": x["answer"]["value"],
          "valid": tf.strings.length(x["answer"]["value"]) > 0}


def _multiple_choice(question: tf.Tensor, options, label) -> Fields:
  return {"question": question, **_choice(options, label)}


def _piqa(x: Fields) -> Fields:
  return _multiple_choice(tf.strings.join(["Goal: ", x["goal"], "\nHow do you do this?"]),
                          tf.stack([x["sol1"], x["sol2"]]), x["label"])


def _hellaswag(x: Fields) -> Fields:
  return _multiple_choice(tf.strings.join(["What happens next? ", x["context"]]),
                          x["endings"], x["label"])


def _winogrande(x: Fields) -> Fields:
  return _multiple_choice(tf.strings.join(["Fill in the blank (_): ", x["sentence"]]),
                          tf.stack([x["option1"], x["option2"]]), x["label"])


def _cosmos_qa(x: Fields) -> Fields:
  options = tf.stack([x[f"answer{i}"] for i in range(4)])
  return _multiple_choice(tf.strings.join([x["context"], "\n", x["question"]]), options,
                          x["label"])


def _openbookqa(x: Fields) -> Fields:
  question = x["question"]
  options = tf.stack([question[f"choice_{c}"] for c in "ABCD"])
  return _multiple_choice(question["stem"], options, x["answerKey"])


def _ai2_arc(x: Fields) -> Fields:
  matches = tf.where(tf.equal(x["choices"]["label"], x["answerKey"]))[:, 0]
  label = tf.cond(tf.size(matches) > 0, lambda: matches[0], lambda: tf.constant(-1, tf.int64))
  return _multiple_choice(x["question"], x["choices"]["text"], label)


@dataclasses.dataclass(frozen=True)
class FlanDataset:
  """One member of the FLAN-style mixture.

  Attributes:
    name: Task name suffix (`flan_<name>`).
    tfds_name: TFDS name with config and version.
    category: Task cluster, as in the FLAN paper.
    family: Key of `flan_templates.TEMPLATES`.
    fields: Raw TFDS example -> template fields, `answer` and `valid`.
    splits: Canonical split -> TFDS split.
  """
  name: str
  tfds_name: str
  category: str
  family: str
  fields: Callable[[Fields], Fields]
  splits: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: {"train": "train", "validation": "validation"})

  @property
  def task_name(self) -> str:
    return f"flan_{self.name}"


_TEST_AS_VALIDATION = {"train": "train", "validation": "test"}
FLAN_DATASETS: tuple[FlanDataset, ...] = (
    FlanDataset("anli_r1", "anli/r1:0.1.0", "nli", "nli", _nli("context")),
    FlanDataset("anli_r2", "anli/r2:0.1.0", "nli", "nli", _nli("context")),
    FlanDataset("anli_r3", "anli/r3:0.1.0", "nli", "nli", _nli("context")),
    FlanDataset("snli", "snli:1.1.0", "nli", "nli", _nli("premise")),
    FlanDataset("mnli", "glue/mnli:2.0.0", "nli", "nli", _nli("premise"),
                {"train": "train", "validation": "validation_matched"}),
    FlanDataset("qnli", "glue/qnli:2.0.0", "nli", "answer_entailment", _qnli),
    FlanDataset("qqp", "glue/qqp:2.0.0", "paraphrase", "paraphrase",
                _paraphrase("question1", "question2")),
    FlanDataset("mrpc", "glue/mrpc:2.0.0", "paraphrase", "paraphrase",
                _paraphrase("sentence1", "sentence2")),
    FlanDataset("paws_wiki", "paws_wiki/labeled_final_tokenized:1.1.0", "paraphrase",
                "paraphrase", _paraphrase("sentence1", "sentence2")),
    FlanDataset("imdb_reviews", "imdb_reviews/plain_text:1.0.0", "sentiment", "sentiment",
                _sentiment("text"), _TEST_AS_VALIDATION),
    FlanDataset("sst2", "glue/sst2:2.0.0", "sentiment", "sentiment", _sentiment("sentence")),
    FlanDataset("yelp_polarity", "yelp_polarity_reviews:0.2.0", "sentiment", "sentiment",
                _sentiment("text"), _TEST_AS_VALIDATION),
    FlanDataset("ag_news", "ag_news_subset:1.0.0", "topic", "topic", _ag_news,
                _TEST_AS_VALIDATION),
    FlanDataset("trec", "trec:1.0.0", "topic", "topic", _trec, _TEST_AS_VALIDATION),
    FlanDataset("squad_v1", "squad/v1.1:3.0.0", "qa", "extractive_qa", _squad),
    FlanDataset("trivia_qa", "trivia_qa/rc.nocontext:1.1.0", "qa", "closed_book_qa",
                _trivia_qa),
    FlanDataset("piqa", "piqa:1.0.0", "commonsense", "multiple_choice", _piqa),
    FlanDataset("hellaswag", "hellaswag:1.1.0", "commonsense", "multiple_choice", _hellaswag),
    FlanDataset("winogrande", "winogrande:1.2.0", "commonsense", "multiple_choice",
                _winogrande, {"train": "train_xl", "validation": "validation"}),
    FlanDataset("cosmos_qa", "cosmos_qa:1.0.0", "commonsense", "multiple_choice", _cosmos_qa),
    FlanDataset("openbookqa", "openbookqa:0.1.0", "commonsense", "multiple_choice",
                _openbookqa),
    FlanDataset("arc_easy", "ai2_arc/ARC-Easy:1.0.0", "commonsense", "multiple_choice",
                _ai2_arc),
    FlanDataset("arc_challenge", "ai2_arc/ARC-Challenge:1.0.0", "commonsense",
                "multiple_choice", _ai2_arc),
)


def tfds_base_name(tfds_name: str) -> str:
  """'glue/mnli:2.0.0' -> 'glue/mnli' (dataset and config, no version)."""
  return tfds_name.split(":")[0]


def _formatter(spec: FlanDataset) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  templates = flan_templates.TEMPLATES[spec.family]

  def format_dataset(dataset: tf.data.Dataset) -> tf.data.Dataset:
    dataset = dataset.map(spec.fields, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.filter(lambda f: f["valid"])
    return dataset.map(lambda f: preprocessors.choose_template(f, templates),
                       num_parallel_calls=tf.data.AUTOTUNE)

  format_dataset.__name__ = f"format_{spec.name}"
  return format_dataset


def _capped_rate(task: seqio.Task) -> float:
  return seqio.mixing_rate_num_examples(task, maximum=FLAN_MAX_RATE)


def _c4_rate(task: seqio.Task, c4_share: float) -> float:
  """The rate that makes C4 `c4_share` of all examples drawn from the mixture."""
  del task
  flan_total = sum(_capped_rate(seqio.get_mixture_or_task(spec.task_name))
                   for spec in FLAN_DATASETS)
  return c4_share / (1.0 - c4_share) * flan_total


def register_flan_mixture(name: str, c4_share: float = DEFAULT_C4_SHARE) -> seqio.Mixture:
  """Registers a mixture of all FLAN members plus `c4_share` of C4 language modelling.

  Args:
    name: Mixture name.
    c4_share: Expected fraction of examples from C4, in [0, 1); 0 leaves C4 out.

  Example:
    >>> register_flan_mixture("flan_prefinetune_c4_5pct", c4_share=0.05).name
    'flan_prefinetune_c4_5pct'
  """
  if not 0.0 <= c4_share < 1.0:
    raise ValueError(f"c4_share must be in [0, 1), got {c4_share!r}")
  members = [(spec.task_name, _capped_rate) for spec in FLAN_DATASETS]
  if c4_share > 0:
    members.append((c4.C4_FULL_LM_EMPTY_INPUTS, functools.partial(_c4_rate, c4_share=c4_share)))
  return vocab.add_mixture(name, members)


def register(vocabulary: seqio.Vocabulary) -> list[str]:
  """Registers every `flan_<name>` task and the two default mixtures; returns task names.

  Needs the C4 tasks registered first (the mixture's C4 share).

  Example:
    >>> register(seqio.ByteVocabulary())[0]
    'flan_anli_r1'
  """
  for spec in FLAN_DATASETS:
    if tfds_base_name(spec.tfds_name) in FLAN_EXCLUDED:
      raise ValueError(f"{spec.tfds_name} is excluded from the FLAN mixture")
    vocab.add_task(
        spec.task_name,
        source=seqio.TfdsDataSource(tfds_name=spec.tfds_name, splits=dict(spec.splits)),
        output_features=vocab.prompt_features(vocabulary),
        preprocessors=preprocessors.prompt_pipeline(_formatter(spec)), metric_fns=[])
  register_flan_mixture("flan_prefinetune", DEFAULT_C4_SHARE)
  register_flan_mixture("flan_prefinetune_no_c4", 0.0)
  return [spec.task_name for spec in FLAN_DATASETS]
