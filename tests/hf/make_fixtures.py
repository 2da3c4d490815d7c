"""Writes tests/hf/fixtures/: tiny checkpoints made by transformers and its outputs on them.

The plain suite (no PyTorch) checks the JAX forward against these outputs; `pytest -m hf`
checks that they still equal what the installed transformers computes
(`test_transformers.py::test_committed_fixtures_are_current`). Regenerate with

  .venv-hf/bin/python tests/hf/make_fixtures.py

Each family's directory holds the checkpoint `save_pretrained` writes (per-expert
safetensors, config.json), a tiny word-level `tokenizer.json` (made with `tokenizers`, ids
below the vocabulary) and `expected.npz`: `tokens` [2, 12], transformers' `logits`
[2, 12, V] and `router_<k>` [24, E] of the k-th MoE layer.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models  # pylint: disable=wrong-import-position

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
WORDS = ("the a of to and in is was for on that with as by at from it an be this are or "
         "which his her their its not but have has had were been one two three city country "
         "river capital north south east west language people year first new old time "
         "large small town state world").split()


def make_tokenizer(path: str) -> None:
  """A word-level tokenizer: [UNK]=0, then WORDS (ids < tiny_models.VOCAB)."""
  import tokenizers
  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
  assert len(vocab) < tiny_models.VOCAB
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.save(path)


def main() -> None:
  for family in tiny_models.FAMILIES + tiny_models.PRUNE_ONLY:
    directory = os.path.join(FIXTURES, family)
    shutil.rmtree(directory, ignore_errors=True)
    model = tiny_models.make_model(family, seed=0)
    model.save_pretrained(directory)
    make_tokenizer(os.path.join(directory, "tokenizer.json"))
    if family in tiny_models.FAMILIES:
      ids = tiny_models.tokens(seed=0)
      outputs = tiny_models.reference_outputs(model, ids)
      np.savez(os.path.join(directory, "expected.npz"), tokens=ids, **outputs)
    print(family, sorted(os.listdir(directory)))


if __name__ == "__main__":
  main()
