"""Stage caching of the study: keys, skipping, invalidation downstream, resuming."""

import dataclasses
import json
import os

import numpy as np
import pytest

from uncurl_jax.study import cache as study_cache
from uncurl_jax.study.cache import Status


@dataclasses.dataclass(frozen=True)
class _Settings:
  steps: int
  rate: float


@dataclasses.dataclass(frozen=True)
class _OtherSettings:  # the same fields as _Settings, another type
  steps: int
  rate: float


def test_config_key_ignores_dict_order_and_container_type():
  a = study_cache.config_key({"b": [1, 2], "a": {"y": 1, "x": np.int64(3)}})
  b = study_cache.config_key({"a": {"x": 3, "y": 1}, "b": (1, 2)})
  assert a == b
  assert a != study_cache.config_key({"a": {"x": 3, "y": 1}, "b": (2, 1)})
  # Dataclasses hash by type name and fields; distinct values give distinct keys.
  assert (study_cache.config_key({"s": _Settings(3, 0.1)})
          != study_cache.config_key({"s": _Settings(4, 0.1)}))
  assert (study_cache.config_key({"s": _Settings(3, 0.1)})
          != study_cache.config_key({"s": _OtherSettings(3, 0.1)}))
  assert len(a) == 64 and int(a, 16) >= 0


def test_config_key_rejects_values_that_are_not_json_like():
  with pytest.raises(TypeError, match="JSON-like"):
    study_cache.config_key({"f": lambda: 0})
  with pytest.raises(TypeError, match="str keys"):
    study_cache.config_key({"m": {1: 2}})


class _Counter:
  """A stage function that records its calls and returns a value from its directory."""

  def __init__(self, value):
    self.value, self.calls = value, []

  def __call__(self, directory):
    self.calls.append(directory)
    with open(os.path.join(directory, "output.txt"), "w") as f:
      f.write(str(self.value))
    return {"value": self.value, "array": np.arange(2)}


def test_rerun_skips_finished_stages_and_returns_the_same_result(tmp_path):
  cache = study_cache.StageCache(tmp_path)
  fn = _Counter(7)
  first = cache.run("pretrain", {"steps": 3}, fn)
  second = cache.run("pretrain", {"steps": 3}, fn)
  assert len(fn.calls) == 1
  assert first.status == Status.RAN and second.status == Status.SKIPPED
  assert first.result == second.result == {"value": 7, "array": [0, 1]}
  assert first.directory == second.directory == fn.calls[0]
  assert os.path.basename(first.directory) == f"pretrain-{first.key[:12]}"
  with open(first.path("stage_config.json")) as f:
    assert json.load(f)["config"] == {"steps": 3}
  # A new cache object on the same root (a new process) skips it too.
  again = study_cache.StageCache(tmp_path).run("pretrain", {"steps": 3}, fn)
  assert again.status == Status.SKIPPED and len(fn.calls) == 1


def test_changed_config_reruns_only_that_stage_and_its_dependents(tmp_path):
  def pipeline(cache, pretrain_steps):
    calls = []

    def fn(name):
      def run(directory):
        del directory
        calls.append(name)
        return name
      return run
    base = cache.run("pretrain", {"steps": pretrain_steps}, fn("pretrain"))
    other = cache.run("pretrain_dense", {"steps": 5}, fn("pretrain_dense"))
    prune = cache.run("prune", {"method": "uncurl"}, fn("prune"), depends_on=[base])
    cache.run("finetune", {"lr": 1.0}, fn("finetune"), depends_on=[prune])
    cache.run("finetune_dense", {"lr": 1.0}, fn("finetune_dense"), depends_on=[other])
    return calls

  cache = study_cache.StageCache(tmp_path)
  assert pipeline(cache, 10) == ["pretrain", "pretrain_dense", "prune", "finetune",
                                 "finetune_dense"]
  assert pipeline(cache, 10) == []
  # prune and finetune read from pretrain: their keys change with it; the dense branch not.
  assert pipeline(cache, 20) == ["pretrain", "prune", "finetune"]
  # Both configurations stay cached side by side.
  assert pipeline(cache, 10) == []


def test_interrupted_stage_resumes_in_the_same_directory(tmp_path):
  cache = study_cache.StageCache(tmp_path)
  seen = []

  def interrupted(directory):
    with open(os.path.join(directory, "checkpoint_2"), "w") as f:
      f.write("half way")
    raise KeyboardInterrupt

  def resuming(directory):
    seen.append(sorted(os.listdir(directory)))
    return {"resumed_from": "checkpoint_2"}

  with pytest.raises(KeyboardInterrupt):
    cache.run("finetune", {"steps": 4}, interrupted)
  stage = cache.run("finetune", {"steps": 4}, resuming)
  assert stage.status == Status.RESUMED
  assert "checkpoint_2" in seen[0] and study_cache.RESULT_FILE not in seen[0]
  assert cache.run("finetune", {"steps": 4}, resuming).status == Status.SKIPPED
  assert [status for _, status in cache.events] == [Status.RESUMED, Status.SKIPPED]


def test_result_must_be_json_like_and_is_not_recorded_otherwise(tmp_path):
  cache = study_cache.StageCache(tmp_path)
  with pytest.raises(TypeError, match="JSON-like"):
    cache.run("bad", {}, lambda directory: {"x": object()})
  assert cache.run("bad", {}, lambda directory: 1).status == Status.RESUMED


@pytest.mark.parametrize("name", ["", "a/b", "with space", None])
def test_bad_stage_names_raise(tmp_path, name):
  with pytest.raises(ValueError, match="stage name"):
    study_cache.StageCache(tmp_path).run(name, {}, lambda directory: 0)


def test_bad_config_and_dependencies_raise(tmp_path):
  cache = study_cache.StageCache(tmp_path)
  with pytest.raises(TypeError, match="mapping"):
    cache.run("x", [1], lambda directory: 0)
  with pytest.raises(TypeError, match="Stages"):
    cache.run("x", {}, lambda directory: 0, depends_on=["pretrain"])
