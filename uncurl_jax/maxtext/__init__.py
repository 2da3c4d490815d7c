"""MaxText MoE checkpoints: read, prune, write (`python -m uncurl_jax.maxtext.prune`).

Modules:
  checkpoints: the params of a MaxText orbax checkpoint (`<dir>/<step>/items`, params at
    `params/params/...`) as numpy arrays; params written back as a params-only checkpoint
    that MaxText restores through `load_parameters_path`.
  prune: `python -m uncurl_jax.maxtext.prune`, pruning such a checkpoint with a plan or
    with router logits (`.npz`).
  reference: Flax modules that name, shape and scan MaxText's MoE parameters as MaxText
    does (Mixtral, Qwen3-MoE, DeepSeek blocks) and compute its routed MoE; the examples
    and tests build their trees with them.
  example: `python -m uncurl_jax.maxtext.example`, a small generated MaxText checkpoint and
    router logits to run the command on.

Nothing here imports MaxText (it needs Python >= 3.12); docs/pruning.md says which
MaxText commit the paths and shapes were checked against.

Example:
  >>> from uncurl_jax import maxtext
  >>> params, step = maxtext.load_params("/tmp/mt_example/checkpoint")
  >>> items, plan = maxtext.prune_checkpoint("/tmp/mt_example/checkpoint", "/tmp/mt_pruned",
  ...     num_experts=4, router_logits="/tmp/mt_example/router_logits.npz", router="merge")
"""

import importlib

from uncurl_jax.maxtext import checkpoints
from uncurl_jax.maxtext import reference
from uncurl_jax.maxtext.checkpoints import load_params
from uncurl_jax.maxtext.checkpoints import save_params
from uncurl_jax.maxtext.reference import MoeDecoderConfig

# The command modules (`python -m uncurl_jax.maxtext.prune`, `.example`) are imported on
# first use, not here: runpy warns when `-m` runs a module the package already imported.
_LAZY = {"prune": ("prune", None), "example": ("example", None),
         "prune_checkpoint": ("prune", "prune_checkpoint"),
         "make_example": ("example", "make_example")}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'uncurl_jax.maxtext' has no attribute {name!r}")
  module, attribute = _LAZY[name]
  module = importlib.import_module(f"uncurl_jax.maxtext.{module}")
  return module if attribute is None else getattr(module, attribute)


__all__ = [
    "MoeDecoderConfig",
    "checkpoints",
    "example",
    "load_params",
    "make_example",
    "prune",
    "prune_checkpoint",
    "reference",
    "save_params",
]
