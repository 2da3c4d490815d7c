"""Every gin file of the project parses and configures what it says it does.

The files under gin/t5x/ are parsed with t5x's configurables and base run files replaced
by stand-ins when t5x is not installed (it is not on PyPI); the stand-ins take the
parameters that t5x's classes take, so a misspelt binding still fails.
"""

import dataclasses
import importlib.util
import inspect
import pathlib
import sys
import types

import gin
import jax
import jax.numpy as jnp
import pytest
import seqio

from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.train import __main__ as train_main
from uncurl_jax.train import run as train_run
from uncurl_jax.train import schedules

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIN = ROOT / "gin"
MODEL_FILES = sorted((GIN / "models").glob("*.gin"))
# Base run files and the macros a user must set for them.
RUN_REQUIRED = {
    "pretrain.gin": {"MODEL_DIR": "'/tmp/run'"},
    "prefinetune.gin": {"MODEL_DIR": "'/tmp/run'", "INITIAL_CHECKPOINT_PATH": "'/tmp/pre'"},
    "finetune.gin": {"MODEL_DIR": "'/tmp/run'", "INITIAL_CHECKPOINT_PATH": "'/tmp/pre'",
                     "MIXTURE_OR_TASK_NAME": "'super_glue_rte_v102'", "TRAIN_STEPS": "1945"},
    "eval.gin": {"CHECKPOINT_PATH": "'/tmp/run'", "EVAL_OUTPUT_DIR": "'/tmp/eval'",
                 "MIXTURE_OR_TASK_NAME": "'super_glue_rte_v102_rank'"},
}
# Overlays and the base run file they go on.
OVERLAYS = {"synthetic_pretrain.gin": "pretrain.gin", "synthetic_finetune.gin": "finetune.gin",
            "progressive_dropping.gin": "finetune.gin"}


def _header(path):
  lines = path.read_text().splitlines()
  header = []
  for line in lines:
    if not line.startswith("#"):
      break
    header.append(line)
  return "\n".join(header)


def _procedure_kwargs(gin_files, bindings):
  """Parses the files and returns the run procedure and the arguments gin gives it."""
  train_main.parse_gin(gin_files=[str(GIN / f) for f in gin_files],
                      gin_bindings=[f"{k} = {v}" for k, v in bindings.items()])
  procedure = gin.get_bindings("uncurl_jax.train.run")["function"]
  name = procedure.__name__
  return name, gin.get_bindings(f"uncurl_jax.train.{name}")


def _required_args(fn):
  return {n for n, p in inspect.signature(fn).parameters.items() if p.default is p.empty}


def test_every_gin_file_is_covered_and_documents_its_macros_and_command():
  runs = {p.name for p in (GIN / "runs").glob("*.gin")}
  assert runs == set(RUN_REQUIRED) | set(OVERLAYS)
  assert {p.name for p in MODEL_FILES} == {
      "tiny.gin", "dense.gin", "smoe_354m_8e.gin", "smoe_354m_32e.gin", "smoe_354m_64e.gin",
      "smoe_354m_128e.gin"}
  for path in GIN.rglob("*.gin"):  # every gin file of the project says how to run it
    header = _header(path)
    assert "Command" in header and "python -m " in header, path
  for path in [*MODEL_FILES, *(GIN / "runs").glob("*.gin"), *(GIN / "t5x").rglob("*.gin")]:
    header = _header(path)
    assert ("python -m uncurl_jax.train" in header or "python -m t5x." in header), path
    assert "Required macros" in header or "Defines:" in header, path


@pytest.mark.parametrize("model_file", [p.name for p in MODEL_FILES])
def test_model_files_define_the_preset_with_their_expert_count(model_file):
  _, kwargs = _procedure_kwargs([f"models/{model_file}", "runs/pretrain.gin"],
                                RUN_REQUIRED["pretrain.gin"])
  config = kwargs["model_config"]
  expected_experts = {"tiny.gin": 8, "dense.gin": 0}.get(
      model_file, int(model_file.removeprefix("smoe_354m_").removesuffix("e.gin")
                      if model_file.startswith("smoe") else -1))
  assert config.num_experts == gin.query_parameter("%NUM_EXPERTS") == expected_experts
  preset = "tiny" if model_file == "tiny.gin" else "dense" if expected_experts == 0 else "354m"
  base = configs.get(preset, num_experts=expected_experts)
  assert dataclasses.replace(config, dtype=base.dtype) == base
  assert config.dtype == ("float32" if preset == "tiny" else "bfloat16")


@pytest.mark.parametrize("run_file", sorted(RUN_REQUIRED))
def test_run_files_bind_every_required_argument_of_their_procedure(run_file):
  name, kwargs = _procedure_kwargs(["models/smoe_354m_32e.gin", f"runs/{run_file}"],
                                   RUN_REQUIRED[run_file])
  procedure = train_run.evaluate if run_file == "eval.gin" else train_run.train
  assert name == procedure.__name__
  assert _required_args(procedure) <= set(kwargs)
  assert set(kwargs) <= set(inspect.signature(procedure).parameters)
  seqio.get_mixture_or_task(kwargs["mixture_or_task_name"])  # registered by the file's import
  length = sum(kwargs["task_feature_lengths"].values())
  assert length <= kwargs["model_config"].max_length


def test_run_files_carry_the_paper_hyperparameters():
  _, pretrain = _procedure_kwargs(["models/smoe_354m_32e.gin", "runs/pretrain.gin"],
                                  RUN_REQUIRED["pretrain.gin"])
  assert gin.get_bindings("uncurl_jax.optim.make_optimizer") == dict(
      peak_learning_rate=5e-5, warmup_steps=1000, end_learning_rate=0.0, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.1, clip_norm=1.0)
  assert pretrain["batch_size"] == 512 and pretrain["task_feature_lengths"] == {"targets": 1024}
  assert pretrain["batch_size"] * 1024 * pretrain["train_steps"] == pytest.approx(40e9, rel=1e-4)
  _, tune = _procedure_kwargs(["models/smoe_354m_8e.gin", "runs/finetune.gin"],
                              RUN_REQUIRED["finetune.gin"])
  optimizer = gin.get_bindings("uncurl_jax.optim.make_optimizer")
  assert (optimizer["peak_learning_rate"], optimizer["warmup_steps"],
          optimizer["weight_decay"]) == (1e-6, 500, 0.001)
  assert tune["batch_size"] == 64 and sum(tune["task_feature_lengths"].values()) == 256
  assert tune["router_warmup_steps"] > 0 and tune["eval_task_metrics"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlays_apply_on_their_base_run_file(overlay):
  base = OVERLAYS[overlay]
  model = "tiny.gin" if overlay.startswith("synthetic") else "smoe_354m_32e.gin"
  _, kwargs = _procedure_kwargs([f"models/{model}", f"runs/{base}", f"runs/{overlay}"],
                                RUN_REQUIRED[base])
  assert sum(kwargs["task_feature_lengths"].values()) <= kwargs["model_config"].max_length
  seqio.get_mixture_or_task(kwargs["mixture_or_task_name"])
  if overlay == "progressive_dropping.gin":
    assert kwargs["progressive_dropping"] == schedules.ProgressiveDropping(
        first_drop_step=200, drop_every_steps=200, target_experts=1, keep_fraction=0.5,
        probe_batches=4)
    assert kwargs["router_warmup_steps"] == 0
  if overlay == "synthetic_finetune.gin":
    seqio.get_mixture_or_task(kwargs["eval_mixture_or_task_name"])


def test_missing_required_macro_is_reported_by_name(tmp_path):
  with pytest.raises(ValueError, match=r"MODEL_DIR/macro.value set to `%gin.REQUIRED` but not "
                                       r"subsequently overridden"):
    train_main.run_with_gin(gin_files=[str(GIN / "models/tiny.gin"), str(GIN / "runs/pretrain.gin")])
  assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------
# gin/t5x/ with stand-ins for t5x.

_T5X_BASE_RUNS = {
    "pretrain.gin": """
from __gin__ import dynamic_registration
import __main__ as train_script
from t5x import utils
MIXTURE_OR_TASK_NAME = %gin.REQUIRED
TASK_FEATURE_LENGTHS = %gin.REQUIRED
TRAIN_STEPS = %gin.REQUIRED
MODEL_DIR = %gin.REQUIRED
USE_CACHED_TASKS = True
train_script.train:
  model = %MODEL
  model_dir = %MODEL_DIR
  train_dataset_cfg = @train/utils.DatasetConfig()
  checkpoint_cfg = @utils.CheckpointConfig()
  total_steps = %TRAIN_STEPS
train/utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  split = 'train'
  batch_size = 128
  use_cached = %USE_CACHED_TASKS
train_eval/utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  split = 'validation'
  batch_size = 128
utils.CheckpointConfig.save = @utils.SaveCheckpointConfig()
utils.SaveCheckpointConfig.period = 1000
""",
    "finetune.gin": """
from __gin__ import dynamic_registration
import __main__ as train_script
from t5x import utils
MODEL_DIR = %gin.REQUIRED
MIXTURE_OR_TASK_NAME = %gin.REQUIRED
TASK_FEATURE_LENGTHS = %gin.REQUIRED
TRAIN_STEPS = %gin.REQUIRED
INITIAL_CHECKPOINT_PATH = %gin.REQUIRED
DROPOUT_RATE = 0.1
USE_CACHED_TASKS = True
BATCH_SIZE = 128
train_script.train:
  model = %MODEL
  model_dir = %MODEL_DIR
  train_dataset_cfg = @train/utils.DatasetConfig()
  checkpoint_cfg = @utils.CheckpointConfig()
  total_steps = %TRAIN_STEPS
train/utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  split = 'train'
  batch_size = %BATCH_SIZE
  use_cached = %USE_CACHED_TASKS
train_script.train.infer_eval_dataset_cfg = @infer_eval/utils.DatasetConfig()
infer_eval/utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = None  # t5x: compute max
  split = 'validation'
  batch_size = %BATCH_SIZE
utils.CheckpointConfig.save = @utils.SaveCheckpointConfig()
utils.CheckpointConfig.restore = @utils.RestoreCheckpointConfig()
utils.RestoreCheckpointConfig.path = %INITIAL_CHECKPOINT_PATH
utils.SaveCheckpointConfig.period = 5000
""",
    "eval.gin": """
from __gin__ import dynamic_registration
import __main__ as eval_script
from t5x import utils
MIXTURE_OR_TASK_NAME = %gin.REQUIRED
CHECKPOINT_PATH = %gin.REQUIRED
EVAL_OUTPUT_DIR = %gin.REQUIRED
TASK_FEATURE_LENGTHS = None
eval_script.evaluate:
  model = %MODEL
  dataset_cfg = @utils.DatasetConfig()
  restore_checkpoint_cfg = @utils.RestoreCheckpointConfig()
  output_dir = %EVAL_OUTPUT_DIR
utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  split = 'test'  # t5x's eval.gin hard-codes it (there is no split macro)
  batch_size = 32
utils.RestoreCheckpointConfig.path = %CHECKPOINT_PATH
""",
    "infer.gin": """
from __gin__ import dynamic_registration
import __main__ as infer_script
from t5x import utils
MIXTURE_OR_TASK_NAME = %gin.REQUIRED
TASK_FEATURE_LENGTHS = %gin.REQUIRED
CHECKPOINT_PATH = %gin.REQUIRED
INFER_OUTPUT_DIR = %gin.REQUIRED
infer_script.infer:
  mode = 'predict'
  model = %MODEL
  output_dir = %INFER_OUTPUT_DIR
  dataset_cfg = @utils.DatasetConfig()
  restore_checkpoint_cfg = @utils.RestoreCheckpointConfig()
  shard_id = 0
  num_shards = 1
utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  split = 'test'
  batch_size = 32
utils.RestoreCheckpointConfig:
  path = %CHECKPOINT_PATH
  mode = 'specific'
  dtype = 'bfloat16'
""",
}


class _Record:
  """Stand-in object recording its constructor arguments."""

  def __init__(self, **kwargs):
    self.kwargs = kwargs


def _stand_in(name, signature):
  """A class named `name` whose constructor takes exactly the parameters of `signature`."""
  def __init__(self, *args, **kwargs):
    _Record.__init__(self, **signature.bind(*args, **kwargs).arguments)
  return type(name, (_Record,), {"__init__": __init__, "__signature__": signature})


def _signature(text):
  namespace = {}
  exec(f"def f({text}): pass", namespace)  # pylint: disable=exec-used
  return inspect.signature(namespace["f"])


def _make_t5x_stand_ins():
  """Stand-in t5x modules (built once: gin registers what they hold by identity)."""
  members = {
      "t5x.utils": dict(
          DatasetConfig=_signature("mixture_or_task_name, task_feature_lengths, split, "
                                   "batch_size, shuffle=True, seed=None, use_cached=False, "
                                   "pack=False, use_custom_packing_ops=False, module=None"),
          CheckpointConfig=_signature("save=None, restore=None"),
          SaveCheckpointConfig=_signature("period=None, dtype='float32', keep=None, "
                                          "save_dataset=False"),
          RestoreCheckpointConfig=_signature(
              "path, mode='latest', assignment_map=None, strict=True, "
              "fallback_to_scratch=False, dtype='float32'"),
          create_learning_rate_scheduler=_signature(
              "factors='constant', base_learning_rate=0.5, warmup_steps=1000, decay_factor=0.5, "
              "steps_per_decay=20000, steps_per_cycle=100000, step_offset=0, "
              "min_learning_rate=1e-8")),
      "t5x.optimizers": dict(chain=_signature("transformations")),
      "t5x.decoding": dict(temperature_sample=_signature(
          "inputs=None, cache=None, tokens_to_logits=None, eos_id=1, decode_rng=None, "
          "num_decodes=1, temperature=1.0, topk=1, topp=0.0")),
      "t5x.contrib.moe.models": dict(MoeDecoderOnlyModel=_signature(
          "module, vocabulary, optimizer_def, decode_fn=None, "
          "inputs_bidirectional_attention=False, "
          "feature_converter_cls=None, label_smoothing=0.0, z_loss=0.0, "
          "loss_normalizing_factor=None, aux_loss_factor=0.0, router_z_loss_factor=0.0")),
      "t5x.contrib.moe.partitioning": dict(MoePjitPartitioner=_signature(
          "num_expert_partitions, num_partitions=None, model_parallel_submesh=None, "
          "params_on_devices=True, logical_axis_rules=None, state_filter_fn=None")),
      "t5x.contrib.moe.trainer": dict(MoeTrainer=_signature(
          "model=None, train_state=None, partitioner=None, eval_names=None, summary_dir=None, "
          "train_state_axes=None, rng=None, learning_rate_fn=None, num_microbatches=None, "
          "num_expert_partitions=1, sharded_match_fn='.*expert.*', weight_metrics_computer=None")),
  }
  modules = {}
  for package in ("t5x", "t5x.contrib", "t5x.contrib.moe"):
    modules[package] = types.ModuleType(package)
    modules[package].__path__ = []
  for name, contents in members.items():
    modules[name] = types.ModuleType(name)
    for member, signature in contents.items():
      setattr(modules[name], member, _stand_in(member, signature))
    parent, child = name.rsplit(".", 1)
    setattr(modules[parent], child, modules[name])
  entry_points = types.SimpleNamespace(train=type("train", (_Record,), {}),
                                       evaluate=type("evaluate", (_Record,), {}),
                                       infer=type("infer", (_Record,), {}))
  return modules, entry_points


_T5X_STAND_INS = None


@pytest.fixture
def t5x_stand_ins(monkeypatch, tmp_path):
  """Installs the stand-in t5x modules and base run files (only when t5x is absent)."""
  global _T5X_STAND_INS
  if importlib.util.find_spec("t5x") is not None:
    pytest.skip("t5x is installed: its own configurables are used")
  if _T5X_STAND_INS is None:
    _T5X_STAND_INS = _make_t5x_stand_ins()
  modules, entry_points = _T5X_STAND_INS
  for name, module in modules.items():
    monkeypatch.setitem(sys.modules, name, module)
  main = sys.modules["__main__"]
  monkeypatch.setattr(main, "train", entry_points.train, raising=False)
  monkeypatch.setattr(main, "evaluate", entry_points.evaluate, raising=False)
  monkeypatch.setattr(main, "infer", entry_points.infer, raising=False)
  runs = tmp_path / "t5x" / "configs" / "runs"
  runs.mkdir(parents=True)
  for name, text in _T5X_BASE_RUNS.items():
    (runs / name).write_text(text)
  yield entry_points, tmp_path
  gin.clear_config()


@pytest.mark.parametrize("model_file,run_file,bindings", [
    ("tiny.gin", "pretrain.gin", {"MODEL_DIR": "'/tmp/t5x'",
                                  "MIXTURE_OR_TASK_NAME": "'synthetic_lm'",
                                  "TASK_FEATURE_LENGTHS": "{'targets': 128}"}),
    ("smoe_354m.gin", "pretrain.gin", {"MODEL_DIR": "'/tmp/t5x'", "NUM_EXPERTS": "64",
                                       "NUM_EXPERT_PARTITIONS": "8"}),
    ("smoe_354m.gin", "finetune.gin", {"MODEL_DIR": "'/tmp/t5x'", "NUM_EXPERTS": "8",
                                       "INITIAL_CHECKPOINT_PATH": "'/tmp/ckpt'",
                                       "MIXTURE_OR_TASK_NAME": "'super_glue_rte_v102'",
                                       "TRAIN_STEPS": "78239"}),
])
def test_t5x_train_files_configure_the_moe_model_partitioner_and_trainer(
    t5x_stand_ins, model_file, run_file, bindings):
  entry_points, base_dir = t5x_stand_ins
  gin.clear_config()
  gin.add_config_file_search_path(str(base_dir))
  gin.parse_config_files_and_bindings(
      [str(GIN / "t5x/models" / model_file), str(GIN / "t5x/runs" / run_file)],
      [f"{k} = {v}" for k, v in bindings.items()])
  train = gin.get_configurable(entry_points.train)().kwargs
  model = train["model"].kwargs
  assert isinstance(model["module"], decoder.SMoEDecoder)
  experts = int(bindings.get("NUM_EXPERTS", 8))
  assert model["module"].config.num_experts == experts
  assert (model["aux_loss_factor"], model["router_z_loss_factor"]) == (0.01, 0.001)
  # The MoE losses are per-token means: the cross-entropy must be one too.
  assert model["loss_normalizing_factor"] == "NUM_REAL_TARGET_TOKENS"
  assert model["vocabulary"].vocab_size <= model["module"].config.vocab_size
  (transformation,) = model["optimizer_def"].kwargs["transformations"]
  assert callable(transformation.update)  # this project's optax AdamW
  assert type(train["partitioner"]).__name__ == "MoePjitPartitioner"
  assert type(train["partitioner"]).__module__ == "uncurl_jax.t5x_compat.partitioning"
  assert train["trainer_cls"].__name__ == "MoeTrainer"
  expert_partitions = int(bindings.get("NUM_EXPERT_PARTITIONS", 1))
  assert train["partitioner"].kwargs["num_expert_partitions"] == expert_partitions
  assert train["trainer_cls"]().kwargs["num_expert_partitions"] == expert_partitions
  # The MoE layers' expert gradients are exact: no rescaling by the expert-parallel size.
  assert train["trainer_cls"]().kwargs["sharded_match_fn"] is None
  dataset = train["train_dataset_cfg"].kwargs
  seqio.get_mixture_or_task(dataset["mixture_or_task_name"])
  assert sum(dataset["task_feature_lengths"].values()) <= model["module"].config.max_length
  if run_file == "finetune.gin":
    assert dataset["batch_size"] == 64
    # Params and step from the checkpoint, the optimizer state from scratch.
    restore = train["checkpoint_cfg"].kwargs["restore"].kwargs
    assert restore["assignment_map"] == ((r"state/param_states.*", None),)
    assert restore["fallback_to_scratch"] is True
    infer_eval = train["infer_eval_dataset_cfg"].kwargs
    assert infer_eval["task_feature_lengths"] == dataset["task_feature_lengths"]


def test_t5x_router_warmup_overlay_freezes_all_but_the_router(t5x_stand_ins):
  entry_points, base_dir = t5x_stand_ins
  gin.clear_config()
  gin.add_config_file_search_path(str(base_dir))
  gin.parse_config_files_and_bindings(
      [str(GIN / "t5x/models/tiny.gin"), str(GIN / "t5x/runs/finetune.gin"),
       str(GIN / "t5x/runs/router_warmup.gin")],
      ["MODEL_DIR = '/tmp/t5x'", "INITIAL_CHECKPOINT_PATH = '/tmp/ckpt'",
       "MIXTURE_OR_TASK_NAME = 'synthetic_city_country'", "TRAIN_STEPS = 50",
       "TASK_FEATURE_LENGTHS = {'inputs': 96, 'targets': 16}"])
  optimizer = gin.get_bindings("uncurl_jax.optim.make_optimizer")
  assert optimizer["trainable"].__name__ == "router_only"  # gin wraps the function
  assert optimizer["warmup_steps"] == 0 and optimizer["peak_learning_rate"] == 1e-4
  train = gin.get_configurable(entry_points.train)().kwargs
  (transformation,) = train["model"].kwargs["optimizer_def"].kwargs["transformations"]
  params = {"mlp": {"router": {"kernel": jnp.zeros((2, 2))},
                    "expert": {"wi": {"kernel": jnp.zeros((2, 2, 2))}}}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = transformation.update(grads, transformation.init(params), params)
  assert float(jnp.abs(updates["mlp"]["router"]["kernel"]).sum()) > 0
  assert float(jnp.abs(updates["mlp"]["expert"]["wi"]["kernel"]).sum()) == 0


def test_t5x_eval_file_evaluates_the_validation_split(t5x_stand_ins):
  entry_points, base_dir = t5x_stand_ins
  gin.clear_config()
  gin.add_config_file_search_path(str(base_dir))
  gin.parse_config_files_and_bindings(
      [str(GIN / "t5x/models/smoe_354m.gin"), str(GIN / "t5x/runs/eval.gin")],
      ["CHECKPOINT_PATH = '/tmp/ckpt'", "EVAL_OUTPUT_DIR = '/tmp/eval'",
       "MIXTURE_OR_TASK_NAME = 'super_glue_rte_v102_rank'", "NUM_EXPERTS = 8"])
  evaluate = gin.get_configurable(entry_points.evaluate)().kwargs
  dataset = evaluate["dataset_cfg"].kwargs
  assert dataset["split"] == "validation" and dataset["batch_size"] == 64
  assert dataset["task_feature_lengths"] == {"inputs": 224, "targets": 32}
  assert evaluate["model"].kwargs["module"].config.num_experts == 8
  assert type(evaluate["partitioner"]).__module__ == "uncurl_jax.t5x_compat.partitioning"


def test_t5x_infer_file_decodes_the_validation_split(t5x_stand_ins):
  entry_points, base_dir = t5x_stand_ins
  gin.clear_config()
  gin.add_config_file_search_path(str(base_dir))
  gin.parse_config_files_and_bindings(
      [str(GIN / "t5x/models/tiny.gin"), str(GIN / "t5x/runs/infer.gin")],
      ["CHECKPOINT_PATH = '/tmp/ckpt'", "INFER_OUTPUT_DIR = '/tmp/infer'",
       "MIXTURE_OR_TASK_NAME = 'synthetic_city_country'", "INFER_SHARDS = 50"])
  infer = gin.get_configurable(entry_points.infer)().kwargs
  dataset = infer["dataset_cfg"].kwargs
  assert dataset["split"] == "validation" and dataset["task_feature_lengths"] == {
      "inputs": 224, "targets": 32}
  assert infer["mode"] == "predict" and infer["num_shards"] == 50
  assert infer["restore_checkpoint_cfg"].kwargs["dtype"] == "float32"
  assert type(infer["partitioner"]).__module__ == "uncurl_jax.t5x_compat.partitioning"
