"""Test-wide set-up: 8 simulated CPU devices for the sharding tests, quick compiles, and one
compilation cache for all test processes.

XLA reads XLA_FLAGS once, when jax initializes its backend, so this must run before any
test module imports jax. A flag already in XLA_FLAGS keeps its value.

The tests' programs are tiny: compiling them is most of the suite's time, running them
almost none. XLA's CPU backend therefore compiles without its expensive optimizations
(`--xla_backend_optimization_level=0`: about 30% less time on the slowest tests, measured on
2 cores). Every comparison the tests make is within one setting (two runs of the same
program, or a program against a numpy or hand reference with a tolerance), so the setting
changes no assertion. `UNCURL_TEST_XLA_OPT=1` keeps XLA's default level.
"""

import os

_FLAGS = {"xla_force_host_platform_device_count": "8"}
if os.environ.get("UNCURL_TEST_XLA_OPT") != "1":
  _FLAGS["xla_backend_optimization_level"] = "0"

for _name, _value in _FLAGS.items():
  if _name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_name}={_value}").strip()


import pytest  # noqa: E402  (after XLA_FLAGS on purpose)


@pytest.fixture(scope="session", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the whole session, shared by pytest-xdist's
  worker processes: a program that another test (or another run of the study, in any
  worker) compiled before is read from disk, not compiled again. Results do not depend on
  it: a cached executable is the one XLA would compile."""
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own basetemp in the root
    root = root.parent
  directory = root / "jax_cache"
  directory.mkdir(exist_ok=True)
  compilation_cache.set_cache_dir(str(directory))
  compilation_cache.reset_cache()
  yield
