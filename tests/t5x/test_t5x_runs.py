"""The gin/t5x/ files run with the real t5x: train, prune, warm up, finetune, eval, infer.

One chain of small runs on the tiny model, shared by the tests (module fixtures), each a
`python -m t5x.<command>` (or `python -m uncurl_jax.t5x_compat.prune`) subprocess from the
repository root with a timeout, so a hanging t5x run fails fast:

  pretrain (40 steps, synthetic_lm) -> prune 8 -> 4 experts for synthetic_city_country
  -> router-only warm-up (10 steps) -> full finetune (5 steps) -> t5x.eval (generation
  and rank tasks) and t5x.infer; plus the pretraining again on 2 CPU devices with 2 expert
  partitions (expert-parallel MoE layers).
"""

import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.t5x

REPO = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # per t5x process; a healthy one takes 0.5-2.5 minutes on 2 busy cores
PROMPT_LENGTHS = "{'inputs': 96, 'targets': 32}"
PRETRAIN_STEPS, WARMUP_END, FINETUNE_END = 40, 50, 55


def t5x_dir():
  """The directory holding t5x/configs/runs/ (the installed package's parent)."""
  import t5x  # pylint: disable=import-outside-toplevel
  return os.path.dirname(os.path.dirname(t5x.__file__))


def run(module, args, log, devices=1):
  """`python -m module args` from the repository root; returns its log text."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "CUDA_VISIBLE_DEVICES": ""}
  with open(log, "w") as out:
    try:
      proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                            stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT_S,
                            check=False)
    except subprocess.TimeoutExpired:
      pytest.fail(f"{module} ran over {TIMEOUT_S}s (t5x can hang after an error); log "
                  f"tail:\n{pathlib.Path(log).read_text()[-3000:]}")
  text = pathlib.Path(log).read_text()
  assert proc.returncode == 0, f"{module} exited {proc.returncode}; log tail:\n{text[-4000:]}"
  return text


def t5x_args(*gin_files, **macros):
  args = [f"--gin_search_paths=.,{t5x_dir()}"] + [f"--gin_file=gin/t5x/{f}" for f in gin_files]
  return args + [f"--gin.{name}={value}" for name, value in macros.items()]


def scalar(directory, tag):
  """The last value of a TensorBoard scalar written by t5x under `directory`."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  values = []
  for path in glob.glob(os.path.join(directory, "events*")):
    events = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    events.Reload()
    if tag in events.Tags()["tensors"]:
      values += [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
  assert values, f"no scalar {tag!r} under {directory}"
  return max(values)[1]


def load(path):
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from uncurl_jax.t5x_compat import checkpoints  # pylint: disable=import-outside-toplevel
  params, step = checkpoints.load_params(str(path))
  return traverse_util.flatten_dict(params, sep="/"), step


def pretrain(model_dir, devices, expert_partitions):
  return run("t5x.train", t5x_args(
      "models/tiny.gin", "runs/pretrain.gin", MODEL_DIR=f'"{model_dir}"',
      MIXTURE_OR_TASK_NAME='"synthetic_lm"', TASK_FEATURE_LENGTHS="{'targets': 128}",
      BATCH_SIZE=8, TRAIN_STEPS=PRETRAIN_STEPS, RANDOM_SEED=0,
      NUM_EXPERT_PARTITIONS=expert_partitions, **{"train/utils.DatasetConfig.seed": 0}),
      f"{model_dir}.log", devices=devices)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("t5x_runs")


@pytest.fixture(scope="module")
def pretrained(workdir):
  pretrain(workdir / "pretrain", devices=1, expert_partitions=1)
  return workdir / "pretrain"


@pytest.fixture(scope="module")
def pruned(workdir, pretrained):
  out = workdir / "pruned"
  run("uncurl_jax.t5x_compat.prune", [
      f"--checkpoint_path={pretrained}/checkpoint_{PRETRAIN_STEPS}", f"--output_dir={out}",
      "--model=tiny", "--mixture_or_task_name=synthetic_city_country",
      f"--task_feature_lengths={PROMPT_LENGTHS}", "--num_experts=4", "--max_tokens=4096"],
      f"{out}.log")
  return out / f"checkpoint_{PRETRAIN_STEPS}"


def finetune(model_dir, initial, steps, *overlays, **macros):
  return run("t5x.train", t5x_args(
      "models/tiny.gin", "runs/finetune.gin", *overlays, MODEL_DIR=f'"{model_dir}"',
      INITIAL_CHECKPOINT_PATH=f'"{initial}"', MIXTURE_OR_TASK_NAME='"synthetic_city_country"',
      TRAIN_STEPS=steps, TASK_FEATURE_LENGTHS=PROMPT_LENGTHS, BATCH_SIZE=8, NUM_EXPERTS=4,
      **macros), f"{model_dir}.log")


@pytest.fixture(scope="module")
def warmed(workdir, pruned):
  finetune(workdir / "warmup", pruned, WARMUP_END, "runs/router_warmup.gin",
           EVALUATOR_NUM_EXAMPLES=16)
  return workdir / "warmup" / f"checkpoint_{WARMUP_END}"


@pytest.fixture(scope="module")
def finetuned(workdir, warmed):
  finetune(workdir / "finetune", warmed, FINETUNE_END,
           **{"optim.make_optimizer.warmup_steps": 2,
              "train.infer_eval_dataset_cfg": "None"})
  return workdir / "finetune" / f"checkpoint_{FINETUNE_END}"


def test_pretraining_balances_the_load(pretrained):
  # With the token cross-entropy summed (t5x's default), 0.67-0.80 of the tokens were
  # left behind after 40 steps; with its mean the MoE losses weigh as intended.
  evaluation = pretrained / "training_eval" / "synthetic_lm"
  assert scalar(evaluation, "experts/fraction_tokens_left_behind") <= 0.25
  assert scalar(pretrained / "train", "experts/fraction_tokens_left_behind") <= 0.25
  assert scalar(pretrained / "train", "cross_ent_loss") < 10  # a per-token mean, not a sum


def test_expert_parallel_under_t5x_equals_one_device(workdir, pretrained):
  log = pretrain(workdir / "pretrain_ep", devices=2, expert_partitions=2)
  assert "uncurl_jax MoE CPU mesh: {'data': 1, 'expert': 2, 'model': 1}" in log
  assert "MoE layer layers_0/mlp: expert-parallel over 2 expert shards" in log
  params, _ = load(workdir / "pretrain_ep" / f"checkpoint_{PRETRAIN_STEPS}")
  assert params["layers_0/mlp/expert/wi/kernel"].shape[0] == 8
  # Measured: equal to 7 digits. t5x's MoeTrainer rescaling of expert gradients (switched
  # off by the run files) made them differ by 4e-6 (train) and 1.4e-5 (validation).
  tag = "cross_ent_loss"
  for sub in ("train", "training_eval/synthetic_lm"):
    want = scalar(pretrained / sub, tag)
    assert scalar(workdir / "pretrain_ep" / sub, tag) == pytest.approx(want, rel=1e-5)


def test_pruned_t5x_checkpoint_has_fewer_experts_and_the_rest_unchanged(pretrained, pruned):
  before, step_before = load(pretrained / f"checkpoint_{PRETRAIN_STEPS}")
  after, step_after = load(pruned)
  assert step_after == step_before == PRETRAIN_STEPS
  assert before.keys() == after.keys()
  for name, value in after.items():
    if name.startswith("layers_0/mlp/"):  # the MoE block: [E, ...] experts, [d, E] router
      assert value.shape[1 if "/router/" in name else 0] == 4, name
    else:
      np.testing.assert_array_equal(value, before[name], err_msg=name)
  plan = json.loads((pruned.parent / "prune_plan.json").read_text())
  assert plan["method"] == "uncurl" and plan["layers"]["layers_0/mlp"]["num_experts"] == 8


def test_router_warmup_changes_only_the_routers(pruned, warmed):
  before, _ = load(pruned)
  after, step = load(warmed)
  assert step == WARMUP_END
  changed = sorted(name for name in before if not np.array_equal(before[name], after[name]))
  assert changed == ["layers_0/mlp/router/kernel"]


def test_finetuning_after_the_warmup_trains_every_parameter(warmed, finetuned):
  before, _ = load(warmed)
  after, step = load(finetuned)
  assert step == FINETUNE_END
  unchanged = [name for name in before if np.array_equal(before[name], after[name])]
  assert not unchanged


@pytest.mark.parametrize("task,metric_key", [("synthetic_city_country", "prediction"),
                                             ("synthetic_city_country_rank", "score")])
def test_t5x_eval_on_the_validation_split(workdir, finetuned, task, metric_key):
  out = workdir / f"eval_{task}"
  run("t5x.eval", t5x_args(
      "models/tiny.gin", "runs/eval.gin", CHECKPOINT_PATH=f'"{finetuned}"',
      EVAL_OUTPUT_DIR=f'"{out}"', MIXTURE_OR_TASK_NAME=f'"{task}"', NUM_EXPERTS=4,
      TASK_FEATURE_LENGTHS=PROMPT_LENGTHS, BATCH_SIZE=8,
      **{"seqio.Evaluator.num_examples": 16}), f"{out}.log")
  metrics = json.loads((out / "inference_eval" / f"{task}-metrics.jsonl").read_text())
  assert metrics["step"] == FINETUNE_END
  rows = [json.loads(line) for line in
          (out / "inference_eval" / f"{task}-{FINETUNE_END:06d}.jsonl").read_text().splitlines()]
  assert len(rows) == 16 and all(metric_key in row for row in rows)
  assert rows[0]["input"]["inputs_pretokenized"] == first_prompt(task, "validation")
  assert first_prompt(task, "validation") != first_prompt(task, "train")
  # The same checkpoint through the project's own evaluation (seqio Evaluator, its scorer
  # and greedy decoder): the same metric, and row by row the same scores / predictions.
  ours, outputs = own_evaluation(finetuned, task, num_examples=16)
  assert metrics["accuracy"] == pytest.approx(ours["accuracy"], abs=1e-6)
  if metric_key == "score":
    np.testing.assert_allclose([row["score"] for row in rows], [s for _, s in outputs],
                               rtol=1e-4, atol=1e-4)
  else:
    assert [row["prediction"] for row in rows] == outputs


def own_evaluation(checkpoint, task, num_examples, postprocess=True, shard=None):
  """(metrics, per-row outputs) of the project's evaluation of a t5x checkpoint: the rank
  task's scores, or the generation task's greedy predictions, decoded to the end of the
  sequence as t5x does (postprocessed as seqio does for the metrics, or as text). `shard`
  (count, index): only those rows (as t5x.infer shards), and no metrics."""
  import jax  # pylint: disable=import-outside-toplevel
  import seqio  # pylint: disable=import-outside-toplevel
  from uncurl_jax.model import configs, decoder  # pylint: disable=import-outside-toplevel
  from uncurl_jax.model import partitioning  # pylint: disable=import-outside-toplevel
  from uncurl_jax.t5x_compat import checkpoints  # pylint: disable=import-outside-toplevel
  from uncurl_jax.train import evaluation  # pylint: disable=import-outside-toplevel
  params, _ = checkpoints.load_params(str(checkpoint))
  model = decoder.SMoEDecoder(configs.get("tiny", num_experts=4))
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  evaluator = evaluation.make_evaluator(
      mixture_or_task_name=task, task_feature_lengths={"inputs": 96, "targets": 32},
      num_examples=num_examples)
  outputs = evaluation.ModelOutputs(apply_fn=model.apply, mesh=mesh, batch_size=8,
                                    max_decode_steps=96 + 32, params=params)
  dataset, examples = (evaluator.cached_model_datasets[task],
                       evaluator.cached_task_datasets[task])
  metrics = None
  if shard is None:
    metrics = evaluation.task_metrics(evaluator, outputs, params)[task]
  else:
    dataset, examples = dataset.shard(*shard), examples.shard(*shard)
  if task.endswith("_rank"):
    return metrics, outputs.score_fn(dataset)
  seqio_task = seqio.get_mixture_or_task(task)
  texts = [seqio_task.output_features["targets"].vocabulary.decode(tokens)
           for _, tokens in outputs.predict_fn(dataset)]
  if not postprocess:
    return metrics, texts
  return metrics, [seqio_task.postprocess_fn(text, example=example, is_target=False)
                   for text, example in zip(texts, examples.as_numpy_iterator())]


def first_prompt(task, split):
  import seqio  # pylint: disable=import-outside-toplevel
  import uncurl_jax.tasks  # pylint: disable=import-outside-toplevel,unused-import
  dataset = seqio.get_mixture_or_task(task).get_dataset(
      sequence_length={"inputs": 96, "targets": 32}, split=split, shuffle=False, num_epochs=1)
  return next(dataset.as_numpy_iterator())["inputs_pretokenized"].decode()


def test_t5x_infer_decodes_the_task(workdir, finetuned):
  out = workdir / "infer"
  run("t5x.infer", t5x_args(
      "models/tiny.gin", "runs/infer.gin", CHECKPOINT_PATH=f'"{finetuned}"',
      INFER_OUTPUT_DIR=f'"{out}"', MIXTURE_OR_TASK_NAME='"synthetic_city_country"',
      NUM_EXPERTS=4, TASK_FEATURE_LENGTHS=PROMPT_LENGTHS, BATCH_SIZE=8, INFER_SHARDS=50),
      f"{out}.log")
  (path,) = glob.glob(str(out / "synthetic_city_country-predict.jsonl-00000-of-00050"))
  rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
  assert len(rows) >= 10
  assert rows[0]["inputs"]["inputs_pretokenized"] == first_prompt("synthetic_city_country",
                                                                  "validation")
  # The project's greedy decoder on the same checkpoint decodes the same strings.
  _, ours = own_evaluation(finetuned, "synthetic_city_country", num_examples=None,
                           postprocess=False, shard=(50, 0))
  assert [row["prediction"] for row in rows] == ours
