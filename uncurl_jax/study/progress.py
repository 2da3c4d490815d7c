"""What a person sees while the study runs: its plan, one progress bar, a line per stage.

The bar counts the study's work in units of one pretraining step (each stage's estimated
`cost`; training stages report their steps as they go), so its ETA covers the whole
study, not the current stage. Cached stages cost nothing; the first stage to run of each
`compile_key` (a new shape's train step or scorer) also counts its `compile_cost`. A
finished stage prints one line: its name, its seconds and what it produced (a score, the
final loss, the experts kept).

Example:
  >>> progress = Progress(specs, cache)
  >>> print(progress.plan_text())
  >>> study.run(progress)
  >>> progress.close()
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any, Iterable, Sequence, TextIO

import tqdm

from uncurl_jax.study import cache as cache_lib


class Progress:
  """The study's progress bar and stage lines (see the module docstring).

  Args:
    specs: The study's plan (`Study.plan()`).
    cache: Its stage cache (which stages are done already).
    stream: Where the bar and lines go.
  """

  def __init__(self, specs: Sequence[cache_lib.StageSpec], cache: cache_lib.StageCache, *,
               stream: TextIO = sys.stdout):
    self._specs = list(specs)
    self._done = {spec.key for spec in self._specs if cache.is_done(spec)}
    self._stream = stream
    self._costs = estimated_costs(spec for spec in self._specs if spec.key not in self._done)
    total = sum(self._costs.values())
    # delay: the bar first shows at the first progress, after the plan (never when all
    # stages are cached).
    self._bar = tqdm.tqdm(total=total, unit="step", file=stream, leave=True, delay=1e-3,
                          mininterval=0.5 if stream.isatty() else 10.0,
                          bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}]")
    self._credited = self._started = self._cost = 0.0

  def plan_text(self) -> str:
    """The plan: per kind of stage, how many run and how many are cached."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for spec in self._specs:
      counts[spec.kind][spec.key in self._done] += 1
    run = sum(c[0] for c in counts.values())
    lines = [f"Plan: {len(self._specs)} stages, {run} to run, "
             f"{len(self._specs) - run} cached."]
    for kind, (to_run, cached) in counts.items():
      lines.append(f"  {kind:<6} {to_run:4d} to run, {cached:4d} cached")
    return "\n".join(lines)

  def start(self, spec: cache_lib.StageSpec, *, cached: bool) -> None:
    self._credited, self._started = 0.0, time.perf_counter()
    self._cost = self._costs.get(spec.key, 0.0)
    if not cached:
      self._bar.set_description_str(spec.name[:40], refresh=False)

  def advance(self, units: float) -> None:
    """Work done inside the current stage (training steps), at most its estimated cost."""
    units = max(0.0, min(units, self._cost - self._credited))
    self._credited += units
    self._bar.update(units)

  def finish(self, spec: cache_lib.StageSpec, stage: cache_lib.Stage) -> None:
    if stage.status == cache_lib.Status.SKIPPED:
      return
    self._bar.update(max(0.0, self._cost - self._credited))
    seconds = time.perf_counter() - self._started
    self._bar.write(f"{spec.name:<56} {seconds:7.1f} s  {_summary(stage.result)}",
                    file=self._stream)

  def close(self) -> None:
    self._bar.close()


def estimated_costs(specs: Iterable[cache_lib.StageSpec]) -> dict[str, float]:
  """{key: cost} of the stages to run, in order; the first stage of each compile key
  also carries its compilation (the later ones reuse the compiled step).

  Example:
    >>> estimated_costs([a, b])  # a, b: compile_key "e8", cost 10, compile_cost 50
    {'<a.key>': 60.0, '<b.key>': 10.0}
  """
  costs, compiled = {}, set()
  for spec in specs:
    cost = spec.cost
    if spec.compile_key is not None and spec.compile_key not in compiled:
      compiled.add(spec.compile_key)
      cost += spec.compile_cost
    costs[spec.key] = float(cost)
  return costs


def _summary(result: Any) -> str:
  if not isinstance(result, dict):
    return ""
  if "score" in result:
    return f"score {result['score']:.2f}"
  if result.get("final_loss") is not None:
    return f"loss {result['final_loss']:.3f}, {result.get('steps')} steps"
  if "experts_per_layer" in result and "router" in result:
    return f"experts {sorted(set(result['experts_per_layer'].values()))}, router {result['router']}"
  if "tokens" in result:
    return f"{result['tokens']} task tokens"
  return ""
