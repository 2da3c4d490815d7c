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

Example:
  >>> import uncurl_jax.tasks
  >>> ds = seqio.get_dataset("facts_task", {"inputs": 24, "targets": 8},
  ...                        feature_converter=seqio.DecoderFeatureConverter(pack=True),
  ...                        dataset_split="validation")
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from uncurl_jax.data import facts
from uncurl_jax.tasks import vocab

# The study's default world (docs/study.md, "design search"): 32 topics x 360 subjects,
# typed answers (16 value tokens per topic), the task = topics 0-7, finetuned on 10% of
# their subjects, with 24 subjects per topic (192 facts) set aside as a development split,
# and scored on the other 300 per topic: 2,400 held-out items; vocabulary 912.
DEFAULT_WORLD = facts.FactWorld(num_values=16, typed_answers=True, subjects_per_topic=360,
                                finetune_fraction=0.1, dev_fraction=24 / 360)
_SPLITS = {"train": {"pretrain": "pretrain", "task": "task_finetune",
                     "task_dev": "task_finetune"},
           "validation": {"pretrain": "pretrain", "task": "task_eval", "task_dev": "task_dev"}}


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
    sizes = {split: world.num_facts if part == "pretrain" else len(world.facts(mapping[part]))
             for split, mapping in _SPLITS.items()}
    source = seqio.FunctionDataSource(
        functools.partial(fact_dataset, world=world, part=part), splits=tuple(_SPLITS),
        num_input_examples=sizes)
    vocab.add_task(f"{name}_{part}", source=source, output_features=_features(world),
                   preprocessors=[seqio.preprocessors.append_eos_after_trim], metric_fns=[])
    names.append(f"{name}_{part}")
  return names


def register() -> list[str]:
  """Registers the default world as `facts_pretrain` / `facts_task` / `facts_task_dev`."""
  return register_world("facts", DEFAULT_WORLD)
