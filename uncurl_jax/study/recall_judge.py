"""Recall, then judge: the score of a task whose judgement follows a recalled fact.

A property task of the world of facts (`tasks.facts.register_property_task`) asks whether a
fact's value has a property. Finetuning teaches the judgement with the true value in the
prompt ("subject topic value ?" -> yes / no, as a chain of thought is trained); what it is
about is whether the model can judge the facts it knows. So each scored fact is answered
in two steps, as a chain of thought would be at inference:

1. recall: the model greedily continues "subject topic" with one token (its value);
2. judge: it reads "subject topic <recalled> ?" and answers with the larger of its logits
   for the two answers (rank classification over single-token answers).

An item is right when the judgement of the recalled value equals the fact's label. Two
more numbers say where an arm stands: `recall` (the recalled value is the fact's) and
`accuracy_true_value` (the judgement with the true value shown: the finetuned skill alone).

Example:
  >>> scorer = RecallJudgeScorer(eval_task="facts_property_recall_judge",
  ...                            task_feature_lengths={"inputs": 24, "targets": 8},
  ...                            batch_size=64, mesh=mesh)
  >>> scorer(config, params)   # {'accuracy': 88.0, 'recall': 77.6, 'accuracy_true_value': 98.9}
  >>> scorer.items(config, params)   # [2736] 0 / 1 per scored fact
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from uncurl_jax.data import pipeline
from uncurl_jax.model import configs
from uncurl_jax.model import decoder
from uncurl_jax.model import inputs as inputs_lib
from uncurl_jax.model import partitioning
from uncurl_jax.study import compiled
from uncurl_jax.tasks import facts as fact_tasks
from uncurl_jax.train import evaluation

OUTCOMES = ("judged", "recalled", "judged_true_value")


def recall_then_judge(params: Any, batch: Mapping[str, jax.Array], *, apply_fn: Callable,
                      value_position: int, answers: tuple[int, int]) -> dict[str, jax.Array]:
  """[B] bool outcomes of each judgement row of `batch` (a prefix-LM batch, one row per
  judgement "prompt value query" -> answer, unpacked): 'recalled' (the greedy token after
  the prompt is the shown value), 'judged' (the judgement with the recalled value in the
  value's place is the row's answer) and 'judged_true_value' (the same with the value
  shown). A judgement answers `answers[0]` when its logit is at least `answers[1]`'s.

  Example:
    >>> out = jax.jit(functools.partial(recall_then_judge, apply_fn=model.apply,
    ...                                 value_position=2, answers=(yes, no)))(params, batch)
  """
  targets = batch["decoder_target_tokens"]
  rows, length = jnp.arange(targets.shape[0]), targets.shape[1]
  positions = jnp.arange(length)[None, :]
  # The prompt before the value, as a prefix-LM row of its own (bidirectional models
  # must not see the value while recalling it).
  recall_batch = {
      "decoder_target_tokens": jnp.where(positions < value_position, targets, 0),
      "decoder_causal_attention": jnp.broadcast_to(
          positions <= value_position, targets.shape).astype(jnp.int32)}
  recalled = evaluation.greedy_decode(params, recall_batch, apply_fn=apply_fn,
                                      num_steps=1)[:, 0].astype(targets.dtype)
  answer_at = jnp.argmax(batch["decoder_loss_weights"] > 0, axis=1)
  says_first = targets[rows, answer_at] == answers[0]

  def answers_first(tokens):
    scored = {**batch, "decoder_target_tokens": tokens,
              "decoder_input_tokens": jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]}
    logits = apply_fn({"params": params}, **inputs_lib.module_inputs(
        scored, inputs_bidirectional_attention=inputs_lib.bidirectional_inputs(apply_fn)),
                      enable_dropout=False)[rows, answer_at]
    return logits[:, answers[0]] >= logits[:, answers[1]]

  return {"recalled": recalled == targets[:, value_position],
          "judged": answers_first(targets.at[:, value_position].set(recalled)) == says_first,
          "judged_true_value": answers_first(targets) == says_first}


class RecallJudgeScorer:
  """Recall-then-judge metrics (%) and per-item scores of models on a registered eval task
  (`tasks.facts.RECALL_JUDGE_TASKS`), one compiled function per model config. It scores
  every row of the task's validation split (the study's `eval_batches` and
  `eval_num_examples` do not apply: the tasks are small).

  Args:
    eval_task: A recall-then-judge eval task (e.g. 'facts_property_recall_judge').
    task_feature_lengths: Fixed feature lengths of its rows.
    batch_size: Rows per forward pass.
    mesh: Mesh the params live on.

  Raises:
    ValueError: `eval_task` is not a recall-then-judge task, or a row's answer is not one
      of the task's two answers.
  """

  has_items = True  # its accuracy's items: the scored facts

  def __init__(self, *, eval_task: str, task_feature_lengths: Mapping[str, int],
               batch_size: int, mesh: jax.sharding.Mesh):
    if eval_task not in fact_tasks.RECALL_JUDGE_TASKS:
      raise ValueError(f"{eval_task!r} is not a recall-then-judge task; expected one of "
                       f"{sorted(fact_tasks.RECALL_JUDGE_TASKS)}")
    self.eval_task, self._mesh = eval_task, mesh
    self._spec = fact_tasks.RECALL_JUDGE_TASKS[eval_task]
    self._batches = list(pipeline.eval_batches(
        mixture_or_task_name=eval_task, task_feature_lengths=dict(task_feature_lengths),
        batch_size=batch_size, split="validation", pack=False))
    for batch in self._batches:
      scored = batch["decoder_loss_weights"].sum(1) > 0
      at = np.argmax(batch["decoder_loss_weights"] > 0, axis=1)
      answers = batch["decoder_target_tokens"][np.arange(len(at)), at][scored]
      if not np.isin(answers, self._spec.answers).all():
        raise ValueError(f"{eval_task!r} has rows whose answer is not one of its answers "
                         f"{self._spec.answers}: {sorted(set(answers.tolist()))[:8]}")
    self._fns: dict[configs.ModelConfig, Callable] = compiled.CompiledCache()
    # The last two models' outcomes (a score at capacity comes between the dropless score
    # and its items): [(config, params, outcomes)].
    self._recent: list[tuple[Any, Any, dict[str, np.ndarray]]] = []

  def outcomes(self, config: configs.ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """{outcome: [items] bool} for every scored row, in the task's order (`OUTCOMES`)."""
    for seen, seen_params, result in self._recent:
      if seen == config and seen_params is params:
        return result
    if config not in self._fns:
      self._fns[config] = jax.jit(functools.partial(
          recall_then_judge, apply_fn=decoder.SMoEDecoder(config).apply,
          value_position=self._spec.value_position, answers=self._spec.answers))
    sharding = partitioning.batch_sharding(self._mesh)
    found = {name: [] for name in OUTCOMES}
    for batch in self._batches:
      out = jax.device_get(self._fns[config](params, pipeline.to_global_replicated(
          batch, sharding)))
      scored = np.asarray(batch["decoder_loss_weights"]).sum(1) > 0
      for name in OUTCOMES:
        found[name].append(np.asarray(out[name])[scored])
    result = {name: np.concatenate(parts) for name, parts in found.items()}
    self._recent = self._recent[-1:] + [(config, params, result)]
    return result

  def __call__(self, config: configs.ModelConfig, params: Any) -> dict[str, float]:
    out = self.outcomes(config, params)
    return {"accuracy": 100.0 * float(out["judged"].mean()),
            "recall": 100.0 * float(out["recalled"].mean()),
            "accuracy_true_value": 100.0 * float(out["judged_true_value"].mean())}

  def items(self, config: configs.ModelConfig, params: Any) -> np.ndarray:
    """[items] 0/1: each scored fact judged right after its recall (the accuracy's items)."""
    return self.outcomes(config, params)["judged"].astype(np.float64)
