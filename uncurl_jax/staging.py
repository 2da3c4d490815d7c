"""Writing an output directory all at once, so that no half-written output is ever left.

The commands that write checkpoints (`python -m uncurl_jax.hf.prune`,
`python -m uncurl_jax.maxtext.prune`) build their output in a temporary directory beside
it and rename it into place only when everything is written; an error removes it.

Example:
  >>> with staged_directory("/tmp/pruned") as staged:     # staged does not exist yet
  ...   os.makedirs(staged)
  ...   write_everything(staged)
  >>> # now /tmp/pruned holds it all; after an error it would not exist
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from uncurl_jax import checks


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike) -> Iterator[str]:
  """Yields a path (not yet created) beside `directory` to build it in.

  On a clean exit the path is renamed to `directory` (an empty directory there is
  replaced); on an error it is removed and `directory` is left as it was. The result has
  the usual permissions (the temporary directory's 0700 stays on the discarded parent).

  Raises:
    ValueError: `directory` exists and is not an empty directory (before anything is
      written).
  """
  directory = checks.new_dir(directory, "the output")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
  try:
    staged = os.path.join(temporary, "output")
    yield staged
    if os.path.isdir(directory):
      os.rmdir(directory)  # empty, checked above
    os.rename(staged, directory)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
