r"""`python -m uncurl_jax.study`: the UNCURL study.

  python -m uncurl_jax.study                  # gin/experiments/synthetic.gin (CPU)
  python -m uncurl_jax.study --gin.SEEDS=[1] --gin.OUTPUT_DIR=outputs/synthetic_seed1
  python -m uncurl_jax.study --gin_file=gin/experiments/full.gin       # 5 seeds, 2x-16x
  python -m uncurl_jax.study --gin_file=gin/experiments/paper_354m.gin   # pods

Without --gin_file the embedded default `gin/experiments/synthetic.gin` runs: a small
SMoE with 32 experts pruned to 8 for a task of the world of memorized facts, with the
references trained from scratch, on a CPU (docs/study.md gives the time). The gin file binds
`StudyConfig` (see `uncurl_jax.study.config`); `--gin.NAME=VALUE` overrides a macro.
Flags: `uncurl_jax.cli`. Outputs: `uncurl_jax.study.run`.
"""

from __future__ import annotations

import os
from typing import Any

import gin

from uncurl_jax import cli
from uncurl_jax.study import config as config_lib
from uncurl_jax.study import run as run_lib
from uncurl_jax.train import __main__ as train_main

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_GIN_FILE = os.path.join(REPOSITORY_ROOT, "gin", "experiments", "synthetic.gin")
# Gin parameters holding paths (made absolute by the command-line layer).
PATH_PARAMETERS = ("uncurl_jax.study.StudyConfig.output_dir",
                   "uncurl_jax.study.StudyConfig.stages_dir")

_REGISTERED: dict[str, Any] = {}


def register_configurables() -> dict[str, Any]:
  """Registers (once) what the experiment gin files name, besides the train command's.

  Gin names: `StudyConfig`, `TrainSettings`, `Runtime`, `run_study`, plus
  `configs.get`, `schedules.ProgressiveDropping`, ... (`train.__main__`).
  """
  if not _REGISTERED:
    train_main.register_configurables()
    module = "uncurl_jax.study"
    _REGISTERED.update(
        StudyConfig=gin.external_configurable(config_lib.StudyConfig, module=module),
        TrainSettings=gin.external_configurable(config_lib.TrainSettings, module=module),
        Runtime=gin.external_configurable(config_lib.Runtime, module=module),
        run_study=gin.external_configurable(run_lib.run_study, module=module))
  return dict(_REGISTERED)


# The repository root is searched too, so the experiment files resolve from anywhere.
COMMAND = cli.Command(register_configurables, "run_study", default_gin_files=[DEFAULT_GIN_FILE],
                      search_paths=[REPOSITORY_ROOT], path_parameters=PATH_PARAMETERS)
parse_gin = COMMAND.parse_gin
run_with_gin = COMMAND.run_with_gin
main = COMMAND.main

if __name__ == "__main__":
  cli.run(main)
