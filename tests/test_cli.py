"""The command-line layer: flags, gin, and relative paths made absolute, for both commands.

Both commands run from a fresh working directory with relative output paths, as a new
user runs them from a fresh clone (orbax refuses relative checkpoint paths).
"""

import os
import pathlib

from absl import app
import gin
import pytest

import uncurl_jax.tasks  # noqa: F401  (registers the seqio tasks)
from uncurl_jax import cli
from uncurl_jax.study import __main__ as study_main
from uncurl_jax.train import __main__ as train_main
from uncurl_jax.train import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]

MINI_STUDY = """
include 'gin/experiments/synthetic.gin'
OUTPUT_DIR = 'out/report'
STAGES_DIR = 'out/stages'
SOURCE_EXPERTS = [4]
PRUNED_EXPERTS = [2]
configs.get.d_model = 16
configs.get.d_ff = 32
configs.get.num_heads = 2
configs.get.max_length = 32
configs.get.group_size = None
StudyConfig.methods = ['frequency']
StudyConfig.dense_reference = False
StudyConfig.eval_batches = 1
StudyConfig.eval_batch_size = 8
StudyConfig.logits_max_tokens = 64
StudyConfig.usage_max_tokens = 64
pretraining/TrainSettings.steps = 2
pretraining/TrainSettings.warmup_steps = 1
pretraining/TrainSettings.batch_size = 8
pretraining/TrainSettings.task_feature_lengths = {'targets': 32}
finetuning/TrainSettings.steps = 2
finetuning/TrainSettings.warmup_steps = 0
finetuning/TrainSettings.router_warmup_steps = 1
finetuning/TrainSettings.batch_size = 8
finetuning/TrainSettings.task_feature_lengths = {'targets': 32}
"""


def test_rewrite_gin_args_quotes_plain_strings():
  assert cli.rewrite_gin_args(
      ["prog", "--gin.MODEL_DIR=/tmp/x", "--gin.TRAIN_STEPS=5", "--gin.F=@f()",
       "--gin.L={'targets': 8}", "--gin_file=a.gin"]) == [
           "prog", "--gin_bindings=MODEL_DIR = '/tmp/x'", "--gin_bindings=TRAIN_STEPS = 5",
           "--gin_bindings=F = @f()", "--gin_bindings=L = {'targets': 8}", "--gin_file=a.gin"]


def test_path_parameters_and_their_macros_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)

  def register():
    return {"f": gin.external_configurable(lambda model_dir=None, other=None: None,
                                           name="f", module="cli_test")}
  try:
    cli.parse_gin(configurables=register, gin_files=[], gin_bindings=[
        "DIR = 'runs/x'", "LINK = %DIR", "cli_test.f.model_dir = %LINK",
        "cli_test.f.other = 'keep/relative'"],
                  path_parameters=["cli_test.f.model_dir", "cli_test.f.missing"])
    assert gin.query_parameter("DIR/macro.value") == str(tmp_path / "runs" / "x")
    assert gin.query_parameter("cli_test.f.other") == "keep/relative"
  finally:
    gin.clear_config()


def test_train_command_runs_with_a_relative_model_dir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = ["train", f"--gin_search_paths={REPO}", "--gin_file=gin/models/tiny.gin",
          "--gin_file=gin/runs/pretrain.gin", "--gin_file=gin/runs/synthetic_pretrain.gin",
          "--gin.MODEL_DIR=runs/tiny", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
          "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.CHECKPOINT_EVERY=1",
          "--gin.optim.make_optimizer.warmup_steps=1",
          "--gin.uncurl_jax.train.train.eval_split=None"]
  result = train_main.main(cli.parse_flags(argv))
  assert int(result.state.step) == 2
  assert checkpoints.resolve_step(tmp_path / "runs" / "tiny" / "checkpoints") == 2


def test_study_command_runs_with_relative_output_dirs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mini.gin").write_text(MINI_STUDY)
  outcome = study_main.main(cli.parse_flags(["study", "--gin_file=mini.gin"]))
  assert os.path.isfile(tmp_path / "out" / "report" / "results.csv")
  assert outcome["files"]["csv"] == str(tmp_path / "out" / "report" / "results.csv")
  stage_dirs = os.listdir(tmp_path / "out" / "stages")
  assert any(name.startswith("pretrain-e4-") for name in stage_dirs)


def test_unexpected_positional_arguments_are_refused():
  with pytest.raises(app.UsageError, match="unexpected arguments"):
    train_main.main(["train", "surplus"])
