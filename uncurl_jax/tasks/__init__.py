"""seqio tasks and mixtures of the project; importing this package registers them all.

- C4 language modelling: `c4_v310_full_lm` (+ `_empty_inputs`)       -> `c4.py`
- SuperGLUE prompts: `super_glue_<name>_v102` (+ `_rank`), mixtures
  `super_glue_v102_proportional`, `super_glue_v102_rank`             -> `superglue.py`
- FLAN-style pre-finetuning: `flan_<name>`, mixtures `flan_prefinetune`,
  `flan_prefinetune_no_c4`                                            -> `flan.py`
- Synthetic corpus (no download): `synthetic_lm[_<domain>]`,
  `synthetic_<task>` (+ `_rank`), mixtures `synthetic_tasks`,
  `synthetic_tasks_rank`, `synthetic_prefinetune`                     -> `synthetic.py`
- The world of memorized facts (the study's default, its own token ids):
  `facts_pretrain`, `facts_task` (+ `_dev`), the truth tasks `facts_truth`,
  `facts_truth_b` (+ `_rank`, `_dev_rank`, `_facts_dev`), the property tasks
  `facts_property`, `facts_property_b` (+ `_rank`, `_dev_rank`, `_facts_dev`,
  `_recall_judge`, `_dev_recall_judge`, mixture `_replay`)             -> `facts.py`

The vocabulary is `seqio.ByteVocabulary()` unless $UNCURL_SENTENCEPIECE_MODEL names
a SentencePiece model; `register_all_tasks(vocabulary)` re-registers every task
with another one.

Example:
  >>> import seqio
  >>> import uncurl_jax.tasks
  >>> ds = seqio.get_dataset("synthetic_city_country", {"inputs": 96, "targets": 16},
  ...                        feature_converter=seqio.DecoderFeatureConverter(pack=False))
"""

from __future__ import annotations

import seqio

from uncurl_jax.tasks import c4
from uncurl_jax.tasks import facts
from uncurl_jax.tasks import flan
from uncurl_jax.tasks import superglue
from uncurl_jax.tasks import synthetic
from uncurl_jax.tasks import vocab
from uncurl_jax.tasks.vocab import get_vocabulary

__all__ = ["get_vocabulary", "register_all_tasks"]


def register_all_tasks(vocabulary: seqio.Vocabulary | None = None) -> list[str]:
  """(Re-)registers every task and mixture with `vocabulary`; returns the task names.

  Args:
    vocabulary: None means `get_vocabulary()` (bytes, or the SentencePiece model
      named by $UNCURL_SENTENCEPIECE_MODEL).

  Example:
    >>> register_all_tasks(get_vocabulary("/path/to/spm.model"))
  """
  if vocabulary is None:
    vocabulary = vocab.get_vocabulary()
  names = c4.register(vocabulary)
  names += superglue.register(vocabulary)
  names += flan.register(vocabulary)  # after c4: its mixture holds the C4 share
  names += synthetic.register(vocabulary)
  names += facts.register()  # its own vocabulary: the world's token ids
  return names


register_all_tasks()
