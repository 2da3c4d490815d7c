r"""Prune a Hugging Face MoE checkpoint for a task, one layer at a time.

`prune_checkpoint` streams: it reads one MoE layer's router and experts from the
safetensors, plans that layer (`pruning.plan_pruning`, with the task's router logits or
expert statistics) or takes its plan, applies it (`pruning.apply_plan`) and writes the
layer's shard before reading the next, so memory holds about one layer. Every other tensor
is copied unchanged, in shards of at most `copy_shard_bytes`. The result is a checkpoint
in the per-expert layout (which transformers 4 and 5 and vLLM read), its config's expert
count set to D (`num_experts_per_tok` at most D), its tokenizer and other files copied, and
the plan beside it (`uncurl_plan.json`). It is written to a temporary sibling directory
and renamed at the end: a failure leaves no half-written output.

`python -m uncurl_jax.hf.prune` is the command (see `docs/checkpoints.md`):

  python -m uncurl_jax.hf.prune --model=DIR --num_experts=8 --method=uncurl \
      --router=merge --task_text=task.txt --output=DIR_PRUNED

Router logits come from the JAX forward over the task's text (`--task_text` FILE, one
example per line, or `--task` a seqio task), or from an `.npz` (`--logits`, one [T, E]
array per MoE layer named `layers_<i>/mlp`: DeepSeek, which has no JAX forward here), or a
saved plan is applied (`--plan`).

Example:
  >>> plan = prune_checkpoint("Qwen3-30B-A3B", "Qwen3-pruned", logits, 64,
  ...                         method="uncurl", router="merge")
  >>> print(plan.summary())
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import flax
import numpy as np
from safetensors.numpy import save_file
import tqdm

from uncurl_jax import checks
from uncurl_jax import pruning
from uncurl_jax import staging
from uncurl_jax.hf import checkpoint as checkpoint_lib
from uncurl_jax.hf import families
from uncurl_jax.pruning import methods as methods_lib
from uncurl_jax.pruning import validate
from uncurl_jax.pruning.features import ExpertStats

PLAN_FILE = "uncurl_plan.json"
_OWN_FILES = ("config.json", checkpoint_lib.INDEX_FILE)


def layer_name(layer: int) -> str:
  """The name of MoE layer `layer` in router logits and plans: 'layers_<i>/mlp'."""
  return f"layers_{layer}/mlp"


def prune_checkpoint(source: str | os.PathLike, output: str | os.PathLike,
                     logits: Mapping[str, Any] | None = None,
                     num_experts: int | Mapping[str, int] | None = None, *,
                     plan: pruning.PrunePlan | None = None,
                     method: str = methods_lib.DEFAULT_METHOD, router: str | None = None,
                     cluster: str = "spectral", features: str = "router_logits",
                     seed: int = 0, top_k: int = 1, allow_uneven: bool = False,
                     num_workers: int = 0,
                     copy_shard_bytes: int = 512 << 20, progress: bool = True,
                     ) -> pruning.PrunePlan:
  """Prunes the checkpoint in `source` into `output`, one MoE layer at a time.

  Args:
    source: A Hugging Face checkpoint directory (`checkpoint.Checkpoint`).
    output: The directory to write; it must not exist or be empty.
    logits: {'layers_<i>/mlp': [tokens, E] router logits} of every MoE layer (or
      `ExpertStats`, for methods that need them), as `collect_router_logits` returns
      them on `HfMoeDecoder`; None with `plan`.
    num_experts: Experts to keep: an int for every layer, a {layer: int} mapping (uneven
      counts need `allow_uneven`), or None for the paper's default.
    plan: A `PrunePlan` to apply instead of planning (e.g. `PrunePlan.from_json`).
    method, router, cluster, features, seed, top_k: As `pruning.plan_pruning`.
    allow_uneven: Write layers with different expert counts, which stock transformers
      and vLLM cannot load (the config then holds the largest count and
      `num_experts_per_layer`).
    num_workers: Assignment-solver threads of the aligning methods (`plan_pruning`).
      Each holds up to 4 cost matrices of d_ff^2 floats, so the default, 0 (one
      alignment at a time), keeps memory to about one layer; more is faster on many
      cores.
    copy_shard_bytes: Largest shard of copied (non-MoE) tensors.
    progress: Show a progress bar over the layers.

  Returns:
    The plan of every MoE layer (also written to `output/uncurl_plan.json`).

  Raises:
    ValueError, TypeError: Before any work: a source that is not a supported
      checkpoint, an output that exists and is not empty, logits or a plan that do not
      fit the MoE layers, a count outside [top-k, E], uneven counts without
      `allow_uneven`, "mc_smoe" (it allocates experts across all layers at once), or,
      for DeepSeek, a count not divisible by `n_group`.
  """
  ckpt = checkpoint_lib.Checkpoint(source)
  output = os.path.abspath(os.fspath(output))
  _check_output(output, ckpt.directory)
  names = {layer_name(i): i for i in ckpt.moe_layers}
  targets = _check_request(ckpt, names, logits, num_experts, plan, method, allow_uneven,
                           router=router, cluster=cluster, features=features)
  copy_shard_bytes = checks.integer("copy_shard_bytes", copy_shard_bytes, low=1)
  num_workers = checks.integer("num_workers", num_workers, low=0)

  with staging.staged_directory(output) as staged:
    os.makedirs(staged)
    layer_plans = _write_shards(
        ckpt, staged, names, targets, logits, plan, copy_shard_bytes, progress,
        dict(method=method, router=router, cluster=cluster, features=features, seed=seed,
             top_k=top_k, num_workers=num_workers))
    first = next(iter(layer_plans.values()))
    full_plan = dataclasses.replace(first, layers={n: p.layers[n]
                                                   for n, p in layer_plans.items()})
    counts = full_plan.num_experts
    config = ckpt.family.with_num_experts(ckpt.config, max(counts.values()))
    if len(set(counts.values())) > 1:
      config["num_experts_per_layer"] = {str(names[n]): c for n, c in counts.items()}
    with open(os.path.join(staged, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(staged, PLAN_FILE), "w") as f:
      f.write(full_plan.to_json())
    for entry in sorted(os.listdir(ckpt.directory)):
      path = os.path.join(ckpt.directory, entry)
      if (os.path.isfile(path) and not entry.endswith(".safetensors")
          and entry not in _OWN_FILES and entry != PLAN_FILE):
        shutil.copy2(path, os.path.join(staged, entry))
  return full_plan


def _check_output(output: str, source: str) -> None:
  if os.path.abspath(source) == output:
    raise ValueError(f"the output {output!r} is the source checkpoint")
  checks.new_dir(output, "the output")


def _check_request(ckpt, names, logits, num_experts, plan, method, allow_uneven, *,
                   router=None, cluster="spectral", features="router_logits"
                   ) -> dict[str, int] | None:
  """Checks everything about the request that can be checked before the work."""
  _check_prunable(ckpt)
  if (logits is None) == (plan is None):
    raise ValueError("give either router logits (or expert statistics) or a plan, not "
                     f"{'both' if plan is not None else 'neither'}")
  num = ckpt.num_experts
  top_k = int(ckpt.config.get("num_experts_per_tok", 1))
  if plan is not None:
    if not isinstance(plan, pruning.PrunePlan):
      raise TypeError(f"plan must be a PrunePlan, got {type(plan).__name__}")
    _same_layers("the plan", set(plan.layers), names)
    for name, layer_plan in plan.layers.items():
      if layer_plan.num_experts != num:
        raise ValueError(f"the plan of {name} is for {layer_plan.num_experts} experts; the "
                         f"checkpoint has {num}")
    width = _expert_width(ckpt)
    for layer_plan in plan.layers.values():
      layer_plan.permutations(width)  # raises on a plan made for another expert width
    router = plan.router
    counts = plan.num_experts
  else:
    if not isinstance(logits, Mapping):
      raise TypeError(f"logits must be a mapping {{'layers_<i>/mlp': [tokens, E]}}, got "
                      f"{type(logits).__name__}")
    _same_layers("the router logits", set(logits), names)
    for name, value in logits.items():
      array = value.logits if isinstance(value, ExpertStats) else value
      shape = np.shape(array)
      if len(shape) != 2 or shape[1] != num or shape[0] < 1:
        raise ValueError(f"router logits of {name} must be [tokens >= 1, {num}], got {shape}")
    has_stats = all(isinstance(v, ExpertStats) for v in logits.values())
    _, router = validate.options(method, cluster, router, has_logits=True,
                                 has_stats=has_stats, has_pretrained=False,
                                 features_from=features)
    if methods_lib.get(method).uneven_counts:
      raise ValueError(f"method {method!r} allocates experts over all layers at once; the "
                       "layer-by-layer pruner does not run it")
    if num_experts is None:
      num_experts = pruning.default_num_experts(num)
    if isinstance(num_experts, Mapping):
      _same_layers("num_experts", set(num_experts), names)
      counts = {n: checks.integer(f"num_experts[{n!r}]", c) for n, c in num_experts.items()}
    else:
      counts = {n: checks.integer("num_experts", num_experts) for n in names}
  for name, count in counts.items():
    if not top_k <= count <= num:
      raise ValueError(f"{name}: {count} experts is outside [top-k {top_k}, E {num}]: a "
                       f"layer keeps at least num_experts_per_tok experts and at most E")
  if router == "bind":
    raise ValueError("router 'bind' keeps all E router rows bound to fewer experts, which a "
                     "Hugging Face config cannot express; use anchor, merge or reinit")
  if len(set(counts.values())) > 1 and not allow_uneven:
    raise ValueError(f"uneven expert counts per layer {sorted(set(counts.values()))}: stock "
                     "transformers and vLLM load one count for every layer; pass "
                     "allow_uneven=True (--allow_uneven) to write them anyway")
  _check_groups(ckpt, counts)
  return counts if plan is None else None


def _expert_width(ckpt) -> int:
  """The hidden width of the routed experts (from a down projection's shape)."""
  prefix = ckpt.block_prefix(ckpt.moe_layers[0])
  down = ckpt.family.experts[2]
  name = f"{prefix}.experts.0.{down}.weight"
  if name in ckpt.files:
    return ckpt.shape(name)[1]                                   # [H, I]
  return ckpt.shape(f"{prefix}.experts.down_proj")[2]            # fused [E, H, I]


def _check_prunable(ckpt) -> None:
  """Refuses checkpoints this pruner would write wrongly: quantized weights, and tensors
  under an MoE block that it does not know how to prune (they would be dropped)."""
  if ckpt.config.get("quantization_config"):
    raise ValueError(f"{ckpt.directory}: quantized checkpoints (quantization_config) are not "
                     "supported; prune the unquantized weights")
  family, num = ckpt.family, ckpt.num_experts
  for layer in ckpt.moe_layers:
    prefix = ckpt.block_prefix(layer)
    known = {f"{prefix}.gate.weight", f"{prefix}.experts.gate_up_proj",
             f"{prefix}.experts.down_proj"}
    if family.router_bias is not None:
      known.add(f"{prefix}.gate.{family.router_bias}")
    known.update(f"{prefix}.experts.{j}.{proj}.weight" for j in range(num)
                 for proj in family.experts)
    unknown = sorted(set(ckpt.moe_tensor_names(layer)) - known)
    if unknown:
      raise ValueError(f"{ckpt.directory}: MoE layer {layer} has tensors this pruner does not "
                       f"know how to prune (they would be lost): {unknown[:4]}"
                       f"{' ...' if len(unknown) > 4 else ''}")


def _check_groups(ckpt, counts: Mapping[str, int]) -> None:
  """DeepSeek's group-limited routing splits the experts in n_group equal groups (V3
  always, scoring a group by its top-2 experts; V2 with topk_method group_limited_greedy)."""
  config, model_type = ckpt.config, ckpt.family.model_type
  grouped = (model_type == "deepseek_v3" or (
      model_type == "deepseek_v2" and config.get("topk_method") == "group_limited_greedy"))
  groups = int(config.get("n_group") or 1)
  if not grouped or groups <= 1:
    return
  smallest = 2 if model_type == "deepseek_v3" else 1
  chosen_groups = int(config.get("topk_group") or groups)
  top_k = int(config.get("num_experts_per_tok", 1))
  bad = sorted({c for c in counts.values() if c % groups or c // groups < smallest
                or c // groups * chosen_groups < top_k})
  if bad:
    raise ValueError(f"{model_type}: the kept count {bad} must be a multiple of n_group="
                     f"{groups} with at least {smallest} experts per group and at least "
                     f"num_experts_per_tok={top_k} experts in the topk_group={chosen_groups} "
                     "groups a token chooses (group-limited routing splits the experts in "
                     "n_group equal groups)")


def _same_layers(what: str, given: set[str], names: Mapping[str, int]) -> None:
  missing, extra = sorted(set(names) - given), sorted(given - set(names))
  if missing or extra:
    raise ValueError(f"{what} must name every MoE layer of the checkpoint "
                     f"({sorted(names, key=names.get)}): missing {missing}, unknown {extra}")


class _ShardWriter:
  """Writes tensors to numbered shards (renamed `model-000NN-of-000MM` at the end)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.shards: list[str] = []
    self.weight_map: dict[str, str] = {}
    self.total_size = 0

  def write(self, tensors: Mapping[str, np.ndarray]) -> None:
    if not tensors:
      return
    name = f"shard-{len(self.shards):05d}.tmp"
    save_file(dict(tensors), os.path.join(self.directory, name), metadata={"format": "pt"})
    self.shards.append(name)
    for key, array in tensors.items():
      self.weight_map[key] = name
      self.total_size += array.nbytes

  def finish(self) -> None:
    count = len(self.shards)
    final = {}
    for i, name in enumerate(self.shards):
      final[name] = (checkpoint_lib.SINGLE_FILE if count == 1
                     else f"model-{i + 1:05d}-of-{count:05d}.safetensors")
      os.rename(os.path.join(self.directory, name), os.path.join(self.directory, final[name]))
    if count > 1:
      index = {"metadata": {"total_size": self.total_size},
               "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())}}
      with open(os.path.join(self.directory, checkpoint_lib.INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


def _write_shards(ckpt, directory, names, targets, logits, plan, copy_shard_bytes, progress,
                  options) -> dict[str, pruning.PrunePlan]:
  writer = _ShardWriter(directory)
  moe_names = {n for i in ckpt.moe_layers for n in ckpt.moe_tensor_names(i)}
  results: dict[str, pruning.PrunePlan] = {}
  start = time.perf_counter()
  with tqdm.tqdm(total=len(names) + 1, unit="layer", desc="prune", disable=not progress,
                 file=sys.stderr) as bar:
    pending: dict[str, np.ndarray] = {}
    size = 0
    for name in ckpt.files:  # every other tensor, unchanged
      if name in moe_names:
        continue
      array = ckpt.read(name)
      if pending and size + array.nbytes > copy_shard_bytes:
        writer.write(pending)
        pending, size = {}, 0
      pending[name] = array
      size += array.nbytes
    writer.write(pending)
    del pending
    bar.update(1)
    for path, layer in sorted(names.items(), key=lambda item: item[1]):
      tree = {f"layers_{layer}": {"mlp": ckpt.moe_layer(layer)}}  # numpy, in host memory
      dtypes = {k: v.dtype for k, v in flax.traverse_util.flatten_dict(tree).items()}
      if plan is None:
        layer_plan = pruning.plan_pruning(
            tree, {path: logits[path]}, {path: targets[path]}, layout=ckpt.family.layout,
            **options)
      else:
        layer_plan = dataclasses.replace(plan, layers={path: plan.layers[path]})
      pruned = pruning.apply_plan(tree, layer_plan)
      del tree
      writer.write(_hf_tensors(ckpt, layer, pruned, dtypes))
      del pruned
      results[path] = layer_plan
      bar.update(1)
      bar.set_postfix(layer=layer)
  writer.finish()
  logging.info("pruned %d MoE layers in %.1fs", len(names), time.perf_counter() - start)
  return results


def _hf_tensors(ckpt, layer: int, pruned: Mapping[str, Any], dtypes) -> dict[str, np.ndarray]:
  """The pruned layer under its on-disk names, per expert, in the source dtypes."""
  flat = flax.traverse_util.flatten_dict(pruned)
  cast = {k: np.asarray(v).astype(dtypes[k], copy=False) for k, v in flat.items()}
  root = (f"layers_{layer}", "mlp")
  prefix = f"model.layers.{layer}.{ckpt.family.blocks[0]}"
  tensors = {f"{prefix}.gate.weight": np.ascontiguousarray(cast[root + ("gate", "kernel")].T)}
  bias = ckpt.family.router_bias
  if bias is not None and root + ("gate", bias) in cast:
    tensors[f"{prefix}.gate.{bias}"] = cast[root + ("gate", bias)]
  for proj in ckpt.family.experts:
    stacked = cast[root + ("experts", proj)]
    for j in range(stacked.shape[0]):
      tensors[f"{prefix}.experts.{j}.{proj}.weight"] = np.ascontiguousarray(stacked[j].T)
  return tensors


# ----------------------------------------------------------------------------------------
# The command.

def define_flags() -> None:
  """The command's flags (defined when run as a program, so importing defines none)."""
  flags.DEFINE_string("model", None, "Hugging Face checkpoint directory (config.json, "
                      "safetensors, tokenizer.json).")
  flags.DEFINE_string("output", None, "Directory of the pruned checkpoint (must not exist "
                      "or be empty).")
  flags.DEFINE_integer("num_experts", None, "Experts to keep per MoE layer (default: the "
                       "paper's, 4x fewer up to 32 experts, 2x above).")
  flags.DEFINE_string("method", methods_lib.DEFAULT_METHOD,
                      "Pruning method (uncurl_jax.pruning.METHODS).")
  flags.DEFINE_string("router", None, "Router of the pruned layers: reinit (the paper's; "
                      "finetune before use), anchor or merge (default: the method's).")
  flags.DEFINE_string("cluster", "spectral", "Clustering of 'uncurl'.")
  flags.DEFINE_integer("seed", 0, "Seed of clustering and of a re-initialized router.")
  flags.DEFINE_string("task_text", None, "Text file of the task, one example per line.")
  flags.DEFINE_string("task", None, "A registered seqio task or mixture (its examples "
                      "decoded by its own vocabulary, re-tokenized by the model's).")
  flags.DEFINE_string("split", "validation", "Split of --task.")
  flags.DEFINE_string("logits", None, ".npz of router logits, one [T, E] array per MoE "
                      "layer named layers_<i>/mlp.")
  flags.DEFINE_string("plan", None, "A saved plan (uncurl_plan.json) to apply.")
  flags.DEFINE_integer("max_tokens", 65536, "Task tokens whose logits are used.")
  flags.DEFINE_integer("batch_size", 8, "Rows per forward batch.")
  flags.DEFINE_integer("max_length", 512, "Tokens per row (longer rows are cut).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Compute dtype of the logits pass.")
  flags.DEFINE_boolean("allow_uneven", False, "Allow different counts per layer.")
  flags.DEFINE_integer("num_workers", 0, "Alignment solver threads (0: one alignment at a "
                       "time, the least memory; more: faster on many cores).")
  flags.DEFINE_boolean("verbose", False, "Show INFO logs (else warnings and errors only).")
  flags.DEFINE_boolean("debug", False, "Show the traceback of an error (else one message).")


# What a user's mistake raises: one line and exit code 2 (`--debug`: the traceback).
USER_ERRORS = (ValueError, TypeError, OSError, KeyError)


def router_logits_for(model_dir: str, texts: Sequence[str] | Any, *, max_tokens: int,
                      batch_size: int, max_length: int, dtype: str = "float32",
                      progress: bool = True) -> dict[str, np.ndarray]:
  """The router logits of every MoE layer on `texts` (the JAX forward; holds the model)."""
  from uncurl_jax.hf import modeling  # pylint: disable=import-outside-toplevel
  from uncurl_jax.hf import task_tokens  # pylint: disable=import-outside-toplevel
  from uncurl_jax.model import collect  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint_lib.Checkpoint(model_dir)
  if not ckpt.family.forward:
    raise ValueError(f"{ckpt.family.model_type} has no JAX forward here: give --logits "
                     "(router logits computed elsewhere) or --plan")
  tokenizer = task_tokens.load_tokenizer(model_dir, vocab_size=int(ckpt.config["vocab_size"]))
  config, params = checkpoint_lib.load(model_dir, dtype=dtype)
  batches = task_tokens.text_batches(tokenizer, texts, batch_size=batch_size,
                                     max_length=max_length)
  return collect.collect_router_logits(modeling.HfMoeDecoder(config), params, batches,
                                       max_tokens=max_tokens, progress=progress)


def main(argv: Sequence[str]) -> pruning.PrunePlan:
  """The command: prune --model into --output (see the module docstring).

  It does not import `uncurl_jax.cli` (which starts TensorFlow for the data pipeline):
  TensorFlow is imported only for --task.
  """
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
    for name in ("model", "output"):
      if FLAGS[name].value is None:
        raise ValueError(f"--{name} is required")
    sources = [name for name in ("task_text", "task", "logits", "plan")
               if FLAGS[name].value is not None]
    if len(sources) != 1:
      raise ValueError("give exactly one of --task_text, --task, --logits, --plan; got "
                       f"{sources or 'none'}")
    ckpt = checkpoint_lib.Checkpoint(FLAGS.model)  # checks the source before any work
    _check_output(os.path.abspath(FLAGS.output), ckpt.directory)
    if FLAGS.num_experts is not None and not (
        int(ckpt.config.get("num_experts_per_tok", 1)) <= FLAGS.num_experts <= ckpt.num_experts):
      raise ValueError(f"--num_experts={FLAGS.num_experts} is outside [top-k "
                       f"{ckpt.config.get('num_experts_per_tok', 1)}, E {ckpt.num_experts}]")
    logits = plan = None
    if FLAGS.plan is not None:
      with open(FLAGS.plan) as f:
        plan = pruning.PrunePlan.from_json(f.read())
    elif FLAGS.logits is not None:
      with np.load(FLAGS.logits) as archive:
        logits = {name: archive[name] for name in archive.files}
    else:
      if FLAGS.task_text is not None:
        with open(FLAGS.task_text) as f:
          texts = [line.rstrip("\n") for line in f]
      else:
        from uncurl_jax.hf import task_tokens  # pylint: disable=import-outside-toplevel
        texts = task_tokens.seqio_texts(FLAGS.task, split=FLAGS.split)
      logits = router_logits_for(ckpt.directory, texts, max_tokens=FLAGS.max_tokens,
                                 batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
                                 dtype=FLAGS.dtype)
    result = prune_checkpoint(ckpt.directory, FLAGS.output, logits, FLAGS.num_experts, plan=plan,
                              method=FLAGS.method, router=FLAGS.router,
                              cluster=FLAGS.cluster, seed=FLAGS.seed,
                              allow_uneven=FLAGS.allow_uneven, num_workers=FLAGS.num_workers)
  except USER_ERRORS as error:
    if FLAGS.debug:
      raise
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    print(f"uncurl_jax.hf.prune: error: {type(error).__name__}: {message}", file=sys.stderr)
    sys.exit(2)
  print(result.summary())
  if result.router == "reinit":
    print("note: the router was re-initialized (the paper's recipe): finetune the pruned "
          "model before use; --router=merge or anchor keeps a working router")
  print(f"pruned checkpoint: {os.path.abspath(FLAGS.output)}")
  return result


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(lambda argv: main(argv) and None)
