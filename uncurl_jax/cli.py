r"""The command-line layer shared by `python -m uncurl_jax.train` and `python -m uncurl_jax.study`.

Like t5x's gin_utils: absl flags, gin files and bindings, paths made absolute, then the
command's procedure. The library modules do not use gin; each command registers the
functions its gin files name (`gin.external_configurable`) and hands them to `parse_gin`.

Flags (both commands):
  --gin_file=F (repeatable)       gin files, parsed in order
  --gin_bindings='NAME = V'       bindings, applied after the files
  --gin.NAME=V                    shorthand for --gin_bindings='NAME = V'; a V that is not
                                  a Python literal is taken as a string (--gin.MODEL_DIR=/tmp/x)
  --gin_search_paths=D            directories searched for gin files (default: '.')
  --coordinator_address, --process_count, --process_index, --multiprocess: multi-host

Paths: orbax needs absolute paths, and a relative path would otherwise mean different
things to different processes. `absolutize_paths` rewrites the path parameters a command
declares (e.g. `uncurl_jax.train.train.model_dir`), or the macros they refer to, to
absolute paths against the working directory, once, right after parsing.

Each command is a `Command` (its configurables, the procedure it calls, its path
parameters); `python -m` runs `cli.run(command.main)`.

Example:
  >>> command = Command(register_configurables, "run", path_parameters=["m.train.model_dir"])
  >>> command.run_with_gin(gin_files=["gin/models/tiny.gin"], gin_bindings=["MODEL_DIR = 'x'"])
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging as std_logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import gin
import jax


def _quiet_tensorflow(argv: Sequence[str]) -> None:
  """Imports TensorFlow (the data pipeline's) without its C++ start-up lines.

  TensorFlow prints "Could not find cuda drivers", "failed call to cuInit" and the like
  from C++ at import and first use, before absl logging is set up, so neither its log
  level nor ours reach them. Without `--verbose` its C++ log level is errors-off (3,
  unless the user set another than jax's default 1) and the import runs with file
  descriptor 2 pointed at /dev/null; Python errors still show.
  This happens when a command's module imports `cli`, before the command imports the
  pipeline; `--verbose` (read from argv here, as flags are parsed later) keeps everything.
  """
  if any(arg in ("--verbose", "--verbose=true", "--verbose=True") for arg in argv):
    return
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":  # "1": what importing jax sets
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
  if "tensorflow" in sys.modules:
    return
  try:
    sys.stderr.flush()
    saved = os.dup(2)
  except (OSError, ValueError):  # no usable descriptor 2 (embedded interpreters)
    return
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:  # the data pipeline reports it when it needs TensorFlow
      pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


_quiet_tensorflow(sys.argv)

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin files, parsed in order.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, applied after the files.")
flags.DEFINE_multi_string("gin_search_paths", ["."], "Directories searched for gin files.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("process_count", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_index", None, "Multi-host: index of this process.")
flags.DEFINE_boolean("multiprocess", False,
                     "Multi-host with the cluster detected by jax.distributed.initialize().")
flags.DEFINE_boolean("debug", False, "Show the full traceback of an error (else one message).")
flags.DEFINE_boolean("verbose", False, "Show the INFO logs of absl, orbax, jax and TensorFlow "
                     "(else warnings and errors only, besides the progress).")

# What a user's mistake raises: a short message and exit code 2 (`--debug`: traceback).
USER_ERRORS = (ValueError, TypeError, SyntaxError, OSError, KeyError, app.UsageError)
USAGE_EXIT_CODE = 2


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE` (as t5x does).

  A VALUE that is not a Python literal, a gin reference (@...), macro (%...) or container
  ({...}, [...], (...), which may hold references) is quoted.

  Example:
    >>> rewrite_gin_args(["prog", "--gin.MODEL_DIR=/tmp/x", "--gin.TRAIN_STEPS=5"])
    ['prog', "--gin_bindings=MODEL_DIR = '/tmp/x'", '--gin_bindings=TRAIN_STEPS = 5']
  """
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      name, value = arg[len("--gin."):].split("=", 1)
      rewritten.append(f"--gin_bindings={name} = {_gin_value(value)}")
    else:
      rewritten.append(arg)
  return rewritten


def _gin_value(value: str) -> str:
  if value.startswith(("@", "%", "{", "[", "(")):  # gin syntax (containers may hold @refs)
    return value
  try:
    ast.literal_eval(value)
    return value
  except (ValueError, SyntaxError):
    return repr(value)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parser accepting t5x's `--gin.NAME=VALUE` shorthand.

  Every call starts from the flags' defaults (absl would otherwise append repeated
  flags such as --gin_file to those of an earlier parse in the same process). An unknown
  or malformed flag exits with a one-line message and code 2.
  """
  FLAGS.unparse_flags()
  try:
    return FLAGS(rewrite_gin_args(argv))
  except flags.Error as error:
    exit_with_message(argv[0] if argv else "uncurl_jax", f"{error}; see --helpfull")


def set_up_logging(*, verbose: bool) -> None:
  """INFO logs of absl (and so orbax), jax and TensorFlow when `verbose`, else warnings."""
  level = logging.INFO if verbose else logging.WARNING
  logging.set_verbosity(level)
  for name in ("jax", "orbax", "tensorflow", "absl"):
    std_logging.getLogger(name).setLevel(std_logging.INFO if verbose else std_logging.WARNING)
  if not verbose:
    std_logging.getLogger("absl").addFilter(_quiet_known_warnings)


_KNOWN_WARNINGS = (
    "uncached FunctionDataset",  # seqio: the synthetic tasks are generated in memory
    "Given directory is read only",  # orbax: the study reads finished stages read-only
)


def _quiet_known_warnings(record: std_logging.LogRecord) -> bool:
  """Drops warnings that say nothing about this run (without --verbose)."""
  message = record.getMessage()
  return not any(known in message for known in _KNOWN_WARNINGS)


def program_name(argv0: str) -> str:
  """What the user typed: '.../uncurl_jax/train/__main__.py' -> 'uncurl_jax.train'.

  Example:
    >>> from uncurl_jax.train import __main__ as train_main
    >>> program_name(train_main.__file__)
    'uncurl_jax.train'
  """
  path = os.path.abspath(argv0)
  name = os.path.splitext(os.path.basename(path))[0]
  parts = [] if name == "__main__" else [name]
  directory = os.path.dirname(path)
  while os.path.isfile(os.path.join(directory, "__init__.py")):
    parts.insert(0, os.path.basename(directory))
    directory = os.path.dirname(directory)
  return ".".join(parts) or os.path.basename(argv0)


def exit_with_message(program: str, message: str) -> None:
  print(f"{program_name(program)}: error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


# Gin names the configurable a call went through with its Python object's repr:
# "In call to configurable 'run' (<function run at 0x7f...>)". The name stays, the address
# (different in every process) goes.
_OBJECT_REPR = re.compile(r"\s*\(<[^<>]*? at 0x[0-9a-fA-F]+>\)")


def short_message(error: BaseException, max_lines: int = 4) -> str:
  r"""The first lines of an error's message (gin appends the configurables it passed,
  named without their memory addresses).

  Example:
    >>> short_message(ValueError("bad\n  In call to configurable 'run' (<function run at 0x7f>)"))
    "ValueError: bad\n  In call to configurable 'run'"
  """
  lines = [_OBJECT_REPR.sub("", line).strip() for line in str(error).splitlines()
           if line.strip()]
  text = "\n  ".join(lines[:max_lines]) or type(error).__name__
  return f"{type(error).__name__}: {text}"


def initialize_distributed(*, coordinator_address: str | None, process_count: int | None,
                           process_index: int | None, auto: bool = False) -> None:
  """`jax.distributed.initialize` from the multi-host flags; a no-op on one host."""
  if coordinator_address is not None:
    if process_count is None or process_index is None:
      raise ValueError("--coordinator_address needs --process_count and --process_index")
    jax.distributed.initialize(coordinator_address, num_processes=process_count,
                               process_id=process_index)
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _absolute(path: str) -> str:
  if "://" in path:  # gs://, s3://: already global
    return path
  return os.path.abspath(os.path.expanduser(path))


def absolutize_paths(parameters: Sequence[str]) -> None:
  """Rebinds each bound gin parameter (or the macro it names) to an absolute path.

  Args:
    parameters: Gin parameter names such as 'uncurl_jax.train.train.model_dir'. Unbound
      ones and values that are not strings (None) are left alone.
  """
  for parameter in parameters:
    try:
      value = gin.query_parameter(parameter)
    except ValueError:  # not bound (the default applies) or not a configurable here
      continue
    binding = parameter
    # `%NAME` is a reference to the macro NAME; follow macro chains to the string.
    while isinstance(value, gin.config.ConfigurableReference):
      scope = value.scoped_selector.rsplit("/", 1)[0]
      binding = f"{scope}/macro.value"
      value = gin.query_parameter(binding)
    if isinstance(value, str):
      with gin.unlock_config():
        gin.bind_parameter(binding, _absolute(value))


def _referenced_macros(value: Any, found: set[str]) -> set[str]:
  """Adds the names of the macros `value` refers to (`%NAME`, also inside containers)."""
  if isinstance(value, gin.config.ConfigurableReference):
    scope, _, selector = value.scoped_selector.rpartition("/")
    if selector.endswith("macro"):
      found.add(scope)
  elif isinstance(value, dict):
    for item in value.values():
      _referenced_macros(item, found)
  elif isinstance(value, (list, tuple)):
    for item in value:
      _referenced_macros(item, found)
  return found


def check_bound_macros(gin_bindings: Sequence[str]) -> None:
  """Refuses a macro bound on the command line that no gin file refers to (a typo).

  Example: `--gin.TRAIN_STEPZ=3` when the files use %TRAIN_STEPS raises a ValueError
  that suggests TRAIN_STEPS.
  """
  config = gin.config._CONFIG  # pylint: disable=protected-access
  referenced: set[str] = set()
  for bindings in config.values():
    _referenced_macros(bindings, referenced)
  for binding in gin_bindings:
    match = re.match(r"\s*([A-Za-z_]\w*)\s*=", binding)
    if match and match.group(1) not in referenced:
      name = match.group(1)
      close = difflib.get_close_matches(name, sorted(referenced), n=3)
      hint = f"; did you mean {close}?" if close else ""
      raise ValueError(f"the macro {name} is bound on the command line but no gin file "
                       f"uses it{hint}")


def parse_gin(*, configurables: Callable[[], Mapping[str, Any]], gin_files: Sequence[str],
              gin_bindings: Sequence[str] = (), gin_search_paths: Sequence[str] = (".",),
              path_parameters: Sequence[str] = ()) -> None:
  """Clears gin, registers the command's configurables, parses files then bindings.

  Args:
    configurables: Registers (once) and returns the command's configurables.
    gin_files: Gin files, parsed in order.
    gin_bindings: Bindings applied after the files.
    gin_search_paths: Directories searched for the files (and their includes).
    path_parameters: Gin parameters that hold paths; made absolute after parsing.
  """
  gin.clear_config()  # also unlocks the config, so the configurables can be registered
  configurables()
  for path in gin_search_paths:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings))
  check_bound_macros(gin_bindings)
  absolutize_paths(path_parameters)


@dataclasses.dataclass(frozen=True)
class Command:
  """A gin-configured command: what it registers, what it runs, its defaults.

  Attributes:
    configurables: Registers (once) and returns {name: configurable} for the gin files.
    procedure: The name, among the configurables, of what the command calls.
    default_gin_files: Parsed when no --gin_file is given.
    search_paths: Searched for gin files after --gin_search_paths.
    path_parameters: Gin parameters holding paths (made absolute after parsing).

  Example:
    >>> command = Command(register, "run", path_parameters=["uncurl_jax.train.train.model_dir"])
    >>> command.run_with_gin(gin_files=["gin/models/tiny.gin", "gin/runs/pretrain.gin"])
    >>> cli.run(command.main)          # as `python -m ...`
  """

  configurables: Callable[[], Mapping[str, Any]]
  procedure: str
  default_gin_files: Sequence[str] = ()
  search_paths: Sequence[str] = ()
  path_parameters: Sequence[str] = ()

  def parse_gin(self, *, gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
                gin_search_paths: Sequence[str] = (".",)) -> None:
    """Clears gin and parses the files (or the defaults), then the bindings."""
    parse_gin(configurables=self.configurables,
              gin_files=list(gin_files) or list(self.default_gin_files),
              gin_bindings=gin_bindings,
              gin_search_paths=list(gin_search_paths) + list(self.search_paths),
              path_parameters=self.path_parameters)

  def run_with_gin(self, *, gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
                   gin_search_paths: Sequence[str] = (".",)) -> Any:
    """Parses the gin configuration and calls the procedure (`main` minus the flags)."""
    self.parse_gin(gin_files=gin_files, gin_bindings=gin_bindings,
                   gin_search_paths=gin_search_paths)
    logging.info("Gin configuration:\n%s", gin.config_str())
    return self.configurables()[self.procedure]()

  def main(self, argv: Sequence[str]) -> Any:
    """The absl `main`: multi-host set-up from the flags, then `run_with_gin`.

    A user error (`USER_ERRORS`: a bad value, an unknown configurable or macro, a gin
    syntax error, a missing file, an incompatible checkpoint) ends the process with a
    short message and exit code 2; `--debug` raises it with its traceback instead.
    """
    try:
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
      set_up_logging(verbose=FLAGS.verbose)
      initialize_distributed(coordinator_address=FLAGS.coordinator_address,
                             process_count=FLAGS.process_count,
                             process_index=FLAGS.process_index, auto=FLAGS.multiprocess)
      return self.run_with_gin(gin_files=FLAGS.gin_file, gin_bindings=FLAGS.gin_bindings,
                               gin_search_paths=FLAGS.gin_search_paths)
    except USER_ERRORS as error:
      if FLAGS.is_parsed() and FLAGS.debug:
        raise
      exit_with_message(argv[0] if argv else "uncurl_jax", short_message(error))


def run(main: Callable[[Sequence[str]], Any]) -> None:
  """Runs an absl `main` with this layer's flag parser (the `--gin.NAME=V` shorthand).

  What `main` returns is for in-process callers: the process exits 0 after it (absl
  would pass it to `sys.exit`, printing it and exiting 1).
  """
  def process_main(argv: Sequence[str]) -> None:
    main(argv)
  app.run(process_main, flags_parser=parse_flags)
