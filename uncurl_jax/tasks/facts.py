"""The world of memorized facts (`uncurl_jax.data.facts`) as seqio tasks.

`register_world(name, world)` registers two tasks over the world's own token ids (a
pass-through vocabulary, no text):

- `<name>_pretrain`: every fact of the world ("train"; "validation" holds the same facts,
  for monitoring memorization);
- `<name>_task`: the target task: "train" = the finetuning facts of the task's topics,
  "validation" = their held-out facts (the scored items);
- `<name>_task_dev` (worlds with a development split): the same "train", and as
  "validation" the development facts, on which settings are chosen (never scored).

A fact is a prefix-LM example (inputs: the prompt tokens; targets: the value), so the
loss and token accuracy count the value only; with packing, each fact is its own segment.
The "train" splits are shuffled in full every epoch (`shuffle_files`).
The default world is registered as `facts`.

`register_truth_task(name, world)` registers a task learned in finetuning over the same
facts (`FactWorld.judgements`: "subject topic value ?" -> yes / no, balanced), on the
world's `task_topics`:

- `<name>`: "train" = the judgements of the finetuning facts (what finetuning learns
  from), "validation" = those of the held-out facts;
- `<name>_rank`: the held-out judgements scored by rank classification over the two
  answers (one row per answer, as the SuperGLUE `*_rank` tasks; metric 'accuracy', chance
  50%): the study's score;
- `<name>_dev_rank`: the same over the development facts, on which settings are chosen;
- `<name>_facts_dev`: the development facts themselves in the pretraining format, on which
  the oracle arm selects its experts (before finetuning the judgement is not learned yet;
  the knowledge it rests on is).

Two truth tasks on topics disjoint from `facts_task`'s are registered by default:
`facts_truth` (topics 8-15) and `facts_truth_b` (topics 16-23).

Example:
  >>> import uncurl_jax.tasks
  >>> ds = seqio.get_dataset("facts_task", {"inputs": 24, "targets": 8},
  ...                        feature_converter=seqio.DecoderFeatureConverter(pack=True),
  ...                        dataset_split="validation")
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import seqio
import tensorflow as tf

from uncurl_jax.data import facts
from uncurl_jax.tasks import metrics
from uncurl_jax.tasks import vocab

# The study's default world (docs/study.md, "design search"): 32 topics x 360 subjects,
# typed answers (16 value tokens per topic), the task = topics 0-7, finetuned on 10% of
# their subjects, with 24 subjects per topic (192 facts) set aside as a development split,
# and scored on the other 300 per topic: 2,400 held-out items; vocabulary 912.
DEFAULT_WORLD = facts.FactWorld(num_values=16, typed_answers=True, subjects_per_topic=360,
                                finetune_fraction=0.1, dev_fraction=24 / 360)
# The truth tasks: the default world's facts (same values, same pretraining data) with
# other task topics and their own split. Judgement is learned in finetuning, from 30% of
# the topics' subjects (1,728 judgements); 24 subjects per topic are the development split;
# the other 228 per topic (3,648 judgements) are scored. Chosen on the references and the
# development split (docs/study.md, "The truth tasks").
TRUTH_WORLDS = {
    "facts_truth": dataclasses.replace(DEFAULT_WORLD, task_topics=tuple(range(8, 16)),
                                       finetune_fraction=0.3),
    "facts_truth_b": dataclasses.replace(DEFAULT_WORLD, task_topics=tuple(range(16, 24)),
                                         finetune_fraction=0.3),
}
# The property tasks learned in finetuning (docs/data.md, "Property judgement"; the search
# of docs/study.md): the default world's facts (same pretraining), 12 topics each, disjoint
# from facts_task's and from each other's. "Is the fact's value one of its topic's
# `yes_values`?", answered after the model recalls the value ("subject topic value ?" ->
# yes / no, trained with the true value, as a chain of thought); finetuned on 30% of the
# topics' subjects (1,296 judgements) mixed one to one with the pretraining facts replayed
# (`facts_pretrain`: finetuning without them erases the facts the judgement rests on),
# 24 subjects per topic (288) are the development split, 228 per topic (2,736) are scored.
PROPERTY_WORLDS = {
    "facts_property": dataclasses.replace(DEFAULT_WORLD, task_topics=tuple(range(8, 20)),
                                          finetune_fraction=0.3),
    "facts_property_b": dataclasses.replace(DEFAULT_WORLD, task_topics=tuple(range(20, 32)),
                                            finetune_fraction=0.3),
}
_SPLITS = {"train": {"pretrain": "pretrain", "task": "task_finetune",
                     "task_dev": "task_finetune", "replay": "replay"},
           "validation": {"pretrain": "pretrain", "task": "task_eval", "task_dev": "task_dev",
                          "replay": "replay"}}


@dataclasses.dataclass(frozen=True)
class RecallJudge:
  """How a recall-then-judge eval task is scored (`study.recall_judge`): each validation row
  is a judgement with the true value shown (inputs "subject topic value ?", target yes or
  no); the model first recalls the value greedily from the prompt before it, then its
  judgement of "subject topic <recalled> ?" is the larger of its `answers` logits.

  Attributes:
    value_position: Index of the value in the inputs (the prompt's length).
    answers: Token ids of the two answers (yes, no).
  """

  value_position: int
  answers: tuple[int, int]


# {eval task name: RecallJudge}, filled by `register_property_task`.
RECALL_JUDGE_TASKS: dict[str, RecallJudge] = {}


def fact_dataset(split: str, shuffle_files: bool, seed: int | None = None, *,
                 world: facts.FactWorld, part: str) -> tf.data.Dataset:
  """The facts of a world's split as {'inputs', 'targets'} (a FunctionDataSource function).

  The content of a split is fixed; with `shuffle_files` its order is a full seeded shuffle,
  new every epoch (in addition to seqio's shuffle buffer).
  """
  if split not in _SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {tuple(_SPLITS)}")
  examples = tf.data.Dataset.from_tensor_slices(world.examples(_SPLITS[split][part]))
  if shuffle_files:
    # The facts are stored topic by topic; seqio's shuffle buffer (1,000 examples) alone
    # would feed training one topic after another. A full shuffle, new every epoch.
    examples = examples.shuffle(len(examples), seed=world.seed if seed is None else seed,
                                reshuffle_each_iteration=True)
  return examples


def _features(world: facts.FactWorld) -> dict[str, seqio.Feature]:
  vocabulary = seqio.PassThroughVocabulary(size=world.vocab_size, eos_id=facts.EOS)
  return {name: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)
          for name in ("inputs", "targets")}


def _facts_source(world: facts.FactWorld, part: str) -> seqio.FunctionDataSource:
  """The facts of a world's `part` (a key of `_SPLITS`' mappings), per split."""
  return seqio.FunctionDataSource(
      functools.partial(fact_dataset, world=world, part=part), splits=tuple(_SPLITS),
      num_input_examples={split: len(world.facts(mapping[part]))
                          for split, mapping in _SPLITS.items()})


def _judgement_source(world: facts.FactWorld, part: str, rank: bool,
                      kind: str) -> seqio.FunctionDataSource:
  """The judgements (`judgement_dataset`) of a world's `part`, per split."""
  rows = (2 if kind == "truth" else 1) * (2 if rank else 1)  # per fact
  return seqio.FunctionDataSource(
      functools.partial(judgement_dataset, world=world, part=part, rank=rank, kind=kind),
      splits=tuple(_SPLITS), num_input_examples={
          split: rows * len(world.facts(mapping[part])) for split, mapping in _SPLITS.items()})


def _add_task(name: str, world: facts.FactWorld, source: seqio.DataSource, **kwargs) -> str:
  vocab.add_task(name, source=source, output_features=_features(world),
                 preprocessors=[seqio.preprocessors.append_eos_after_trim],
                 **{"metric_fns": [], **kwargs})
  return name


def register_world(name: str, world: facts.FactWorld) -> list[str]:
  """Registers `<name>_pretrain`, `<name>_task` and, if the world has a development split,
  `<name>_task_dev` over `world`; returns their names.

  Example:
    >>> register_world("facts_small", facts.FactWorld(num_topics=4, subjects_per_topic=8,
    ...                                                task_topics=(0,)))
    ['facts_small_pretrain', 'facts_small_task']
  """
  names = []
  parts = ("pretrain", "task") + (("task_dev",) if world.dev_fraction > 0 else ())
  for part in parts:
    names.append(_add_task(f"{name}_{part}", world, _facts_source(world, part)))
  return names


def judgement_dataset(split: str, shuffle_files: bool, seed: int | None = None, *,
                      world: facts.FactWorld, part: str, rank: bool,
                      kind: str = "truth") -> tf.data.Dataset:
  """Truth judgements of a world's split (a FunctionDataSource function): prefix-LM
  examples {'inputs', 'targets', 'label'}, or with `rank` one row per answer (yes, then
  no) with 'idx' [judgement, answer], 'is_correct' and 'targets_pretokenized'."""
  if split not in _SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {tuple(_SPLITS)}")
  if kind == "truth":
    examples = world.judgements(_SPLITS[split][part])
  else:  # "property:<query position>", checked by register_truth_task
    examples = world.properties(_SPLITS[split][part], query=kind.split(":")[1])
  if rank:
    examples = rank_rows(examples, world)
  dataset = tf.data.Dataset.from_tensor_slices(examples)
  if shuffle_files:
    dataset = dataset.shuffle(len(dataset), seed=world.seed if seed is None else seed,
                              reshuffle_each_iteration=True)
  return dataset


def rank_rows(judgements: dict[str, np.ndarray], world: facts.FactWorld
              ) -> dict[str, np.ndarray]:
  """Rank-classification rows of judgements: for judgement i, (inputs, yes) with idx
  [i, 0] and (inputs, no) with idx [i, 1], each with 'is_correct' and its answer text."""
  n = len(judgements["label"])
  answers = np.asarray([world.truth_token("yes"), world.truth_token("no")], np.int32)
  label = np.repeat(judgements["label"], 2)
  option = np.tile([0, 1], n)
  return {"inputs": np.repeat(judgements["inputs"], 2, axis=0),
          "targets": answers[option][:, None],
          "idx": np.stack([np.repeat(np.arange(n), 2), option], axis=1).astype(np.int32),
          "is_correct": (option == 1 - label),
          "targets_pretokenized": np.asarray(["yes", "no"])[option]}


def register_truth_task(name: str, world: facts.FactWorld, kind: str = "truth") -> list[str]:
  """Registers the truth-judgement tasks of `world`'s task topics (module docstring):
  `<name>`, `<name>_rank`, and with a development split `<name>_dev_rank` and
  `<name>_facts_dev`; returns their names. `kind` "property:<query position>" (one of
  `facts.PROPERTY_QUERIES`) registers property judgements instead (`FactWorld.properties`;
  the search of docs/study.md).

  Example:
    >>> register_truth_task("truth_small", facts.FactWorld(
    ...     num_topics=4, subjects_per_topic=40, task_topics=(1,), dev_fraction=0.2))
    ['truth_small', 'truth_small_rank', 'truth_small_dev_rank', 'truth_small_facts_dev']
  """
  if kind != "truth" and (not kind.startswith("property:")
                          or kind.split(":", 1)[1] not in facts.PROPERTY_QUERIES):
    raise ValueError(f"unknown judgement kind {kind!r}; expected 'truth' or "
                     f"'property:<query position>' with a position in {facts.PROPERTY_QUERIES}")
  names = [_add_task(name, world, _judgement_source(world, "task", False, kind))]
  parts = [("", "task")] + ([("_dev", "task_dev")] if world.dev_fraction > 0 else [])
  for suffix, part in parts:
    names.append(_add_task(f"{name}{suffix}_rank", world,
                           _judgement_source(world, part, True, kind),
                           postprocess_fn=metrics.rank_target,
                           metric_fns=[metrics.rank_accuracy]))
  if world.dev_fraction > 0:
    names.append(_add_task(f"{name}_facts_dev", world, _facts_source(world, "task_dev")))
  return names


def register_facts(name: str, world: facts.FactWorld, part: str) -> str:
  """Registers `name`: the facts of one of `world`'s parts ("pretrain" or "replay", whose
  content does not depend on the split) in the pretraining format, in both splits.

  Example:
    >>> register_facts("facts_unscored", PROPERTY_WORLDS["facts_property"], "replay")
  """
  if part not in ("pretrain", "replay"):
    raise ValueError(f"register_facts registers the 'pretrain' or 'replay' facts, got {part!r}")
  return _add_task(name, world, _facts_source(world, part))


def register_property_task(name: str, world: facts.FactWorld, replay: str) -> list[str]:
  """Registers a property task learned in finetuning and scored after recall (module
  docstring): the judgement tasks of `register_truth_task(name, world,
  "property:recalled")`, the recall-then-judge eval tasks `<name>_recall_judge` (held-out)
  and `<name>_dev_recall_judge` (development; `RECALL_JUDGE_TASKS`), and the finetuning
  mixture `<name>_replay`: the judgements and the task (or mixture) `replay`, the
  pretraining data replayed, one to one; returns their names.

  Example:
    >>> register_property_task("property_small", facts.FactWorld(
    ...     num_topics=4, subjects_per_topic=40, task_topics=(1,), dev_fraction=0.2),
    ...     replay="small_world_pretrain")[-3:]
    ['property_small_recall_judge', 'property_small_dev_recall_judge', 'property_small_replay']
  """
  if world.dev_fraction <= 0:
    raise ValueError(f"register_property_task({name!r}) needs a world with a development "
                     f"split (dev_fraction > 0), got {world.dev_fraction}")
  names = register_truth_task(name, world, kind="property:recalled")
  spec = RecallJudge(value_position=len(world.prompt),
                     answers=(world.truth_token("yes"), world.truth_token("no")))
  for suffix, part in (("", "task"), ("_dev", "task_dev")):
    names.append(_add_task(f"{name}{suffix}_recall_judge", world,
                           _judgement_source(world, part, False, "property:recalled")))
    RECALL_JUDGE_TASKS[names[-1]] = spec
  vocab.add_mixture(f"{name}_replay", [(name, 1.0), (replay, 1.0)])
  return names + [f"{name}_replay"]


def register() -> list[str]:
  """Registers the default world as `facts_pretrain` / `facts_task` / `facts_task_dev`, the
  truth tasks of `TRUTH_WORLDS` and the property tasks of `PROPERTY_WORLDS`."""
  names = register_world("facts", DEFAULT_WORLD)
  for name, world in TRUTH_WORLDS.items():
    names += register_truth_task(name, world)
  for name, world in PROPERTY_WORLDS.items():
    names += register_property_task(name, world, replay="facts_pretrain")
  return names
