"""Data: the seqio -> batches pipeline (`pipeline`) and the synthetic corpus.

Modules: `pipeline`, `corpus` (the multi-domain text corpus), `corpus_tasks` (its
classification questions).

`pipeline` imports seqio and TensorFlow; the corpus modules are pure numpy.

Example:
  >>> from uncurl_jax.data import pipeline
  >>> ds = pipeline.train_dataset(mixture_or_task_name="synthetic_lm",
  ...                             task_feature_lengths={"targets": 128},
  ...                             global_batch_size=16, seed=0)
"""
