"""The package's layout rules, checked on its source (docs/DESIGN.md states them).

- Imports go one way: nothing in `train/` imports `pruning/`, and no module imports
  itself back through others (no circle).
- One way to build a training run: nothing in `study/` makes a checkpoint manager, an
  initial state or a training loop itself (`train.builder.Run` does).
- Only `pruning/methods.py` names a pruning method: elsewhere a method is known by its
  registry entry's flags, so adding one is one registration.
- Nothing cites a file outside the repository.
"""

import ast
import dataclasses
import inspect
import os
import pathlib
import subprocess

import pytest

from uncurl_jax import pruning
from uncurl_jax.pruning import methods
from uncurl_jax.pruning.features import ExpertStats

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "uncurl_jax"


def _modules() -> dict[str, pathlib.Path]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules `path` imports at module level or in functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
      continue
    found.update(name for name in names if name in modules)
  return found


def _is_docstring(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
  parent = parents.get(node)
  grand = parents.get(parent)
  return (isinstance(parent, ast.Expr) and isinstance(
      grand, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))


# A default configuration (the study's default arms) is data, not logic: it may name methods.
_CONFIGURATION = {"DEFAULT_METHODS"}


def _method_names_in_logic(path: pathlib.Path, names: set[str]) -> list[tuple[int, str]]:
  """(line, value) of the method names a module's logic uses: compared with (`==`, `in`),
  looked up (`table["frequency"]`), given as a default argument, or listed in a
  module-level table. A name given as a "method:router" spec counts too."""
  tree = ast.parse(path.read_text())
  named = lambda node: (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and node.value.split(":")[0] in names)
  found = []

  def collect(node):
    found.extend((c.lineno, c.value) for c in ast.walk(node) if named(c))
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      collect(node)
    elif isinstance(node, ast.Subscript):
      collect(node.slice)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
        collect(default)
  for node in tree.body:  # module-level tables
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      if not any(isinstance(t, ast.Name) and t.id in _CONFIGURATION for t in targets):
        collect(node.value)
  return sorted(set(found))


def test_train_imports_nothing_of_pruning():
  modules = _modules()
  arrows = [(name, imported) for name, path in modules.items()
            if name.startswith("uncurl_jax.train")
            for imported in _imports(path, modules) if imported.startswith("uncurl_jax.pruning")]
  assert not arrows


def test_no_import_circle_between_modules():
  modules = _modules()
  graph = {name: {m for m in _imports(path, modules) if m != name}
           for name, path in modules.items()}
  # A package's __init__ re-exports its modules: an arrow into a package means its
  # modules, not a dependency of them on the importer.
  graph = {name: {m for m in targets if not (name.startswith(m + "."))}
           for name, targets in graph.items()}
  state: dict[str, int] = {}
  circles = []

  def visit(name, stack):
    state[name] = 1
    for nxt in sorted(graph[name]):
      if state.get(nxt) == 1:
        circles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[name] = 2
  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  assert not circles


@pytest.mark.parametrize("call", ["make_manager", "initial_state", "train_loop"])
def test_the_study_builds_no_training_run_itself(call):
  users = []
  for path in (PACKAGE / "study").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == call):
        users.append(f"{path.name}:{node.lineno}")
  assert not users


def test_only_the_registry_names_a_pruning_method():
  # "reap" is also a field of the experts' statistics (REAP's saliency) and "selection" an
  # argument of plan_pruning (the experts to keep): both are read by name.
  names = (set(methods.names()) - {field.name for field in dataclasses.fields(ExpertStats)}
           - set(inspect.signature(pruning.plan_pruning).parameters))
  named = [f"{path.relative_to(ROOT)}:{line} {value!r}"
           for path in _modules().values() if path != PACKAGE / "pruning" / "methods.py"
           for line, value in _method_names_in_logic(path, names)]
  assert not named


def test_the_method_name_check_finds_names_in_logic(tmp_path):
  """The check above sees a method compared, looked up, defaulted and tabled, and not in
  docstrings, messages or field names."""
  module = tmp_path / "m.py"
  module.write_text('''"""uncurl"""
BASELINES = ("frequency",)
DEFAULT_METHODS = ("uncurl:reinit",)
def f(method="random", stats=None):
  """reap"""
  if method == "mc_smoe:bind":
    return TABLE["hc_smoe"]
  return stats["reap_saliency"], "reap", f"uses {method} like uncurl"
''')
  assert [v for _, v in _method_names_in_logic(module, set(methods.names()))] == [
      "frequency", "random", "mc_smoe:bind", "hc_smoe"]


def test_nothing_cites_a_file_outside_the_repository():
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  citing = []
  for name in tracked:
    if not name.endswith((".py", ".md", ".gin", ".cfg", ".txt")) or name == os.path.relpath(
        __file__, ROOT):
      continue
    text = (ROOT / name).read_text(errors="replace")
    citing += [f"{name}: {marker}" for marker in ("SPEC.md", "STYLE.md", "shared/docs",
                                                   "shared/seeds") if marker in text]
  assert not citing
