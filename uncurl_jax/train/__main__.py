r"""`python -m uncurl_jax.train`: pretraining, pre-finetuning, finetuning and evaluation via gin.

  python -m uncurl_jax.train \
    --gin_file=gin/models/tiny.gin --gin_file=gin/runs/pretrain.gin \
    --gin.MODEL_DIR=/tmp/uncurl_tiny --gin.TRAIN_STEPS=2000

Gin macros (as in t5x): MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS,
BATCH_SIZE, MODEL_DIR from the run file, NUM_EXPERTS from the model file. The run file
picks the procedure (`run.function = @train` or `@evaluate`). Flags: `uncurl_jax.cli`.

Multi-host (as t5x): `--coordinator_address=host:port --process_count=N
--process_index=i` on every host, or `--multiprocess` where jax detects the cluster
(TPU pods, SLURM); each host then reads its own shard of the training data.
"""

from __future__ import annotations

from typing import Any, Callable

import gin

from uncurl_jax import cli
from uncurl_jax.model import configs
from uncurl_jax.train import optim
from uncurl_jax.train import run as run_lib
from uncurl_jax.train import schedules

# Gin parameters holding paths (made absolute by the command-line layer).
PATH_PARAMETERS = ("uncurl_jax.train.train.model_dir", "uncurl_jax.train.train.init_checkpoint",
                   "uncurl_jax.train.evaluate.checkpoint_path",
                   "uncurl_jax.train.evaluate.output_dir")


def run(*, function: Callable[[], Any]) -> Any:
  """Calls the procedure the run gin file names (`run.function = @train`)."""
  return function()


_REGISTERED: dict[str, Callable] = {}


def register_configurables() -> dict[str, Callable]:
  """Registers (once) the functions and classes the gin files name; returns them by name.

  Gin names: `configs.get`, `configs.ModelConfig`, `optim.make_optimizer`,
  `schedules.ProgressiveDropping`, `train`, `evaluate`, `run`.
  """
  if not _REGISTERED:
    module = "uncurl_jax"
    _REGISTERED.update(
        get=gin.external_configurable(configs.get, module=f"{module}.configs"),
        ModelConfig=gin.external_configurable(configs.ModelConfig, module=f"{module}.configs"),
        make_optimizer=gin.external_configurable(optim.make_optimizer,
                                                 module=f"{module}.optim"),
        ProgressiveDropping=gin.external_configurable(schedules.ProgressiveDropping,
                                                      module=f"{module}.schedules"),
        train=gin.external_configurable(run_lib.train, module=f"{module}.train"),
        evaluate=gin.external_configurable(run_lib.evaluate, module=f"{module}.train"),
        run=gin.external_configurable(run, module=f"{module}.train"))
  return dict(_REGISTERED)


COMMAND = cli.Command(register_configurables, "run", path_parameters=PATH_PARAMETERS)
parse_gin = COMMAND.parse_gin
run_with_gin = COMMAND.run_with_gin
main = COMMAND.main

if __name__ == "__main__":
  cli.run(main)
