"""Where is a fact's value readable in the study's pretrained models? (docs/study.md, "A task
learned in finetuning"; the numbers in summary.md.)

For the dense and the 32-expert model of the default study (seed 0, from the stage cache),
the facts of the truth task's topics (8-15) are run in the pretraining format; per block, a
multinomial logistic regression (scikit-learn) learns the value from the block's output at
the topic position on the 864 finetuning facts and is scored on the 1,824 held-out ones,
next to the model's own answer there. A later position (a judgement's query) can attend to
what the blocks before the last wrote at the topic position, not to the model's answer.

  python docs/results/truth_search/value_readout.py --stages_dir=outputs/stages
"""

import argparse
import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression

from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import partitioning
from uncurl_jax.study import stages
from uncurl_jax.tasks import facts as fact_tasks


def pretrained(stages_dir, name, seed=0):
  for path in sorted(glob.glob(os.path.join(stages_dir, f"{name}-*"))):
    config = json.load(open(os.path.join(path, "stage_config.json")))["config"]
    if config["seed"] == seed and config["train"]["mixture_or_task_name"] == "facts_pretrain" \
        and os.path.exists(os.path.join(path, "result.json")):
      return path, json.load(open(os.path.join(path, "result.json")))["result"]
  raise SystemExit(f"no finished {name} stage of seed {seed} in {stages_dir}")


def load_stage(path, result, mesh):
  """(model, params) of a finished training stage (its directory and result)."""
  config = dataclasses.replace(configs.from_dict(result["model_config"]), dropless=True)
  params = stages.restore_params(os.path.join(path, result["checkpoint"]), config=config,
                                 mesh=mesh)
  return decoder.SMoEDecoder(config), params


def load_pretrained(stages_dir, name, mesh, seed=0):
  """(model, params) of a finished pretraining stage of the default world."""
  return load_stage(*pretrained(stages_dir, name, seed), mesh)


def forward(model, params, tokens, **kwargs):
  """The model's teacher-forced forward over whole sequences `tokens` [n, length] (each
  position predicts the next token, as in training); kwargs go to `model.apply`."""
  inputs = np.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
  return model.apply({"params": params}, jnp.asarray(inputs), jnp.asarray(tokens),
                     enable_dropout=False, **kwargs)


def run_facts(model, params, world, split):
  """(logits at the topic position [n, vocab], {block: its output there [n, d_model]}) for
  the facts of `split` in the pretraining format."""
  examples = world.examples(split)
  tokens = np.concatenate([examples["inputs"], examples["targets"]], 1)  # subject topic value
  logits, found = forward(model, params, tokens, capture_intermediates=True,
                          mutable=["intermediates"])
  blocks = {k: np.asarray(v["__call__"][0])[:, 2] for k, v in
            found["intermediates"].items() if k.startswith("layers_")}
  return np.asarray(logits)[:, 2], blocks


def models_and_facts(description):
  """Parses --stages_dir; yields (name, states) for the dense and the 32-expert model, where
  states(split) = (logits at the topic position, block outputs there, topics, values) of
  the truth task's facts of `split` (world `facts_truth`)."""
  parser = argparse.ArgumentParser(description=description.splitlines()[0])
  parser.add_argument("--stages_dir", default="outputs/stages")
  args = parser.parse_args()
  world = fact_tasks.TRUTH_WORLDS["facts_truth"]
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  for name in ("pretrain-dense", "pretrain-e32"):
    model, params = load_pretrained(args.stages_dir, name, mesh)

    def states(split, model=model, params=params):
      logits, blocks = run_facts(model, params, world, split)
      facts = world.facts(split)
      return logits, blocks, facts[:, 0], world.values[facts[:, 0], facts[:, 1]]

    yield name, world, states


def main():
  for name, world, run in models_and_facts(__doc__):

    def states(split):
      logits, blocks, topics, values = run(split)
      own = logits.argmax(-1) == world.value_token(values, topics)
      return blocks, values + world.num_values * topics, own

    train, test = states("task_finetune"), states("task_eval")
    print(f"{name}: the model's own answer on the held-out facts: {100 * test[2].mean():.1f}%")
    for block in sorted(train[0]):
      probe = LogisticRegression(max_iter=2000, C=10.0).fit(train[0][block], train[1])
      print(f"  output of {block}: readout learned on {len(train[1])} finetuning facts: "
            f"{100 * probe.score(test[0][block], test[1]):.1f}% held out "
            f"({100 * probe.score(train[0][block], train[1]):.1f}% on its own facts)")


if __name__ == "__main__":
  main()
