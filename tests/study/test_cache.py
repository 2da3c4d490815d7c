"""Stage caching of the study: keys, skipping, invalidation downstream, resuming, damaged
stages, and processes sharing one cache."""

import dataclasses
import json
import multiprocessing
import os
import time

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


# ------------------------------------------------------------------------------------------
# Damaged stages are detected, reported by name and run again; shared caches are locked.


def _checkpointed(directory):
  """A stage that writes a small 'checkpoint' and returns a result."""
  os.makedirs(os.path.join(directory, "checkpoint"), exist_ok=True)
  with open(os.path.join(directory, "checkpoint", "params.bin"), "wb") as f:
    f.write(b"weights" * 100)
  return {"loss": 1.5}


def _damage_cases():
  def truncate_result(d):
    with open(os.path.join(d, study_cache.RESULT_FILE), "r+") as f:
      f.truncate(40)

  def edit_result(d):
    path = os.path.join(d, study_cache.RESULT_FILE)
    saved = json.load(open(path))
    saved["result"]["loss"] = 0.1  # a "better" number typed in by hand
    json.dump(saved, open(path, "w"))

  def delete_checkpoint(d):
    os.remove(os.path.join(d, "checkpoint", "params.bin"))

  def truncate_checkpoint(d):
    with open(os.path.join(d, "checkpoint", "params.bin"), "r+b") as f:
      f.truncate(10)

  def flip_checkpoint_byte(d):  # same size, other bytes: only the checksum sees it
    with open(os.path.join(d, "checkpoint", "params.bin"), "r+b") as f:
      f.write(b"W")

  def other_stage_format(d):  # a directory copied from a study version of another format
    path = os.path.join(d, study_cache.RESULT_FILE)
    saved = json.load(open(path))
    saved["format"] = study_cache.STAGE_FORMAT + 1
    json.dump(saved, open(path, "w"))

  def other_stage(d):  # another stage's result.json copied in
    path = os.path.join(d, study_cache.RESULT_FILE)
    saved = json.load(open(path))
    saved["key"] = "0" * 64
    json.dump(saved, open(path, "w"))

  return {"result.json does not parse": truncate_result, "result.json was edited": edit_result,
          "params.bin is missing": delete_checkpoint, "params.bin has 10 bytes": truncate_checkpoint,
          "params.bin changed": flip_checkpoint_byte, "stage format": other_stage_format,
          "not this stage's": other_stage}


@pytest.mark.parametrize("expected,damage", list(_damage_cases().items()),
                         ids=list(_damage_cases()))
def test_a_damaged_stage_is_reported_by_name_and_run_again(tmp_path, expected, damage):
  lines = []
  cache = study_cache.StageCache(tmp_path, notify=lines.append)
  first = cache.run("pretrain", {"steps": 4}, _checkpointed)
  assert cache.run("pretrain", {"steps": 4}, _checkpointed).status == Status.SKIPPED
  damage(first.directory)
  calls = []

  def again(directory):
    calls.append(sorted(os.listdir(directory)))
    return _checkpointed(directory)

  rerun = cache.run("pretrain", {"steps": 4}, again)
  assert rerun.status == Status.REPAIRED and rerun.result == {"loss": 1.5}
  assert calls == [sorted([study_cache.LOCK_FILE, study_cache.CONFIG_FILE])]  # damage gone
  assert len(lines) == 1 and "stage pretrain is damaged" in lines[0] and expected in lines[0]
  assert cache.damaged == [("pretrain", lines[0].split(": ", 1)[1].rsplit(";", 1)[0])]
  assert cache.run("pretrain", {"steps": 4}, again).status == Status.SKIPPED
  assert len(calls) == 1


def test_result_json_records_the_files_their_checksums_and_the_version(tmp_path):
  stage = study_cache.StageCache(tmp_path).run("pretrain", {"steps": 4}, _checkpointed)
  saved = json.load(open(stage.path(study_cache.RESULT_FILE)))
  assert saved["format"] == study_cache.STAGE_FORMAT and saved["version"]
  files = saved["files"]
  assert set(files) == {"checkpoint/params.bin", study_cache.CONFIG_FILE}
  assert files["checkpoint/params.bin"]["bytes"] == 700
  assert len(files["checkpoint/params.bin"]["sha256"]) == 64


def test_large_files_are_sized_not_checksummed(tmp_path, monkeypatch):
  monkeypatch.setattr(study_cache, "CHECKSUM_MAX_BYTES", 100)
  stage = study_cache.StageCache(tmp_path).run("pretrain", {"steps": 4}, _checkpointed)
  files = json.load(open(stage.path(study_cache.RESULT_FILE)))["files"]
  assert "sha256" not in files["checkpoint/params.bin"]


def test_a_stage_written_before_manifests_is_accepted_and_gets_one(tmp_path):
  cache = study_cache.StageCache(tmp_path)
  stage = cache.run("pretrain", {"steps": 4}, _checkpointed)
  path = stage.path(study_cache.RESULT_FILE)
  saved = json.load(open(path))
  legacy = {k: saved[k] for k in ("stage", "key", "result", "seconds")}
  json.dump(legacy, open(path, "w"))
  assert cache.is_done(cache.plan("pretrain", {"steps": 4}, _checkpointed))
  assert cache.run("pretrain", {"steps": 4}, _checkpointed).status == Status.SKIPPED
  assert json.load(open(path))["files"] == saved["files"]  # recorded on first read


def test_repair_empties_a_stage_whose_checkpoint_does_not_restore(tmp_path):
  lines = []
  cache = study_cache.StageCache(tmp_path, notify=lines.append)
  stage = cache.run("pretrain", {"steps": 4}, _checkpointed)
  cache.repair(stage, "its checkpoint does not restore (ValueError: bad)")
  assert lines == ["stage pretrain is damaged: its checkpoint does not restore (ValueError: "
                   "bad); running it again"]
  assert os.listdir(stage.directory) == [study_cache.LOCK_FILE]
  assert cache.run("pretrain", {"steps": 4}, _checkpointed).status == Status.REPAIRED


def _run_in_child(root, name, seconds, started, die=False):
  """Runs one stage in a child process; `started` is set once the stage's work began."""
  def work(directory):
    started.set()
    time.sleep(seconds)
    if die:
      os._exit(1)  # killed in the middle of the stage: the kernel releases its lock
    return {"by": os.getpid()}
  study_cache.StageCache(root).run(name, {"steps": 4}, work)


def test_a_second_process_waits_for_the_stage_and_reads_its_result(tmp_path):
  context = multiprocessing.get_context("spawn")
  started = context.Event()
  child = context.Process(target=_run_in_child, args=(str(tmp_path), "pretrain", 1.5, started))
  child.start()
  assert started.wait(30)
  lines, calls = [], []
  cache = study_cache.StageCache(tmp_path, notify=lines.append)
  stage = cache.run("pretrain", {"steps": 4}, lambda d: calls.append(d) or {"by": os.getpid()})
  child.join(30)
  assert child.exitcode == 0
  assert calls == [] and stage.status == Status.SKIPPED and stage.result == {"by": child.pid}
  assert lines == [f"waiting for stage pretrain: another process (pid {child.pid}) is "
                   "running it"]


def test_a_stage_whose_owner_died_is_resumed_by_the_next_process(tmp_path):
  context = multiprocessing.get_context("spawn")
  started = context.Event()
  child = context.Process(target=_run_in_child,
                          args=(str(tmp_path), "pretrain", 0.2, started, True))
  child.start()
  child.join(30)
  assert started.is_set() and child.exitcode == 1
  stage = study_cache.StageCache(tmp_path).run("pretrain", {"steps": 4},
                                               lambda d: {"by": os.getpid()})
  assert stage.status == Status.RESUMED and stage.result == {"by": os.getpid()}


def test_a_repair_leaves_a_stage_another_process_has_rebuilt_since(tmp_path):
  """Two processes fail to restore the same checkpoint: the first repairs and rebuilds it;
  the second's repair, of the stage as it read it before, must not discard the rebuilt one."""
  lines = []
  first, second = (study_cache.StageCache(tmp_path, notify=lines.append) for _ in range(2))
  seen_by_second = second.run("pretrain", {"steps": 4}, _checkpointed)
  stale = first.run("pretrain", {"steps": 4}, _checkpointed)
  first.repair(stale, "its checkpoint does not restore (ValueError: bad)")
  rebuilt = first.run("pretrain", {"steps": 4}, _checkpointed)
  assert rebuilt.status == Status.REPAIRED and rebuilt.stamp != seen_by_second.stamp
  second.repair(seen_by_second, "its checkpoint does not restore (ValueError: bad)")
  assert len(lines) == 1  # only the first repair was reported
  assert second.run("pretrain", {"steps": 4}, _checkpointed).status == Status.SKIPPED
