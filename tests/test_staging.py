"""`staging.staged_directory`: all of an output or none of it."""

import os

import pytest

from uncurl_jax import staging


def test_a_complete_output_is_renamed_into_place_with_the_usual_permissions(tmp_path):
  target = tmp_path / "out"
  target.mkdir()  # an empty directory is replaced
  with staging.staged_directory(target) as staged:
    assert not os.path.exists(staged) and os.path.dirname(os.path.dirname(staged)) == str(
        tmp_path)
    os.makedirs(staged)
    open(os.path.join(staged, "a"), "w").write("x")
    assert os.listdir(target) == []
  assert os.listdir(target) == ["a"] and os.listdir(tmp_path) == ["out"]
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(target).st_mode & 0o777 == 0o777 & ~umask


def test_an_error_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError, match="disk full"):
    with staging.staged_directory(tmp_path / "out") as staged:
      os.makedirs(staged)
      open(os.path.join(staged, "a"), "w").write("x")
      raise RuntimeError("disk full")
  assert os.listdir(tmp_path) == []


def test_an_existing_output_is_refused_before_anything_is_written(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "a").write_text("x")
  with pytest.raises(ValueError, match="exists and is not an empty directory"):
    with staging.staged_directory(tmp_path / "out"):
      pytest.fail("entered")
  assert sorted(os.listdir(tmp_path)) == ["out"]
