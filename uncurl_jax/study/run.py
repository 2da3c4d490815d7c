"""What the study command does: run the study's stages, write its report, print the tables.

`run_study` is a plain function of a `StudyConfig`; `python -m uncurl_jax.study` binds it
with gin (see `uncurl_jax.study.__main__`).

Outputs (`StudyConfig.output_dir`): results.csv, results.md (the tables), scores.png,
pruning_factor.png, similarity_<task>.png, expert_usage_<task>.png; the stages live
under `stages_dir`, so a rerun skips what is done and an interrupted run resumes.

Example:
  >>> outcome = run_study(config)
  >>> outcome["files"]["csv"]
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

from uncurl_jax.pruning import features
from uncurl_jax.pruning import methods as pruning_methods
from uncurl_jax.study import config as config_lib
from uncurl_jax.study import plots
from uncurl_jax.study import report
from uncurl_jax.study import runner
from uncurl_jax.study import stages
from uncurl_jax.study import statistics
from uncurl_jax.study.progress import Progress


@contextlib.contextmanager
def persistent_compilation_cache(directory: str | None) -> Iterator[None]:
  """Caches every compiled program in `directory` (None: no change) while active.

  The study compiles the same train step for every pruned model of one size and the same
  scorer for every evaluation; with the cache the repeats (and reruns) are disk reads.
  A cache directory the user already configured (`JAX_COMPILATION_CACHE_DIR`,
  `jax.config.update("jax_compilation_cache_dir", ...)`) is kept.
  """
  if directory is None or jax.config.jax_compilation_cache_dir:
    yield
    return
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.set_cache_dir(directory)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def write_report(study: runner.Study, output_dir: str) -> dict[str, str]:
  """Writes results.csv, results.md and the PNG plots of a finished study.

  Returns:
    {what: path} of the files written, with 'table' -> the markdown table text.
  """
  rows, config = study.rows, study.config
  os.makedirs(output_dir, exist_ok=True)
  written = {"csv": os.path.join(output_dir, "results.csv"),
             "markdown": os.path.join(output_dir, "results.md"),
             "scores": os.path.join(output_dir, "scores.png"),
             "pruning_factor": os.path.join(output_dir, "pruning_factor.png")}
  report.write_csv(rows, written["csv"])
  table = report.markdown_table(rows, lower_is_better=config.lower_is_better,
                                items=study.items())
  with open(written["markdown"], "w") as f:
    f.write(_markdown_report(study, table))
  plots.plot_scores(rows, written["scores"])
  plots.plot_pruning_factor(rows, written["pruning_factor"])
  written.update(_task_figures(study, output_dir))
  return {**written, "table": table}


def _task_figures(study: runner.Study, output_dir: str) -> dict[str, str]:
  """Per task, for the first seed, source and pruned size: the source's router-logit
  similarity with the first UNCURL arm's clusters, and expert usage before and after."""
  written = {}
  for task in study.config.tasks:
    specs = [(key, spec) for key, spec in study.stats_specs.items() if key[0] == task.name]
    if not specs:
      continue
    (_, seed, source), stats_spec = specs[0]
    stats = stages.load_stats(os.path.join(stats_spec.directory, stages.STATS_FILE))
    pruned = [row for row in study.row_specs if row.task == task and row.seed == seed
              and row.kind == "pruned" and row.source == source]
    size = pruned[0].num_experts if pruned else None
    uncurl = next((row for row in pruned if row.num_experts == size
                   and row.method.method == pruning_methods.proposed().name
                   and row.before is not None), None)
    labels = anchors = None
    if uncurl is not None:
      plan = study.done[uncurl.before.inputs[0].key].result
      labels, anchors = plan["labels"], plan["anchors"]
      path = written[f"similarity_{task.name}"] = os.path.join(
          output_dir, f"similarity_{task.name}.png")
      plots.plot_similarity(
          {name: (features.router_similarity(s.logits), labels[name], anchors[name])
           for name, s in stats.items()}, path,
          title=f"{task.name}: router-logit similarity of the {source}-expert source, "
                f"UNCURL clusters ({source} -> {size}, anchors starred)")
    after = {f"{source}->{size} {row.method.label}": study.done[row.score.key].result["usage"]
             for row in pruned if row.num_experts == size}
    after = {name: usage for name, usage in after.items() if usage is not None}
    if after:
      path = written[f"expert_usage_{task.name}"] = os.path.join(
          output_dir, f"expert_usage_{task.name}.png")
      plots.plot_expert_usage(study.done[stats_spec.key].result["usage"], after, path,
                              labels=labels)
  return written


def _findings(study: runner.Study) -> list[statistics.Finding]:
  """The paper's findings, one-shot and after finetuning (per-item errors with one seed)."""
  return statistics.findings(study.rows, pairs=list(study.config.pairs),
                             items=study.items(), items_one_shot=study.items("one_shot"),
                             lower_is_better=study.config.lower_is_better)


def _markdown_report(study: runner.Study, table: str) -> str:
  config, rows = study.config, study.rows
  counts: dict[str, int] = {}
  for _, status in study.cache.events:
    counts[status.value] = counts.get(status.value, 0) + 1
  tasks = ", ".join(f"{t.name} ({config.task_metric(t)} of "
                    f"{t.eval_task or 'its validation split'})" for t in config.tasks)
  items = study.items()
  found = _findings(study)
  return "\n".join([
      f"# Study '{config.name}' (seeds {list(config.seeds)})", "",
      report.scores_note(tasks, config.lower_is_better), "",
      "## After finetuning", "", table, "",
      "## Scores by phase", "",
      "Before finetuning (a reference after pretraining, a pruned model right after "
      "pruning), after the pruned models' router-only warm-up, after finetuning:", "",
      report.phase_table(rows),
      "## Routers after the warm-up", "",
      "Mean top-1 gate on the task's tokens right after pruning and after the router-only "
      "warm-up; for UNCURL with a re-initialized router, the share of tokens whose first "
      "choice is the expert the merge router (the same experts, function-preserving) "
      f"chooses, per MoE layer (seed {config.seeds[0]}):", "",
      report.router_table(study.router_diagnostics()),
      "## Finetuning recipes", "", "Every arm trains on the same batches for the same "
      "number of steps:", "", "```", report.recipes_text(study.recipes()), "```", "",
      "## Paired differences", "", report.differences_table(rows, items=items), "",
      "## The paper's findings", "", report.findings_text(found), "",
      "## Right after pruning (before finetuning)", "",
      report.markdown_table(rows, before_finetune=True), "",
      f"Stages: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}.", ""])


def run_study(config: config_lib.StudyConfig, *, compilation_cache: bool = True,
              stream=None) -> dict[str, Any]:
  """Runs the study, writes its report and prints its plan, progress and tables.

  Args:
    config: The study (gin: `run_study.config = @StudyConfig()`).
    compilation_cache: Keep compiled programs in `<stages dir>/jax_compilation_cache`.
    stream: Where the plan, progress, stage lines and tables go (default: stdout).

  Returns:
    {'rows': result rows, 'files': written paths, 'events': stage events,
     'seconds': wall time}.

  Example:
    >>> outcome = run_study(config)
    >>> outcome["files"]["csv"]
    'outputs/synthetic/results.csv'
  """
  stream = sys.stdout if stream is None else stream
  start = time.perf_counter()
  study = runner.Study(config)
  specs = study.plan()
  out = lambda text="": print(text, file=stream, flush=True)
  progress = Progress(specs, study.cache, stream=stream)
  out(f"Study '{config.name}': seeds {list(config.seeds)}, tasks "
      f"{[t.name for t in config.tasks]}, {len(config.methods)} methods, pairs "
      f"{list(config.pairs)}; stages in {study.cache.root}")
  out(progress.plan_text())
  out("Arms and their finetuning (every arm the same steps on the same batches):")
  out(report.recipes_text(study.recipes()))
  cache_dir = os.path.join(study.cache.root, "jax_compilation_cache") if compilation_cache else None
  try:
    with persistent_compilation_cache(cache_dir):
      study.run(progress)
  finally:
    progress.close()
  files = write_report(study, config.output_dir)
  seconds = time.perf_counter() - start
  ran = sum(1 for _, status in study.cache.events if status != "skipped")
  out(f"\nAfter finetuning ({', '.join(sorted({config.task_metric(t) for t in config.tasks}))}"
      f", mean ± SE over seeds {list(config.seeds)}; + / - called against the same-size "
      "model from scratch):\n")
  out(files["table"])
  out("\nThe paper's findings:\n")
  out(report.findings_text(_findings(study)))
  out(f"\n{ran} of {len(study.cache.events)} stages computed, the rest cached; "
      f"{seconds:.0f} s. Report in {config.output_dir}:")
  for name, path in files.items():
    if name != "table":
      out(f"  {path}")
  return {"rows": study.rows, "files": files, "events": list(study.cache.events),
          "seconds": seconds}
