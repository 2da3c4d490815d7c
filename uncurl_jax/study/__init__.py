"""The UNCURL study: pretrain, prune with every method, finetune, evaluate, report.

Modules: `config` (StudyConfig and its parts), `cache` (stages keyed by a hash of their
inputs), `stages` (router logits, pruning, scoring), `training` (stage training around the
one training loop), `runner` (which stages run, in order), `report` (CSV and tables),
`plots`, `run` (`run_study`: run and write the report; `python -m uncurl_jax.study`).

This package imports no module eagerly: most of them load seqio/TensorFlow.

Example:
  >>> from uncurl_jax.study import run
  >>> outcome = run.run_study(config)
"""
