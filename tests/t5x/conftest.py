"""Integration tests against the real t5x and flaxformer (`pytest -m t5x`).

Every test under tests/t5x/ is marked `t5x`. Where t5x or flaxformer cannot be imported
(they are not on PyPI: .ci/run builds an environment from source snapshots when they are
available, docs/training.md says how to install them) the tests are skipped with the
import error as the reason, so a plain install keeps a green suite.
"""

import pathlib

import pytest

_HERE = pathlib.Path(__file__).parent


def _missing_reason():
  try:
    import flaxformer.architectures.moe.moe_layers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import t5x.contrib.moe.models  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as error:
    return (f"t5x/flaxformer not importable ({error}); they are not on PyPI: install them "
            "from source (docs/training.md, 'With t5x') to run the t5x-marked tests")
  return None


_MISSING = None


@pytest.hookimpl(tryfirst=True)  # before `-m t5x` selects by marker
def pytest_collection_modifyitems(config, items):
  del config
  global _MISSING
  ours = [item for item in items if _HERE in pathlib.Path(item.path).parents]
  if not ours:
    return
  if _MISSING is None:
    _MISSING = _missing_reason() or ""
  for item in ours:
    item.add_marker(pytest.mark.t5x)
    if _MISSING:
      item.add_marker(pytest.mark.skip(reason=_MISSING))
