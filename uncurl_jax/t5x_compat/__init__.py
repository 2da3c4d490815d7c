"""Running this project's decoder under t5x: the pieces that must be Python.

Every module here imports t5x (not on PyPI; see docs/training.md, "With t5x"), so
nothing else in `uncurl_jax` imports this package; the gin files under `gin/t5x/` and
the command `python -m uncurl_jax.t5x_compat.prune` do.

Modules:
  partitioning: `MoePjitPartitioner`, t5x.contrib.moe's partitioner with a CPU mesh that
    can hold more than one expert partition, and the mesh made current for the MoE
    layers' expert-parallel (`jax.shard_map`) path.
  checkpoints: read the params of a t5x checkpoint, write params as a t5x checkpoint
    that `t5x.train` finetunes from.
  prune: `python -m uncurl_jax.t5x_compat.prune`, task-specific pruning of a t5x
    checkpoint of this project's decoder.
"""
