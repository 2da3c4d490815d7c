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
import time
from typing import Any, Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

from uncurl_jax.study import config as config_lib
from uncurl_jax.study import plots
from uncurl_jax.study import report
from uncurl_jax.study import runner


@contextlib.contextmanager
def persistent_compilation_cache(directory: str | None) -> Iterator[None]:
  """Caches every compiled program in `directory` (None: no change) while active.

  The study compiles the same train step for every pruned model of one size and the same
  scorer for every evaluation; with the cache the repeats (and reruns) are disk reads.
  """
  if directory is None:
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
  table = report.markdown_table(rows, lower_is_better=config.lower_is_better)
  with open(written["markdown"], "w") as f:
    f.write(_markdown_report(study, table))
  plots.plot_scores(rows, written["scores"])
  plots.plot_pruning_factor(rows, written["pruning_factor"])
  for task, figures in study.figures.items():
    pair = f"{figures.source_experts} -> {figures.num_experts}"
    if figures.clusters is not None:
      path = written[f"similarity_{task}"] = os.path.join(output_dir, f"similarity_{task}.png")
      plots.plot_similarity(
          {name: (s, figures.clusters["labels"][name], figures.clusters["anchors"][name])
           for name, s in study.source_similarity(task).items()}, path,
          title=f"{task}: router-logit similarity of the {figures.source_experts}-expert "
                f"source, UNCURL clusters ({pair}, anchors starred)")
    if figures.usage_after:
      path = written[f"expert_usage_{task}"] = os.path.join(output_dir,
                                                             f"expert_usage_{task}.png")
      labels = None if figures.clusters is None else figures.clusters["labels"]
      plots.plot_expert_usage(figures.usage_before, figures.usage_after, path, labels=labels)
  return {**written, "table": table}


def _markdown_report(study: runner.Study, table: str) -> str:
  config = study.config
  direction = "lower" if config.lower_is_better else "higher"
  counts = {}
  for _, status in study.cache.events:
    counts[status.value] = counts.get(status.value, 0) + 1
  tasks = ", ".join(f"{t.name} ({config.task_metric(t)} of "
                    f"{t.eval_task or 'its validation split'})" for t in config.tasks)
  return "\n".join([
      f"# Study '{config.name}' (seed {config.seed})", "",
      f"Tasks and scores: {tasks}; {direction} is better. A pruned model's score is marked "
      "+ / - when it is better / worse than the model of the same size trained from "
      "scratch (paper Table 2).", "",
      "## After finetuning", "", table, "",
      "## Right after pruning (before finetuning)", "",
      report.markdown_table(study.rows, before_finetune=True), "",
      f"Stages: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}.", ""])


def run_study(config: config_lib.StudyConfig, *,
              compilation_cache: bool = True) -> dict[str, Any]:
  """Runs the study, writes its report and prints the table.

  Args:
    config: The study (gin: `run_study.config = @StudyConfig()`).
    compilation_cache: Keep compiled programs in `<stages dir>/jax_compilation_cache`.

  Returns:
    {'rows': result rows, 'files': written paths, 'events': stage events,
     'seconds': wall time}.

  Example:
    >>> outcome = run_study(config)
    >>> outcome["files"]["csv"]
    'outputs/synthetic/results.csv'
  """
  start = time.perf_counter()
  study = runner.Study(config)
  cache_dir = os.path.join(study.cache.root, "jax_compilation_cache") if compilation_cache else None
  with persistent_compilation_cache(cache_dir):
    study.run()
  files = write_report(study, config.output_dir)
  seconds = time.perf_counter() - start
  ran = sum(1 for _, status in study.cache.events if status != "skipped")
  metrics = sorted({config.task_metric(t) for t in config.tasks})
  print(f"\nStudy '{config.name}' (seed {config.seed}): {', '.join(metrics)}, "
        f"{'lower' if config.lower_is_better else 'higher'} is better; + / - against the "
        f"same-size model trained from scratch.\n")
  print("After finetuning:\n")
  print(files["table"])
  print("\nRight after pruning, before finetuning:\n")
  print(report.markdown_table(study.rows, before_finetune=True))
  print(f"\n{ran} of {len(study.cache.events)} stages computed, the rest cached; "
        f"{seconds:.0f} s. Report in {config.output_dir}:")
  for name, path in files.items():
    if name != "table":
      print(f"  {path}")
  return {"rows": study.rows, "files": files, "events": list(study.cache.events),
          "seconds": seconds}
