"""Offline TFDS for tests: generated metadata + `tfds.testing.mock_data`.

The PyPI wheel of tensorflow-datasets lacks the metadata files that `mock_data`
needs to know split names and sizes. `write_dataset_info` builds them from the
builder's own code (features) plus fake splits; `mock_tfds` writes them for a
set of datasets and mocks TFDS with `MockPolicy.USE_FILES` on that data_dir, so
`tfds.load` and seqio's `TfdsDataSource` yield random examples of the right
structure, and `num_input_examples` reports the fake split sizes.

Example:
  >>> with mock_tfds(tmp_path, {"super_glue/rte:1.0.2": ["train", "validation"]}):
  ...   ds = seqio.get_dataset("super_glue_rte_v102", ...)
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Sequence

import seqio
import tensorflow_datasets as tfds


def write_dataset_info(data_dir: str, tfds_name: str, splits: Sequence[str],
                       num_examples: int) -> str:
  """Writes dataset_info.json/features.json for `tfds_name` with fake splits.

  Args:
    data_dir: Root data directory.
    tfds_name: "name/config:version" as given to `tfds.builder`.
    splits: TFDS split names to declare.
    num_examples: Declared size of every split.

  Returns:
    The directory written (data_dir/name/config/version).
  """
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive, got {num_examples}")
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
      for split in splits]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return builder.data_dir


@contextlib.contextmanager
def mock_tfds(data_dir: str, datasets: Mapping[str, Sequence[str]], *,
              num_examples: int = 3, split_size: int = 5,
              max_value: int = 4) -> Iterator[None]:
  """Mocks TFDS for `datasets` ({tfds_name: split names}) inside the context.

  Args:
    data_dir: An empty directory for the generated metadata.
    datasets: Each TFDS name with the split names its tasks read.
    num_examples: Random examples that every split yields.
    split_size: Split size declared in the metadata (what mixing rates see).
    max_value: Bound of random plain integers; small, so that integer labels
      (hellaswag's) index the 5 to 50 random options of a mocked sequence.
  """
  for tfds_name, splits in datasets.items():
    write_dataset_info(str(data_dir), tfds_name, splits, split_size)
  # seqio memoizes builders per (name, data_dir): drop ones made outside the mock.
  seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()  # pylint: disable=protected-access
  try:
    with tfds.testing.mock_data(num_examples=num_examples, max_value=max_value,
                                policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(data_dir)):
      yield
  finally:
    seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS.clear()  # pylint: disable=protected-access
