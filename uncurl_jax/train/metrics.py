"""Training metrics: TensorBoard event files and per-step progress lines with ETA.

`TensorBoardWriter` writes scalar summaries in TensorBoard's format with TensorFlow's
summary ops (the `tensorboard` package is not needed to write them, only to view them:
`tensorboard --logdir MODEL_DIR`). Only process 0 writes in a multi-host run.

Example:
  >>> writer = TensorBoardWriter(os.path.join(model_dir, "train"))
  >>> progress = ProgressMeter(total_steps=1000, start_step=0)
  >>> line = progress.update(step=10, metrics={"loss": 3.2})   # logs steps/s and ETA
  >>> writer.write_scalars(10, {"loss": 3.2, **progress.rates()})
  >>> writer.close()
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Mapping

from absl import logging
import jax
import numpy as np

# TensorBoard's scalar dashboard shows summaries whose metadata names this plugin
# (what `tensorboard.summary.scalar` writes).
_SCALARS_PLUGIN = "scalars"


class TensorBoardWriter:
  """Scalars to a TensorBoard log directory (TensorFlow summary ops, imported lazily).

  Args:
    logdir: Directory of the event files (created).
    enabled: Whether this process writes; defaults to `jax.process_index() == 0`.
  """

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool | None = None):
    self.logdir = os.fspath(logdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    if self.enabled:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      from tensorflow.core.framework import summary_pb2  # pylint: disable=import-outside-toplevel
      self._tf = tf
      self._metadata = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=_SCALARS_PLUGIN))
      self._writer = tf.summary.create_file_writer(self.logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes each scalar of `scalars` under its name at `step`."""
    if not self.enabled:
      return
    tf = self._tf
    with self._writer.as_default():
      for name, value in scalars.items():
        tf.summary.write(name, tf.constant(float(value), tf.float32), step=int(step),
                         metadata=self._metadata)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from the event files of `logdir` (for tests and notebooks).

  Example:
    >>> read_scalars(os.path.join(model_dir, "train"))["loss"][-1]
    (100, 2.71...)
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  scalars: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(logdir)):
    if "tfevents" not in name:
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append(
            (int(event.step), float(tf.make_ndarray(value.tensor))))
  return scalars


def format_duration(seconds: float) -> str:
  """'1:02:03' for 3723 seconds; '?' when unknown."""
  if not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressMeter:
  """Steps per second and ETA of this process's steps, with the first update as origin.

  The first logged step carries the compilation time, so the rate is measured from it:
  steps/s = (step - first step) / (time since the first update), evaluation and
  checkpoint time included, which is what the ETA needs.

  Args:
    total_steps: The step the run ends at.
    start_step: The step this process started from (0, or the resumed step).
    clock: Time source (seconds); tests pass a fake.
  """

  def __init__(self, *, total_steps: int, start_step: int, clock=time.monotonic):
    if not 0 <= start_step <= total_steps:
      raise ValueError(f"start_step={start_step} must be in [0, total_steps={total_steps}]")
    self.total_steps = total_steps
    self._clock = clock
    self._origin: tuple[int, float] | None = None
    self._steps_per_second = float("nan")

  def update(self, *, step: int, metrics: Mapping[str, float]) -> str:
    """Records that `step` is done and returns (and logs) the progress line."""
    now = self._clock()
    if self._origin is None:
      self._origin = (step, now)
    elif step > self._origin[0] and now > self._origin[1]:
      self._steps_per_second = (step - self._origin[0]) / (now - self._origin[1])
    eta = (self.total_steps - step) / self._steps_per_second
    shown = " | ".join(f"{name} {_format_value(value)}" for name, value in metrics.items())
    line = (f"step {step}/{self.total_steps} | {shown} | "
            f"{self._steps_per_second:.2f} steps/s | ETA {format_duration(eta)}")
    logging.info("%s", line)
    return line

  def rates(self) -> dict[str, float]:
    """{'steps_per_second': ...} since the first update (NaN before the second)."""
    return {"steps_per_second": self._steps_per_second}


def _format_value(value: float) -> str:
  value = float(np.asarray(value))
  return f"{value:.4g}"
