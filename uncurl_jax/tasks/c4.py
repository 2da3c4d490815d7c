"""C4 language modelling (pretraining data), named as T5 names its C4 tasks.

- `c4_v310_full_lm`: `c4/en:3.1.0` text -> `targets`, tokenized, cache
  placeholder, EOS after every document, documents concatenated and split into
  pieces of exactly the `targets` length (T5's `c4_v220_full_lm` recipe on the
  C4 version TFDS 4.9.10 can build; it cannot build 3.0.1).
- `c4_v310_full_lm_empty_inputs`: the same with an empty `inputs` feature, so it
  can share a mixture with prompt tasks (the FLAN mixture's share of C4).

Example:
  >>> import seqio, uncurl_jax.tasks
  >>> ds = seqio.get_dataset("c4_v310_full_lm", {"targets": 1024}, dataset_split="train",
  ...                        feature_converter=seqio.DecoderFeatureConverter(pack=True))
"""

from __future__ import annotations

import seqio

from uncurl_jax.tasks import preprocessors
from uncurl_jax.tasks import vocab

C4_TFDS_NAME = "c4/en:3.1.0"
C4_SPLITS = ("train", "validation")
C4_FULL_LM = "c4_v310_full_lm"
C4_FULL_LM_EMPTY_INPUTS = "c4_v310_full_lm_empty_inputs"


def register(vocabulary: seqio.Vocabulary) -> list[str]:
  """Registers the two C4 tasks with `vocabulary`; returns their names.

  Example:
    >>> register(seqio.ByteVocabulary())
    ['c4_v310_full_lm', 'c4_v310_full_lm_empty_inputs']
  """
  source = seqio.TfdsDataSource(tfds_name=C4_TFDS_NAME, splits=C4_SPLITS)
  vocab.add_task(C4_FULL_LM, source=source, output_features=vocab.lm_features(vocabulary),
                 preprocessors=preprocessors.lm_pipeline("text"), metric_fns=[])
  vocab.add_task(C4_FULL_LM_EMPTY_INPUTS, source=source,
                 output_features=vocab.prompt_features(vocabulary),
                 preprocessors=preprocessors.lm_pipeline("text", empty_inputs=True),
                 metric_fns=[])
  return [C4_FULL_LM, C4_FULL_LM_EMPTY_INPUTS]
