"""Fault injection: a study killed at random points and rerun gives the same results.csv.

The miniature study of test_study.py runs once uninterrupted; a second copy is killed in
training (during a checkpoint save), in pruning (before the pruned params are written)
and while writing the report, each time rerun on the same directories; the final
results.csv is byte-identical to the uninterrupted run's.
"""

import random

import pytest

from tests.study.test_study import _config
from uncurl_jax.study import plots
from uncurl_jax.study import run as study_run
from uncurl_jax.study import stages
from uncurl_jax.train import checkpoints


class _Killed(BaseException):
  """Like a SIGKILL: not an Exception, so nothing on the way catches it."""


def _dies_on_call(function, number):
  calls = {"count": 0}

  def wrapped(*args, **kwargs):
    calls["count"] += 1
    if calls["count"] == number:
      raise _Killed
    return function(*args, **kwargs)
  return wrapped


def test_killed_and_rerun_study_gives_byte_identical_results(tmp_path):
  straight = study_run.run_study(_config(tmp_path / "straight"))
  with open(straight["files"]["csv"], "rb") as f:
    expected = f.read()

  rng = random.Random(2409)  # seeded "random" points: which save, which prune
  faults = [(checkpoints, "save", rng.randint(1, 6)),            # in training
            (stages.checkpoints, "save_params", rng.randint(1, 2)),  # in pruning
            (plots, "plot_scores", 1)]                          # in the report
  config = _config(tmp_path / "faulty")
  for module, name, number in faults:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(module, name, _dies_on_call(getattr(module, name), number))
      with pytest.raises(_Killed):
        study_run.run_study(config)
  final = study_run.run_study(config)
  with open(final["files"]["csv"], "rb") as f:
    assert f.read() == expected
  assert final["rows"] == straight["rows"]

