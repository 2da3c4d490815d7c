"""The study's arms as data: which stages make each row, one small function per kind of arm.

An arm turns a method and a pair E -> D into the stages of one result row: the model it
finetunes, what is scored before finetuning and after the router warm-up, and the recipe
in words. The kinds:

- `reference`: a model trained from scratch (the source, every pruned size, dense),
  finetuned on every parameter for the whole budget;
- `prune_then_finetune`: every registered pruning method (the floor, `experts_off`,
  included): prune the source, train the router alone, then everything;
- `probe_then_prune`: a method that needs a finetuned router (its `Method` says
  `needs_pretrained`, e.g. router_norm): finetune the source for part of the budget,
  prune that, then as above on the rest;
- `drop_progressively` (the arm "progressive_dropping"): finetune the source like a
  reference while dropping experts;
- `oracle` (the arm "oracle", the ceiling): keep the experts chosen greedily on the
  task's development split, router bound, then as a pruned model.

Which kind a method gets is `arm_of(name)`: the `STUDY_ARMS` table for the arms that are
not pruning methods, the method's registry flags for the others. Adding a pruning method
is one registration (`pruning.register_method`); adding an arm is one `STUDY_ARMS` entry
and one function.

An arm function receives the `graph` (`study.graph.StageGraph`: the study's stage
builders) and an `ArmInputs`, and returns an `ArmPlan`.

Example:
  >>> plan = arm_of("uncurl")(graph, ArmInputs(task, spec, 32, 8, seed=0, base=base,
  ...                                          stats=stats))
  >>> plan.trained.name, plan.recipe
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from uncurl_jax.pruning import methods as pruning_methods

PROGRESSIVE_DROPPING = "progressive_dropping"
ORACLE = "oracle"


@dataclasses.dataclass(frozen=True)
class ArmInputs:
  """What an arm is planned from.

  Attributes:
    task: The `StudyTask`.
    method: The `MethodSpec` of the row.
    source, size: The pair E -> D.
    seed: The seed.
    base: The source's pretrained stage.
    stats: The source's task statistics stage.
  """

  task: Any
  method: Any
  source: int
  size: int
  seed: int
  base: Any
  stats: Any

  @property
  def label(self) -> str:
    """The stage-name stem of the arm ('uncurl-reinit-e32to8')."""
    return f"{self.method.slug}-e{self.source}to{self.size}"

  @property
  def shape(self) -> Any:
    """What its models' compiled steps are shared by: the size, or the arm alone when its
    pruned models have shapes of their own (bound routers, uneven counts)."""
    return f"{self.label}-seed{self.seed}" if self.method.own_shapes else self.size


@dataclasses.dataclass(frozen=True)
class ArmPlan:
  """The stages of one arm's row.

  Attributes:
    trained: The finetuned model (scored for the row's score).
    before: Its score stage before finetuning (one-shot for a pruned model).
    warmed: Its score stage after the router warm-up, or None.
    recipe: What its finetuning does, in words.
    shape: What the finetuned model's scorer is compiled for (see `ArmInputs.shape`).
  """

  trained: Any
  before: Any
  warmed: Any = None
  recipe: str = ""
  shape: Any = None


ArmFn = Callable[[Any, ArmInputs], ArmPlan]


def prune_then_finetune(graph, a: ArmInputs, *, source_params=None, pretrained=None,
                        selected=None, probe: int = 0) -> ArmPlan:
  """Prune the source (or `source_params`), score it, train its router alone for the
  warm-up steps and score it, then finetune every parameter on the rest of the budget."""
  settings = graph.config.finetune_settings(a.task)
  warmup = settings.router_warmup_steps
  offset = probe
  pruned = graph.pruned(a.task, a.method, (a.source, a.size), a.seed,
                        source=a.base if source_params is None else source_params,
                        stats=a.stats, pretrained=pretrained, selected=selected)
  before = graph.scored(a.task, pruned, shape=a.shape)
  tuned, warmed = pruned, None
  if warmup:
    tuned = graph.router_warmed(a.task, pruned, a.label, num_experts=a.size, seed=a.seed,
                                data_offset=offset, shape=a.shape)
    warmed = graph.scored(a.task, tuned, shape=a.shape)
  trained = graph.finetuned(a.task, tuned, a.label, num_experts=a.size, seed=a.seed,
                            steps=settings.steps - warmup - probe,
                            data_offset=offset + warmup, shape=a.shape)
  return ArmPlan(trained, before, warmed, graph.recipe(a.task, "pruned", moe=True, probe=probe),
                 a.shape)


def probe_then_prune(graph, a: ArmInputs) -> ArmPlan:
  """A method that needs a finetuned router: finetune the source for part of the
  full-parameter budget (the probe trains like a reference), prune that with the
  pretrained router as the method's reference, and continue the probe's data."""
  probe = graph.router_norm_probe_steps(a.task)
  probed = graph.finetuned(a.task, a.base, f"{a.label}-probe", num_experts=a.source,
                           seed=a.seed, steps=probe)
  return prune_then_finetune(graph, a, source_params=probed, pretrained=a.base, probe=probe)


def drop_progressively(graph, a: ArmInputs) -> ArmPlan:
  """Progressive dropping: the source finetuned like a reference, dropping experts on
  the schedule down to D. Before its finetuning it is the intact source (the source's
  own score stage)."""
  trained = graph.finetuned(
      a.task, a.base, a.label, num_experts=a.source, seed=a.seed,
      dropping=dataclasses.replace(graph.config.dropping, target_experts=a.size))
  return ArmPlan(trained, graph.scored(a.task, a.base, shape=a.source),
                 recipe=graph.recipe(a.task, "dropping", moe=True, size=a.size), shape=a.shape)


def oracle(graph, a: ArmInputs) -> ArmPlan:
  """The ceiling: per layer the experts chosen greedily to score best on the task's
  development split, kept with their router columns bound, then as a pruned model."""
  selected = graph.oracle_selected(a.task, a.base, (a.source, a.size))
  return prune_then_finetune(graph, a, selected=selected)


@dataclasses.dataclass(frozen=True)
class Arm:
  """An arm that is not a pruning method.

  Attributes:
    plan: Its arm function.
    router: The router option its models get ("": the source's own, unchanged).
    own_shapes: Whether its models have shapes of their own (each compiles its steps).
    description: One line for documentation and messages.
  """

  plan: ArmFn
  router: str
  own_shapes: bool
  description: str


STUDY_ARMS: dict[str, Arm] = {
    PROGRESSIVE_DROPPING: Arm(drop_progressively, router="", own_shapes=False,
                              description="the source finetuned while dropping experts"),
    ORACLE: Arm(oracle, router="bind", own_shapes=True,
                description="the ceiling: experts chosen greedily on a development split"),
}


def arm_of(name: str) -> ArmFn:
  """The arm function of method or arm `name` (a `STUDY_ARMS` entry, else chosen by the
  registered method's flags)."""
  if name in STUDY_ARMS:
    return STUDY_ARMS[name].plan
  return probe_then_prune if pruning_methods.get(name).needs_pretrained else prune_then_finetune


def reference(graph, task, size: int, seed: int, base) -> ArmPlan:
  """A model trained from scratch (`size` experts, 0: dense), finetuned on every
  parameter for the whole budget; before finetuning it is the pretrained model."""
  trained = graph.finetuned(task, base, slug(size), num_experts=size, seed=seed)
  return ArmPlan(trained, graph.scored(task, base, shape=size),
                 recipe=graph.recipe(task, "reference", moe=size > 0), shape=size)


def slug(num_experts: int) -> str:
  """A model size in stage names: 'dense' or 'e8'."""
  return "dense" if num_experts == 0 else f"e{num_experts}"
