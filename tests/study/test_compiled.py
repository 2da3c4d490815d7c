"""The study's bounded cache of compiled functions (uncurl_jax/study/compiled.py)."""

import jax
import jax.numpy as jnp
import pytest

from uncurl_jax.model import partitioning
from uncurl_jax.study import compiled
from uncurl_jax.study import training as study_training


def test_the_least_recently_used_entry_is_evicted_and_jax_caches_cleared():
  functions = [jax.jit(lambda x, k=k: x * k) for k in range(3)]
  cache = compiled.CompiledCache(maxsize=2)
  cache["a"], cache["b"] = functions[0], functions[1]
  for f in functions:
    f(jnp.ones(3))
  assert functions[0]._cache_size() == 1
  assert cache["a"] is functions[0]           # "a" is now the most recently used
  cache["c"] = functions[2]                   # so "b" goes
  assert list(cache) == ["a", "c"]
  # The evicted executables are freed: JAX's caches are cleared (held functions recompile).
  assert [f._cache_size() for f in functions] == [0, 0, 0]
  assert float(cache["a"](jnp.ones(3)).sum()) == 0.0 and functions[0]._cache_size() == 1


def test_no_eviction_leaves_jax_caches_alone():
  f = jax.jit(lambda x: x + 1)
  cache = compiled.CompiledCache(maxsize=2)
  cache["a"] = f
  f(jnp.ones(2))
  cache["a"] = f                               # replacing a key is not an eviction
  cache["b"] = f
  assert f._cache_size() == 1 and list(cache) == ["a", "b"]


def test_maxsize_is_checked():
  with pytest.raises(ValueError, match="maxsize must be >= 1, got 0"):
    compiled.CompiledCache(maxsize=0)


def test_the_study_trainer_holds_a_bounded_number_of_runs():
  trainer = study_training.StageTrainer(mesh=partitioning.make_mesh(), checkpoint_every_steps=10)
  assert isinstance(trainer._runs, compiled.CompiledCache)
  assert trainer._runs.maxsize == compiled.MAX_COMPILED
