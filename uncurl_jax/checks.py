"""Generic argument checks shared by every layer of the package (it imports nothing of it).

Each check names the argument, what was expected and what was given, and raises a
TypeError (wrong kind of value) or a ValueError (right kind, wrong value); it returns the
value in the form the caller uses. The model, training, pruning and the study call these
before any work; argument checks that know a sub-package's data (router logits, targets
per layer) stay in that sub-package (`pruning/validate.py`).

Example:
  >>> checks.integer("seed", 3, low=0)
  3
  >>> checks.choice("router", "anchor", ("reinit", "anchor", "merge"))
  'anchor'
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
  """`value` as an int in [low, high]; bools, floats and strings are refused.

  Example:
    >>> integer("seed", 3, low=0)
    3
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
  value = int(value)
  if (low is not None and value < low) or (high is not None and value > high):
    bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    raise ValueError(f"{name} must be in {bounds}, got {value}")
  return value


def real(name: str, value: Any, *, positive: bool = False) -> float:
  """`value` as a finite float (> 0 if `positive`); bools and strings are refused."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
  value = float(value)
  if not math.isfinite(value) or (positive and value <= 0):
    raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, "
                     f"got {value}")
  return value


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
  """`value` if it is one of the strings `allowed`."""
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
  return value


def mapping(name: str, value: Any) -> Mapping:
  """`value` if it is a mapping (dict, FrozenDict)."""
  if not isinstance(value, Mapping):
    raise TypeError(f"{name} must be a mapping, got {type(value).__name__}")
  return value


def output_dir(path: object, what: str) -> str:
  """`path` if it is a string naming a directory or nothing yet (not a file)."""
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise TypeError(f"{what} must be a path, got {path!r}")
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{what}={os.fspath(path)!r} is a file, expected a directory")
  return os.fspath(path)


def new_dir(path: object, what: str) -> str:
  """The absolute path of `path` if it names nothing yet or an empty directory (an output
  written all at once, `staging.staged_directory`)."""
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise TypeError(f"{what} must be a path, got {path!r}")
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"{what} {path!r} exists and is not an empty directory")
  return path


def existing_dir(path: object, what: str) -> str:
  """`path` if it is an existing directory (a run's MODEL_DIR or a checkpoint root)."""
  if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
    raise ValueError(f"{what}={path!r} is not a directory holding checkpoints")
  return os.fspath(path)
