"""Recall, then judge: the property judgement with the value in the prompt, scored with the
model's own recalled value (docs/study.md, "A task learned in finetuning"; summary.md).

`facts_property_recalled` finetunes on "subject topic value ?" -> yes / no with the fact's
true value shown, as a chain of thought would be trained. Its `_dev_rank` score shows the
true value, so it measures the judgement alone, not the knowledge. This script scores what
the task is about: for every finished finetuning stage of that task in the stage cache, on
the development facts, the model first recalls the value ("subject topic" -> its argmax
token), then judges "subject topic <recalled> ?" by comparing its yes and no logits. It also
prints the recall itself and the judgement with the true value shown.

  python docs/results/truth_search/recall_then_judge.py --stages_dir=outputs/stages
"""

import argparse
import glob
import json
import os

import jax
import numpy as np

from uncurl_jax.model import partitioning
from uncurl_jax.tasks import facts as fact_tasks

from value_readout import forward, load_stage  # the same loading and forward

TASK = "facts_property_recalled"  # the default --task


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stages_dir", default="outputs/stages")
  parser.add_argument("--split", default="task_dev", choices=["task_dev", "task_eval"])
  parser.add_argument("--task", default=TASK, help="The finetuning task or mixture "
                      "(e.g. facts_property_recalled_replay).")
  args = parser.parse_args()
  world = fact_tasks.TRUTH_WORLDS["facts_truth"]
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  yes, no, query = (world.truth_token(t) for t in ("yes", "no", "query"))
  examples, facts = world.examples(args.split), world.facts(args.split)
  topics = facts[:, 0]
  true = world.value_token(world.values[topics, facts[:, 1]], topics)
  label = world.yes_values[topics, world.values[topics, facts[:, 1]]]
  column = lambda token: np.full((len(facts), 1), token)
  for path in sorted(glob.glob(os.path.join(args.stages_dir, f"finetune-*-{args.task}-*"))):
    if not os.path.exists(os.path.join(path, "result.json")):
      continue
    stage = json.load(open(os.path.join(path, "stage_config.json")))
    result = json.load(open(os.path.join(path, "result.json")))["result"]
    model, params = load_stage(path, result, mesh)
    logits = lambda tokens: np.asarray(forward(model, params, tokens))

    recalled = logits(np.concatenate([examples["inputs"], true[:, None]], 1))[:, 2].argmax(-1)

    def judged(value):
      z = logits(np.concatenate([examples["inputs"], value[:, None], column(query),
                                 column(yes)], 1))[:, 4]
      right = (z[:, yes] > z[:, no]) == label
      return f"{100 * right.mean():.1f} (SE {100 * right.std() / np.sqrt(len(right)):.1f})"

    train = stage["config"]["train"]
    print(f"{stage['stage']} ({train['steps']} steps @ {train['learning_rate']:g}): recall "
          f"{100 * (recalled == true).mean():.1f}%, judged with its recall {judged(recalled)}, "
          f"with the true value {judged(true)}; {len(facts)} facts")


if __name__ == "__main__":
  main()
