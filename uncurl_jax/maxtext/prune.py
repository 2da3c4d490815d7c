r"""`python -m uncurl_jax.maxtext.prune`: prune a MaxText MoE checkpoint for a task.

Reads the params of a MaxText orbax checkpoint (scanned or unscanned layers; Mixtral's
`MoeBlock_0`, Qwen3-MoE's `moe_block`, DeepSeek's `DeepSeekMoeBlock_0/MoeBlock_0` with its
routed bias; `model.detect_layout` tells which), prunes every routed MoE layer to the same
D experts, with a plan (`--plan`, a `PrunePlan` JSON) or by a method on the task's router
logits (`--router_logits`, an .npz), and writes a params-only MaxText checkpoint that
MaxText restores with `load_parameters_path=<output_dir>/<step>/items` and
`num_experts=D`, plus the plan (`<output_dir>/prune_plan.json`). Shared experts and
every other parameter are copied unchanged. All of it is written into a temporary
directory beside `--output_dir`, renamed into place at the end: a failed run leaves
nothing there.

Router logits (.npz): the gate logits `x @ gate/kernel` of each MoE layer on the task's
tokens, keyed by the layer's path in the params collection: for a scanned block one
[L, tokens, E] array keyed by the block ('decoder/layers/MoeBlock_0') or one [tokens, E]
array per layer ('decoder/layers/MoeBlock_0[3]'); unscanned layers by their path
('decoder/layers_3/MoeBlock_0').

Example:
  python -m uncurl_jax.maxtext.example --output_dir=/tmp/mt_example
  python -m uncurl_jax.maxtext.prune --checkpoint_path=/tmp/mt_example/checkpoint \
    --router_logits=/tmp/mt_example/router_logits.npz --num_experts=4 \
    --router=merge --output_dir=/tmp/mt_pruned
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import numpy as np

from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax import staging
from uncurl_jax.maxtext import checkpoints
from uncurl_jax.model import layout as layout_lib

PROGRAM = "uncurl_jax.maxtext.prune"
# What a user's mistake raises: a short message and exit code 2 (--debug: the traceback).
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, flags.Error)
USAGE_EXIT_CODE = 2
# The routed-MoE paths of MaxText's block, whatever biases a model has.
_MAXTEXT_PATHS = ("router_kernel", "gate_kernel", "wi_kernel", "wo_kernel")


def maxtext_layout(params: Mapping[str, Any]) -> layout_lib.MoeLayout:
  """The layout of a MaxText params collection (`detect_layout`), refusing other trees."""
  layout = model_lib.detect_layout(params)
  if any(getattr(layout, f) != getattr(model_lib.MAXTEXT_LAYOUT, f) for f in _MAXTEXT_PATHS):
    raise ValueError(f"the checkpoint's MoE layers are not MaxText's routed blocks (gate/"
                     f"kernel, wi_0, wi_1, wo): detect_layout found {layout}")
  return layout


def read_logits(path: str) -> dict[str, np.ndarray]:
  """{key: array} of an .npz file of router logits."""
  if not os.path.isfile(path):
    raise ValueError(f"--router_logits {path!r} is not a file")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except (ValueError, OSError) as error:
    raise ValueError(f"--router_logits {path!r} is not an .npz file of arrays: {error}") \
        from None


def prune_checkpoint(checkpoint_path: str, output_dir: str, *,
                     num_experts: int | None = None,
                     router_logits: str | Mapping[str, Any] | None = None,
                     plan: str | pruning.PrunePlan | None = None,
                     method: str = pruning.methods.DEFAULT_METHOD, router: str | None = None,
                     cluster: str = "spectral", seed: int = 0, top_k: int = 1
                     ) -> tuple[str, pruning.PrunePlan]:
  """Prunes a MaxText checkpoint; returns (the new checkpoint's item directory, plan).

  Args:
    checkpoint_path: `<dir>`, `<dir>/<step>` or `<dir>/<step>/items`
      (`checkpoints.resolve_items`).
    output_dir: A new directory: `<output_dir>/<step>/items` and `prune_plan.json`.
    num_experts: D, the experts every MoE layer keeps (MaxText has one `num_experts`).
    router_logits: An .npz path or a mapping (see the module docstring).
    plan: A `PrunePlan` or the path of its JSON; then num_experts, router_logits and the
      method's options must not be given.
    method, router, cluster, seed, top_k: As `pruning.plan_pruning`'s.

  Raises:
    ValueError, TypeError: Bad input, before anything is written.
  """
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  if os.path.exists(output_dir):
    raise ValueError(f"--output_dir {output_dir!r} exists; give a new directory")
  if plan is not None:
    if num_experts is not None or router_logits is not None:
      raise ValueError("give --plan alone, or --num_experts with --router_logits (a plan "
                       "already holds the counts and the decisions)")
    if isinstance(plan, str):
      with open(plan) as f:
        plan = pruning.PrunePlan.from_json(f.read())
    if not isinstance(plan, pruning.PrunePlan):
      raise TypeError(f"plan must be a PrunePlan or its JSON path, got {type(plan).__name__}")
  elif num_experts is None:
    raise ValueError("--num_experts is required (MaxText restores the pruned checkpoint with "
                     "num_experts set to it), or give --plan")
  params, step = checkpoints.load_params(checkpoint_path)
  layout = maxtext_layout(params)
  if plan is None:
    logits = read_logits(router_logits) if isinstance(router_logits, str) else router_logits
    if router == "bind":
      raise ValueError("router 'bind' keeps all E router columns, which MaxText's RoutedMoE "
                       "cannot hold (one column per expert); use reinit, anchor or merge")
    plan = pruning.plan_pruning(params, logits, num_experts, method=method, router=router,
                                cluster=cluster, seed=seed, top_k=top_k, layout=layout)
  _check_plan_for_maxtext(plan)
  small = pruning.apply_plan(params, plan)
  del params
  with staging.staged_directory(output_dir) as staged:
    checkpoints.save_params(staged, small, step=step)
    with open(os.path.join(staged, "prune_plan.json"), "w") as f:
      f.write(plan.to_json())
  return os.path.join(output_dir, str(step), checkpoints.ITEM), plan


def _check_plan_for_maxtext(plan: pruning.PrunePlan) -> None:
  """MaxText has one `num_experts` for all MoE layers and one router column per expert."""
  counts = plan.num_experts
  if len(set(counts.values())) > 1:
    raise ValueError(f"the plan keeps different expert counts per layer {counts}; MaxText "
                     "restores every MoE layer with one num_experts")
  if plan.router == "bind":
    raise ValueError("the plan's router 'bind' keeps all E router columns, which MaxText's "
                     "RoutedMoE cannot hold; plan with reinit, anchor or merge")


def _define_flags(flag_values: flags.FlagValues) -> None:
  define = lambda kind, name, default, help_: getattr(flags, f"DEFINE_{kind}")(
      name, default, help_, flag_values=flag_values)
  define("string", "checkpoint_path", None, "MaxText checkpoint: <dir> (its newest step), "
         "<dir>/<step>, or <dir>/<step>/items.")
  define("string", "output_dir", None, "A new directory for the pruned checkpoint "
         "(<output_dir>/<step>/items) and prune_plan.json.")
  define("integer", "num_experts", None, "Experts every MoE layer keeps (MaxText's "
         "num_experts for the pruned model).")
  define("string", "router_logits", None, ".npz of the MoE layers' gate logits on the task: "
         "[L, tokens, E] per scanned block path, or [tokens, E] per layer "
         "('decoder/layers/MoeBlock_0[3]').")
  define("string", "plan", None, "A PrunePlan JSON to apply instead of planning.")
  define("string", "method", pruning.methods.DEFAULT_METHOD, "Pruning method "
         "(uncurl_jax.pruning.METHODS; not mc_smoe, whose counts vary per layer).")
  define("string", "router", None, "Router of the pruned layers: reinit, anchor or merge "
         "(default: the method's).")
  define("string", "cluster", "spectral", "Clustering of uncurl: spectral, kmeans, "
         "agglomerative.")
  define("integer", "seed", 0, "Seed of clustering and of a re-initialized router.")
  define("integer", "top_k", 1, "Router choices per token counted in the selection "
         "frequencies (1: first choices, the paper's; MaxText's num_experts_per_tok: all).")
  define("bool", "debug", False, "Show the traceback of an error (else one message).")
  define("bool", "verbose", False, "Show orbax's and absl's INFO logs.")


_KNOWN_WARNINGS = ("ts_context=None", "transformations API", "Metadata file does not exist",
                   "_CHECKPOINT_METADATA")


def _quiet(record: std_logging.LogRecord) -> bool:
  return not any(known in record.getMessage() for known in _KNOWN_WARNINGS)


def main(argv: Sequence[str]) -> int:
  """Runs the command on `argv` (argv[0] is the program); returns the exit code."""
  flag_values = flags.FlagValues()
  _define_flags(flag_values)
  if any(arg in ("--help", "--helpfull", "-h") for arg in argv[1:]):
    print(__doc__ + "\nFlags:\n" + flag_values.get_help())
    return 0
  debug = "--debug" in argv[1:] or "--debug=true" in argv[1:]
  try:
    extra = flag_values(list(argv))[1:]
    if extra:
      raise ValueError(f"unexpected arguments: {extra}")
    if not flags.FLAGS.is_parsed():  # absl logging: no "before flag parsing" notice
      flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.INFO if flag_values.verbose else logging.WARNING)
    if not flag_values.verbose and _quiet not in std_logging.getLogger("absl").filters:
      std_logging.getLogger("absl").addFilter(_quiet)
    for name in ("checkpoint_path", "output_dir"):
      if flag_values[name].value is None:
        raise ValueError(f"--{name} is required")
    path, plan = prune_checkpoint(
        flag_values.checkpoint_path, flag_values.output_dir,
        num_experts=flag_values.num_experts, router_logits=flag_values.router_logits,
        plan=flag_values.plan, method=flag_values.method, router=flag_values.router,
        cluster=flag_values.cluster, seed=flag_values.seed, top_k=flag_values.top_k)
  except USER_ERRORS as error:
    if debug:
      raise
    lines = [line.strip() for line in str(error).splitlines() if line.strip()][:4]
    print(f"{PROGRAM}: error: {type(error).__name__}: {' '.join(lines)}", file=sys.stderr)
    return USAGE_EXIT_CODE
  kept = sorted(set(plan.num_experts.values()))[0]
  before = sorted({layer.num_experts for layer in plan.layers.values()})
  print(f"pruned {len(plan.layers)} MoE layers from {before} to {kept} experts "
        f"(method {plan.method}, router {plan.router})")
  print(f"pruned checkpoint: {path}")
  print(f"restore in MaxText with: load_parameters_path={path} num_experts={kept}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
