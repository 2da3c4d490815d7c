"""A procedurally generated multi-domain text corpus (its questions: `corpus_tasks`).

The embedded default data of the project: no download, pure numpy, deterministic
by seed, and fast (tens of thousands of documents per second). Six domains each
have their own vocabulary and structure, so that the experts of an SMoE model can
specialize by domain; seven classification tasks ask questions whose answers need
the knowledge that the documents of one domain carry, so that pruning for one task
has something to keep and something to drop.

All facts (countries, cities, languages, motifs, invented words) come from one
fixed `World` built from `WORLD_SEED`; seeds only choose which facts a document
mentions and the free content around them. Entity questions (which country is a
city in, ...) ask about disjoint entities in "train" and "validation", so a model
answers validation questions only with knowledge learned from the documents.

Example:
  >>> from uncurl_jax.data import corpus
  >>> docs = corpus.generate_documents("geography", 2, seed=0)
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Callable, Mapping, Sequence

import numpy as np

DOMAINS = ("arithmetic", "code", "geography", "dna", "calendar", "lexicon")
SPLITS = ("train", "validation")
CATEGORIES = ("animal", "tool", "plant", "color", "food", "vehicle")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
            "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December")
WORLD_SEED = 2409
# Every VALIDATION_EVERY-th entity (city, word) is asked about only in validation.
VALIDATION_EVERY = 5

NUM_COUNTRIES = 16
_CITIES_PER_COUNTRY = 6
_WORDS_PER_CATEGORY = 8
_MOTIF_NAMES = ("alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega",
                "theta")
_BASES = "ACGT"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class Stream:
  """Cheap scalar draws from blocks of numpy random numbers."""

  def __init__(self, rng: np.random.Generator, block: int = 4096):
    self._rng, self._block = rng, block
    self._values, self._next = rng.integers(0, 2**31, block), 0

  def integer(self, low: int, high: int) -> int:
    """A uniform integer in [low, high] (inclusive)."""
    if self._next == self._block:
      self._values, self._next = self._rng.integers(0, 2**31, self._block), 0
    value = int(self._values[self._next])
    self._next += 1
    return low + value % (high - low + 1)

  def choice(self, items: Sequence):
    return items[self.integer(0, len(items) - 1)]

  def sample(self, items: Sequence, k: int) -> list:
    """k distinct items, in random order."""
    pool = list(items)
    return [pool.pop(self.integer(0, len(pool) - 1)) for _ in range(k)]


@dataclasses.dataclass(frozen=True)
class World:
  """The facts that documents state and tasks ask about.

  Attributes:
    countries: Country names.
    languages: languages[i] is spoken in countries[i].
    capitals: capitals[i] is the capital of countries[i] (one of its cities).
    cities: All city names; city_country[j] is the country index of cities[j].
    city_country: Country index of each city.
    motifs: Motif name -> DNA string (no motif contains another).
    words: Invented nouns; word_category[j] indexes CATEGORIES for words[j].
    word_category: Category index of each word.
  """
  countries: tuple[str, ...]
  languages: tuple[str, ...]
  capitals: tuple[str, ...]
  cities: tuple[str, ...]
  city_country: tuple[int, ...]
  motifs: Mapping[str, str]
  words: tuple[str, ...]
  word_category: tuple[int, ...]


def _invent_names(stream: Stream, count: int, syllables: tuple[int, int],
                  taken: set[str]) -> list[str]:
  names = []
  while len(names) < count:
    name = "".join(stream.choice(_CONSONANTS) + stream.choice(_VOWELS)
                   for _ in range(stream.integer(*syllables)))
    if name not in taken:
      taken.add(name)
      names.append(name)
  return names


@functools.cache
def get_world() -> World:
  """Returns the fixed world of facts (built once from `WORLD_SEED`).

  Example:
    >>> world = get_world()
    >>> world.countries[world.city_country[0]]  # the country of cities[0]
  """
  stream = Stream(np.random.default_rng(WORLD_SEED))
  taken: set[str] = set()
  countries = [n.capitalize() + "ia"
               for n in _invent_names(stream, NUM_COUNTRIES, (2, 2), taken)]
  languages = [n.capitalize() + "ish"
               for n in _invent_names(stream, NUM_COUNTRIES, (2, 2), taken)]
  num_cities = NUM_COUNTRIES * _CITIES_PER_COUNTRY
  cities = [n.capitalize() for n in _invent_names(stream, num_cities, (2, 3), taken)]
  city_country = [j % NUM_COUNTRIES for j in range(num_cities)]
  capitals = cities[:NUM_COUNTRIES]
  motifs: dict[str, str] = {}
  while len(motifs) < len(_MOTIF_NAMES):
    motif = "".join(stream.choice(_BASES) for _ in range(6))
    if all(motif not in m and m not in motif for m in motifs.values()):
      motifs[_MOTIF_NAMES[len(motifs)]] = motif
  num_words = len(CATEGORIES) * _WORDS_PER_CATEGORY
  # Names end in a vowel, so a consonant ending keeps words distinct (and nouns).
  words = [w + stream.choice(("p", "x", "m", "sh"))
           for w in _invent_names(stream, num_words, (1, 2), taken)]
  word_category = [j % len(CATEGORIES) for j in range(num_words)]
  return World(tuple(countries), tuple(languages), tuple(capitals), tuple(cities),
               tuple(city_country), types.MappingProxyType(motifs), tuple(words),
               tuple(word_category))


# ------------------------------------------------------------------ pieces ---

def equation(stream: Stream) -> tuple[str, int]:
  """A random 'a op b' and its value."""
  op = stream.choice("+-*")
  high = 12 if op == "*" else 99
  a, b = stream.integer(0, high), stream.integer(0, high)
  value = a + b if op == "+" else a - b if op == "-" else a * b
  return f"{a} {op} {b}", value


def program(stream: Stream, max_lets: int = 4) -> tuple[list[str], int]:
  """Statements of the toy language and the value the program prints."""
  names = stream.sample("abcdefghkmnpqrxyz", 4)
  values = {names[0]: stream.integer(0, 9)}
  lines = [f"let {names[0]} = {values[names[0]]};"]
  for name in names[1:stream.integer(2, max_lets)]:
    source, op, constant = stream.choice(list(values)), stream.choice("+-*"), stream.integer(1, 9)
    values[name] = {"+": values[source] + constant, "-": values[source] - constant,
                    "*": values[source] * constant}[op]
    lines.append(f"let {name} = {source} {op} {constant};")
  printed = stream.choice(list(values))
  lines.append(f"print {printed};")
  return lines, values[printed]


def date(stream: Stream) -> tuple[str, int]:
  """An ISO date between 1900 and 2099 and its weekday index (Monday = 0)."""
  day = stream.integer(-25567, 47481)  # days since 1970-01-01 (a Thursday)
  iso = str(np.datetime64(day, "D"))
  return iso, (day + 3) % 7


def _random_dna(stream: Stream, length: int) -> str:
  return "".join(stream.choice(_BASES) for _ in range(length))


def dna_without(stream: Stream, motif: str, length: int) -> str:
  while True:
    sequence = _random_dna(stream, length)
    if motif not in sequence:
      return sequence


def dna_with(stream: Stream, motif: str, length: int) -> tuple[str, int]:
  position = stream.integer(0, length - len(motif))
  sequence = _random_dna(stream, length)
  return sequence[:position] + motif + sequence[position + len(motif):], position


def article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------- documents ---

def _arithmetic_document(stream: Stream, world: World) -> str:
  del world
  lines = ["Worked sums:"]
  for _ in range(stream.integer(4, 8)):
    expression, value = equation(stream)
    lines.append(stream.choice((f"{expression} = {value}", f"{expression} gives {value}.",
                                f"Compute {expression}: the result is {value}.")))
  return "\n".join(lines)


def _code_document(stream: Stream, world: World) -> str:
  del world
  blocks = []
  for _ in range(stream.integer(1, 2)):
    lines, value = program(stream)
    blocks.append("\n".join(lines + [f"# output: {value}"]))
  return "\n\n".join(blocks)


def _geography_document(stream: Stream, world: World) -> str:
  country = stream.integer(0, NUM_COUNTRIES - 1)
  name, other = world.countries[country], stream.choice(world.countries)
  cities = [c for c, k in zip(world.cities, world.city_country) if k == country]
  mentioned = stream.sample(cities, stream.integer(2, 4))
  sentences = [f"{city} is a city in {name}." for city in mentioned]
  sentences += [f"The capital of {name} is {world.capitals[country]}.",
                f"People in {name} speak {world.languages[country]}.",
                f"Travellers from {name} often visit {other}.",
                f"{stream.choice(cities)} has {stream.integer(2, 90)} markets."]
  order = stream.sample(range(len(sentences)), len(sentences))
  return " ".join(sentences[i] for i in order)


def _dna_document(stream: Stream, world: World) -> str:
  names = stream.sample(list(world.motifs), stream.integer(1, 2))
  lines = [f"Motif {n}: {world.motifs[n]}." for n in names]
  for sample in range(stream.integer(2, 4)):
    name = stream.choice(names)
    sequence, position = dna_with(stream, world.motifs[name], stream.integer(24, 40))
    lines.append(f"Sample {sample + 1}: {sequence} carries the {name} motif at {position}.")
  return "\n".join(lines)


def _calendar_document(stream: Stream, world: World) -> str:
  del world
  sentences = []
  for _ in range(stream.integer(2, 4)):
    day = stream.integer(-25567, 47481)
    later = day + stream.integer(1, 30)
    date = np.datetime64(day, "D")
    sentences.append(f"{date} was a {WEEKDAYS[(day + 3) % 7]}.")
    sentences.append(f"{later - day} days later, {np.datetime64(later, 'D')} was a "
                     f"{WEEKDAYS[(later + 3) % 7]}.")
    month = date.astype("datetime64[M]")
    first_days = np.array([month, month + 1]).astype("datetime64[D]")
    days_in_month = int(np.diff(first_days).astype(int)[0])
    sentences.append(f"{MONTHS[int(month.astype(int)) % 12]} {str(month)[:4]} had "
                     f"{days_in_month} days.")
  return " ".join(sentences)


_USAGE = {
    "animal": ("The {w} slept under the tree.", "We saw a {w} running across the field."),
    "tool": ("He fixed the fence with a {w}.", "Hand me the {w} from the shed."),
    "plant": ("The {w} grows near the river.", "She watered the {w} every morning."),
    "color": ("The door was painted {w}.", "Her coat was a deep shade of {w}."),
    "food": ("They ate {w} for dinner.", "The {w} tasted sweet and warm."),
    "vehicle": ("The {w} was parked outside.", "They rode the {w} to the coast."),
}


def _lexicon_document(stream: Stream, world: World) -> str:
  sentences = []
  for j in stream.sample(range(len(world.words)), stream.integer(2, 3)):
    word, category = world.words[j], CATEGORIES[world.word_category[j]]
    sentences.append(f"{article(word).capitalize()} {word} is a kind of {category}.")
    sentences.append(stream.choice(_USAGE[category]).format(w=word))
  return " ".join(sentences)


_DOCUMENT_FNS: dict[str, Callable[[Stream, World], str]] = {
    "arithmetic": _arithmetic_document, "code": _code_document,
    "geography": _geography_document, "dna": _dna_document,
    "calendar": _calendar_document, "lexicon": _lexicon_document,
}


def generate_documents(domain: str, n: int, seed: int) -> list[str]:
  """Returns `n` ASCII documents of one domain, a pure function of its arguments.

  Args:
    domain: One of `DOMAINS`.
    n: Number of documents (>= 0).
    seed: Non-negative integer; other seeds give other documents over the
      same facts.

  Example:
    >>> generate_documents("arithmetic", 1, seed=3)[0].splitlines()[0]
    'Worked sums:'
  """
  if domain not in DOMAINS:
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
  check_count_and_seed(n, seed)
  stream = Stream(np.random.default_rng([seed, DOMAINS.index(domain)]))
  world, make = get_world(), _DOCUMENT_FNS[domain]
  return [make(stream, world) for _ in range(n)]


def check_count_and_seed(n: int, seed: int) -> None:
  for name, value in (("n", n), ("seed", seed)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0:
      raise ValueError(f"{name} must be non-negative, got {value!r}")
