"""seqio tasks and mixtures end to end: mocked TFDS (offline) and the synthetic corpus."""

import os

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from tests.tasks import tfds_mock
import uncurl_jax.tasks
from uncurl_jax.data import corpus
from uncurl_jax.data import corpus_tasks
from uncurl_jax.tasks import c4
from uncurl_jax.tasks import flan
from uncurl_jax.tasks import flan_templates
from uncurl_jax.tasks import metrics
from uncurl_jax.tasks import preprocessors
from uncurl_jax.tasks import superglue
from uncurl_jax.tasks import vocab

TASK_NAMES = uncurl_jax.tasks.register_all_tasks()
TFDS_SPLITS = {
    c4.C4_TFDS_NAME: c4.C4_SPLITS,
    **{spec.tfds_name: superglue.SPLITS for spec in superglue.SUPERGLUE_TASKS},
    **{spec.tfds_name: sorted(set(spec.splits.values())) for spec in flan.FLAN_DATASETS},
}
PROMPT_LENGTHS = {"inputs": 48, "targets": 16}
LM_LENGTHS = {"targets": 16}
PACKED_PROMPT_LENGTHS = {"inputs": 192, "targets": 64}  # rows that fit several mock prompts
EOS = 1


@pytest.fixture(scope="module")
def mocked_tfds(tmp_path_factory):
  with tfds_mock.mock_tfds(tmp_path_factory.mktemp("tfds"), TFDS_SPLITS):
    yield


def lengths_of(task_or_mixture, pack=False):
  if "inputs" not in task_or_mixture.output_features:
    return LM_LENGTHS
  return PACKED_PROMPT_LENGTHS if pack else PROMPT_LENGTHS


def converted(name_or_provider, *, pack, split="validation", count=2, repeat=False):
  provider = seqio.get_mixture_or_task(name_or_provider) if isinstance(
      name_or_provider, str) else name_or_provider
  ds = seqio.get_dataset(provider, lengths_of(provider, pack), dataset_split=split,
                         shuffle=False,
                         num_epochs=None if repeat else 1,
                         feature_converter=seqio.DecoderFeatureConverter(pack=pack))
  return list(ds.take(count).as_numpy_iterator())


def test_task_names_follow_the_conventions():
  assert len(TASK_NAMES) == len(set(TASK_NAMES))
  assert {"c4_v310_full_lm", "super_glue_rte_v102", "super_glue_wsc_fixed_v102_rank",
          "flan_anli_r1", "synthetic_lm", "synthetic_city_country_rank"} <= set(TASK_NAMES)
  assert set(seqio.get_mixture_or_task("super_glue_v102_proportional").tasks) == {
      seqio.get_mixture_or_task(spec.task_name) for spec in superglue.SUPERGLUE_TASKS}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_converts_unpacked(name, mocked_tfds):
  del mocked_tfds
  task = seqio.get_mixture_or_task(name)
  lengths = lengths_of(task)
  examples = converted(name, pack=False)
  assert examples, f"{name} produced no examples"
  for ex in examples:
    targets, weights = ex["decoder_target_tokens"], ex["decoder_loss_weights"]
    assert all(v.shape == (sum(lengths.values()),) for v in ex.values())
    np.testing.assert_array_equal(ex["decoder_input_tokens"][1:], targets[:-1])
    assert weights.sum() > 0 and not weights[targets == 0].any()  # padding has no loss
    if "inputs" in lengths:
      num_prompt = ex["decoder_causal_attention"].sum() - 1  # the prefix covers BOS too
      assert not weights[:num_prompt].any()
      if task.output_features["targets"].add_eos and not name.endswith("empty_inputs"):
        # answers end with EOS, except where the task's targets feature adds none (facts_*)
        assert targets[np.flatnonzero(weights)[-1]] == EOS and num_prompt > 0


def lm_mixture():
  names = [n for n in TASK_NAMES if "inputs" not in seqio.get_mixture_or_task(n).output_features]
  return seqio.Mixture("test_lm_tasks", names, default_rate=1.0)


@pytest.mark.parametrize("mixture", ["flan_prefinetune", "super_glue_v102_proportional",
                                     "super_glue_v102_rank", "synthetic_prefinetune",
                                     "synthetic_tasks_rank", "lm_tasks"])
def test_every_task_converts_packed_through_a_mixture(mixture, mocked_tfds):
  del mocked_tfds
  provider = lm_mixture() if mixture == "lm_tasks" else seqio.get_mixture_or_task(mixture)
  examples = converted(provider, pack=True, split="train", count=40, repeat=True)
  assert len(examples) == 40
  num_segments = 0
  for ex in examples:
    segments, positions = ex["decoder_segment_ids"], ex["decoder_positions"]
    for segment in set(segments[segments > 0]):
      where = np.flatnonzero(segments == segment)
      np.testing.assert_array_equal(positions[where], np.arange(len(where)))
      np.testing.assert_array_equal(ex["decoder_input_tokens"][where][1:],
                                    ex["decoder_target_tokens"][where][:-1])
    num_segments += len(set(segments[segments > 0]))
  if mixture == "lm_tasks":  # full-LM pieces have exactly the row length: rows are full
    assert np.mean([ex["decoder_segment_ids"].all() for ex in examples]) > 0.8
  else:
    assert num_segments > len(examples)  # several examples share a row


def test_c4_pieces_are_the_concatenated_documents(mocked_tfds):
  del mocked_tfds
  task = seqio.get_mixture_or_task(c4.C4_FULL_LM)
  byte_vocab = task.output_features["targets"].vocabulary
  texts = [ex["text"] for ex in tfds.as_numpy(tfds.load(c4.C4_TFDS_NAME, split="validation"))]
  expected = [t for text in texts for t in byte_vocab.encode(text.decode()) + [EOS]]
  pieces = [list(ex["targets"]) for ex in task.get_dataset(
      LM_LENGTHS, split="validation", shuffle=False).as_numpy_iterator()]
  assert sum(pieces, []) == expected
  assert all(len(p) == LM_LENGTHS["targets"] for p in pieces[:-1]) and len(pieces) > 2


def test_concatenate_and_split_by_hand():
  ds = tf.data.Dataset.from_generator(
      lambda: iter([{"targets": [5, 6, 1]}, {"targets": [7, 1]}, {"targets": [8, 9, 9, 1]}]),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)})
  pieces = [list(x["targets"]) for x in preprocessors.concatenate_and_split(
      ds, {"targets": 4}, batch_size=2).as_numpy_iterator()]
  assert pieces == [[5, 6, 1, 7], [1], [8, 9, 9, 1]]  # batches of two documents
  assert preprocessors.concatenate_and_split(ds, None) is ds
  with pytest.raises(ValueError, match="targets length must be positive"):
    preprocessors.concatenate_and_split(ds, {"targets": 0})


def test_rank_classification_expands_options():
  ds = tf.data.Dataset.from_tensor_slices({
      "inputs": ["q0", "q1"], "options": tf.ragged.constant([["a", "b"], ["c", "d"]]),
      "label": [1, 0], "group": [[3, 4], [5, 6]]})
  rows = list(preprocessors.rank_classification(ds).as_numpy_iterator())
  assert [(list(r["idx"]), r["inputs"], r["targets"], r["is_correct"], list(r["group"]))
          for r in rows] == [
              ([0, 0], b"q0", b"a", False, [3, 4]), ([0, 1], b"q0", b"b", True, [3, 4]),
              ([1, 0], b"q1", b"c", True, [5, 6]), ([1, 1], b"q1", b"d", False, [5, 6])]
  train_rows = list(preprocessors.rank_classification(ds, mode="train").as_numpy_iterator())
  assert [r["targets"] for r in train_rows] == [b"b", b"c"]
  with pytest.raises(ValueError, match="mode must be 'eval' or 'train'"):
    preprocessors.rank_classification(ds, mode="test")


def test_superglue_prompts_and_postprocessing(mocked_tfds):
  del mocked_tfds
  raw = list(tfds.as_numpy(tfds.load("super_glue/rte:1.0.2", split="validation")))
  rte = list(seqio.get_mixture_or_task("super_glue_rte_v102").get_dataset(
      PROMPT_LENGTHS, split="validation", shuffle=False).as_numpy_iterator())
  assert [ex["inputs_pretokenized"] for ex in rte] == [
      r["premise"] + b"\nQuestion: " + r["hypothesis"] + b" True or False?\nAnswer: " for r in raw]
  assert [ex["targets_pretokenized"] for ex in rte] == [
      [b"true", b"false"][r["label"]] for r in raw]
  for spec in superglue.SUPERGLUE_TASKS:
    task = seqio.get_mixture_or_task(spec.task_name)
    for ex in task.get_dataset(PROMPT_LENGTHS, split="validation",
                               shuffle=False).as_numpy_iterator():
      answer = ex["targets_pretokenized"].decode()
      predicted, gold = (spec.postprocessor(answer, example=ex, is_target=flag)
                         for flag in (False, True))
      if spec.name == "record":  # the answer is one of the gold answers and entities
        assert predicted in gold and list(ex["is_correct"]) == [o in ex["answers"]
                                                                for o in ex["options"]]
      else:
        assert predicted == gold and metrics.option_index(answer, ex) == ex["label"]


def test_flan_members_and_exclusions():
  assert len(flan.FLAN_DATASETS) >= 10
  assert {"COPA", "BoolQ", "RTE", "CB", "ReCoRD", "WSC"} == set(flan.FLAN_EXCLUDED.values())
  assert all(len(templates) >= 3 for templates in flan_templates.TEMPLATES.values())
  for name in ("flan_prefinetune", "flan_prefinetune_no_c4"):
    for task in seqio.get_mixture_or_task(name).tasks:
      tfds_name = task.source.tfds_dataset.name
      assert flan.tfds_base_name(tfds_name) not in flan.FLAN_EXCLUDED, tfds_name
      assert not task.name.startswith("super_glue") and "rte" not in tfds_name
  members = {t.name for t in seqio.get_mixture_or_task("flan_prefinetune").tasks}
  assert members == {s.task_name for s in flan.FLAN_DATASETS} | {c4.C4_FULL_LM_EMPTY_INPUTS}


@pytest.mark.parametrize("share", [0.1, 0.25])
def test_flan_c4_share_is_the_mixture_rate(share, mocked_tfds):
  del mocked_tfds
  mixture = flan.register_flan_mixture("test_flan_share", c4_share=share)
  seqio.MixtureRegistry.remove("test_flan_share")
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  # Every mocked split declares 5 examples, under the 3,000 cap.
  assert all(rate == 5 for name, rate in rates.items() if name.startswith("flan_"))
  assert rates[c4.C4_FULL_LM_EMPTY_INPUTS] / sum(rates.values()) == pytest.approx(share)


def test_flan_mixture_rejects_bad_shares():
  without_c4 = flan.register_flan_mixture("test_flan_no_c4", c4_share=0.0)
  seqio.MixtureRegistry.remove("test_flan_no_c4")
  assert {t.name for t in without_c4.tasks} == {s.task_name for s in flan.FLAN_DATASETS}
  with pytest.raises(ValueError, match=r"c4_share must be in \[0, 1\), got 1.0"):
    flan.register_flan_mixture("test_flan_bad", c4_share=1.0)


def test_flan_template_choice_is_deterministic_and_varied():
  templates = flan_templates.TEMPLATES["nli"]
  choices = []
  for i in range(40):
    fields = {"premise": tf.constant(f"premise {i}"), "hypothesis": tf.constant("h"),
              "options": tf.constant("\n- yes\n- no"), "answer": tf.constant("yes")}
    first, again = (preprocessors.choose_template(fields, templates) for _ in range(2))
    assert first["inputs"].numpy() == again["inputs"].numpy()
    assert first["targets"].numpy() == b"yes"
    choices.append(first["inputs"].numpy().split(b"premise")[0])
  assert len(set(choices)) == len(templates)  # all templates get used


def test_flan_formats_answers_from_the_options(mocked_tfds):
  del mocked_tfds
  for name in ("flan_snli", "flan_hellaswag", "flan_arc_easy"):
    examples = list(seqio.get_mixture_or_task(name).get_dataset(
        PROMPT_LENGTHS, split="validation", shuffle=False).as_numpy_iterator())
    assert examples, name
    for ex in examples:
      assert b"OPTIONS:" in ex["inputs_pretokenized"] or b"options:" in ex["inputs_pretokenized"]
      assert b"\n- " + ex["targets_pretokenized"] in ex["inputs_pretokenized"]


def test_synthetic_task_examples_match_the_corpus():
  task = seqio.get_mixture_or_task("synthetic_city_country")
  got = list(task.get_dataset(PROMPT_LENGTHS, split="validation", shuffle=False)
             .take(3).as_numpy_iterator())
  want = corpus_tasks.task_examples("city_country", "validation", 3, seed=1)  # chunk 0 of split 1
  assert [ex["targets_pretokenized"].decode() for ex in got] == [w.answer for w in want]
  assert [ex["inputs_pretokenized"].decode() for ex in got] == [w.prompt for w in want]


def make_evaluator(task_name):
  evaluator = seqio.Evaluator(task_name, seqio.DecoderFeatureConverter(pack=False),
                              eval_split="validation", num_examples=6,
                              sequence_length={"inputs": 64, "targets": 8})
  examples = list(evaluator.cached_task_datasets[task_name].as_numpy_iterator())

  def evaluate(**model_fn):
    results, _ = evaluator.evaluate(compute_metrics=True, **model_fn)
    return results.result()[task_name]

  return evaluate, examples


def test_evaluator_scores_rank_tasks():
  evaluate, examples = make_evaluator("synthetic_dna_motif_rank")
  # num_examples counts expanded examples: three yes/no questions, two options each.
  assert [list(ex["idx"]) for ex in examples] == [[q, o] for q in range(3) for o in range(2)]

  def oracle(ds):
    return [(i, 0.0 if examples[i]["is_correct"] else -1.0) for i, _ in ds.as_numpy_iterator()]

  assert evaluate(score_fn=oracle) == {"accuracy": 100.0}
  assert evaluate(score_fn=lambda ds: [(i, -s) for i, s in oracle(ds)]) == {"accuracy": 0.0}


def test_evaluator_decodes_predictions():
  evaluate, examples = make_evaluator("synthetic_dna_motif")
  byte_vocab = vocab.get_vocabulary()

  def answering(text_of):
    def predict(ds):
      tokens = [byte_vocab.encode(text_of(examples[i])) for i, _ in ds.as_numpy_iterator()]
      return list(enumerate(np.array([t + [0] * (8 - len(t)) for t in tokens])))
    return predict

  right = answering(lambda ex: ex["targets_pretokenized"].decode())
  assert evaluate(predict_fn=right) == {"accuracy": 100.0}
  yes_share = np.mean([ex["label"] == 0 for ex in examples])
  assert evaluate(predict_fn=answering(lambda ex: "yes")) == pytest.approx(
      {"accuracy": 100 * yes_share})
  assert evaluate(predict_fn=answering(lambda ex: "perhaps")) == {"accuracy": 0.0}


def test_vocabulary_options(tmp_path, monkeypatch):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv(vocab.SENTENCEPIECE_ENV, raising=False)
  assert isinstance(vocab.get_vocabulary(), seqio.ByteVocabulary)
  prefix = str(tmp_path / "spm")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus.generate_documents("geography", 300, seed=0)),
      model_prefix=prefix, vocab_size=200, model_type="unigram", minloglevel=2)
  spm_vocab = vocab.get_vocabulary(prefix + ".model")
  assert spm_vocab.vocab_size == 200 and spm_vocab.decode(spm_vocab.encode("Gogi")) == "Gogi"
  monkeypatch.setenv(vocab.SENTENCEPIECE_ENV, prefix + ".model")
  assert vocab.get_vocabulary().vocab_size == 200
  try:
    uncurl_jax.tasks.register_all_tasks()
    features = seqio.get_mixture_or_task("synthetic_lm").output_features
    assert features["targets"].vocabulary.vocab_size == 200
  finally:
    uncurl_jax.tasks.register_all_tasks(seqio.ByteVocabulary())
  assert isinstance(seqio.get_mixture_or_task("synthetic_lm").output_features[
      "targets"].vocabulary, seqio.ByteVocabulary)
  monkeypatch.setenv(vocab.SENTENCEPIECE_ENV, os.fspath(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="missing.model' does not exist"):
    vocab.get_vocabulary()
  with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
    vocab.get_vocabulary(3)
