"""Tests of the synthetic corpus: determinism, facts, answers, speed (numpy only)."""

import calendar
import datetime
import re
import subprocess
import sys
import time

import pytest

from uncurl_jax.data import corpus
from uncurl_jax.data import corpus_tasks

WORLD = corpus.get_world()
CITY_COUNTRY = dict(zip(WORLD.cities, WORLD.city_country))
WORD_CATEGORY = dict(zip(WORLD.words, WORLD.word_category))


def run_program(lines):
  """Reference interpreter of the toy language: returns the printed value."""
  values = {}
  for line in lines:
    if match := re.fullmatch(r"let (\w) = (-?\d+);", line):
      values[match[1]] = int(match[2])
    elif match := re.fullmatch(r"let (\w) = (\w) ([-+*]) (\d+);", line):
      a, b = values[match[2]], int(match[4])
      values[match[1]] = {"+": a + b, "-": a - b, "*": a * b}[match[3]]
    elif match := re.fullmatch(r"print (\w);", line):
      return values[match[1]]
    else:
      raise AssertionError(f"not a statement: {line!r}")
  raise AssertionError("program prints nothing")


def test_importing_does_not_load_tensorflow():
  code = ("import sys, uncurl_jax.data.corpus, uncurl_jax.data.corpus_tasks; "
          "print('tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "False"


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_documents_are_deterministic_by_seed(domain):
  first = corpus.generate_documents(domain, 20, seed=7)
  assert first == corpus.generate_documents(domain, 20, seed=7)
  assert first != corpus.generate_documents(domain, 20, seed=8)
  assert all(doc.isascii() and doc for doc in first)
  assert len(set(first)) > 15  # varied, not one document repeated


def test_domains_have_their_own_vocabulary():
  docs = {d: " ".join(corpus.generate_documents(d, 50, seed=0)) for d in corpus.DOMAINS}
  assert "let " in docs["code"] and "let " not in docs["geography"]
  assert re.search(r"[ACGT]{20}", docs["dna"]) and not re.search(r"[ACGT]{20}", docs["lexicon"])
  assert " is a city in " in docs["geography"] and " is a city in " not in docs["calendar"]


def stated_facts(domain, doc):
  """(stated, true) pairs for every fact the document states, recomputed independently."""
  apply = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
  if domain == "geography":
    return ([(country, WORLD.countries[CITY_COUNTRY[city]])
             for city, country in re.findall(r"(\w+) is a city in (\w+)\.", doc)]
            + [(language, WORLD.languages[WORLD.countries.index(country)])
               for country, language in re.findall(r"People in (\w+) speak (\w+)\.", doc)])
  if domain == "calendar":
    return ([(day, corpus.WEEKDAYS[datetime.date.fromisoformat(iso).weekday()])
             for iso, day in re.findall(r"(\d{4}-\d\d-\d\d) was a (\w+)\.", doc)]
            + [(int(days), calendar.monthrange(int(year), corpus.MONTHS.index(month) + 1)[1])
               for month, year, days in re.findall(r"(\w+) (\d{4}) had (\d+) days\.", doc)])
  if domain == "arithmetic":
    pattern = r"(\d+) ([-+*]) (\d+)(?: =| gives|: the result is) (-?\d+)"
    return [(int(value), apply[op](int(a), int(b)))
            for a, op, b, value in re.findall(pattern, doc)]
  if domain == "code":
    return [(block.splitlines()[-1], f"# output: {run_program(block.splitlines()[:-1])}")
            for block in doc.split("\n\n")]
  if domain == "dna":
    pattern = r"([ACGT]+) carries the (\w+) motif at (\d+)"
    return [(sequence[int(at):int(at) + 6], WORLD.motifs[name])
            for sequence, name, at in re.findall(pattern, doc)]
  if domain == "lexicon":
    return [(category, corpus.CATEGORIES[WORD_CATEGORY[word]])
            for word, category in re.findall(r"An? (\w+) is a kind of (\w+)\.", doc)]
  raise AssertionError(domain)


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_documents_state_true_facts(domain):
  docs = corpus.generate_documents(domain, 200, seed=1)
  facts = [fact for doc in docs for fact in stated_facts(domain, doc)]
  assert len(facts) >= len(docs)  # every document states at least one checkable fact
  assert [stated for stated, _ in facts] == [true for _, true in facts]


def expected_label(task, example):
  """The answer recomputed from the world's facts, independently of the generator."""
  question = example.question
  if task == "arithmetic_truth":
    a, op, b, shown = re.search(r"(\d+) ([-+*]) (\d+) = (-?\d+)", question).groups()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return example.options.index("true" if value == int(shown) else "false")
  if task == "code_output":
    return example.options.index(str(run_program(question.splitlines()[1:])))
  if task in ("city_country", "city_language"):
    country = CITY_COUNTRY[re.search(r"(?:city|in) (\w+)\?", question)[1]]
    names = WORLD.countries if task == "city_country" else WORLD.languages
    return example.options.index(names[country])
  if task == "dna_motif":
    sequence, name = re.search(r"Does ([ACGT]+) contain the (\w+) motif", question).groups()
    return example.options.index("yes" if WORLD.motifs[name] in sequence else "no")
  if task == "date_weekday":
    iso = re.search(r"\d{4}-\d\d-\d\d", question)[0]
    return datetime.date.fromisoformat(iso).weekday()
  if task == "word_category":
    return WORD_CATEGORY[re.search(r"an? (\w+)\?", question)[1]]
  raise AssertionError(task)


@pytest.mark.parametrize("task", list(corpus_tasks.TASKS))
def test_task_labels_follow_from_the_facts(task):
  for split in corpus.SPLITS:
    examples = corpus_tasks.task_examples(task, split, 300, seed=3)
    assert examples == corpus_tasks.task_examples(task, split, 300, seed=3)
    labels = [ex.label for ex in examples]
    assert [expected_label(task, ex) for ex in examples] == labels
    assert set(labels) == set(range(len(examples[0].options)))  # every answer occurs
    for ex in examples:
      assert ex.prompt.startswith(ex.question) and ex.prompt.endswith("Answer: ")
      assert ex.answer == ex.options[ex.label] and len(set(ex.options)) == len(ex.options)
      assert ex.show_options == (corpus_tasks.TASKS[task].options is None)
      if corpus_tasks.TASKS[task].options is not None:
        assert ex.options == corpus_tasks.TASKS[task].options


def test_binary_tasks_are_balanced():
  for task in ("arithmetic_truth", "dna_motif"):
    labels = [ex.label for ex in corpus_tasks.task_examples(task, "train", 2000, seed=0)]
    assert 0.45 < sum(labels) / len(labels) < 0.55


def test_entity_questions_use_disjoint_entities_per_split():
  def entities(task, split):
    return {re.search(r"(\w+)\?$", ex.question)[1]
            for ex in corpus_tasks.task_examples(task, split, 2000, seed=0)}
  for task in ("city_country", "city_language", "word_category"):
    train, validation = entities(task, "train"), entities(task, "validation")
    assert train and validation and not train & validation


def test_generation_is_fast():
  start = time.perf_counter()
  count = sum(len(corpus.generate_documents(d, 500, seed=0)) for d in corpus.DOMAINS)
  # About 15k-100k documents/s per domain here; a wide margin for a loaded machine.
  assert count / (time.perf_counter() - start) > 2000


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="unknown domain 'poetry'"):
    corpus.generate_documents("poetry", 1, seed=0)
  with pytest.raises(ValueError, match="unknown task"):
    corpus_tasks.task_examples("sentiment", "train", 1, seed=0)
  with pytest.raises(ValueError, match="unknown split 'test'"):
    corpus_tasks.task_examples("dna_motif", "test", 1, seed=0)
  with pytest.raises(ValueError, match="n must be non-negative, got -1"):
    corpus.generate_documents("dna", -1, seed=0)
  with pytest.raises(ValueError, match="seed must be non-negative, got -2"):
    corpus_tasks.task_examples("dna_motif", "train", 1, seed=-2)
  with pytest.raises(TypeError, match="n must be an integer, got 2.5"):
    corpus.generate_documents("dna", 2.5, seed=0)
  with pytest.raises(TypeError, match="seed must be an integer, got '1'"):
    corpus_tasks.task_examples("dna_motif", "train", 1, seed="1")
