r"""`python -m uncurl_jax.maxtext.example`: a small MaxText MoE checkpoint to prune.

Writes, under `--output_dir`:
  checkpoint/0/items   a params-only MaxText checkpoint of a randomly initialized model
                       (`reference.MoeDecoderConfig`: MaxText's paths and shapes, scanned
                       layers with the layer axis at 1 unless --noscan_layers);
  router_logits.npz    each routed block's gate logits on random inputs, keyed by the block's
                       path: [L, tokens, E] for a scanned block ('decoder/layers/MoeBlock_0'),
                       [tokens, E] per unscanned layer ('decoder/layers_0/MoeBlock_0').

Example:
  python -m uncurl_jax.maxtext.example --output_dir=/tmp/mt_example --model=deepseek
  python -m uncurl_jax.maxtext.prune --checkpoint_path=/tmp/mt_example/checkpoint \
    --router_logits=/tmp/mt_example/router_logits.npz --num_experts=4 \
    --output_dir=/tmp/mt_pruned
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from uncurl_jax.maxtext import checkpoints
from uncurl_jax.maxtext import reference


def make_example(output_dir: str, config: reference.MoeDecoderConfig | None = None, *,
                 tokens: int = 256, seed: int = 0) -> dict[str, Any]:
  """Writes the example checkpoint and router logits; returns their paths and the params.

  Returns:
    {'checkpoint': <output_dir>/checkpoint, 'items': its item directory, 'router_logits':
    the .npz path, 'params': the params collection, 'config': the config}.
  """
  config = config or reference.MoeDecoderConfig()
  output_dir = os.path.abspath(output_dir)
  params = reference.init_params(config, seed)
  x = np.random.default_rng(seed).normal(size=(tokens, config.emb_dim)).astype(np.float32)
  _, logits = reference.forward(config, params, x)
  items = checkpoints.save_params(os.path.join(output_dir, "checkpoint"), params, step=0)
  logits_path = os.path.join(output_dir, "router_logits.npz")
  np.savez(logits_path, **logits)
  return {"checkpoint": os.path.join(output_dir, "checkpoint"), "items": items,
          "router_logits": logits_path, "params": params, "config": config}


def main(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flag_values = flags.FlagValues()
  flags.DEFINE_string("output_dir", None, "Where the example goes (a new directory).",
                      flag_values=flag_values)
  flags.DEFINE_enum("model", "mixtral", list(reference.MODELS), "MaxText decoder block.",
                    flag_values=flag_values)
  flags.DEFINE_integer("num_experts", 8, "Experts per MoE layer.", flag_values=flag_values)
  flags.DEFINE_integer("num_layers", 4, "Decoder layers (DeepSeek: 1 dense, the rest MoE).",
                       flag_values=flag_values)
  flags.DEFINE_integer("emb_dim", 16, "MaxText's emb_dim.", flag_values=flag_values)
  flags.DEFINE_integer("moe_mlp_dim", 32, "MaxText's moe_mlp_dim.", flag_values=flag_values)
  flags.DEFINE_bool("scan_layers", True, "Scanned layers (MaxText's default).",
                    flag_values=flag_values)
  flags.DEFINE_integer("param_scan_axis", 1, "Layer axis of scanned parameters.",
                       flag_values=flag_values)
  flags.DEFINE_integer("tokens", 256, "Tokens of the router logits.", flag_values=flag_values)
  try:
    flag_values(argv)
    if flag_values.output_dir is None:
      raise ValueError("--output_dir is required")
    if os.path.exists(flag_values.output_dir):
      raise ValueError(f"--output_dir {flag_values.output_dir!r} exists; give a new directory")
    config = reference.MoeDecoderConfig(
        model=flag_values.model, num_experts=flag_values.num_experts,
        num_layers=flag_values.num_layers, emb_dim=flag_values.emb_dim,
        moe_mlp_dim=flag_values.moe_mlp_dim, scan_layers=flag_values.scan_layers,
        param_scan_axis=flag_values.param_scan_axis,
        routed_bias=flag_values.model == "deepseek")
    made = make_example(flag_values.output_dir, config, tokens=flag_values.tokens)
  except (flags.Error, ValueError, OSError) as error:
    print(f"uncurl_jax.maxtext.example: error: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"checkpoint: {made['checkpoint']} (load_parameters_path={made['items']})")
  print(f"router logits: {made['router_logits']}")


if __name__ == "__main__":
  main(sys.argv)
