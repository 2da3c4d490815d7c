"""Classification questions over the synthetic corpus's knowledge (one domain each).

Seven tasks ask questions whose answers need the knowledge that the documents of one
domain of `corpus` carry, so that pruning for one task has something to keep and
something to drop. Entity questions (which country is a city in, ...) ask about disjoint
entities in "train" and "validation", so a model answers validation questions only with
knowledge learned from the documents.

Example:
  >>> from uncurl_jax.data import corpus_tasks
  >>> example = corpus_tasks.task_examples("city_country", "train", 1, seed=0)[0]
  >>> example.prompt, example.options, example.answer
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from uncurl_jax.data.corpus import CATEGORIES
from uncurl_jax.data.corpus import NUM_COUNTRIES
from uncurl_jax.data.corpus import SPLITS
from uncurl_jax.data.corpus import VALIDATION_EVERY
from uncurl_jax.data.corpus import WEEKDAYS
from uncurl_jax.data.corpus import Stream
from uncurl_jax.data.corpus import World
from uncurl_jax.data.corpus import article
from uncurl_jax.data.corpus import check_count_and_seed
from uncurl_jax.data.corpus import date
from uncurl_jax.data.corpus import dna_with
from uncurl_jax.data.corpus import dna_without
from uncurl_jax.data.corpus import equation
from uncurl_jax.data.corpus import get_world
from uncurl_jax.data.corpus import program


@dataclasses.dataclass(frozen=True)
class TaskExample:
  """One classification example: `options[label]` is the right answer.

  Attributes:
    question: The question text.
    options: The answer options.
    label: Index of the right option.
    show_options: Whether the prompt lists the options (done where they vary
      per example; fixed options are implied by the question and learned).
  """
  question: str
  options: tuple[str, ...]
  label: int
  show_options: bool = False

  @property
  def prompt(self) -> str:
    """The model input: the question, the options if shown, an answer cue."""
    listed = f"\nOptions: {' / '.join(self.options)}" if self.show_options else ""
    return f"{self.question}{listed}\nAnswer: "

  @property
  def answer(self) -> str:
    return self.options[self.label]


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
  """A classification task over one domain.

  Attributes:
    name: Task name (a key of `TASKS`).
    domain: The domain whose documents hold the needed knowledge.
    description: What the task asks.
    options: The fixed answer options, or None when they vary per example.
  """
  name: str
  domain: str
  description: str
  options: tuple[str, ...] | None


def _pick_entity(stream: Stream, count: int, split: str) -> int:
  """An entity index whose train/validation membership matches `split`."""
  while True:
    index = stream.integer(0, count - 1)
    if (index % VALIDATION_EVERY == 0) == (split == "validation"):
      return index


def _multiple_choice(stream: Stream, question: str, correct: str,
                     distractors: Sequence[str]) -> TaskExample:
  options = stream.sample([correct] + list(distractors), len(distractors) + 1)
  return TaskExample(question, tuple(options), options.index(correct), show_options=True)


def _arithmetic_truth(stream: Stream, world: World, split: str) -> TaskExample:
  del world, split
  expression, value = equation(stream)
  is_true = stream.integer(0, 1) == 1
  shown = value if is_true else value + stream.choice((-1, 1)) * stream.integer(1, 10)
  return TaskExample(f"Is this true or false? {expression} = {shown}",
                     ("true", "false"), 0 if is_true else 1)


def _code_output(stream: Stream, world: World, split: str) -> TaskExample:
  del world, split
  lines, value = program(stream, max_lets=3)  # short enough for 128-token models
  offsets = stream.sample([d for d in range(-9, 10) if d != 0], 3)
  return _multiple_choice(stream, "What does this program print?\n" + "\n".join(lines),
                          str(value), [str(value + d) for d in offsets])


def _city_question(stream: Stream, world: World, split: str, names: Sequence[str],
                   question: str) -> TaskExample:
  city = _pick_entity(stream, len(world.cities), split)
  correct = world.city_country[city]
  others = stream.sample([k for k in range(NUM_COUNTRIES) if k != correct], 3)
  return _multiple_choice(stream, question.format(city=world.cities[city]),
                          names[correct], [names[k] for k in others])


def _city_country(stream: Stream, world: World, split: str) -> TaskExample:
  return _city_question(stream, world, split, world.countries,
                        "In which country is the city {city}?")


def _city_language(stream: Stream, world: World, split: str) -> TaskExample:
  return _city_question(stream, world, split, world.languages,
                        "Which language do people speak in {city}?")


def _dna_motif(stream: Stream, world: World, split: str) -> TaskExample:
  del split
  name = stream.choice(list(world.motifs))
  length, contains = stream.integer(20, 32), stream.integer(0, 1) == 1
  if contains:
    sequence, _ = dna_with(stream, world.motifs[name], length)
  else:
    sequence = dna_without(stream, world.motifs[name], length)
  return TaskExample(f"Does {sequence} contain the {name} motif?", ("yes", "no"),
                     0 if contains else 1)


def _date_weekday(stream: Stream, world: World, split: str) -> TaskExample:
  del world, split
  iso, weekday = date(stream)
  return TaskExample(f"Which day of the week was {iso}?", WEEKDAYS, weekday)


def _word_category(stream: Stream, world: World, split: str) -> TaskExample:
  word = _pick_entity(stream, len(world.words), split)
  return TaskExample(f"What kind of thing is {article(world.words[word])} "
                     f"{world.words[word]}?", CATEGORIES, world.word_category[word])


TASKS: dict[str, SyntheticTask] = {
    t.name: t for t in (
        SyntheticTask("arithmetic_truth", "arithmetic",
                      "Is 'a op b = c' true?", ("true", "false")),
        SyntheticTask("code_output", "code", "Which number does a program print?", None),
        SyntheticTask("city_country", "geography", "Which country is a city in?", None),
        SyntheticTask("city_language", "geography",
                      "Which language is spoken in a city (city -> country -> language)?",
                      None),
        SyntheticTask("dna_motif", "dna", "Does a sequence contain a named motif?",
                      ("yes", "no")),
        SyntheticTask("date_weekday", "calendar", "On which weekday was a date?", WEEKDAYS),
        SyntheticTask("word_category", "lexicon", "What kind of thing is an invented word?",
                      CATEGORIES),
    )
}
_TASK_FNS: dict[str, Callable[[Stream, World, str], TaskExample]] = {
    "arithmetic_truth": _arithmetic_truth, "code_output": _code_output,
    "city_country": _city_country, "city_language": _city_language,
    "dna_motif": _dna_motif, "date_weekday": _date_weekday,
    "word_category": _word_category,
}


def task_examples(task: str, split: str, n: int, seed: int) -> list[TaskExample]:
  """Returns `n` examples of a task, a pure function of its arguments.

  Args:
    task: A key of `TASKS`.
    split: "train" or "validation" (entity questions use disjoint entities).
    n: Number of examples (>= 0).
    seed: Non-negative integer.

  Example:
    >>> ex = task_examples("arithmetic_truth", "validation", 1, seed=0)[0]
    >>> ex.options
    ('true', 'false')
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASKS)}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  check_count_and_seed(n, seed)
  rng = np.random.default_rng([seed, 100 + list(TASKS).index(task), SPLITS.index(split)])
  stream, world, make = Stream(rng), get_world(), _TASK_FNS[task]
  return [make(stream, world, split) for _ in range(n)]
