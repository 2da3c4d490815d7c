"""The command-line layer: flags, gin, and relative paths made absolute, for both commands.

Both commands run from a fresh working directory with relative output paths, as a new
user runs them from a fresh clone (orbax refuses relative checkpoint paths).
"""

import os
import pathlib
import re
import subprocess
import sys

import gin
import pytest

import uncurl_jax.tasks  # noqa: F401  (registers the seqio tasks)
from uncurl_jax import cli
from uncurl_jax.study import __main__ as study_main
from uncurl_jax.train import __main__ as train_main
from uncurl_jax.train import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]

# The model, data and training settings of tests/study/test_study.py's miniature study
# (`_config`, one method), so that its compiled programs come from the session's
# compilation cache when that module ran first.
MINI_STUDY = """
import uncurl_jax.tasks
run_study.config = @StudyConfig()
StudyConfig:
  name = 'mini'
  output_dir = 'out/report'
  stages_dir = 'out/stages'
  model = @configs.get()
  tasks = ['synthetic_lm_dna']
  pretrain = @pretraining/TrainSettings()
  finetune = @finetuning/TrainSettings()
  source_experts = [4]
  pruned_experts = [2]
  methods = ['frequency']
  dense_reference = False
  eval_batches = 1
  eval_batch_size = 8
  logits_max_tokens = 64
  usage_max_tokens = 64
configs.get:
  name = 'tiny'
  num_layers = 2
  moe_every = 1
  d_model = 16
  d_ff = 32
  num_heads = 2
  max_length = 32
TrainSettings:
  task_feature_lengths = {'targets': 32}
  steps = 4
  batch_size = 8
  learning_rate = 1e-2
  warmup_steps = 1
pretraining/TrainSettings.mixture_or_task_name = 'synthetic_lm'
finetuning/TrainSettings.router_warmup_steps = 1
finetuning/TrainSettings.router_warmup_learning_rate = 1e-2
"""


def test_rewrite_gin_args_quotes_plain_strings():
  assert cli.rewrite_gin_args(
      ["prog", "--gin.MODEL_DIR=/tmp/x", "--gin.TRAIN_STEPS=5", "--gin.F=@f()",
       "--gin.L={'targets': 8}", "--gin.D={'a': @s/f()}", "--gin.M=[%X]",
       "--gin_file=a.gin"]) == [
           "prog", "--gin_bindings=MODEL_DIR = '/tmp/x'", "--gin_bindings=TRAIN_STEPS = 5",
           "--gin_bindings=F = @f()", "--gin_bindings=L = {'targets': 8}",
           "--gin_bindings=D = {'a': @s/f()}", "--gin_bindings=M = [%X]", "--gin_file=a.gin"]


def test_path_parameters_and_their_macros_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)

  registered = {}

  def register():  # once: gin refuses a second configurable of the same name
    if not registered:
      registered["f"] = gin.external_configurable(lambda model_dir=None, other=None: None,
                                                  name="f", module="cli_test")
    return dict(registered)
  try:
    cli.parse_gin(configurables=register, gin_files=[], gin_bindings=[
        "DIR = 'runs/x'", "LINK = %DIR", "cli_test.f.model_dir = %LINK",
        "cli_test.f.other = 'keep/relative'"],
                  path_parameters=["cli_test.f.model_dir", "cli_test.f.missing"])
    assert gin.query_parameter("DIR/macro.value") == str(tmp_path / "runs" / "x")
    # The parameter still refers to the macro chain (the macro itself was rebound).
    assert isinstance(gin.query_parameter("cli_test.f.model_dir"),
                      gin.config.ConfigurableReference)
    assert gin.query_parameter("cli_test.f.other") == "keep/relative"
    gin.clear_config()
    cli.parse_gin(configurables=register, gin_files=[], gin_bindings=[
        "cli_test.f.model_dir = 'gs://bucket/runs/x'"], path_parameters=["cli_test.f.model_dir"])
    assert gin.query_parameter("cli_test.f.model_dir") == "gs://bucket/runs/x"
  finally:
    gin.clear_config()


TRAIN_ARGS = ["train", f"--gin_search_paths={REPO}", "--gin_file=gin/models/tiny.gin",
              "--gin_file=gin/runs/pretrain.gin", "--gin_file=gin/runs/synthetic_pretrain.gin",
              "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
              "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.CHECKPOINT_EVERY=1",
              "--gin.optim.make_optimizer.warmup_steps=1",
              "--gin.uncurl_jax.train.train.eval_split=None"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The train command run from a fresh directory with a relative MODEL_DIR."""
  workdir = tmp_path_factory.mktemp("cli")
  cwd = os.getcwd()
  os.chdir(workdir)
  try:
    result = train_main.main(cli.parse_flags(TRAIN_ARGS + ["--gin.MODEL_DIR=runs/tiny"]))
  finally:
    os.chdir(cwd)
  return workdir, result


def test_train_command_runs_with_a_relative_model_dir(trained):
  workdir, result = trained
  assert int(result.state.step) == 2
  assert checkpoints.resolve_step(workdir / "runs" / "tiny" / "checkpoints") == 2


def _exit_message(capsys, argv, command=train_main):
  with pytest.raises(SystemExit) as exit_info:
    command.main(cli.parse_flags(argv))
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and "Traceback" not in err
  return err


@pytest.mark.parametrize("extra, message", [
    (["--gin_fil=x.gin"], "Unknown command line flag 'gin_fil'"),
    (["--gin_bindings=TRAIN_STEPS = "], "SyntaxError"),
    (["--gin.optim.make_optimiser.warmup_steps=1"], "No configurable matching"),
    (["--gin.TRAIN_STEPZ=3"], "the macro TRAIN_STEPZ is bound on the command line but no gin "
                              "file uses it; did you mean ['TRAIN_STEPS'"),
    (["--gin.MIXTURE_OR_TASK_NAME=synthetic_lmm"],
     "MIXTURE_OR_TASK_NAME='synthetic_lmm' is not a registered seqio task or mixture"),
    (["--gin.BATCH_SIZE=0"], "BATCH_SIZE must be in [1, inf], got 0"),
    (["--gin.TRAIN_STEPS=-1"], "TRAIN_STEPS must be in [1, inf], got -1"),
    (["--gin_file=gin/runs/nope.gin"], "Unable to open file"),
    (["--gin.uncurl_jax.train.train.init_checkpoint='/nonexistent'"],
     "INITIAL_CHECKPOINT_PATH='/nonexistent' is not a directory holding checkpoints"),
])
def test_bad_train_command_lines_exit_2_with_one_message(tmp_path, capsys, extra, message):
  argv = TRAIN_ARGS + [f"--gin.MODEL_DIR={tmp_path / 'run'}"] + extra
  assert message in _exit_message(capsys, argv)


def test_model_dir_that_is_a_file_is_refused(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  err = _exit_message(capsys, TRAIN_ARGS + [f"--gin.MODEL_DIR={tmp_path / 'file'}"])
  assert "is a file, expected a directory" in err


def test_resuming_another_models_checkpoint_is_refused(trained, capsys):
  model_dir = trained[0] / "runs" / "tiny"
  err = _exit_message(capsys, TRAIN_ARGS + [f"--gin.MODEL_DIR={model_dir}",
                                            "--gin.TRAIN_STEPS=3", "--gin.NUM_EXPERTS=4"])
  assert "has (8,) experts per MoE layer, this run expects 4" in err
  err = _exit_message(capsys, TRAIN_ARGS + [f"--gin.MODEL_DIR={model_dir}",
                                            "--gin.TRAIN_STEPS=3",
                                            "--gin.configs.get.d_model=32"])
  assert "and the model differ: d_model 64 (config: 32)" in err


def test_debug_flag_shows_the_traceback(tmp_path):
  argv = TRAIN_ARGS + [f"--gin.MODEL_DIR={tmp_path}", "--gin.BATCH_SIZE=0", "--debug"]
  with pytest.raises(ValueError, match="BATCH_SIZE"):
    train_main.main(cli.parse_flags(argv))


def test_the_process_exits_2_without_a_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "uncurl_jax.train"] + TRAIN_ARGS[1:] +
      [f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPZ=3"],
      capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("uncurl_jax.train: error: ")
  assert "TRAIN_STEPZ" in result.stderr.strip().splitlines()[-1]
  # TensorFlow's C++ start-up lines (cuda drivers, cuInit) stay quiet without --verbose.
  assert "absl::InitializeLog" not in result.stderr
  assert "I0000" not in result.stderr and "E0000" not in result.stderr


@pytest.mark.parametrize("binding, message", [
    ("StudyConfig.tasks = ['synthetic_lm_nope']", "a study task='synthetic_lm_nope' is not a "
                                                  "registered seqio task"),
    ("StudyConfig.methods = ['uncurl', 'magic']", "unknown method 'magic'"),
    ("StudyConfig.eval_batch_size = 0", "StudyConfig.eval_batch_size must be in [1, inf]"),
])
def test_bad_study_configs_are_refused_before_any_stage(tmp_path, monkeypatch, capsys,
                                                         binding, message):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mini.gin").write_text(MINI_STUDY)
  err = _exit_message(capsys, ["study", "--gin_file=mini.gin", f"--gin_bindings={binding}"],
                      command=study_main)
  assert message in err
  assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mini_study(tmp_path_factory):
  """The miniature study run alone by the study command, from its own folder with the
  gin file's relative output paths: (folder, outcome)."""
  folder = tmp_path_factory.mktemp("mini_study")
  (folder / "mini.gin").write_text(MINI_STUDY)
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(folder)
    outcome = study_main.main(cli.parse_flags(["study", "--gin_file=mini.gin"]))
  return folder, outcome


def test_study_command_runs_with_relative_output_dirs(mini_study):
  folder, outcome = mini_study
  assert os.path.isfile(folder / "out" / "report" / "results.csv")
  assert outcome["files"]["csv"] == str(folder / "out" / "report" / "results.csv")
  stage_dirs = os.listdir(folder / "out" / "stages")
  assert any(name.startswith("pretrain-e4-") for name in stage_dirs)


def test_error_messages_name_the_command_as_typed():
  assert cli.program_name(train_main.__file__) == "uncurl_jax.train"
  assert cli.program_name(study_main.__file__) == "uncurl_jax.study"
  assert cli.program_name("train") == "train"


def test_unexpected_positional_arguments_are_refused(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_main.main(["train", "surplus"])
  assert exit_info.value.code == 2
  assert "unexpected arguments: ['surplus']" in capsys.readouterr().err


def test_a_command_that_returns_results_exits_0(monkeypatch):
  """`main` returns the study's results to in-process callers; the process still exits 0
  (absl's app.run would print them and exit 1)."""
  monkeypatch.setattr(sys, "argv", ["uncurl_jax"])
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda argv: {"rows": ["a result"]})
  assert exit_info.value.code in (None, 0)


def test_error_messages_name_gins_configurables_without_memory_addresses(tmp_path, capsys):
  """gin appends "In call to configurable 'run' (<function run at 0x7f...>)": the
  configurable's name is kept, the address is not."""
  error = ValueError("BATCH_SIZE=0 must be >= 1\n  In call to configurable 'run' "
                     "(<function run at 0x7f3a2b1c0d90>)")
  assert cli.short_message(error) == ("ValueError: BATCH_SIZE=0 must be >= 1\n"
                                      "  In call to configurable 'run'")
  err = _exit_message(capsys, TRAIN_ARGS + [f"--gin.MODEL_DIR={tmp_path}",
                                            "--gin.BATCH_SIZE=0"])
  assert "BATCH_SIZE" in err and "0x" not in err


def test_two_study_commands_started_at_once_over_one_stage_cache(tmp_path, mini_study):
  """Two study processes with the same plan over one STAGES_DIR (started together, so they
  contend for every stage): both exit 0 with the same results.csv as a process alone."""
  (tmp_path / "mini.gin").write_text(MINI_STUDY)

  # The session's compilation cache (conftest.py), which holds the miniature study's
  # programs: the processes compile nothing, so the test's time is the stages'.
  import jax  # pylint: disable=import-outside-toplevel
  env = dict(os.environ)
  if jax.config.jax_compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir

  def start(output_dir, stages_dir):
    return subprocess.Popen(
        [sys.executable, "-m", "uncurl_jax.study", "--gin_file=mini.gin",
         f"--gin.StudyConfig.output_dir='{output_dir}'",
         f"--gin.StudyConfig.stages_dir='{stages_dir}'"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  processes = [start("out/a", "out/shared"), start("out/b", "out/shared")]
  outputs = [p.communicate(timeout=600) for p in processes]
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err
  alone = (mini_study[0] / "out" / "report" / "results.csv").read_bytes()
  csv = [(tmp_path / "out" / name / "results.csv").read_bytes() for name in ("a", "b")]
  assert csv[0] == csv[1] == alone
  shared = tmp_path / "out" / "shared"
  stages = [d for d in shared.iterdir() if d.is_dir() and (d / "stage_config.json").exists()]
  assert stages and all((d / "result.json").exists() for d in stages)  # none unfinished
  # Every stage ran once, in one of the two processes (its stage line), and the other one
  # waited for it or found it done.
  ran = [re.findall(r"^(\S+) +\d+\.\d s  ", out.replace("\r", "\n"), re.M)
         for out, _ in outputs]
  assert sorted(ran[0] + ran[1]) == sorted(set(ran[0] + ran[1]))
  assert len(ran[0] + ran[1]) == len(stages)
  assert sum(err.count("waiting for stage") for _, err in outputs) >= 1
