"""The world of memorized facts: its facts, splits and token ids, and its seqio tasks."""

import numpy as np
import pytest
import seqio

import uncurl_jax.tasks  # noqa: F401  (registers the seqio tasks)
from uncurl_jax.data import facts
from uncurl_jax.tasks import facts as fact_tasks

WORLD = facts.FactWorld(num_topics=6, num_values=8, typed_answers=True, subjects_per_topic=10,
                        task_topics=(1, 4), task_subjects_per_topic=20,
                        finetune_fraction=0.25, seed=7)


def test_facts_values_and_splits():
  assert WORLD.num_facts == 4 * 10 + 2 * 20
  finetune, held_out = WORLD.facts("task_finetune"), WORLD.facts("task_eval")
  assert len(finetune) == 2 * 5 and len(held_out) == WORLD.num_task_items == 2 * 15
  pairs = lambda a: {tuple(p) for p in a}
  assert not pairs(finetune) & pairs(held_out)                  # disjoint subjects
  assert pairs(finetune) | pairs(held_out) <= pairs(WORLD.facts("pretrain"))
  assert set(held_out[:, 0]) == {1, 4}
  # The same world (seed) gives the same facts; another seed other values.
  again = facts.FactWorld(**{f: getattr(WORLD, f) for f in WORLD.__dataclass_fields__})
  np.testing.assert_array_equal(again.values, WORLD.values)
  other = facts.FactWorld(num_topics=6, num_values=8, subjects_per_topic=10,
                          task_topics=(1, 4), seed=8)
  assert not np.array_equal(other.values[:, :10], WORLD.values[:, :10])


def test_a_development_split_is_set_aside_from_the_held_out_subjects():
  """`dev_fraction` takes subjects from the held-out ones (after the finetuning cut, so the
  finetuning facts stay the same); the three task splits are disjoint and cover the task;
  the seqio task `<name>_task_dev` trains like the task and validates on the dev facts."""
  fields = {f: getattr(WORLD, f) for f in WORLD.__dataclass_fields__}
  world = facts.FactWorld(**{**fields, "dev_fraction": 0.25})
  pairs = lambda a: {tuple(p) for p in a}
  finetune, dev, held_out = (world.facts(s) for s in ("task_finetune", "task_dev", "task_eval"))
  np.testing.assert_array_equal(finetune, WORLD.facts("task_finetune"))
  assert len(dev) == 2 * 5 and len(held_out) == world.num_task_items == 2 * 10
  assert not pairs(dev) & pairs(held_out) and not pairs(dev) & pairs(finetune)
  assert pairs(dev) | pairs(held_out) == pairs(WORLD.facts("task_eval"))
  assert set(dev[:, 0]) == {1, 4}
  names = fact_tasks.register_world("facts_dev_test", world)
  assert names == ["facts_dev_test_pretrain", "facts_dev_test_task", "facts_dev_test_task_dev"]
  task = seqio.get_mixture_or_task("facts_dev_test_task_dev")
  assert task.num_input_examples("validation") == len(dev)
  assert task.num_input_examples("train") == len(finetune)
  targets = [int(x["targets"][0]) for x in task.get_dataset(
      None, split="validation", shuffle=False).as_numpy_iterator()]
  assert targets == world.examples("task_dev")["targets"][:, 0].tolist()
  with pytest.raises(ValueError, match="dev_fraction"):
    facts.FactWorld(**{**fields, "dev_fraction": 0.75})


def test_token_ids_of_a_fact():
  examples = WORLD.examples("task_eval")
  topic, subject = WORLD.facts("task_eval")[0]
  assert examples["inputs"][0].tolist() == [2 + subject, 2 + 20 + topic]
  value = WORLD.values[topic, subject]
  assert examples["targets"][0, 0] == 2 + 20 + 6 + topic * 8 + value   # typed: topic's own
  all_targets = WORLD.examples("pretrain")["targets"][:, 0]
  assert all_targets.min() >= 2 + 20 + 6 and all_targets.max() < WORLD.vocab_size
  assert WORLD.vocab_size % 16 == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(task_topics=(0, 9)), "task_topics"),
    (dict(task_topics=(1, 1)), "task_topics"),
    (dict(finetune_fraction=1.0), "finetune_fraction"),
    (dict(prompt=("topic",)), "prompt"),
    (dict(num_values=0), "num_values"),
    (dict(task_subjects_per_topic=1), "task_subjects_per_topic"),
    (dict(typed_answers=True, shared_property=True), "shared_property needs untyped"),
])
def test_bad_worlds_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    facts.FactWorld(num_topics=6, **{"task_topics": (0, 1), **kwargs})
  with pytest.raises(ValueError, match="unknown split"):
    WORLD.facts("test")


def test_seqio_tasks_score_the_value_only_and_pack_facts_as_segments():
  names = fact_tasks.register_world("facts_test", WORLD)
  assert names == ["facts_test_pretrain", "facts_test_task"]
  ds = seqio.get_dataset("facts_test_task", {"inputs": 12, "targets": 4},
                         feature_converter=seqio.DecoderFeatureConverter(pack=True),
                         dataset_split="validation", shuffle=False)
  rows = list(ds.as_numpy_iterator())
  weights = np.concatenate([r["decoder_loss_weights"].ravel() for r in rows])
  targets = np.concatenate([r["decoder_target_tokens"].ravel() for r in rows])
  segments = np.concatenate([r["decoder_segment_ids"].ravel() for r in rows])
  assert weights.sum() == WORLD.num_task_items          # one scored token per fact
  expected = WORLD.examples("task_eval")["targets"][:, 0]
  np.testing.assert_array_equal(np.sort(targets[weights > 0]), np.sort(expected))
  # Every fact is its own segment of 3 tokens (subject, topic, value).
  row = rows[0]
  ids, counts = np.unique(row["decoder_segment_ids"][row["decoder_segment_ids"] > 0],
                          return_counts=True)
  assert len(ids) == 5 and set(counts) == {3}
  assert segments.max() >= 5


def test_training_split_is_shuffled_in_full_each_epoch_and_deterministic():
  """The facts are stored topic by topic; the training stream must mix topics from the
  first row on (seqio's 1,000-example buffer alone would not), reproducibly per seed."""
  # At least 2,400 scored items beside the development split (192 facts).
  assert fact_tasks.DEFAULT_WORLD.num_task_items >= 2400
  assert len(fact_tasks.DEFAULT_WORLD.facts("task_dev")) == 192
  assert fact_tasks.DEFAULT_WORLD.num_topics >= 32
  world = facts.FactWorld(num_topics=32, subjects_per_topic=40)  # 1,280 facts

  def topics(seed):
    ds = fact_tasks.fact_dataset("train", True, seed, world=world, part="pretrain")
    return [int(ex["inputs"][1]) - int(world.topic_token(0))
            for ex in ds.repeat(2).take(2 * world.num_facts).as_numpy_iterator()]

  first, again, other = topics(0), topics(0), topics(1)
  assert first == again and first != other
  assert len(set(first[:64])) >= 20                     # many topics from the start
  epochs = first[:world.num_facts], first[world.num_facts:]
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]  # reshuffled
  ordered = fact_tasks.fact_dataset("validation", False, world=world, part="pretrain")
  assert [int(ex["inputs"][1]) - int(world.topic_token(0))
          for ex in ordered.take(3).as_numpy_iterator()] == [0, 0, 0]


# ------------------------------------------------------------------------------------------
# Truth judgement: a task learned in finetuning, scored by rank classification.

TRUTH_WORLD = facts.FactWorld(num_topics=6, num_values=8, typed_answers=True,
                              subjects_per_topic=40, task_topics=(2, 3), finetune_fraction=0.25,
                              dev_fraction=0.125, seed=11)


def test_truth_judgements_are_balanced_and_their_negatives_come_from_the_topic():
  w = TRUTH_WORLD
  for split in ("task_finetune", "task_dev", "task_eval"):
    j, f = w.judgements(split), w.facts(split)
    assert len(j["label"]) == 2 * len(f) and j["label"].tolist() == [1, 0] * len(f)
    topics, subjects = np.repeat(f[:, 0], 2), np.repeat(f[:, 1], 2)
    np.testing.assert_array_equal(j["inputs"][:, 0], w.subject_token(subjects))
    np.testing.assert_array_equal(j["inputs"][:, 1], w.topic_token(topics))
    assert set(j["inputs"][:, 3]) == {w.truth_token("query")}
    shown = j["inputs"][:, 2]
    true = w.value_token(w.values[topics, subjects], topics)
    # The positive shows the fact's value, the negative another value of the same topic.
    np.testing.assert_array_equal(shown[j["label"] == 1], true[j["label"] == 1])
    negatives = shown[j["label"] == 0]
    assert np.all(negatives != true[j["label"] == 0])
    first, last = w.value_token(0, topics), w.value_token(w.num_values - 1, topics)
    assert np.all((shown >= first) & (shown <= last))
    np.testing.assert_array_equal(
        j["targets"][:, 0], np.where(j["label"] == 1, w.truth_token("yes"), w.truth_token("no")))
  # Negatives are spread over the topic's other values (not always the same one).
  negatives = w.judgements("task_eval")["inputs"][1::2, 2]
  assert len(set(negatives.tolist())) > w.num_values
  # The tokens follow the values and fit the vocabulary; the format is not pretraining's.
  assert w.truth_token("query") == w.value_token(w.num_values - 1, w.num_topics - 1) + 1
  assert w.truth_token("no") < w.vocab_size
  pretraining = w.examples("pretrain")
  assert not np.isin([w.truth_token(t) for t in facts.TRUTH_TOKENS], pretraining["inputs"]).any()
  assert not np.isin([w.truth_token(t) for t in facts.TRUTH_TOKENS],
                     pretraining["targets"]).any()
  with pytest.raises(ValueError, match="unknown truth token"):
    w.truth_token("maybe")


@pytest.mark.parametrize("shared", [False, True])
def test_property_judgements_follow_each_topics_half_of_the_values(shared):
  w = facts.FactWorld(num_topics=6, num_values=8, typed_answers=not shared,
                      subjects_per_topic=60, task_topics=(1, 4), finetune_fraction=0.25,
                      dev_fraction=0.25, shared_property=shared, seed=7)
  halves = w.yes_values
  assert halves.shape == (6, 8) and np.all(halves.sum(axis=1) == 4)
  # Shared: one half for every topic; per topic: the topics' halves differ.
  assert (len({tuple(row) for row in halves.tolist()}) == 1) == shared
  for query, order in (("after", ["subject", "topic", "query"]),
                       ("before", ["query", "subject", "topic"]), ("none", ["subject", "topic"]),
                       ("recalled", ["subject", "topic", "value", "query"])):
    p, f = w.properties("task_eval", query), w.facts("task_eval")
    topics, subjects = f[:, 0], f[:, 1]
    label = halves[topics, w.values[topics, subjects]]
    np.testing.assert_array_equal(p["label"], label.astype(np.int32))
    np.testing.assert_array_equal(
        p["targets"][:, 0], np.where(label, w.truth_token("yes"), w.truth_token("no")))
    parts = {"subject": w.subject_token(subjects), "topic": w.topic_token(topics),
             "query": np.full(len(f), w.truth_token("query")),
             "value": w.value_token(w.values[topics, subjects], topics)}
    np.testing.assert_array_equal(p["inputs"], np.stack([parts[k] for k in order], axis=1))
  with pytest.raises(ValueError, match="unknown query position 'middle'"):
    w.properties("task_eval", "middle")
  with pytest.raises(ValueError, match="unknown judgement kind 'property:middle'"):
    fact_tasks.register_truth_task("property_refused", w, kind="property:middle")
  # The half is chosen to balance the classes over the task topics' facts.
  task = np.concatenate([w.values[t, :w.subjects(t)] for t in w.task_topics])
  topic_of = np.repeat(w.task_topics, [w.subjects(t) for t in w.task_topics])
  assert abs(halves[topic_of, task].mean() - 0.5) <= 0.05


def test_truth_tasks_finetune_and_score_on_disjoint_subjects():
  names = fact_tasks.register_truth_task("truth_test", TRUTH_WORLD)
  assert names == ["truth_test", "truth_test_rank", "truth_test_dev_rank",
                   "truth_test_facts_dev"]
  subjects = lambda name, split: {
      (int(x["inputs"][1]), int(x["inputs"][0])) for x in seqio.get_mixture_or_task(
          name).get_dataset(None, split=split, shuffle=False).as_numpy_iterator()}
  finetune = subjects("truth_test", "train")
  scored = subjects("truth_test_rank", "validation")
  dev = subjects("truth_test_dev_rank", "validation")
  assert finetune and scored and dev
  assert not finetune & scored and not finetune & dev and not dev & scored
  assert subjects("truth_test_facts_dev", "validation") == dev
  # 2 rows per judgement (yes, no), the right one marked; 2 judgements per fact.
  rows = list(seqio.get_mixture_or_task("truth_test_rank").get_dataset(
      None, split="validation", shuffle=False).as_numpy_iterator())
  n = len(TRUTH_WORLD.facts("task_eval"))
  assert len(rows) == 4 * n
  assert seqio.get_mixture_or_task("truth_test_rank").num_input_examples("validation") == 4 * n
  assert [r["idx"].tolist() for r in rows[:4]] == [[0, 0], [0, 1], [1, 0], [1, 1]]
  assert [bool(r["is_correct"]) for r in rows[:4]] == [True, False, False, True]
  assert [r["targets_pretokenized"] for r in rows[:2]] == [b"yes", b"no"]
  # The default truth tasks: topics apart from facts_task's, >= 2,500 scored items each.
  default_topics = set(fact_tasks.DEFAULT_WORLD.task_topics)
  truth_topics = [set(w.task_topics) for w in fact_tasks.TRUTH_WORLDS.values()]
  assert len(truth_topics) == 2 and not truth_topics[0] & truth_topics[1]
  assert all(not topics & default_topics for topics in truth_topics)
  for world in fact_tasks.TRUTH_WORLDS.values():
    assert 2 * world.num_task_items >= 2500
    np.testing.assert_array_equal(world.values, fact_tasks.DEFAULT_WORLD.values)  # same facts


def test_rank_scoring_of_a_truth_task_on_known_logits():
  """seqio's Evaluator with the project's scorer on a stand-in model whose logits are
  known: a model that knows every fact is right on every judgement, one that always
  answers yes is right on exactly half, one that knows the facts of one topic only is right
  on that topic's judgements and half of the rest."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from uncurl_jax.model import partitioning  # pylint: disable=import-outside-toplevel
  from uncurl_jax.train import evaluation  # pylint: disable=import-outside-toplevel
  w = TRUTH_WORLD
  fact_tasks.register_truth_task("truth_logits", w)
  table = jnp.asarray(w.value_token(w.values, np.arange(w.num_topics)[:, None]))

  def stand_in(known_topics):
    def apply_fn(variables, decoder_input_tokens, decoder_target_tokens, **_):
      del variables
      # decoder_input_tokens is shifted right: position 4 holds the shown value, 5 the query.
      subject = decoder_input_tokens[:, 1] - 2
      topic = decoder_input_tokens[:, 2] - int(w.topic_token(0))
      shown = decoder_input_tokens[:, 3]
      known = jnp.isin(topic, jnp.asarray(known_topics))
      true = (table[topic, subject] == shown) | ~known
      logits = jnp.zeros(decoder_target_tokens.shape + (w.vocab_size,))
      answer = jnp.where(true, w.truth_token("yes"), w.truth_token("no"))
      return logits.at[:, :, answer].set(0.0) + 5.0 * jax_one_hot(answer, w.vocab_size)[:, None]
    return apply_fn

  def jax_one_hot(index, size):
    return (jnp.arange(size)[None, :] == index[:, None]).astype(jnp.float32)

  evaluator = evaluation.make_evaluator(mixture_or_task_name="truth_logits_rank",
                                        task_feature_lengths={"inputs": 8, "targets": 4})
  mesh = partitioning.make_mesh(devices=__import__("jax").devices()[:1])
  accuracy = lambda topics: evaluation.task_metrics(evaluator, evaluation.ModelOutputs(
      apply_fn=stand_in(topics), mesh=mesh, batch_size=8), None)["truth_logits_rank"]["accuracy"]
  assert accuracy(list(range(w.num_topics))) == 100.0
  assert accuracy([]) == 50.0  # knows nothing: always yes
  judged = w.judgements("task_eval")["inputs"][:, 1] - int(w.topic_token(0))
  expected = 100.0 * (np.mean(judged == 2) + 0.5 * np.mean(judged != 2))
  assert accuracy([2]) == pytest.approx(expected)


def test_the_searchs_variants_are_registered():
  from uncurl_jax.tasks import truth_search
  mixture = seqio.get_mixture_or_task("facts_property_recalled_replay")
  tasks = {task.name: mixture.get_rate(task) for task in mixture.tasks}
  assert tasks == {"facts_property_recalled": 1.0, "facts_pretrain": 1.0}
  # The untyped world: its topics answer from the same 16 value tokens, one property half.
  world = truth_search.UNTYPED_WORLD
  targets = world.examples("pretrain")["targets"][:, 0]
  assert set(targets.tolist()) == set(world.value_token(np.arange(16), 0).tolist())
  assert (world.yes_values == world.yes_values[0]).all()
  recalled = seqio.get_mixture_or_task("facts_property_recalled")
  assert recalled.num_input_examples("train") == len(
      fact_tasks.TRUTH_WORLDS["facts_truth"].facts("task_finetune"))


def test_property_tasks_finetune_score_and_replay_on_the_right_facts():
  """A property task: its judgements are finetuned on the finetuning subjects, scored
  (recall, then judge) on the held-out ones, chosen on the development ones, all disjoint;
  its rows show the fact's true value and are labelled by the topic's half; the
  finetuning mixture replays the pretraining data one to one. The world's "replay" split
  (the search's variant) is every fact but the development and scored ones."""
  w = TRUTH_WORLD
  fact_tasks.register_world("property_test_world", w)
  names = fact_tasks.register_property_task("property_test", w,
                                            replay="property_test_world_pretrain")
  assert names == ["property_test", "property_test_rank", "property_test_dev_rank",
                   "property_test_facts_dev", "property_test_recall_judge",
                   "property_test_dev_recall_judge", "property_test_replay"]
  rows = lambda name, split: list(seqio.get_mixture_or_task(name).get_dataset(
      None, split=split, shuffle=False).as_numpy_iterator())
  pair = lambda x: (int(x["inputs"][1]) - int(w.topic_token(0)), int(x["inputs"][0]) - 2)
  finetune = {pair(x) for x in rows("property_test", "train")}
  scored = rows("property_test_recall_judge", "validation")
  dev = {pair(x) for x in rows("property_test_dev_recall_judge", "validation")}
  as_set = lambda a: {tuple(p) for p in a.tolist()}
  assert finetune == as_set(w.facts("task_finetune")) and dev == as_set(w.facts("task_dev"))
  assert {pair(x) for x in scored} == as_set(w.facts("task_eval"))
  assert not finetune & dev and not finetune & {pair(x) for x in scored}
  # The scored rows: "subject topic value ?" with the true value, answered by the half.
  expected = w.properties("task_eval", "recalled")
  np.testing.assert_array_equal(np.stack([x["inputs"] for x in scored]), expected["inputs"])
  np.testing.assert_array_equal([int(x["targets"][0]) for x in scored],
                                expected["targets"][:, 0])
  spec = fact_tasks.RECALL_JUDGE_TASKS["property_test_recall_judge"]
  assert spec == fact_tasks.RecallJudge(value_position=2, answers=(
      w.truth_token("yes"), w.truth_token("no")))
  mixture = seqio.get_mixture_or_task("property_test_replay")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      "property_test": 1.0, "property_test_world_pretrain": 1.0}
  # The "replay" split: every fact but the development and scored ones.
  fact_tasks.register_facts("property_test_unscored", w, "replay")
  replayed = {pair(x) for x in rows("property_test_unscored", "train")}
  assert replayed == as_set(w.facts("pretrain")) - dev - as_set(w.facts("task_eval"))
  assert finetune <= replayed and len(replayed) == len(w.facts("replay"))
  with pytest.raises(ValueError, match="'pretrain' or 'replay' facts"):
    fact_tasks.register_facts("property_refused", w, "task_eval")
  no_dev = facts.FactWorld(num_topics=6, num_values=8, typed_answers=True,
                           subjects_per_topic=40, task_topics=(2,))
  with pytest.raises(ValueError, match="needs a world with a development split"):
    fact_tasks.register_property_task("property_refused", no_dev, replay="facts_pretrain")


def test_the_default_property_tasks_are_balanced_apart_and_large_enough():
  """The study's two property tasks: 12 topics each, apart from facts_task's and from each
  other's, on the default world's facts, >= 2,500 scored facts, classes within 5 points of
  balance in every split."""
  worlds = fact_tasks.PROPERTY_WORLDS
  assert sorted(worlds) == ["facts_property", "facts_property_b"]
  topics = [set(w.task_topics) for w in worlds.values()]
  assert all(len(t) == 12 for t in topics) and not topics[0] & topics[1]
  assert all(not t & set(fact_tasks.DEFAULT_WORLD.task_topics) for t in topics)
  for name, w in worlds.items():
    np.testing.assert_array_equal(w.values, fact_tasks.DEFAULT_WORLD.values)  # same facts
    assert w.num_task_items >= 2500
    for split in ("task_finetune", "task_dev", "task_eval"):
      assert abs(w.properties(split, "recalled")["label"].mean() - 0.5) <= 0.05, (name, split)
    assert seqio.get_mixture_or_task(f"{name}_recall_judge").num_input_examples(
        "validation") == w.num_task_items
