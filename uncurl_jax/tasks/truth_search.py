"""The task variants of the search for a task learned in finetuning (docs/study.md, "A task
learned in finetuning"), registered on import (gin: `import uncurl_jax.tasks.truth_search`).

On the default world's facts (same pretraining), topics 8-15 scored as `facts_truth`:

- `facts_truth_wide`: truth judgement whose finetuning also holds every fact of topics
  24-31 (the rule "the shown value is the stored one" from 8x more examples);
- `facts_property_<after|before|none|recalled>`: property judgement (is the fact's value
  one of half of its topic's values, `FactWorld.properties`) with the query token after
  the prompt, before it, absent (the answer then takes the value's place), or after the
  value ("subject topic value ?": the judgement of a recalled value, trained with the
  true one, as a chain of thought);
- `facts_property_recalled_replay`: a mixture of `facts_property_recalled` and the
  pretraining facts (`facts_pretrain`), one to one: finetuning that replays what it must
  not erase.

On the study's property tasks (`facts.PROPERTY_WORLDS`, topics 8-19 and 20-31):

- `<task>_replay_unscored`: the judgements mixed one to one with every fact but the
  task's development and scored ones (`<task>_unscored_facts`), instead of every fact.

On a world with untyped answers (`UNTYPED_WORLD`: the default world's subjects, topics
and split, but every topic answers from the same 16 value tokens; its own pretraining,
`facts_untyped_pretrain`):

- `facts_untyped_property_<after|before>`: property judgement with one half of the 16
  values for every topic (`FactWorld.shared_property`), a linear function of the value
  the model forms;
- `facts_untyped_truth`: truth judgement, as `facts_truth`.
"""

from __future__ import annotations

import dataclasses

from uncurl_jax.tasks import facts
from uncurl_jax.tasks import vocab

WIDE_WORLD = dataclasses.replace(facts.TRUTH_WORLDS["facts_truth"], finetune_fraction=0.1,
                                 finetune_topics=tuple(range(24, 32)))
UNTYPED_WORLD = dataclasses.replace(facts.TRUTH_WORLDS["facts_truth"], typed_answers=False,
                                    shared_property=True)


def register() -> list[str]:
  names = facts.register_truth_task("facts_truth_wide", WIDE_WORLD)
  for query in ("after", "before", "none", "recalled"):
    names += facts.register_truth_task(f"facts_property_{query}",
                                       facts.TRUTH_WORLDS["facts_truth"], kind=f"property:{query}")
  vocab.add_mixture("facts_property_recalled_replay",
                    [("facts_property_recalled", 1.0), ("facts_pretrain", 1.0)])
  names.append("facts_property_recalled_replay")
  # The study's property tasks, replaying every fact but their development and scored
  # ones (the world's "replay" split), so that the scored facts stay seen in pretraining
  # only; `<task>_replay` replays every fact.
  for task, world in facts.PROPERTY_WORLDS.items():
    names.append(facts.register_facts(f"{task}_unscored_facts", world, "replay"))
    vocab.add_mixture(f"{task}_replay_unscored", [(task, 1.0), (f"{task}_unscored_facts", 1.0)])
    names.append(f"{task}_replay_unscored")
  names += facts.register_world("facts_untyped", UNTYPED_WORLD)
  for query in ("after", "before"):
    names += facts.register_truth_task(f"facts_untyped_property_{query}", UNTYPED_WORLD,
                                       kind=f"property:{query}")
  names += facts.register_truth_task("facts_untyped_truth", UNTYPED_WORLD)
  return names


register()
