"""Is a property of a fact's value linearly readable where a yes / no answer is read?
(docs/study.md, "A task learned in finetuning"; the numbers in summary.md.)

For the dense and the 32-expert model of the default study (seed 0, from the stage cache),
the facts of the truth task's topics (8-15) run in the pretraining format. A logistic
regression (scikit-learn) learns the property of `facts_property_*` (is the value one of
its topic's `yes_values`) on the 864 finetuning facts and is scored on the 1,824 held-out
ones, from two places: each block's output at the topic position (what a yes / no token's
logit reads, through the final norm, is a linear function of the last one's 32 numbers),
and the model's answer distribution over the topic's 16 values (placed among the 512
value tokens). Next to them: the property of the model's own answer.

  python docs/results/truth_search/property_readout.py --stages_dir=outputs/stages
"""

import numpy as np
from sklearn.linear_model import LogisticRegression

from value_readout import models_and_facts  # the same models and forward


def main():
  for name, world, run in models_and_facts(__doc__):

    def states(split):
      logits, blocks, topics, values = run(split)
      candidates = world.value_token(np.arange(world.num_values)[None], topics[:, None])
      scores = np.take_along_axis(logits, candidates, 1)
      answer = np.exp(scores - scores.max(1, keepdims=True))
      answer /= answer.sum(1, keepdims=True)
      distribution = np.zeros((len(topics), world.num_value_tokens))
      np.put_along_axis(distribution, topics[:, None] * world.num_values
                        + np.arange(world.num_values)[None], answer, 1)
      own = world.yes_values[topics, scores.argmax(1)]
      return blocks, distribution, world.yes_values[topics, values], own

    train, test = states("task_finetune"), states("task_eval")
    print(f"{name}: the property of the model's own answer, held out: "
          f"{100 * (test[3] == test[2]).mean():.1f}%")
    for block in sorted(train[0]):
      probe = LogisticRegression(max_iter=3000, C=10.0).fit(train[0][block], train[2])
      print(f"  output of {block}: {100 * probe.score(test[0][block], test[2]):.1f}% held out "
            f"({100 * probe.score(train[0][block], train[2]):.1f}% on its own facts)")
    probe = LogisticRegression(max_iter=3000, C=1.0).fit(train[1], train[2])
    print(f"  answer distribution over the values: {100 * probe.score(test[1], test[2]):.1f}% "
          f"held out ({100 * probe.score(train[1], train[2]):.1f}% on its own facts)")


if __name__ == "__main__":
  main()
