"""Hugging Face checkpoints without PyTorch: the JAX forward against transformers' committed
outputs, reading both expert layouts, layer-by-layer pruning, the command and its errors.

`test_transformers.py` (marker hf) checks the same against transformers itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from tests.hf import checkpoints as ckpts
from uncurl_jax import collect_router_logits
from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.hf import HfMoeConfig
from uncurl_jax.hf import HfMoeDecoder
from uncurl_jax.hf import checkpoint as checkpoint_lib
from uncurl_jax.hf import prune as hf_prune
from uncurl_jax.hf import task_tokens
from uncurl_jax.pruning import stats as stats_lib

TOLERANCE = 1e-5


def _logits(directory: str, tokens: np.ndarray) -> np.ndarray:
  config, params = checkpoint_lib.load(directory)
  return np.asarray(HfMoeDecoder(config).apply({"params": params}, tokens))


def _batches(tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
  return [{"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
           "decoder_loss_weights": np.ones(tokens.shape, np.float32)}]


@pytest.mark.parametrize("family", ckpts.FORWARD_FAMILIES)
def test_forward_and_router_logits_equal_transformers(family):
  """Logits and every MoE layer's router logits equal transformers' (float32) within 1e-5."""
  want = ckpts.expected(family)
  config, params = checkpoint_lib.load(ckpts.fixture(family))
  model = HfMoeDecoder(config)
  logits = np.asarray(model.apply({"params": params}, want["tokens"]))
  np.testing.assert_allclose(logits, want["logits"], atol=TOLERANCE, rtol=0)
  router = collect_router_logits(model, params, _batches(want["tokens"]), progress=False)
  assert sorted(router) == sorted(f"layers_{i}/mlp" for i in config.moe_layers)
  for k, layer in enumerate(config.moe_layers):
    np.testing.assert_allclose(router[f"layers_{layer}/mlp"], want[f"router_{k}"],
                               atol=TOLERANCE, rtol=0)


def test_each_family_uses_its_features():
  """The fixtures exercise what differs between the families (a guard on the configs)."""
  configs = {f: checkpoint_lib.load(ckpts.fixture(f))[0] for f in ckpts.FORWARD_FAMILIES}
  assert configs["mixtral"].renormalize_gates and configs["mixtral"].top_k == 2
  assert configs["qwen2_moe"].shared_expert_size and configs["qwen2_moe"].qkv_bias
  assert configs["qwen2_moe"].moe_layers == (0, 2)          # mlp_only_layers=[1]
  assert configs["qwen3_moe"].qk_norm == "head" and configs["qwen3_moe"].head_dim == 16
  assert configs["qwen3_moe"].moe_layers == (1, 2)          # mlp_only_layers=[0]
  assert configs["olmoe"].qk_norm == "full" and configs["olmoe"].clip_qkv == 2.0
  assert not configs["olmoe"].renormalize_gates


@pytest.mark.parametrize("family", ckpts.FORWARD_FAMILIES)
def test_detect_layout_names_the_family(family):
  _, params = checkpoint_lib.load(ckpts.fixture(family))
  want = model_lib.HF_MIXTRAL_LAYOUT if family == "mixtral" else model_lib.HF_QWEN_MOE_LAYOUT
  assert model_lib.detect_layout(params) == want


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_reads_as_per_expert(family, tmp_path):
  source = ckpts.fixture(family)
  fused = ckpts.fused(source, str(tmp_path / "fused"))
  ckpt, fused_ckpt = checkpoint_lib.Checkpoint(source), checkpoint_lib.Checkpoint(fused)
  for layer in ckpt.moe_layers:
    a = flax.traverse_util.flatten_dict(ckpt.moe_layer(layer))
    b = flax.traverse_util.flatten_dict(fused_ckpt.moe_layer(layer))
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  tokens = ckpts.expected(family)["tokens"]
  np.testing.assert_array_equal(_logits(source, tokens), _logits(fused, tokens))


def test_expert_stats_of_gated_experts_match_a_numpy_reference():
  """collect_expert_stats on an HF model: SiLU-gated experts, gates renormalized (Mixtral)."""
  family = "mixtral"
  config, params = checkpoint_lib.load(ckpts.fixture(family))
  tokens = ckpts.expected(family)["tokens"]
  stats = stats_lib.collect_expert_stats(HfMoeDecoder(config), params, _batches(tokens),
                                         progress=False)
  _, state = HfMoeDecoder(config).apply({"params": params}, tokens, mutable=["moe_inputs"])
  name = "layers_1/mlp"
  x = np.asarray(state["moe_inputs"]["layers_1"]["mlp"]["inputs"], np.float64).reshape(-1, 32)
  layer = params["layers_1"]["mlp"]
  w1, w3, w2 = (np.asarray(layer["experts"][k], np.float64) for k in ("w1", "w3", "w2"))
  logits = x @ np.asarray(layer["gate"]["kernel"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = np.argsort(-probs, -1)[:, :2]
  silu = lambda z: z / (1 + np.exp(-z))
  reap = np.zeros(8)
  for e in range(8):
    out = (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]
    routed = (top == e).any(-1)
    gate = probs[:, e] / np.take_along_axis(probs, top, -1).sum(-1)
    reap[e] = (gate * np.linalg.norm(out, axis=-1))[routed].mean() if routed.any() else 0
    np.testing.assert_allclose(stats[name].mean_output[e], out.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats[name].reap, reap, rtol=1e-4)
  np.testing.assert_array_equal(stats[name].topk_counts,
                                [(top == e).any(-1).sum() for e in range(8)])


# ----------------------------------------------------------------------------------------
# Pruning.


@pytest.mark.parametrize("family", ckpts.ALL_FAMILIES)
def test_pruning_to_every_expert_is_the_identity(family, tmp_path):
  """E -> E writes every tensor unchanged (same names, dtypes and values)."""
  source = ckpts.fixture(family)
  out = str(tmp_path / "out")
  num = checkpoint_lib.Checkpoint(source).num_experts
  plan = hf_prune.prune_checkpoint(source, out, ckpts.task_logits(source), num,
                                   method="frequency", router="anchor", progress=False)
  assert set(plan.num_experts.values()) == {num}
  before, after = ckpts.tensors(source), ckpts.tensors(out)
  assert before.keys() == after.keys()
  for name in before:
    assert before[name].dtype == after[name].dtype, name
    np.testing.assert_array_equal(before[name], after[name], err_msg=name)
  with open(os.path.join(out, "config.json")) as f, \
       open(os.path.join(source, "config.json")) as g:
    assert json.load(f) == json.load(g)
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask    # not mkdtemp's 0700
  assert pruning.PrunePlan.from_json(open(os.path.join(out, hf_prune.PLAN_FILE)).read()) == plan


@pytest.mark.parametrize("family", ckpts.FORWARD_FAMILIES)
def test_merging_permuted_duplicate_pairs_keeps_the_function(family, tmp_path):
  """UNCURL with a merged router turns 2E' duplicate experts into E' with equal logits."""
  source = ckpts.duplicate_pairs(ckpts.fixture(family), str(tmp_path / "pairs"))
  num = checkpoint_lib.Checkpoint(source).num_experts
  out = str(tmp_path / "out")
  plan = hf_prune.prune_checkpoint(source, out, ckpts.task_logits(source, pairs=True),
                                   num // 2, method="uncurl", router="merge", progress=False)
  for layer_plan in plan.layers.values():  # the pairs were found and aligned exactly
    labels = np.asarray(layer_plan.labels)
    np.testing.assert_array_equal(labels[0::2], labels[1::2])
    assert all(a.score_after == pytest.approx(1.0) for a in layer_plan.alignments)
  config = json.load(open(os.path.join(out, "config.json")))
  assert checkpoint_lib.Checkpoint(out).num_experts == num // 2
  assert config["num_experts_per_tok"] == 1
  tokens = ckpts.expected(family)["tokens"]
  np.testing.assert_allclose(_logits(out, tokens), _logits(source, tokens), atol=TOLERANCE,
                             rtol=0)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_prunes_routed_experts_only(family, tmp_path):
  source = ckpts.fixture(family)
  ckpt = checkpoint_lib.Checkpoint(source)
  out = str(tmp_path / "out")
  plan = hf_prune.prune_checkpoint(source, out, ckpts.task_logits(source), 4,
                                   method="frequency", router="anchor", progress=False)
  before, after = ckpts.tensors(source), ckpts.tensors(out)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["n_routed_experts"] == 4
  for layer in ckpt.moe_layers:
    prefix = ckpt.block_prefix(layer)
    kept = np.asarray(plan.layers[f"layers_{layer}/mlp"].anchors)
    np.testing.assert_array_equal(after[f"{prefix}.gate.weight"],
                                  before[f"{prefix}.gate.weight"][kept])
    if family == "deepseek_v3":
      name = f"{prefix}.gate.e_score_correction_bias"
      np.testing.assert_array_equal(after[name], before[name][kept])
    for new, old in enumerate(kept):
      np.testing.assert_array_equal(after[f"{prefix}.experts.{new}.up_proj.weight"],
                                    before[f"{prefix}.experts.{old}.up_proj.weight"])
    assert f"{prefix}.experts.4.up_proj.weight" not in after
  untouched = [n for n in before if ".experts." not in n and ".gate." not in n]
  assert any("shared_experts" in n for n in untouched)
  for name in untouched:
    np.testing.assert_array_equal(after[name], before[name])


def test_uneven_counts_only_when_asked(tmp_path):
  source = ckpts.fixture("olmoe")
  out = str(tmp_path / "out")
  counts = {"layers_0/mlp": 4, "layers_1/mlp": 2}
  plan = hf_prune.prune_checkpoint(source, out, ckpts.task_logits(source), counts,
                                   method="frequency", router="anchor", allow_uneven=True,
                                   progress=False)
  assert plan.num_experts == counts
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["num_experts"] == 4 and config["num_experts_per_layer"] == {"0": 4, "1": 2}
  after = ckpts.tensors(out)
  assert after["model.layers.1.mlp.gate.weight"].shape == (2, 32)
  assert "model.layers.1.mlp.experts.2.up_proj.weight" not in after


def test_sharded_output_and_index(tmp_path):
  """Copied tensors go in shards of at most copy_shard_bytes; the index lists them all."""
  source = ckpts.fixture("qwen2_moe")
  out = str(tmp_path / "out")
  hf_prune.prune_checkpoint(source, out, ckpts.task_logits(source), 4, method="frequency",
                            router="anchor", copy_shard_bytes=20_000, progress=False)
  index = json.load(open(os.path.join(out, checkpoint_lib.INDEX_FILE)))
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 3 and sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) \
      == shards
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert index["metadata"]["total_size"] == sum(a.nbytes for a in ckpts.tensors(out).values())


# ----------------------------------------------------------------------------------------
# Bad input: refused before any work, nothing written.


def _refused(tmp_path, match, **kwargs):
  out = tmp_path / "out"
  args = dict(source=ckpts.fixture("mixtral"), output=str(out),
              logits=ckpts.task_logits(ckpts.fixture("mixtral")), num_experts=4,
              method="frequency", router="anchor", progress=False)
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    hf_prune.prune_checkpoint(**args)
  assert not out.exists() or not os.listdir(out)
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_bad_requests_are_refused_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setattr(pruning, "plan_pruning", lambda *a, **k: pytest.fail("work started"))
  mixtral = ckpts.fixture("mixtral")
  logits = ckpts.task_logits(mixtral)
  _refused(tmp_path, "is not a directory", source=str(tmp_path / "missing"))
  odd = ckpts.copy_checkpoint(mixtral, str(tmp_path / "odd"),
                              config_updates={"model_type": "llama"})
  _refused(tmp_path, "unsupported model_type 'llama'", source=odd)
  _refused(tmp_path, r"outside \[top-k 2, E 8\]", num_experts=9)
  _refused(tmp_path, r"outside \[top-k 2, E 8\]", num_experts=1)
  _refused(tmp_path, "uneven expert counts", num_experts={"layers_0/mlp": 4,
                                                          "layers_1/mlp": 2})
  _refused(tmp_path, r"missing \['layers_1/mlp'\]", logits={"layers_0/mlp": logits[
      "layers_0/mlp"]})
  _refused(tmp_path, r"must be \[tokens >= 1, 8\]", logits={
      **logits, "layers_1/mlp": logits["layers_1/mlp"][:, :4]})
  _refused(tmp_path, "allocates experts over all layers", method="mc_smoe")
  _refused(tmp_path, "router 'bind' keeps all E router rows", router="bind")
  _refused(tmp_path, "needs expert statistics", method="reap")
  _refused(tmp_path, "router", router="bogus")
  _refused(tmp_path, "cluster", method="uncurl", cluster="bogus")
  quantized = ckpts.copy_checkpoint(mixtral, str(tmp_path / "fp8"), config_updates={
      "quantization_config": {"quant_method": "fp8"}})
  _refused(tmp_path, "quantized checkpoints", source=quantized)
  extra = ckpts.tensors(mixtral)
  extra["model.layers.1.block_sparse_moe.experts.0.w1.weight_scale_inv"] = np.ones(
      (1,), np.float32)
  odd_tensor = ckpts.copy_checkpoint(mixtral, str(tmp_path / "extra"), tensors_out=extra)
  _refused(tmp_path, r"MoE layer 1 has tensors this pruner does not know how to prune",
           source=odd_tensor)
  _refused(tmp_path, "either router logits .* or a plan", logits=None)

  _refused(tmp_path, "is the source checkpoint", output=mixtral)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  _refused(tmp_path, "exists and is not an empty directory", output=str(tmp_path / "full"))
  deepseek = ckpts.fixture("deepseek_v3")
  _refused(tmp_path, r"kept count \[3\] must be a multiple of n_group=2", source=deepseek,
           num_experts=3, logits=ckpts.task_logits(deepseek))
  _refused(tmp_path, "at least 2 experts per group", source=deepseek, num_experts=2,
           logits=ckpts.task_logits(deepseek))
  greedy = ckpts.fixture("deepseek_v2")  # topk_method greedy: no groups to respect
  assert json.load(open(os.path.join(greedy, "config.json")))["topk_method"] == "greedy"
  hf_prune._check_groups(checkpoint_lib.Checkpoint(greedy), {"layers_1/mlp": 3})


def test_a_plan_for_another_expert_width_is_refused_before_any_work(tmp_path, monkeypatch):
  mixtral = ckpts.fixture("mixtral")
  plan = pruning.plan_pruning(checkpoint_lib.load(mixtral)[1], ckpts.task_logits(mixtral), 4,
                              method="uncurl", router="merge",
                              layout=model_lib.HF_MIXTRAL_LAYOUT)
  narrow = ckpts.copy_checkpoint(mixtral, str(tmp_path / "narrow"), tensors_out={
      name: (value[:12] if name.endswith(("w1.weight", "w3.weight")) else
             value[:, :12] if name.endswith("w2.weight") else value)
      for name, value in ckpts.tensors(mixtral).items()},
      config_updates={"intermediate_size": 12})
  monkeypatch.setattr(pruning, "apply_plan", lambda *a, **k: pytest.fail("work started"))
  _refused(tmp_path, "permutes 24 hidden units, the layer has d_ff=12", source=narrow,
           logits=None, plan=plan)


def test_a_failure_midway_leaves_nothing(tmp_path, monkeypatch):
  calls = []
  real = pruning.apply_plan

  def apply_then_fail(params, plan):
    calls.append(plan)
    if len(calls) == 2:
      raise RuntimeError("disk full")
    return real(params, plan)

  monkeypatch.setattr(pruning, "apply_plan", apply_then_fail)
  with pytest.raises(RuntimeError, match="disk full"):
    hf_prune.prune_checkpoint(ckpts.fixture("mixtral"), str(tmp_path / "out"),
                              ckpts.task_logits(ckpts.fixture("mixtral")), 4, progress=False)
  assert len(calls) == 2 and os.listdir(tmp_path) == []


def test_tokenizer_of_another_model_is_refused(tmp_path):
  small = ckpts.copy_checkpoint(ckpts.fixture("olmoe"), str(tmp_path / "small"),
                                config_updates={"vocab_size": 40})
  with pytest.raises(ValueError, match="the tokenizer does not match the checkpoint"):
    task_tokens.load_tokenizer(small, vocab_size=40)


def test_text_batches_mark_padding():
  tokenizer = task_tokens.load_tokenizer(ckpts.fixture("olmoe"), vocab_size=96)
  batches = list(task_tokens.text_batches(
      tokenizer, ["the city of the river", "", "a town"], batch_size=2, max_length=4))
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]["decoder_loss_weights"], [[1, 1, 1, 1], [1, 1, 0, 0]])
  ids = tokenizer.encode("the city of the").ids
  np.testing.assert_array_equal(batches[0]["decoder_input_tokens"][0], ids)


def test_config_refuses_what_the_forward_does_not_compute():
  config = json.load(open(os.path.join(ckpts.fixture("mixtral"), "config.json")))
  with pytest.raises(ValueError, match="sliding window"):
    HfMoeConfig.from_hf_config({**config, "sliding_window": 4096})
  with pytest.raises(ValueError, match="RoPE type 'yarn'"):
    HfMoeConfig.from_hf_config({**config, "rope_parameters": {"rope_type": "yarn",
                                                              "rope_theta": 1e6}})
  with pytest.raises(ValueError, match="hidden_act 'gelu'"):
    HfMoeConfig.from_hf_config({**config, "hidden_act": "gelu"})
  deepseek = json.load(open(os.path.join(ckpts.fixture("deepseek_v3"), "config.json")))
  with pytest.raises(ValueError, match="no JAX forward"):
    HfMoeConfig.from_hf_config(deepseek)


# ----------------------------------------------------------------------------------------
# The command.


def _command(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "uncurl_jax.hf.prune", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_command_prunes_from_task_text(tmp_path):
  source = ckpts.duplicate_pairs(ckpts.fixture("qwen3_moe"), str(tmp_path / "pairs"))
  text = tmp_path / "task.txt"
  text.write_text("the capital of the country is a city\nthe river of the north\n"
                  "people of the world have a language\n" * 4)
  result = _command(f"--model={source}", "--output=pruned", "--num_experts=4",
                    "--method=uncurl", "--router=merge", f"--task_text={text}",
                    cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "layers_1/mlp: 8 -> 4 experts" in result.stdout     # the plan's summary
  assert "members [" in result.stdout
  assert f"pruned checkpoint: {tmp_path / 'pruned'}" in result.stdout
  out = tmp_path / "pruned"
  assert checkpoint_lib.Checkpoint(out).num_experts == 4
  tokens = ckpts.expected("qwen3_moe")["tokens"]
  np.testing.assert_allclose(_logits(str(out), tokens), _logits(source, tokens),
                             atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--model=/nonexistent", "--output=o", "--logits=x.npz"], "is not a directory"),
    (["--model={mixtral}", "--output=o", "--num_experts=9", "--task_text=t.txt"],
     r"outside \[top-k 2, E 8\]"),
])
def test_command_bad_input_exits_2_with_one_message(tmp_path, args, message):
  (tmp_path / "t.txt").write_text("the city\n")
  args = [a.format(mixtral=ckpts.fixture("mixtral"), deepseek=ckpts.fixture("deepseek_v3"))
          for a in args]
  result = _command(*args, cwd=tmp_path)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  assert __import__("re").search(message, result.stderr), result.stderr
  assert not (tmp_path / "o").exists()


def test_the_docs_python_example_runs(capsys, monkeypatch):
  """docs/checkpoints.md's Python example, run as written from the repository root."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  text = open(os.path.join(root, "docs", "checkpoints.md")).read()
  block = text.split("```python\n", 1)[1].split("```", 1)[0]
  monkeypatch.chdir(root)
  exec(compile(block, "docs/checkpoints.md", "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  assert "'layers_1/mlp': (64, 8)" in printed
  assert "{'layers_1/mlp': 4, 'layers_2/mlp': 4}" in printed


def test_seqio_task_text_is_decoded_by_the_tasks_vocabulary():
  """--task: a registered seqio task's examples as text (inputs and targets decoded)."""
  texts = list(task_tokens.seqio_texts("synthetic_city_country", split="validation",
                                       max_examples=3))
  assert len(texts) == 3
  assert all(t.startswith("In which country is the city ") and "Answer:" in t for t in texts)
  with pytest.raises(ValueError, match="unknown seqio task or mixture 'no_such_task'"):
    list(task_tokens.seqio_texts("no_such_task"))


def test_router_logits_need_a_forward_and_a_matching_tokenizer(tmp_path):
  with pytest.raises(ValueError, match="no JAX forward here"):
    hf_prune.router_logits_for(ckpts.fixture("deepseek_v3"), ["the city"], max_tokens=8,
                               batch_size=1, max_length=8)
  small = ckpts.copy_checkpoint(ckpts.fixture("olmoe"), str(tmp_path / "small"),
                                config_updates={"vocab_size": 40})
  with pytest.raises(ValueError, match="the tokenizer does not match"):
    hf_prune.router_logits_for(small, ["the city"], max_tokens=8, batch_size=1,
                               max_length=8)
