"""A token-level world of memorized facts for the study: many topics, few per task.

Every (subject, topic) pair of the world has a value, an independent uniform draw from
`num_values` value tokens: knowledge that can only be memorized, never inferred. A fact
is one example with the prompt (by default `subject topic`) as its inputs and the value
as its single target, so the loss and the score fall on the value alone, the
knowledge-dependent prediction. Packed rows hold many facts of mixed topics, each its
own segment (attention stays inside a fact).

A target task is a few topics. Its subjects are split once (by the world's seed) into
finetuning subjects and held-out subjects: finetuning sees only the former's facts,
scoring only the latter's, which the model saw in pretraining only. So a score measures
what the pretrained model knows, not how fast finetuning teaches. The task topics may be
larger than the others (`task_subjects_per_topic`) so that a task has thousands of
independent scored items while the world's total stays within a CPU budget.

With `typed_answers`, each topic answers from its own `num_values` value tokens (as
relations have typed answers: years, cities, ...), so a deeper router that keys on the
partly computed answer still sees the topic; otherwise all topics share them.

Truth judgement (`judgements`), a task learned in finetuning: "subject topic value ?"
answered with a yes or a no token, where the negatives show another value of the same
topic. Its format never occurs in pretraining (which sees facts only); what makes it
learnable is the knowledge pretraining stored. Each fact of a split gives one positive and
one negative judgement (balanced classes).

Token ids: 0 padding, 1 end of sequence (unused), then subjects, topics, values, and the
three tokens of the truth judgements (query, yes, no); the vocabulary is padded to a
multiple of 16.

Example:
  >>> world = FactWorld()
  >>> world.num_facts, world.num_task_items
  >>> examples = world.examples("pretrain")       # {'inputs': [N, 2], 'targets': [N, 1]}
  >>> held_out = world.examples("task_eval")
  >>> truth = world.judgements("task_finetune")   # + 'label': 1 = yes, 0 = no
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

PAD, EOS = 0, 1
SPLITS = ("pretrain", "task_finetune", "task_dev", "task_eval", "replay")
PROMPT_PARTS = ("subject", "topic")
TRUTH_TOKENS = ("query", "yes", "no")  # after the value tokens
PROPERTY_QUERIES = ("after", "before", "none", "recalled")  # `FactWorld.properties`


@dataclasses.dataclass(frozen=True)
class FactWorld:
  """The facts, the task's topics and its finetune / held-out split (all fixed by `seed`).

  Attributes:
    num_topics: Topics (relations); well beyond the small model's expert count.
    num_values: Values a fact can take; right by chance with 1 / num_values.
    typed_answers: Each topic has its own `num_values` value tokens (else shared).
    subjects_per_topic: Subjects with a fact in each topic outside the task.
    task_topics: The target task's topics.
    task_subjects_per_topic: Subjects of each task topic (None: `subjects_per_topic`).
    finetune_fraction: Share of a task topic's subjects whose facts finetuning sees.
    dev_fraction: Share of a task topic's subjects set aside as a development split
      ("task_dev": seen only in pretraining, like the scored ones, but never scored), on
      which the study's settings are chosen; taken after the finetuning subjects, so the
      finetuning facts do not depend on it.
    prompt: The inputs of a fact, e.g. ("subject", "topic") or ("topic", "subject",
      "topic"); the value follows the last token.
    finetune_topics: Topics outside the task whose every fact is finetuning data too (a
      task learned in finetuning learns its rule from them; they are never scored).
    shared_property: Property judgements (`properties`) use one half of the values for
      every topic (else each topic its own half); only with untyped answers, where the
      topics share their value tokens.
    seed: Seed of the values and of the split.
  """

  num_topics: int = 32
  num_values: int = 64
  typed_answers: bool = False
  subjects_per_topic: int = 200
  task_topics: tuple[int, ...] = tuple(range(8))
  task_subjects_per_topic: int | None = None
  finetune_fraction: float = 0.2
  dev_fraction: float = 0.0
  prompt: tuple[str, ...] = ("subject", "topic")
  finetune_topics: tuple[int, ...] = ()
  shared_property: bool = False
  seed: int = 2409

  def __post_init__(self):
    for name in ("num_topics", "num_values", "subjects_per_topic"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"FactWorld.{name} must be a positive int, got {getattr(self, name)!r}")
    topics = tuple(self.task_topics)
    if not topics or len(set(topics)) != len(topics) or not all(
        0 <= t < self.num_topics for t in topics):
      raise ValueError(f"FactWorld.task_topics must be distinct topics in [0, "
                       f"{self.num_topics}), got {topics}")
    object.__setattr__(self, "task_topics", topics)
    extra = tuple(self.finetune_topics)
    if len(set(extra)) != len(extra) or set(extra) & set(topics) or not all(
        0 <= t < self.num_topics for t in extra):
      raise ValueError(f"FactWorld.finetune_topics must be distinct topics in [0, "
                       f"{self.num_topics}) outside task_topics {topics}, got {extra}")
    object.__setattr__(self, "finetune_topics", extra)
    if self.task_subjects_per_topic is not None and self.task_subjects_per_topic < 2:
      raise ValueError(f"task_subjects_per_topic must be None or >= 2, got "
                       f"{self.task_subjects_per_topic}")
    if not 0.0 < self.finetune_fraction < 1.0:
      raise ValueError(f"finetune_fraction must be in (0, 1), got {self.finetune_fraction}")
    if not 0.0 <= self.dev_fraction < 1.0 - self.finetune_fraction:
      raise ValueError(f"dev_fraction must be in [0, 1 - finetune_fraction = "
                       f"{1.0 - self.finetune_fraction:g}), got {self.dev_fraction}")
    if not self.prompt or any(p not in PROMPT_PARTS for p in self.prompt) or \
        "subject" not in self.prompt or "topic" not in self.prompt:
      raise ValueError(f"prompt must use both of {PROMPT_PARTS}, got {self.prompt}")
    object.__setattr__(self, "prompt", tuple(self.prompt))
    if self.shared_property and self.typed_answers:
      raise ValueError("shared_property needs untyped answers (typed_answers=False): typed "
                       "topics have no values in common")

  # Sizes and token ids.

  def subjects(self, topic: int) -> int:
    """Subjects with a fact in `topic`."""
    if topic in self.task_topics and self.task_subjects_per_topic is not None:
      return self.task_subjects_per_topic
    return self.subjects_per_topic

  @property
  def max_subjects(self) -> int:
    return max(self.subjects(t) for t in range(self.num_topics))

  @property
  def num_facts(self) -> int:
    return sum(self.subjects(t) for t in range(self.num_topics))

  @property
  def num_task_items(self) -> int:
    """Held-out facts of the task: its independent scored items."""
    return len(self._split()[2])

  @property
  def num_value_tokens(self) -> int:
    return self.num_values * (self.num_topics if self.typed_answers else 1)

  @property
  def vocab_size(self) -> int:
    used = self.truth_token("query") + len(TRUTH_TOKENS)
    return -(-used // 16) * 16

  def subject_token(self, subject):
    return 2 + np.asarray(subject)

  def topic_token(self, topic):
    return 2 + self.max_subjects + np.asarray(topic)

  def value_token(self, value, topic):
    offset = np.asarray(topic) * self.num_values if self.typed_answers else 0
    return 2 + self.max_subjects + self.num_topics + offset + np.asarray(value)

  def truth_token(self, name: str) -> int:
    """The id of a truth-judgement token: 'query' (ends the prompt), 'yes' or 'no'."""
    if name not in TRUTH_TOKENS:
      raise ValueError(f"unknown truth token {name!r}; expected one of {TRUTH_TOKENS}")
    return (2 + self.max_subjects + self.num_topics + self.num_value_tokens
            + TRUTH_TOKENS.index(name))

  # Facts.

  @functools.cached_property
  def values(self) -> np.ndarray:
    """[num_topics, max_subjects] the value of every fact (subjects beyond a topic's count
    have none: -1)."""
    rng = np.random.default_rng([self.seed, 0])
    table = rng.integers(0, self.num_values, (self.num_topics, self.max_subjects))
    for topic in range(self.num_topics):
      table[topic, self.subjects(topic):] = -1
    return table

  @functools.cache
  def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(finetune, dev, held-out) facts of the task as [n, 2] (topic, subject) arrays."""
    rng = np.random.default_rng([self.seed, 1])
    finetune, dev, held_out = [], [], []
    for topic in self.task_topics:
      subjects = rng.permutation(self.subjects(topic))
      cut = max(1, round(self.finetune_fraction * len(subjects)))
      dev_cut = cut + round(self.dev_fraction * len(subjects))
      if dev_cut >= len(subjects):
        raise ValueError(f"topic {topic} has {len(subjects)} subjects: none left to score "
                         f"after {cut} finetuning and {dev_cut - cut} development subjects")
      finetune += [(topic, s) for s in np.sort(subjects[:cut])]
      dev += [(topic, s) for s in np.sort(subjects[cut:dev_cut])]
      held_out += [(topic, s) for s in np.sort(subjects[dev_cut:])]
    finetune += [(topic, s) for topic in self.finetune_topics for s in range(self.subjects(topic))]
    as_array = lambda pairs: np.asarray(pairs, np.int64).reshape(-1, 2)
    return as_array(finetune), as_array(dev), as_array(held_out)

  def facts(self, split: str) -> np.ndarray:
    """[n, 2] (topic, subject) pairs of `split`: every fact of the world ("pretrain"), the
    task's finetuning facts ("task_finetune"), its development facts ("task_dev"), its
    held-out, scored facts ("task_eval"), or every fact but the task's development and
    held-out ones ("replay": what finetuning may replay while the facts it is scored on
    stay seen only in pretraining)."""
    if split == "pretrain":
      return np.asarray([(t, s) for t in range(self.num_topics)
                         for s in range(self.subjects(t))], np.int64)
    if split == "task_finetune":
      return self._split()[0]
    if split == "task_dev":
      return self._split()[1]
    if split == "task_eval":
      return self._split()[2]
    if split == "replay":
      every = self.facts("pretrain")
      unseen = np.zeros((self.num_topics, self.max_subjects), bool)
      for part in self._split()[1:]:
        unseen[part[:, 0], part[:, 1]] = True
      return every[~unseen[every[:, 0], every[:, 1]]]
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

  def examples(self, split: str) -> dict[str, np.ndarray]:
    """{'inputs': [n, len(prompt)], 'targets': [n, 1]} int32 token ids of `split`'s facts."""
    facts = self.facts(split)
    topics, subjects = facts[:, 0], facts[:, 1]
    parts = {"subject": self.subject_token(subjects), "topic": self.topic_token(topics)}
    inputs = np.stack([parts[p] for p in self.prompt], axis=1)
    targets = self.value_token(self.values[topics, subjects], topics)[:, None]
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}

  @functools.cached_property
  def yes_values(self) -> np.ndarray:
    """[num_topics, num_values] bool: the values of each topic that have the property
    (`properties`): half of them, the half whose facts come closest to half the topic's
    subjects (a fixed draw among balanced halves), so the classes are near balanced. With
    `shared_property`, one half for every topic, balanced over the task topics' facts."""
    rng = np.random.default_rng([self.seed, 3])
    table = np.zeros((self.num_topics, self.num_values), bool)
    # (topics that share a half, topics whose facts it balances)
    groups = [(range(self.num_topics), self.task_topics)] if self.shared_property else [
        ([t], [t]) for t in range(self.num_topics)]
    for topics, balanced in groups:
      counts = sum(np.bincount(self.values[t, :self.subjects(t)], minlength=self.num_values)
                   for t in balanced)
      best = None
      for _ in range(256):
        half = rng.permutation(self.num_values)[:self.num_values // 2]
        gap = abs(2 * counts[half].sum() - counts.sum())
        if best is None or gap < best[0]:
          best = (gap, half)
      for topic in topics:
        table[topic, best[1]] = True
    return table

  def properties(self, split: str, query: str = "after") -> dict[str, np.ndarray]:
    """Property judgements of `split`'s facts: "subject topic ?" -> yes when the fact's
    value is one of the topic's `yes_values`: {'inputs': [n, k] (the prompt and the tokens
    `query` adds), 'targets': [n, 1] (the yes or no token), 'label': [n] (1: yes)},
    int32. `query`: the query token "after" the prompt, "before" it, "none" (the answer
    in the value's place), or "recalled" (after the prompt and the fact's value: "subject
    topic value ?", the judgement of a recalled value, as in a chain of thought)."""
    if query not in PROPERTY_QUERIES:
      raise ValueError(f"unknown query position {query!r}; expected one of {PROPERTY_QUERIES}")
    facts = self.facts(split)
    topics, subjects = facts[:, 0], facts[:, 1]
    label = self.yes_values[topics, self.values[topics, subjects]].astype(np.int32)
    parts = {"subject": self.subject_token(subjects), "topic": self.topic_token(topics)}
    prompt = np.stack([parts[p] for p in self.prompt], axis=1)
    q = np.full((len(facts), 1), self.truth_token("query"))
    value = self.value_token(self.values[topics, subjects], topics)[:, None]
    inputs = {"after": [prompt, q], "before": [q, prompt], "none": [prompt],
              "recalled": [prompt, value, q]}[query]
    inputs = np.concatenate(inputs, axis=1)
    answer = np.where(label == 1, self.truth_token("yes"), self.truth_token("no"))
    return {"inputs": inputs.astype(np.int32), "targets": answer[:, None].astype(np.int32),
            "label": label}

  def judgements(self, split: str) -> dict[str, np.ndarray]:
    """Truth judgements of `split`'s facts: {'inputs': [2n, len(prompt) + 2] (the prompt,
    a shown value, the query token), 'targets': [2n, 1] (the yes or no token), 'label':
    [2n] (1: yes)}, int32.

    Every fact gives a positive (its value shown) and, right after it, a negative (another
    value of the same topic, uniform over the other `num_values - 1`, fixed by the seed and
    the fact), so the classes are balanced and a fact's two judgements stay together.
    """
    facts = self.facts(split)
    topics, subjects = facts[:, 0], facts[:, 1]
    true = self.values[topics, subjects]
    # One draw per fact of the world, independent of the split it is asked in.
    shift = np.random.default_rng([self.seed, 2]).integers(
        1, self.num_values, (self.num_topics, self.max_subjects))[topics, subjects]
    wrong = (true + shift) % self.num_values
    parts = {"subject": self.subject_token(subjects), "topic": self.topic_token(topics)}
    prompt = np.stack([parts[p] for p in self.prompt], axis=1)
    query = np.full((len(facts), 1), self.truth_token("query"))
    shown = np.stack([true, wrong], axis=1).reshape(-1)  # positive, negative per fact
    inputs = np.concatenate([np.repeat(prompt, 2, axis=0),
                             self.value_token(shown, np.repeat(topics, 2))[:, None],
                             np.repeat(query, 2, axis=0)], axis=1)
    label = np.tile([1, 0], len(facts))
    answer = np.where(label == 1, self.truth_token("yes"), self.truth_token("no"))
    return {"inputs": inputs.astype(np.int32), "targets": answer[:, None].astype(np.int32),
            "label": label.astype(np.int32)}
