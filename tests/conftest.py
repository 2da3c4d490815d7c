"""Test-wide set-up: 8 simulated CPU devices for the sharding tests.

XLA reads XLA_FLAGS once, when jax initializes its backend, so this must run before any
test module imports jax. An XLA_FLAGS value that already has the flag is kept.
"""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICE_COUNT_FLAG).strip()


import pytest  # noqa: E402  (after XLA_FLAGS on purpose)


@pytest.fixture(scope="session", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the whole session: a program that another test
  (or another run of the study) compiled before is read from disk, not compiled again.
  Results do not depend on it: a cached executable is the one XLA would compile."""
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
  compilation_cache.reset_cache()
  yield
