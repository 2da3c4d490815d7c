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
after the stage returned, so its presence means the stage completed. It records what the
stage wrote (every file's size, and the SHA-256 of those up to `CHECKSUM_MAX_BYTES`), the
stage format and the package version that wrote it. A cached stage is used only if its
`result.json` parses, has this stage format and its files match; otherwise it is reported
by name (a warning, and `StageCache.damaged`), its directory is emptied and it runs again.
Stages written before the manifest existed (no "files") are accepted and get one recorded
the first time they are read; a model stage whose checkpoint cannot be restored is
repaired the same way (`StageCache.repair`, called by the study).

Several processes may share one cache. A stage is owned by one process at a time: an
exclusive `fcntl.flock` on `<directory>/.lock`, held while the stage runs and released by
the kernel if its owner dies. A process that needs a stage another one is running waits
for it (saying so, with the stage's name and the owner's pid) and then reads its result.

Example:
  >>> cache = StageCache("/tmp/study/stages")
  >>> pretrain = cache.run("pretrain_e32", {"steps": 300, "seed": 0},
  ...                      lambda directory: {"final_loss": train_in(directory)})
  >>> prune = cache.run("prune_uncurl", {"num_experts": 8}, prune_fn, depends_on=[pretrain])
  >>> cache.events                     # [('pretrain_e32', 'ran'), ('prune_uncurl', 'ran')]
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

RESULT_FILE = "result.json"
CONFIG_FILE = "stage_config.json"
LOCK_FILE = ".lock"
KEY_LENGTH = 12  # hex digits of the key in directory names
# What a stage directory holds and how result.json describes it; a cached stage of another
# format is run again. 1: no manifest (accepted, see the module docstring); 2: manifest.
STAGE_FORMAT = 2
CHECKSUM_MAX_BYTES = 1 << 20  # files up to this size are checksummed, larger ones sized


def _stamp(directory: str) -> tuple[int, int] | None:
  """(inode, mtime ns) of a stage's result.json (None: there is none)."""
  try:
    info = os.stat(os.path.join(directory, RESULT_FILE))
  except FileNotFoundError:
    return None
  return (info.st_ino, info.st_mtime_ns)


def _package_version() -> str:
  try:
    return importlib.metadata.version("uncurl_jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def manifest(directory: str) -> dict[str, dict[str, Any]]:
  """{relative path: {'bytes': size[, 'sha256': digest]}} of every file a stage wrote in
  `directory` (not result.json, the lock or temporary files); digests of the files up to
  `CHECKSUM_MAX_BYTES`."""
  files = {}
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if relative in (RESULT_FILE, LOCK_FILE) or name.startswith(".tmp-"):
        continue
      size = os.path.getsize(path)
      files[relative] = {"bytes": size}
      if size <= CHECKSUM_MAX_BYTES:
        files[relative]["sha256"] = _sha256(path)
  return files


def manifest_problem(directory: str, recorded: Mapping[str, Mapping[str, Any]]) -> str | None:
  """What differs between the files `recorded` and those in `directory` (None: nothing);
  files added since are allowed (a resumed stage may leave extra ones)."""
  for relative, expected in sorted(recorded.items()):
    path = os.path.join(directory, relative)
    if not os.path.isfile(path):
      return f"file {relative} is missing"
    size = os.path.getsize(path)
    if size != expected["bytes"]:
      return f"file {relative} has {size} bytes, {expected['bytes']} were written"
    if "sha256" in expected and _sha256(path) != expected["sha256"]:
      return f"file {relative} changed (its SHA-256 differs from the one recorded)"
  return None


class Status(str, enum.Enum):
  """What `StageCache.run` did with a stage."""

  RAN = "ran"  # started from an empty directory
  RESUMED = "resumed"  # the directory held a previous, unfinished attempt
  SKIPPED = "skipped"  # a finished result was found
  REPAIRED = "repaired"  # a cached result was damaged: emptied and run again


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
    stamp: (inode, modification time in ns) of the result.json it came from, so that a
      repair can tell whether another process has rebuilt the stage since.
  """

  name: str
  key: str
  directory: str
  result: Any
  status: Status
  seconds: float = 0.0
  stamp: tuple[int, int] | None = None

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
    notify: Called with a line when this process waits for a stage another one is
      running, or finds a damaged stage (default: a logging warning).

  Attributes:
    events: [(stage name, Status)] in the order `run` was called.
    stages: The Stages `run` returned, in the same order.
    damaged: [(stage name, what was wrong)] of the damaged stages found and run again.
  """

  def __init__(self, root: str | os.PathLike, *, notify: Callable[[str], None] | None = None):
    self.root = os.fspath(root)
    self.notify = notify or logging.getLogger(__name__).warning
    self.events: list[tuple[str, Status]] = []
    self.stages: list[Stage] = []
    self.damaged: list[tuple[str, str]] = []
    self._repairing: set[str] = set()  # discarded directories not run again yet
    self._held: set[str] = set()  # stage directories whose lock this process holds

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
    """Whether the stage finished in an earlier run (its result.json parses and is of this
    stage format; its files are checked when the stage is read, by `run`)."""
    saved = self._read_result(spec.directory)
    return isinstance(saved, dict) and ("files" not in saved
                                        or saved.get("format") == STAGE_FORMAT)

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
    cached = self._cached(name, key, directory)
    if cached is not None:
      return self._record(cached)
    os.makedirs(directory, exist_ok=True)
    with self._owned(name, directory):
      cached = self._cached(name, key, directory)  # finished by another process meanwhile
      if cached is not None:
        return self._record(cached)
      unfinished = set(os.listdir(directory)) - {LOCK_FILE}
      status = (Status.REPAIRED if directory in self._repairing else
                Status.RESUMED if unfinished else Status.RAN)
      self._repairing.discard(directory)
      _write_json_atomically(os.path.join(directory, CONFIG_FILE), {
          "stage": name, "key": key, "config": _canonical(config),
          "inputs": {s.name: s.key for s in depends_on}})
      start = time.perf_counter()
      result = fn(directory)
      seconds = time.perf_counter() - start
      # Round-trip through JSON so a fresh and a cached run hand back identical values.
      result = json.loads(json.dumps(_canonical(result)))
      _write_json_atomically(os.path.join(directory, RESULT_FILE), {
          "stage": name, "key": key, "result": result, "seconds": seconds,
          "result_sha256": config_key({"result": result}),
          "format": STAGE_FORMAT, "version": _package_version(),
          "files": manifest(directory)})
    return self._record(Stage(name, key, directory, result, status, seconds,
                              _stamp(directory)))

  def repair(self, stage: Stage | StageSpec, problem: str) -> None:
    """Reports `stage` as damaged (`problem`: what is wrong, e.g. its checkpoint does not
    restore) and empties its directory, so that the next `run` computes it again."""
    with self._owned(stage.name, stage.directory):
      stamp = _stamp(stage.directory)
      if stamp is not None and getattr(stage, "stamp", None) not in (None, stamp):
        return  # another process has rebuilt it since `stage` was read: that one is used
      self._discard(stage.name, stage.directory, problem)

  # ------------------------------------------------------------------------------------

  @staticmethod
  def _read_result(directory: str) -> Any:
    """The parsed result.json of `directory`; None if there is none, the text's error
    (a str) if it does not parse."""
    path = os.path.join(directory, RESULT_FILE)
    try:
      with open(path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError) as e:
      return f"result.json does not parse ({type(e).__name__}: {e})"

  def _check(self, key: str, directory: str) -> tuple[dict | None, str | None]:
    """(the saved result.json, None) if sound, (None, what is wrong) if damaged, (None,
    None) if the stage has not finished."""
    saved = self._read_result(directory)
    if saved is None or isinstance(saved, str):
      return None, saved
    if not isinstance(saved, dict) or saved.get("key") != key or "result" not in saved:
      return None, "result.json is not this stage's (wrong key or no result)"
    if "files" not in saved:
      return saved, None  # written before manifests (format 1)
    if saved.get("format") != STAGE_FORMAT:
      return None, (f"it was written in stage format {saved.get('format')} (version "
                    f"{saved.get('version', 'unknown')}); this version reads {STAGE_FORMAT}")
    if saved.get("result_sha256") != config_key({"result": saved["result"]}):
      return None, "result.json was edited (its result differs from the one written)"
    problem = manifest_problem(directory, saved["files"])
    return (None, problem) if problem else (saved, None)

  def _cached(self, name: str, key: str, directory: str) -> Stage | None:
    """The stage's cached result if it is sound; a damaged one is discarded (None)."""
    saved, problem = self._check(key, directory)
    if problem is not None:
      with self._owned(name, directory):
        saved, problem = self._check(key, directory)  # again, now that it is ours
        if problem is not None:
          self._discard(name, directory, problem)
    if saved is None:
      return None
    if "files" not in saved:  # written before manifests: record one now, as its owner
      with self._owned(name, directory):
        saved, _ = self._check(key, directory)
        if saved is None:  # repaired by another process meanwhile
          return None
        if "files" not in saved:
          saved = {**saved, "format": STAGE_FORMAT, "version": _package_version(),
                   "result_sha256": config_key({"result": saved["result"]}),
                   "files": manifest(directory)}
          _write_json_atomically(os.path.join(directory, RESULT_FILE), saved)
    return Stage(name, key, directory, saved["result"], Status.SKIPPED, saved.get("seconds", 0.0),
                 _stamp(directory))

  def _discard(self, name: str, directory: str, problem: str) -> None:
    self.notify(f"stage {name} is damaged: {problem}; running it again")
    self.damaged.append((name, problem))
    self._repairing.add(directory)
    for entry in os.listdir(directory):
      if entry == LOCK_FILE:
        continue
      path = os.path.join(directory, entry)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)

  @contextlib.contextmanager
  def _owned(self, name: str, directory: str) -> Iterator[None]:
    """Holds the stage's lock (waiting, and saying so, while another process holds it);
    re-entrant within this process."""
    held = self._held
    if directory in held:
      yield
      return
    os.makedirs(directory, exist_ok=True)
    descriptor = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        owner = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "?"
        self.notify(f"waiting for stage {name}: another process (pid {owner}) is running it")
        fcntl.flock(descriptor, fcntl.LOCK_EX)
      os.ftruncate(descriptor, 0)
      os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
      held.add(directory)
      try:
        yield
      finally:
        held.discard(directory)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
      os.close(descriptor)

  def _record(self, stage: Stage) -> Stage:
    self.events.append((stage.name, stage.status))
    self.stages.append(stage)
    return stage
