"""`python -m uncurl_jax.maxtext.prune` on generated MaxText checkpoints.

The output is restored the way MaxText restores a `load_parameters_path` checkpoint
(`maxtext/common/checkpointing.py: load_params_from_path`: an orbax `Checkpointer` with
MaxText's handler settings restoring `{'params': <the model's abstract params>}` from
`<dir>/<step>/items` with `transforms={}`), the abstract params being those of the model
with `num_experts` set to the kept count (`uncurl_jax.maxtext.reference`, MaxText's
paths and shapes; tests/pruning/test_maxtext.py checks them).
"""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from uncurl_jax import model as model_lib
from uncurl_jax import pruning
from uncurl_jax.maxtext import checkpoints
from uncurl_jax.maxtext import example
from uncurl_jax.maxtext import prune as prune_lib
from uncurl_jax.maxtext import reference as ref

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ref.MoeDecoderConfig(model="deepseek", num_experts=8, num_layers=4, routed_bias=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  return example.make_example(str(tmp_path_factory.mktemp("mt") / "example"), CONFIG,
                              tokens=96)


def _maxtext_restore(items, config):
  """MaxText's `load_params_from_path` for a Linen model of `config`."""
  abstract = jax.eval_shape(ref.Transformer(config).init, jax.random.key(0),
                            jnp.zeros((4,), jnp.int32))  # {'params': {...}}: the TrainState's
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), dict(abstract))
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      restore_concurrent_gb=96, save_concurrent_gb=96, use_ocdbt=True, use_zarr3=True))
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  restored = checkpointer.restore(epath.Path(items), item={"params": abstract}, transforms={},
                                  restore_args={"params": restore_args})
  return restored["params"]["params"]


def _flat(tree):
  import flax  # pylint: disable=import-outside-toplevel
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _run(args, cwd):
  return subprocess.run([sys.executable, "-m", "uncurl_jax.maxtext.prune", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_the_command_writes_a_checkpoint_maxtext_restores_with_d_experts(made, tmp_path):
  result = _run([f"--checkpoint_path={made['checkpoint']}",
                 f"--router_logits={made['router_logits']}", "--num_experts=4",
                 "--router=merge", "--output_dir=pruned"], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  items = tmp_path / "pruned" / "0" / "items"
  assert f"load_parameters_path={items} num_experts=4" in result.stdout
  restored = _maxtext_restore(items, dataclasses.replace(CONFIG, num_experts=4))
  # The same as pruning in-process, and every other parameter unchanged.
  params = made["params"]
  layout = model_lib.detect_layout(params)
  logits = dict(np.load(made["router_logits"]))
  want = pruning.prune_params(params, logits, 4, router="merge", layout=layout)
  got, expected, source = _flat(restored), _flat(want), _flat(params)
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    # Read from the checkpoint: transforms={} would leave a ShapeDtypeStruct where the
    # checkpoint lacks the path, and MaxText's _raise_on_weight_mismatch refuses both that
    # and a stored shape other than the model's.
    assert isinstance(got[key], (np.ndarray, jax.Array)), key
    np.testing.assert_allclose(np.asarray(got[key]), value, rtol=1e-6, atol=1e-7,
                               err_msg=key)
    if "MoeBlock_0" not in key:
      np.testing.assert_array_equal(np.asarray(got[key]), source[key], err_msg=key)
  block = "decoder/moe_layers/DeepSeekMoeBlock_0/MoeBlock_0"
  assert got[f"{block}/wi_0"].shape == (4, 3, 16, 32)
  assert got[f"{block}/gate/bias"].shape == (4, 3)
  plan = pruning.PrunePlan.from_json((tmp_path / "pruned" / "prune_plan.json").read_text())
  assert plan.num_experts == {f"{block}[{i}]": 4 for i in range(3)}
  assert plan.layout == layout and plan.router == "merge"


def _main(*args):
  return prune_lib.main(["uncurl_jax.maxtext.prune", *args])


def test_a_saved_plan_prunes_as_the_logits_did(made, tmp_path):
  params = made["params"]
  logits = dict(np.load(made["router_logits"]))
  plan = pruning.plan_pruning(params, logits, 2, method="frequency", top_k=2,
                              layout=model_lib.detect_layout(params))
  (tmp_path / "plan.json").write_text(plan.to_json())
  assert _main(f"--checkpoint_path={made['items']}", f"--plan={tmp_path / 'plan.json'}",
               f"--output_dir={tmp_path / 'out'}") == 0
  restored, step = checkpoints.load_params(str(tmp_path / "out"))
  assert step == 0
  want = _flat(pruning.apply_plan(params, plan))
  for key, value in _flat(restored).items():
    np.testing.assert_array_equal(value, want[key], err_msg=key)


def _uneven_plan(tmp_path):
  """A plan of the unscanned model keeping 2 experts in one layer and 3 in the others."""
  unscanned = ref.init_params(dataclasses.replace(CONFIG, scan_layers=False))
  layout = model_lib.detect_layout(unscanned)
  plan_2, plan_3 = (pruning.plan_pruning(unscanned, None, d, method="random", layout=layout)
                    for d in (2, 3))
  name = next(iter(plan_3.layers))
  uneven = dataclasses.replace(plan_2, layers=dict(plan_2.layers, **{name: plan_3.layers[name]}))
  path = tmp_path / "uneven.json"
  path.write_text(uneven.to_json())
  return path


@pytest.mark.parametrize("case,match", [
    ("missing", r"no MaxText checkpoint at '.*nowhere': not a directory"),
    ("not_a_checkpoint", r"no MaxText checkpoint at .*expected <step>/items"),
    ("output_exists", r"--output_dir '.*' exists; give a new directory"),
    ("no_count", r"--num_experts is required"),
    ("plan_and_count", r"give --plan alone"),
    ("bind", r"router 'bind' keeps all E router columns"),
    ("mc_smoe", r"method 'mc_smoe' keeps a different number of experts in each layer"),
    ("bad_npz", r"--router_logits '.*' is not an .npz file"),
    ("wrong_layers", r"logits must have one entry per MoE layer"),
    ("uneven_plan", r"the plan keeps different expert counts per layer"),
    ("unknown_flag", r"Unknown command line flag 'num_expert'"),
])
def test_user_errors_are_one_message_and_exit_code_2(made, tmp_path, capsys, case, match):
  good = [f"--checkpoint_path={made['checkpoint']}", f"--router_logits={made['router_logits']}",
          "--num_experts=4", f"--output_dir={tmp_path / 'out'}"]
  (tmp_path / "empty").mkdir()
  (tmp_path / "bad.npz").write_text("not a zip")
  np.savez(tmp_path / "wrong.npz", **{"decoder/layers/MoeBlock_0": np.zeros((3, 5, 8))})
  args = {
      "missing": [f"--checkpoint_path={tmp_path / 'nowhere'}", *good[1:]],
      "not_a_checkpoint": [f"--checkpoint_path={tmp_path / 'empty'}", *good[1:]],
      "output_exists": [*good[:3], f"--output_dir={tmp_path / 'empty'}"],
      "no_count": [good[0], good[1], good[3]],
      "plan_and_count": [*good, f"--plan={tmp_path / 'x.json'}"],
      "bind": [*good, "--router=bind"],
      "mc_smoe": [*good, "--method=mc_smoe"],
      "bad_npz": [good[0], f"--router_logits={tmp_path / 'bad.npz'}", *good[2:]],
      "wrong_layers": [good[0], f"--router_logits={tmp_path / 'wrong.npz'}", *good[2:]],
      "uneven_plan": [f"--checkpoint_path={_unscanned_checkpoint(tmp_path)}",
                      f"--plan={_uneven_plan(tmp_path)}", good[3]],
      "unknown_flag": [*good, "--num_expert=3"],
  }[case]
  before = sorted(os.listdir(tmp_path))
  assert _main(*args) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("uncurl_jax.maxtext.prune: error: ") and "\n" not in err, err
  assert re.search(match, err), err
  assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary left
  if case != "unknown_flag":
    with pytest.raises((ValueError, TypeError)):  # --debug: the exception itself
      _main(*args, "--debug")


def _unscanned_checkpoint(tmp_path):
  params = ref.init_params(dataclasses.replace(CONFIG, scan_layers=False))
  return checkpoints.save_params(str(tmp_path / "unscanned"), params)
