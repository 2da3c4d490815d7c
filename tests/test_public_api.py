"""The public API: a small core at the top, each sub-package owning the list of the rest."""

import importlib
import inspect
import subprocess
import sys

import pytest

import uncurl_jax

CORE = ["ModelConfig", "PrunePlan", "SMoEDecoder", "apply_plan", "collect_expert_stats",
        "collect_router_logits", "configs", "model", "plan_pruning", "prune_params",
        "pruned_config", "pruning", "with_expert_counts"]
PACKAGES = ["uncurl_jax", "uncurl_jax.model", "uncurl_jax.pruning", "uncurl_jax.maxtext",
            "uncurl_jax.hf"]


def test_the_top_level_is_the_small_core():
  assert sorted(uncurl_jax.__all__) == sorted(CORE)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_listed_name_exists_and_says_how_to_use_it(package):
  module = importlib.import_module(package)
  assert len(set(module.__all__)) == len(module.__all__)
  for name in module.__all__:
    value = getattr(module, name)
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.ismodule(value):
      assert inspect.getdoc(value), f"{package}.{name} has no docstring"


def test_the_core_is_the_sub_packages_objects():
  for name in CORE:
    value = getattr(uncurl_jax, name)
    if inspect.ismodule(value):
      continue
    owners = [p for p in PACKAGES[1:] if getattr(importlib.import_module(p), name, None)
              is value]
    assert owners, f"uncurl_jax.{name} is in no sub-package's list"


def test_each_name_has_one_owner():
  model = set(importlib.import_module("uncurl_jax.model").__all__)
  pruning = set(importlib.import_module("uncurl_jax.pruning").__all__)
  assert not model & pruning


def test_the_documented_example_names_resolve():
  """The names the package docstrings' examples call."""
  assert callable(uncurl_jax.configs.get)
  assert callable(uncurl_jax.model.expert_counts)
  assert callable(uncurl_jax.pruning.register_method)


def test_importing_the_package_loads_neither_seqio_nor_tensorflow():
  code = ("import sys, uncurl_jax; print(sorted(m for m in ('tensorflow', 'seqio') "
          "if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=300)
  assert result.stdout.strip() == "[]"
