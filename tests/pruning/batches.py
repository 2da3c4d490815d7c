"""Task batches for the pruning tests: random tokens, rows ending in padding."""

import numpy as np


def padded_batches(*, vocab_size, batch, length, num_batches, seed, min_length):
  """Batches whose rows end with padding (loss weight 0, token 0) of varying length."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(num_batches):
    tokens = rng.integers(1, vocab_size, (batch, length))
    lengths = rng.integers(min_length, length + 1, batch)
    weights = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    tokens = tokens * weights.astype(tokens.dtype)
    batches.append({"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
                    "decoder_loss_weights": weights})
  return batches
