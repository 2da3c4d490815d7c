"""seqio tasks -> numpy batches with t5x's decoder features -> global jax arrays.

Training data is read per host: host `jax.process_index()` takes shard
`process_index` of `process_count` (seqio shards before packing) and batches
`global_batch_size / process_count` examples; the hosts' batches are then assembled
into one global array sharded over the mesh's batch axes. The stream is shuffled with
a fixed seed and repeated, so the batch of a given step is the same in every run:
resuming at step s skips the first s batches.

Evaluation data is read whole on every host (validation sets are small) and padded
to full batches with all-zero rows, whose loss weight is 0.

Example:
  >>> ds = data.train_dataset(mixture_or_task_name="synthetic_lm", task_feature_lengths=
  ...                         {"targets": 128}, global_batch_size=64, seed=0)
  >>> batch = data.to_global(next(ds.as_numpy_iterator()), partitioning.batch_sharding(mesh))
"""

from __future__ import annotations

import difflib
from typing import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

Batch = dict[str, np.ndarray]


def feature_converter(*, pack: bool) -> seqio.FeatureConverter:
  """t5x's decoder-only converter: LM for 'targets'-only tasks, prefix LM with 'inputs'.

  Loss weights cover the targets only; `decoder_causal_attention` marks the prefix.

  Example:
    >>> seqio.get_dataset("synthetic_lm", {"targets": 128}, feature_converter(pack=True))
  """
  return seqio.DecoderFeatureConverter(pack=pack)


def _check_lengths(task_feature_lengths: Mapping[str, int]) -> None:
  if not isinstance(task_feature_lengths, Mapping):
    raise TypeError(f"task_feature_lengths must be a mapping such as {{'targets': 128}}, got "
                    f"{type(task_feature_lengths).__name__}")
  if "targets" not in task_feature_lengths:
    raise ValueError(f"task_feature_lengths needs a 'targets' length, got "
                     f"{dict(task_feature_lengths)}")
  for name, length in task_feature_lengths.items():
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
      raise ValueError(f"task_feature_lengths[{name!r}] must be a positive int, got {length!r}")


def check_task(name: object, what: str = "MIXTURE_OR_TASK_NAME") -> str:
  """`name` if it is a registered seqio task or mixture, else a ValueError with suggestions.

  Example:
    >>> check_task("synthetic_lmm")
    ValueError: MIXTURE_OR_TASK_NAME='synthetic_lmm' is not a registered seqio task or
    mixture (did you mean ['synthetic_lm', ...]?) ...
  """
  known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if not isinstance(name, str) or name not in known:
    close = difflib.get_close_matches(str(name), sorted(known), n=3)
    hint = f" (did you mean {close}?)" if close else ""
    raise ValueError(f"{what}={name!r} is not a registered seqio task or mixture{hint}; "
                     "the module that registers it must be imported (e.g. `import "
                     "uncurl_jax.tasks` in the gin file)")
  return name


def mixture_rates(name: str) -> dict[str, object] | None:
  """What a registered seqio mixture mixes, which its name alone does not say: {task or
  sub-mixture: its rate}, a number, or for a rate function (e.g. rates by example count)
  the function's name, so that nothing is read; sub-mixtures nest. None for a task.

  Example:
    >>> mixture_rates("facts_property_replay")
    {'facts_property': 1.0, 'facts_pretrain': 1.0}
  """
  provider = seqio.get_mixture_or_task(name)
  if not isinstance(provider, seqio.Mixture):
    return None

  def described(rate):
    if not callable(rate):
      return float(rate)
    function = getattr(rate, "func", rate)  # functools.partial
    keywords = getattr(rate, "keywords", None)
    text = f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', rate)}"
    return text + (f"({sorted(keywords.items())})" if keywords else "")

  rates = {task: described(rate) for task, rate in provider.rate_per_task_name.items()}
  for mixture in getattr(provider, "_sub_mixtures", ()):  # its rate is under its name
    rates[mixture.name] = {"rate": rates.get(mixture.name), "mixes": mixture_rates(mixture.name)}
  return rates


def model_length(task_feature_lengths: Mapping[str, int]) -> int:
  """Length of the decoder features: inputs and targets are concatenated.

  Example:
    >>> model_length({"inputs": 224, "targets": 32})
    256
  """
  _check_lengths(task_feature_lengths)
  return sum(task_feature_lengths.values())


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
  """`global_batch_size / process_count`, or ValueError when it does not divide.

  Example:
    >>> per_host_batch_size(512, 4)
    128
  """
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  return global_batch_size // process_count


def train_dataset(*, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                  global_batch_size: int, seed: int, split: str = "train", pack: bool = True,
                  shuffle: bool = True, use_cached: bool = False, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> tf.data.Dataset:
  """This host's repeated, shuffled, batched training stream, positioned at `start_step`.

  Args:
    mixture_or_task_name: A registered seqio task or mixture.
    task_feature_lengths: e.g. {"targets": 1024} (LM) or {"inputs": 192, "targets": 64}.
    global_batch_size: Examples per step over all hosts.
    seed: Shuffle seed; fixed so that a resumed run sees the same batches.
    split: Dataset split.
    pack: Pack several examples per row (segment ids and positions are added).
    shuffle: Shuffle examples.
    use_cached: Read seqio's offline cache of the task.
    start_step: Number of batches to skip (the resumed step).
    process_index, process_count: This host's shard; default jax's process index/count.

  Returns:
    A dataset of dicts of [global_batch_size / process_count, length] int32 arrays.

  Example:
    >>> ds = train_dataset(mixture_or_task_name="synthetic_lm", task_feature_lengths=
    ...                    {"targets": 128}, global_batch_size=32, seed=0, start_step=200)
  """
  _check_lengths(task_feature_lengths)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  local_batch = per_host_batch_size(global_batch_size, process_count)
  ds = seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths),
      feature_converter=feature_converter(pack=pack), dataset_split=split,
      use_cached=use_cached, shuffle=shuffle, num_epochs=None, seed=seed,
      shard_info=seqio.ShardInfo(index=process_index, num_shards=process_count))
  ds = ds.batch(local_batch, drop_remainder=True)
  # Resuming replays the input pipeline over the skipped batches (no model compute);
  # t5x instead checkpoints the iterator, which seqio's FunctionDataSources do not support.
  return ds.skip(start_step).prefetch(tf.data.AUTOTUNE)


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> Batch:
  """Pads every feature along axis 0 to `batch_size` rows of zeros (weight 0 = ignored).

  Example:
    >>> pad_batch({"decoder_loss_weights": np.ones((3, 2), np.int32)}, 4)["decoder_loss_weights"]
    array([[1, 1], [1, 1], [1, 1], [0, 0]], dtype=int32)
  """
  rows = {len(v) for v in batch.values()}
  if len(rows) != 1:
    raise ValueError(f"batch features disagree on the number of rows: {sorted(rows)}")
  (count,) = rows
  if count > batch_size:
    raise ValueError(f"batch has {count} rows, more than batch_size={batch_size}")
  return {k: np.concatenate([v, np.zeros((batch_size - count,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def eval_batches(*, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, split: str = "validation", pack: bool = True,
                 use_cached: bool = False, max_batches: int | None = None) -> Iterator[Batch]:
  """One pass over `split` (the same on every host), padded to full batches.

  Example:
    >>> for batch in eval_batches(mixture_or_task_name="synthetic_lm",
    ...                           task_feature_lengths={"targets": 128}, batch_size=32):
    ...   metrics = eval_step(params, to_global_replicated(batch, sharding))
  """
  _check_lengths(task_feature_lengths)
  ds = seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths),
      feature_converter=feature_converter(pack=pack), dataset_split=split,
      use_cached=use_cached, shuffle=False, num_epochs=1)
  ds = ds.batch(batch_size, drop_remainder=False)
  if max_batches is not None:
    ds = ds.take(max_batches)
  for batch in ds.as_numpy_iterator():
    yield pad_batch(batch, batch_size)


def to_global(local_batch: Mapping[str, np.ndarray],
              sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles every host's `local_batch` into global arrays (rows: host 0's, then 1's...).

  Example:
    >>> batch = to_global(next(iterator), partitioning.batch_sharding(mesh))
  """
  if jax.process_count() == 1:  # one transfer for the whole batch (the same arrays)
    return jax.device_put({k: np.asarray(v) for k, v in local_batch.items()}, sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_global_replicated(full_batch: Mapping[str, np.ndarray],
                         sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Global arrays from a batch that every host holds in full (evaluation data).

  Example:
    >>> batch = to_global_replicated(eval_batch, partitioning.batch_sharding(mesh))
  """
  def make(array: np.ndarray) -> jax.Array:
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
  return {k: make(v) for k, v in full_batch.items()}
