"""Stage caching for the study: one directory per stage, named by a hash of its inputs.

A stage (pretrain a model, prune it, finetune it, evaluate it, ...) is identified by its
name, the settings that determine its output and the keys of the stages it reads from.
Those three go through canonical JSON into a SHA-256 digest, the stage's key, which
names its directory `<root>/<name>-<key[:12]>`. So:

* a rerun finds the directory with its `result.json` and skips the stage;
* a changed setting changes the key of that stage and, through the dependency keys, of
  every stage downstream of it, and of nothing else: only the affected stages rerun;
* an interrupted stage has a directory but no `result.json`: the rerun calls the stage
  again on the same directory, where it resumes (training stages restart from their
  newest orbax checkpoint there).

`result.json` is written atomically (a temporary file renamed into place) and only
after the stage returned, so its presence means the stage completed.

Example:
  >>> cache = StageCache("/tmp/study/stages")
  >>> pretrain = cache.run("pretrain_e32", {"steps": 300, "seed": 0},
  ...                      lambda directory: {"final_loss": train_in(directory)})
  >>> prune = cache.run("prune_uncurl", {"num_experts": 8}, prune_fn, depends_on=[pretrain])
  >>> cache.events                     # [('pretrain_e32', 'ran'), ('prune_uncurl', 'ran')]
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import re
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

RESULT_FILE = "result.json"
CONFIG_FILE = "stage_config.json"
KEY_LENGTH = 12  # hex digits of the key in directory names


class Status(str, enum.Enum):
  """What `StageCache.run` did with a stage."""

  RAN = "ran"  # started from an empty directory
  RESUMED = "resumed"  # the directory held a previous, unfinished attempt
  SKIPPED = "skipped"  # a finished result was found


def _canonical(value: Any) -> Any:
  """A JSON-ready copy of `value` whose serialization does not depend on dict order."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {"__dataclass__": type(value).__name__,
            **{f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}}
  if isinstance(value, Mapping):
    keys = list(value)
    if not all(isinstance(k, str) for k in keys):
      raise TypeError(f"stage config mappings need str keys, got {keys!r}")
    return {k: _canonical(value[k]) for k in sorted(keys)}
  if isinstance(value, (list, tuple)):
    return [_canonical(v) for v in value]
  if isinstance(value, enum.Enum):
    return _canonical(value.value)
  if isinstance(value, (np.ndarray, np.generic)):
    return _canonical(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"stage configs and results must be JSON-like (dict, list, str, number, "
                  f"bool, None, dataclass, numpy array), got {type(value).__name__}: {value!r}")


def config_key(config: Mapping[str, Any]) -> str:
  """SHA-256 hex digest of the canonical JSON of `config` (dict order does not matter).

  Example:
    >>> config_key({"a": 1, "b": [2, 3]}) == config_key({"b": (2, 3), "a": 1})
    True
  """
  text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_json_atomically(path: str, value: Any) -> None:
  directory = os.path.dirname(path)
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(handle, "w") as f:
      json.dump(value, f, indent=2, sort_keys=True)
      f.write("\n")
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


@dataclasses.dataclass(frozen=True)
class Stage:
  """A finished (or skipped) stage: where its outputs live and what it returned.

  Attributes:
    name: The stage's name.
    key: Hex digest of its name, settings and dependency keys.
    directory: Its output directory.
    result: The JSON value the stage function returned.
    status: What `StageCache.run` did.
    seconds: Wall time of the stage function when it ran (also for a skipped stage).
  """

  name: str
  key: str
  directory: str
  result: Any
  status: Status
  seconds: float = 0.0

  def path(self, *parts: str) -> str:
    """A path inside the stage's directory."""
    return os.path.join(self.directory, *parts)


_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.=+-]+$")


@dataclasses.dataclass(eq=False)
class StageSpec:
  """A planned stage: everything `StageCache.run_spec` needs, known before anything runs.

  Attributes:
    name: The stage's name.
    config: The settings that determine its output.
    work: directory -> JSON-like result (may read the outputs of `inputs`).
    inputs: The specs whose outputs `work` reads (their keys enter this one's).
    key: Hex digest of name, config and the inputs' keys.
    directory: Where its outputs go.
    cost: Estimated work, in the study's units (for progress and ETA).
    kind: What it does ("train", "stats", "prune", "score").
    compile_key: What it compiles (a step or scorer for one shape), or None; the first
      stage of a run with a given key also pays `compile_cost` (progress and ETA).
    compile_cost: Estimated compilation, in the same units.
  """

  name: str
  config: Mapping[str, Any]
  work: Callable[[str], Any]
  inputs: tuple["StageSpec", ...]
  key: str
  directory: str
  cost: float = 1.0
  kind: str = "stage"
  compile_key: Any = None
  compile_cost: float = 0.0


class StageCache:
  """Runs stages at most once per configuration (see the module docstring).

  Args:
    root: Directory that holds one sub-directory per stage (created when needed).

  Attributes:
    events: [(stage name, Status)] in the order `run` was called.
    stages: The Stages `run` returned, in the same order.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)
    self.events: list[tuple[str, Status]] = []
    self.stages: list[Stage] = []

  def key(self, name: str, config: Mapping[str, Any],
          depends_on: Sequence[Stage | StageSpec] = ()) -> str:
    """The key of stage `name` with `config` reading from the stages `depends_on`."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
      raise ValueError(f"stage name must be a non-empty string of letters, digits and "
                       f"'_.=+-', got {name!r}")
    if not isinstance(config, Mapping):
      raise TypeError(f"stage config must be a mapping, got {type(config).__name__}")
    for stage in depends_on:
      if not isinstance(stage, (Stage, StageSpec)):
        raise TypeError(f"depends_on must hold Stages, got {type(stage).__name__}")
    return config_key({"stage": name, "config": config,
                       "inputs": {s.name: s.key for s in depends_on}})

  def directory(self, name: str, key: str) -> str:
    return os.path.join(self.root, f"{name}-{key[:KEY_LENGTH]}")

  def plan(self, name: str, config: Mapping[str, Any], work: Callable[[str], Any], *,
           inputs: Sequence[StageSpec] = (), cost: float = 1.0, kind: str = "stage",
           compile_key: Any = None, compile_cost: float = 0.0) -> StageSpec:
    """A `StageSpec` of stage `name` (nothing runs; see `run_spec`).

    Example:
      >>> spec = cache.plan("pretrain-e32", {"steps": 300}, train_fn, cost=300, kind="train")
      >>> cache.is_done(spec), cache.run_spec(spec).result
    """
    key = self.key(name, config, inputs)
    return StageSpec(name, config, work, tuple(inputs), key, self.directory(name, key), cost,
                     kind, compile_key, compile_cost)

  def is_done(self, spec: StageSpec) -> bool:
    """Whether the stage finished in an earlier run (its result is cached)."""
    return os.path.exists(os.path.join(spec.directory, RESULT_FILE))

  def run_spec(self, spec: StageSpec) -> Stage:
    """Runs a planned stage (or reads its cached result), like `run`."""
    return self.run(spec.name, spec.config, spec.work, depends_on=spec.inputs)

  def run(self, name: str, config: Mapping[str, Any], fn: Callable[[str], Any], *,
          depends_on: Sequence[Stage] = ()) -> Stage:
    """Returns stage `name`'s result, calling `fn(directory)` unless it is cached.

    Args:
      name: Stage name (letters, digits, '_.=+-'); also the directory's prefix.
      config: JSON-like settings that determine the stage's output (dataclasses allowed).
      fn: Computes the stage in the directory it is given (which may hold an earlier,
        interrupted attempt to resume from) and returns a JSON-serializable result.
      depends_on: Stages whose outputs `fn` reads; their keys enter this stage's key.

    Example:
      >>> stage = cache.run("collect", {"max_tokens": 4096}, collect_fn, depends_on=[pre])
      >>> np.load(stage.path("logits.npz"))
    """
    key = self.key(name, config, depends_on)
    directory = self.directory(name, key)
    result_path = os.path.join(directory, RESULT_FILE)
    if os.path.exists(result_path):
      with open(result_path) as f:
        saved = json.load(f)
      return self._record(Stage(name, key, directory, saved["result"], Status.SKIPPED,
                                saved.get("seconds", 0.0)))
    status = Status.RESUMED if os.path.isdir(directory) else Status.RAN
    os.makedirs(directory, exist_ok=True)
    _write_json_atomically(os.path.join(directory, CONFIG_FILE), {
        "stage": name, "key": key, "config": _canonical(config),
        "inputs": {s.name: s.key for s in depends_on}})
    start = time.perf_counter()
    result = fn(directory)
    seconds = time.perf_counter() - start
    # Round-trip through JSON so a fresh and a cached run hand back identical values.
    result = json.loads(json.dumps(_canonical(result)))
    _write_json_atomically(result_path, {"stage": name, "key": key, "result": result,
                                         "seconds": seconds})
    return self._record(Stage(name, key, directory, result, status, seconds))

  def _record(self, stage: Stage) -> Stage:
    self.events.append((stage.name, stage.status))
    self.stages.append(stage)
    return stage
