"""Against transformers itself (marker hf; skipped without transformers and PyTorch).

For tiny random models that transformers creates for each family: the JAX forward and
router logits equal transformers' within 1e-5 (float32); pruning to E experts writes a
checkpoint whose transformers logits equal the original's; a top-1 model with permuted
duplicate expert pairs merged to E/2 by UNCURL with a merged router gives transformers
logits equal to the original's; every pruned checkpoint loads with `from_pretrained` and
generates. DeepSeek-V2/V3 round-trip through transformers' loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.hf import checkpoints as ckpts
from uncurl_jax import collect_router_logits
from uncurl_jax.hf import HfMoeDecoder
from uncurl_jax.hf import checkpoint as checkpoint_lib
from uncurl_jax.hf import prune as hf_prune

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tiny_models = pytest.importorskip("tests.hf.tiny_models")

pytestmark = pytest.mark.hf
TOLERANCE = 1e-5


def _torch_logits(directory: str, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    return model.eval()(torch.as_tensor(tokens)).logits.numpy()


def _generates(directory: str, tokens: np.ndarray) -> None:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  prompt = torch.as_tensor(tokens[:, :4])
  out = model.eval().generate(prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=3, do_sample=False, pad_token_id=0)
  assert tuple(out.shape) == (tokens.shape[0], 7)


@pytest.fixture(scope="module", params=tiny_models.FAMILIES)
def saved(request, tmp_path_factory):
  """(family, directory) of a random tiny model saved by transformers."""
  directory = str(tmp_path_factory.mktemp(request.param) / "model")
  tiny_models.make_model(request.param, seed=1).save_pretrained(directory)
  return request.param, directory


def test_jax_forward_equals_transformers(saved):
  family, directory = saved
  tokens = tiny_models.tokens(seed=3)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  want = tiny_models.reference_outputs(model.eval(), tokens)
  config, params = checkpoint_lib.load(directory)
  jax_model = HfMoeDecoder(config)
  np.testing.assert_allclose(np.asarray(jax_model.apply({"params": params}, tokens)),
                             want["logits"], atol=TOLERANCE, rtol=0)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
           "decoder_loss_weights": np.ones(tokens.shape)}
  router = collect_router_logits(jax_model, params, [batch], progress=False)
  for k, layer in enumerate(config.moe_layers):
    np.testing.assert_allclose(router[f"layers_{layer}/mlp"], want[f"router_{k}"],
                               atol=TOLERANCE, rtol=0)


def test_identity_pruning_keeps_transformers_logits(saved, tmp_path):
  _, directory = saved
  out = str(tmp_path / "out")
  num = checkpoint_lib.Checkpoint(directory).num_experts
  hf_prune.prune_checkpoint(directory, out, ckpts.task_logits(directory), num,
                            method="frequency", router="anchor", progress=False)
  tokens = tiny_models.tokens(seed=4)
  np.testing.assert_array_equal(_torch_logits(out, tokens), _torch_logits(directory, tokens))
  _generates(out, tokens)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_merged_duplicate_pairs_keep_transformers_logits(family, tmp_path):
  directory = str(tmp_path / "pairs")
  model = tiny_models.make_model(family, seed=2, duplicate_pairs=True, top_k=1,
                                 norm_topk_prob=True)
  model.save_pretrained(directory)
  num = checkpoint_lib.Checkpoint(directory).num_experts
  out = str(tmp_path / "out")
  hf_prune.prune_checkpoint(directory, out, ckpts.task_logits(directory, pairs=True),
                            num // 2, method="uncurl", router="merge", progress=False)
  config = transformers.AutoConfig.from_pretrained(out)
  assert getattr(config, "num_local_experts", None) == num // 2 or \
      getattr(config, "num_experts", None) == num // 2
  tokens = tiny_models.tokens(seed=5)
  np.testing.assert_allclose(_torch_logits(out, tokens), _torch_logits(directory, tokens),
                             atol=TOLERANCE, rtol=0)
  _generates(out, tokens)


@pytest.mark.parametrize("family", tiny_models.PRUNE_ONLY)
def test_deepseek_round_trips_through_transformers(family, tmp_path):
  directory = str(tmp_path / "model")
  tiny_models.make_model(family, seed=1).save_pretrained(directory)
  tokens = tiny_models.tokens(seed=6)
  same = str(tmp_path / "same")
  hf_prune.prune_checkpoint(directory, same, ckpts.task_logits(directory), 8,
                            method="frequency", router="anchor", progress=False)
  np.testing.assert_array_equal(_torch_logits(same, tokens), _torch_logits(directory, tokens))
  half = str(tmp_path / "half")
  hf_prune.prune_checkpoint(directory, half, ckpts.task_logits(directory), 4,
                            method="uncurl", router="merge", progress=False)
  config = transformers.AutoConfig.from_pretrained(half)
  assert config.n_routed_experts == 4
  model = transformers.AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32)
  for layer in checkpoint_lib.Checkpoint(half).moe_layers:
    mlp = model.model.layers[layer].mlp
    assert tuple(mlp.gate.weight.shape)[0] == 4 and mlp.experts.gate_up_proj.shape[0] == 4
  _generates(half, tokens)


@pytest.mark.parametrize("family", tiny_models.FAMILIES + tiny_models.PRUNE_ONLY)
def test_committed_fixtures_are_current(family, tmp_path):
  """tests/hf/fixtures equals what make_fixtures.py makes with the installed transformers
  (so the plain suite's comparisons are comparisons with transformers)."""
  model = tiny_models.make_model(family, seed=0)
  directory = str(tmp_path / "model")
  model.save_pretrained(directory)
  fresh, committed = ckpts.tensors(directory), ckpts.tensors(ckpts.fixture(family))
  assert fresh.keys() == committed.keys()
  for name in fresh:
    np.testing.assert_array_equal(fresh[name], committed[name], err_msg=name)
  if family in tiny_models.FAMILIES:
    # The weights are equal bit for bit; the outputs only within the forward check's
    # tolerance: PyTorch's CPU kernels round differently on another CPU (1.04e-6 in one of
    # Mixtral's 2,304 logits on an AVX-512 machine, 2026-12-04).
    want = ckpts.expected(family)
    got = tiny_models.reference_outputs(model, want["tokens"])
    for key, value in got.items():
      np.testing.assert_allclose(value, want[key], atol=TOLERANCE, rtol=0, err_msg=key)
  with open(os.path.join(directory, "config.json")) as f, \
       open(os.path.join(ckpts.fixture(family), "config.json")) as g:
    assert json.load(f) == json.load(g)
