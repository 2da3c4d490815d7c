"""Recall, then judge: the score of the property tasks, on known logits and against a
direct forward pass of a real model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import uncurl_jax.tasks  # noqa: F401  (registers the seqio tasks)
from uncurl_jax.data import facts
from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import partitioning
from uncurl_jax.study import recall_judge
from uncurl_jax.tasks import facts as fact_tasks

WORLD = facts.FactWorld(num_topics=4, num_values=8, typed_answers=True, subjects_per_topic=40,
                        task_topics=(1, 2), finetune_fraction=0.25, dev_fraction=0.125, seed=3)
LENGTHS = {"inputs": 8, "targets": 4}
fact_tasks.register_world("recall_judge_world", WORLD)
fact_tasks.register_property_task("recall_judge_test", WORLD,
                                  replay="recall_judge_world_pretrain")


def _batches():
  return list(pipeline.eval_batches(mixture_or_task_name="recall_judge_test_recall_judge",
                                    task_feature_lengths=LENGTHS, batch_size=16, pack=False))


def _stand_in(known_topics):
  """A model that recalls the facts of `known_topics` (others: the next value of the same
  topic) and judges any shown value by its topic's half, reading only the inputs it may
  see (decoder_input_tokens are the targets shifted right)."""
  w = WORLD
  table = jnp.asarray(w.value_token(w.values, np.arange(w.num_topics)[:, None]))
  half = jnp.asarray(w.yes_values)
  first = jnp.asarray(w.value_token(0, np.arange(w.num_topics)))  # each topic's value 0

  def apply_fn(variables, decoder_input_tokens, decoder_target_tokens, **_):
    del variables
    subject = decoder_input_tokens[:, 1] - 2
    topic = jnp.clip(decoder_input_tokens[:, 2] - int(w.topic_token(0)), 0, w.num_topics - 1)
    true = table[topic, subject]
    value = first[topic] + (true - first[topic] + 1) % w.num_values
    recalled = jnp.where(jnp.isin(topic, jnp.asarray(known_topics)), true, value)
    shown = decoder_input_tokens[:, 3] - first[topic]
    yes = half[topic, jnp.clip(shown, 0, w.num_values - 1)]
    answer = jnp.where(yes, w.truth_token("yes"), w.truth_token("no"))
    logits = jnp.zeros(decoder_target_tokens.shape + (w.vocab_size,))
    logits = logits.at[jnp.arange(len(answer)), 2, recalled].set(5.0)
    return logits.at[jnp.arange(len(answer)), 4, answer].set(5.0)
  return apply_fn


@pytest.mark.parametrize("known", [[1, 2], [1], []])
def test_recall_then_judge_on_known_logits(known):
  """A model that judges every shown value right: with the true value shown it is always
  right; after recall it is right where it recalls the fact, and where its wrong recall
  happens to fall in the same half."""
  w = WORLD
  fn = jax.jit(functools.partial(recall_judge.recall_then_judge, apply_fn=_stand_in(known),
                                 value_position=2, answers=(w.truth_token("yes"),
                                                            w.truth_token("no"))))
  out = {name: [] for name in recall_judge.OUTCOMES}
  for batch in _batches():
    scored = batch["decoder_loss_weights"].sum(1) > 0
    for name, value in fn(None, {k: jnp.asarray(v) for k, v in batch.items()}).items():
      out[name].append(np.asarray(value)[scored])
  out = {name: np.concatenate(v) for name, v in out.items()}
  f = w.facts("task_eval")
  topics, values = f[:, 0], w.values[f[:, 0], f[:, 1]]
  knows = np.isin(topics, known)
  np.testing.assert_array_equal(out["recalled"], knows)
  np.testing.assert_array_equal(out["judged_true_value"], np.ones(len(f), bool))
  same_half = w.yes_values[topics, (values + 1) % w.num_values] == w.yes_values[topics, values]
  np.testing.assert_array_equal(out["judged"], knows | same_half)
  if not known:  # a model that recalls nothing right is right only by its halves' chance
    assert 0 < out["judged"].mean() < 1


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_scorer_equals_a_direct_forward_of_a_real_model(bidirectional):
  """The scorer's outcomes on a real (randomly initialised) MoE decoder equal a plain
  teacher-forced forward: argmax after "subject topic", then the yes / no logits after
  "subject topic <recalled> ?" and after the true value. A prefix-LM model sees its prompt
  both ways, and the value only where it is part of the prompt (not while recalling it)."""
  w = WORLD
  config = configs.get("tiny", num_layers=2, moe_every=1, d_model=16, d_ff=32, num_heads=2,
                       max_length=16, vocab_size=w.vocab_size, num_experts=4, dropless=True,
                       inputs_bidirectional_attention=bidirectional)
  model = decoder.SMoEDecoder(config)
  tokens = jnp.ones((2, 12), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False)["params"]
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  scorer = recall_judge.RecallJudgeScorer(eval_task="recall_judge_test_recall_judge",
                                          task_feature_lengths=LENGTHS, batch_size=16, mesh=mesh)
  metrics, items = scorer(config, params), scorer.items(config, params)

  apply = jax.jit(functools.partial(model.apply, enable_dropout=False))

  def forward(sequence, prompt_length):
    inputs = np.pad(sequence, ((0, 0), (1, 0)))[:, :-1]
    prefix = {}
    if bidirectional:  # seqio's prefix-LM marker: the prompt and the first target position
      prefix["decoder_causal_attention"] = jnp.asarray(
          np.arange(sequence.shape[1])[None] <= prompt_length, jnp.int32).repeat(
              len(sequence), 0)
    return np.asarray(apply({"params": params}, jnp.asarray(inputs), jnp.asarray(sequence),
                            **prefix))

  rows = w.properties("task_eval", "recalled")
  prompt, true = rows["inputs"][:, :2], rows["inputs"][:, 2]
  recalled = forward(rows["inputs"][:, :3], 2)[:, 2].argmax(-1)  # the value's prediction
  yes, no = w.truth_token("yes"), w.truth_token("no")

  def judged(value):
    z = forward(np.concatenate([prompt, value[:, None], rows["inputs"][:, 3:],
                                rows["targets"]], 1), 4)[:, 4]  # the answer's prediction
    return (z[:, yes] >= z[:, no]) == (rows["label"] == 1)

  if bidirectional:  # the prefix changes this model's outputs (so the check is not empty)
    causal = np.asarray(apply({"params": params}, jnp.asarray(
        np.pad(rows["inputs"], ((0, 0), (1, 0)))[:, :-1]), jnp.asarray(rows["inputs"])))
    assert np.abs(causal[:, 2] - forward(rows["inputs"], 4)[:, 2]).max() > 1e-4
  np.testing.assert_array_equal(items, judged(recalled).astype(np.float64))
  assert metrics["accuracy"] == pytest.approx(100 * judged(recalled).mean())
  assert metrics["recall"] == pytest.approx(100 * (recalled == true).mean())
  assert metrics["accuracy_true_value"] == pytest.approx(100 * judged(true).mean())
  assert len(items) == w.num_task_items


def test_the_scorer_refuses_a_task_that_is_not_recall_then_judge():
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="is not a recall-then-judge task"):
    recall_judge.RecallJudgeScorer(eval_task="recall_judge_test_rank",
                                   task_feature_lengths=LENGTHS, batch_size=8, mesh=mesh)
