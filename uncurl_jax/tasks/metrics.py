"""Postprocessors and metrics of the prompt tasks (SuperGLUE definitions).

Two ways to evaluate a prompt task, both through `seqio.Evaluator`:

- generation: the model's decoded answer text is mapped back to a label by a
  postprocessor (`option_index`, `multirc_answer`, `record_answer`) and compared
  with the target by a `(targets, predictions)` metric;
- rank classification (the `_rank` task variants): every answer option is one
  example, the evaluator scores each, `rank_target` keeps each example's
  identity, and a `(targets, scores)` metric picks the highest-scoring option per
  question before applying the same definitions.

Definitions: accuracy (RTE, BoolQ, COPA, WiC, WSC, synthetic tasks); CB accuracy
and macro-F1 over its three classes; MultiRC F1a (binary F1 over all answer
options) and exact match (share of questions whose options are all right);
ReCoRD max-over-gold-answers token F1 and exact match after SQuAD normalization.
All values are percentages. An answer that matches no option counts as wrong.

Example:
  >>> accuracy([0, 1, 1], [0, 1, 0])
  {'accuracy': 66.66666666666667}
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn import metrics as sklearn_metrics


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------- postprocessors ---

def option_index(answer: str, example: Mapping[str, Any] | None = None,
                 is_target: bool = False) -> int:
  """Maps an answer text to the index of the matching option (-1 if none).

  For targets the example's own `label` is returned.

  Example:
    >>> option_index(" Yes", example={"options": [b"no", b"yes"], "label": 1})
    1
  """
  if example is None:
    raise ValueError("option_index needs the example (its 'options')")
  if is_target:
    return int(example["label"])
  wanted = _text(answer).strip().lower()
  options = [_text(o).strip().lower() for o in example["options"]]
  return options.index(wanted) if wanted in options else -1


def multirc_answer(answer: str, example: Mapping[str, Any] | None = None,
                   is_target: bool = False) -> dict[str, Any]:
  """An answer-option label with its question `group` (MultiRC)."""
  return {"group": tuple(int(g) for g in example["group"]),
          "value": option_index(answer, example, is_target)}


def record_answer(answer: str, example: Mapping[str, Any] | None = None,
                  is_target: bool = False) -> str | list[str]:
  """The predicted entity text, or all gold answers for a target (ReCoRD)."""
  if is_target:
    return [_text(a) for a in example["answers"]]
  return _text(answer).strip()


def rank_target(score: Any, example: Mapping[str, Any] | None = None,
                is_target: bool = False) -> Any:
  """Keeps what rank metrics need of each option example; scores pass through."""
  if not is_target:
    return score
  target = {"example": int(example["idx"][0]), "option": int(example["idx"][1]),
            "is_correct": bool(example["is_correct"]),
            "text": _text(example["targets_pretokenized"])}
  if "group" in example:
    target["group"] = tuple(int(g) for g in example["group"])
  return target


# ---------------------------------------------------- prediction metrics ---

def accuracy(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """Percentage of predictions equal to their target.

  Example:
    >>> accuracy([1, 0], [1, 1])
    {'accuracy': 50.0}
  """
  return {"accuracy": 100.0 * sklearn_metrics.accuracy_score(targets, predictions)}


def accuracy_and_macro_f1(targets: Sequence[int], predictions: Sequence[int],
                          num_classes: int = 3) -> dict[str, float]:
  """Accuracy and the unweighted mean of per-class F1 (CB).

  Example:
    >>> accuracy_and_macro_f1([0, 1, 2], [0, 1, 1])["f1_macro"]
    55.55555555555556
  """
  f1 = sklearn_metrics.f1_score(targets, predictions, labels=list(range(num_classes)),
                                average="macro", zero_division=0)
  return {**accuracy(targets, predictions), "f1_macro": 100.0 * f1}


def multirc_f1a_and_em(targets: Sequence[Mapping[str, Any]],
                       predictions: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """MultiRC: F1 over all answer options (F1a) and per-question exact match.

  Example:
    >>> multirc_f1a_and_em([{"group": (0, 0), "value": 1}, {"group": (0, 0), "value": 0}],
    ...                    [{"value": 1}, {"value": 1}])
    {'f1a': 66.66666666666667, 'exact_match': 0.0}
  """
  labels = np.array([t["value"] for t in targets])
  predicted = np.array([p["value"] for p in predictions])
  predicted = np.where(predicted < 0, 1 - labels, predicted)  # unmatched -> wrong
  f1a = sklearn_metrics.f1_score(labels, predicted, average="binary", pos_label=1,
                                 zero_division=0)
  all_right: dict[Any, bool] = collections.defaultdict(lambda: True)
  for target, label, guess in zip(targets, labels, predicted):
    all_right[target["group"]] &= bool(label == guess)
  return {"f1a": 100.0 * f1a, "exact_match": 100.0 * float(np.mean(list(all_right.values())))}


def normalize_answer(text: str) -> str:
  """SQuAD normalization: lower case, no punctuation, articles or extra spaces.

  Example:
    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
  """
  text = "".join(c for c in text.lower() if c not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _token_f1(gold: str, guess: str) -> float:
  gold_tokens, guess_tokens = normalize_answer(gold).split(), normalize_answer(guess).split()
  common = sum((collections.Counter(gold_tokens) & collections.Counter(guess_tokens)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(guess_tokens), common / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def record_max_f1_em(targets: Sequence[Sequence[str]],
                     predictions: Sequence[str]) -> dict[str, float]:
  """ReCoRD: token F1 and exact match, each the max over an example's gold answers.

  Example:
    >>> record_max_f1_em([["Paris", "the city of Paris"]], ["Paris city"])
    {'f1': 80.0, 'exact_match': 0.0}
  """
  f1s, ems = [], []
  for answers, guess in zip(targets, predictions):
    f1s.append(max((_token_f1(a, guess) for a in answers), default=0.0))
    ems.append(max((float(normalize_answer(a) == normalize_answer(guess)) for a in answers),
                   default=0.0))
  return {"f1": 100.0 * float(np.mean(f1s)), "exact_match": 100.0 * float(np.mean(ems))}


# ---------------------------------------------------------- rank metrics ---

def _rank_choices(targets: Sequence[Mapping[str, Any]],
                  scores: Sequence[float]) -> list[dict[str, Any]]:
  """Per original example: its options' correctness and texts, the best-scored option."""
  if len(targets) != len(scores):
    raise ValueError(f"{len(targets)} targets but {len(scores)} scores")
  by_example: dict[int, list] = collections.defaultdict(list)
  for target, score in zip(targets, scores):
    by_example[target["example"]].append((target["option"], float(np.sum(score)), target))
  choices = []
  for index in sorted(by_example):
    options = sorted(by_example[index], key=lambda o: o[0])
    best = int(np.argmax([score for _, score, _ in options]))
    correct = [i for i, (_, _, t) in enumerate(options) if t["is_correct"]]
    choices.append({"prediction": best, "label": correct[0] if correct else -1,
                    "is_correct": best in correct,
                    "gold_texts": [options[i][2]["text"] for i in correct],
                    "predicted_text": options[best][2]["text"],
                    "group": options[0][2].get("group")})
  return choices


def rank_correct(targets: Sequence[Mapping[str, Any]],
                 scores: Sequence[float]) -> np.ndarray:
  """[examples] bool: whether each example's highest-scoring option is a right one (the
  items of `rank_accuracy`, in example order).

  Example:
    >>> t = [{"example": 0, "option": k, "is_correct": k == 1, "text": str(k)} for k in (0, 1)]
    >>> rank_correct(t, [-3.0, -1.0])
    array([ True])
  """
  return np.asarray([c["is_correct"] for c in _rank_choices(targets, scores)], bool)


def rank_accuracy(targets: Sequence[Mapping[str, Any]],
                  scores: Sequence[float]) -> dict[str, float]:
  """Share of examples whose highest-scoring option is a right one.

  Example:
    >>> t = [{"example": 0, "option": k, "is_correct": k == 1, "text": str(k)} for k in (0, 1)]
    >>> rank_accuracy(t, [-3.0, -1.0])
    {'accuracy': 100.0}
  """
  choices = _rank_choices(targets, scores)
  return {"accuracy": 100.0 * float(np.mean([c["is_correct"] for c in choices]))}


def rank_accuracy_and_macro_f1(targets: Sequence[Mapping[str, Any]], scores: Sequence[float],
                               num_classes: int = 3) -> dict[str, float]:
  """CB by rank classification (options are the classes, in label order)."""
  choices = _rank_choices(targets, scores)
  return accuracy_and_macro_f1([c["label"] for c in choices],
                               [c["prediction"] for c in choices], num_classes)


def rank_multirc(targets: Sequence[Mapping[str, Any]],
                 scores: Sequence[float]) -> dict[str, float]:
  """MultiRC F1a and exact match by rank classification over ("no", "yes")."""
  choices = _rank_choices(targets, scores)
  return multirc_f1a_and_em([{"group": c["group"], "value": c["label"]} for c in choices],
                            [{"value": c["prediction"]} for c in choices])


def rank_record(targets: Sequence[Mapping[str, Any]],
                scores: Sequence[float]) -> dict[str, float]:
  """ReCoRD F1/EM by rank classification over the passage's entities."""
  choices = _rank_choices(targets, scores)
  return record_max_f1_em([c["gold_texts"] for c in choices],
                          [c["predicted_text"] for c in choices])
