r"""`python -m uncurl_jax.t5x_compat.prune`: prune a t5x checkpoint of this project's decoder.

Reads the params of a t5x checkpoint (trained with a gin/t5x/models/ file), collects each
MoE layer's router logits on a task's training examples, plans and applies the pruning
(`uncurl_jax.pruning`), and writes the pruned params as a t5x checkpoint with the same step
(`OUTPUT_DIR/checkpoint_<step>`) plus the plan (`OUTPUT_DIR/prune_plan.json`). Finetune it
with gin/t5x/runs/finetune.gin (+ router_warmup.gin) and `--gin.NUM_EXPERTS=<kept>`.

Example:
  python -m uncurl_jax.t5x_compat.prune --checkpoint_path=/tmp/t5x_tiny/checkpoint_40 \
    --output_dir=/tmp/t5x_tiny_pruned --model=tiny \
    --mixture_or_task_name=synthetic_city_country \
    "--task_feature_lengths={'inputs': 96, 'targets': 32}" --num_experts=4
"""

from __future__ import annotations

import ast
import os
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.t5x_compat import checkpoints

_CHECKPOINT = flags.DEFINE_string("checkpoint_path", None, "t5x checkpoint_<step> directory "
                                  "(or a model directory: its newest checkpoint).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the pruned checkpoint goes.")
_MODEL = flags.DEFINE_string("model", None, f"Preset of the checkpoint's model "
                             f"({', '.join(configs.PRESETS)}), as its gin/t5x/models/ file.")
_TASK = flags.DEFINE_string("mixture_or_task_name", None, "seqio task to prune for.")
_LENGTHS = flags.DEFINE_string("task_feature_lengths", "{'inputs': 224, 'targets': 32}",
                               "Python dict of the task's feature lengths.")
_EXPERTS = flags.DEFINE_integer("num_experts", None, "Experts to keep per MoE layer "
                                "(default: the paper's, 4x fewer up to 32 experts, 2x above).")
_METHOD = flags.DEFINE_string("method", pruning.methods.DEFAULT_METHOD,
                              "Pruning method (uncurl_jax.pruning.METHODS).")
_ROUTER = flags.DEFINE_string("router", None, "Router of the pruned layers: reinit, anchor or "
                              "merge (default: the method's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of clustering and of a re-initialized router.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 65536, "Task tokens whose logits are used.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size of the logits pass.")


def prune_checkpoint(checkpoint_path: str, output_dir: str, *, model: str,
                     mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                     num_experts: int | None = None,
                     method: str = pruning.methods.DEFAULT_METHOD,
                     router: str | None = None, seed: int = 0, max_tokens: int = 65536,
                     batch_size: int = 32) -> tuple[str, pruning.PrunePlan]:
  """Prunes a t5x checkpoint for a task; returns (pruned checkpoint directory, plan).

  Example:
    >>> path, plan = prune_checkpoint("/tmp/t5x_tiny", "/tmp/pruned", model="tiny",
    ...     mixture_or_task_name="synthetic_city_country",
    ...     task_feature_lengths={"inputs": 96, "targets": 32}, num_experts=4)
  """
  params, step = checkpoints.load_params(checkpoint_path)
  config = configs.with_expert_counts(configs.get(model), model_lib.expert_counts(params))
  batches = pipeline.eval_batches(
      mixture_or_task_name=mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      batch_size=batch_size, split="train", pack=False,
      max_batches=max(1, -(-max_tokens // batch_size)))
  logits = model_lib.collect_router_logits(decoder.SMoEDecoder(config), params, batches,
                                         max_tokens=max_tokens)
  plan = pruning.plan_pruning(params, logits, num_experts, method=method, router=router,
                              seed=seed, top_k=config.top_k, router_init_std=config.init_std)
  small = pruning.apply_plan(params, plan)
  path = checkpoints.save_params(output_dir, small, params_axes=_params_axes(
      pruning.pruned_config(config, plan)), step=step)
  with open(os.path.join(output_dir, "prune_plan.json"), "w") as f:
    f.write(plan.to_json())
  return path, plan


def _params_axes(config: configs.ModelConfig) -> Any:
  """The 'params_axes' collection of `config`'s decoder (shapes only, nothing computed)."""
  tokens = jnp.ones((1, config.max_length), jnp.int32)
  variables = jax.eval_shape(lambda: decoder.SMoEDecoder(config).init(
      jax.random.key(0), tokens, tokens, enable_dropout=False))
  return variables["params_axes"]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in (_CHECKPOINT, _OUTPUT, _MODEL, _TASK):
    if flag.value is None:
      raise app.UsageError(f"--{flag.name} is required")
  lengths = ast.literal_eval(_LENGTHS.value)
  if not isinstance(lengths, dict):
    raise app.UsageError(f"--task_feature_lengths must be a dict, got {_LENGTHS.value!r}")
  import uncurl_jax.tasks  # pylint: disable=import-outside-toplevel,unused-import
  path, plan = prune_checkpoint(
      _CHECKPOINT.value, os.path.abspath(_OUTPUT.value), model=_MODEL.value,
      mixture_or_task_name=_TASK.value, task_feature_lengths=lengths,
      num_experts=_EXPERTS.value, method=_METHOD.value, router=_ROUTER.value,
      seed=_SEED.value, max_tokens=_MAX_TOKENS.value, batch_size=_BATCH_SIZE.value)
  logging.info("%s", plan.summary())
  print(f"pruned checkpoint: {path} ({plan.num_experts})")


if __name__ == "__main__":
  app.run(main)
