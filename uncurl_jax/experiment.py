r"""The study's entry point: pretrain, prune with every method, finetune, evaluate, report.

  python -m uncurl_jax.experiment                  # gin/experiments/synthetic.gin (CPU)
  python -m uncurl_jax.experiment --gin.SEED=1 --gin.OUTPUT_DIR=outputs/synthetic_seed1
  python -m uncurl_jax.experiment --gin_file=gin/experiments/sweep.gin
  python -m uncurl_jax.experiment --gin_file=gin/experiments/paper_354m.gin   # pods

Without --gin_file the embedded default `gin/experiments/synthetic.gin` runs: a tiny
SMoE with 32 experts pruned to 8 for one domain of the synthetic corpus, with the
references trained from scratch, on a CPU in a few minutes. The gin file binds
`StudyConfig` (see `uncurl_jax.study`); `--gin.NAME=VALUE` overrides a macro.

Outputs (OUTPUT_DIR): results.csv, results.md (the tables), scores.png,
pruning_factor.png, similarity_<task>.png, expert_usage_<task>.png; the stages live
under STAGES_DIR, so a rerun skips what is done and an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax
from jax.experimental.compilation_cache import compilation_cache

from uncurl_jax import report
from uncurl_jax import study as study_lib
from uncurl_jax import study_config
from uncurl_jax import train as train_lib

FLAGS = flags.FLAGS  # --gin_file, --gin_bindings, --gin_search_paths: from uncurl_jax.train

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GIN_FILE = os.path.join(REPOSITORY_ROOT, "gin", "experiments", "synthetic.gin")


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


def write_report(study: study_lib.Study, output_dir: str) -> dict[str, str]:
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
  report.plot_scores(rows, written["scores"])
  report.plot_pruning_factor(rows, written["pruning_factor"])
  for task, figures in study.figures.items():
    pair = f"{figures.source_experts} -> {figures.num_experts}"
    if figures.clusters is not None:
      path = written[f"similarity_{task}"] = os.path.join(output_dir, f"similarity_{task}.png")
      report.plot_similarity(
          {name: (s, figures.clusters["labels"][name], figures.clusters["anchors"][name])
           for name, s in study.source_similarity(task).items()}, path,
          title=f"{task}: router-logit similarity of the {figures.source_experts}-expert "
                f"source, UNCURL clusters ({pair}, anchors starred)")
    if figures.usage_after:
      path = written[f"expert_usage_{task}"] = os.path.join(output_dir,
                                                             f"expert_usage_{task}.png")
      labels = None if figures.clusters is None else figures.clusters["labels"]
      report.plot_expert_usage(figures.usage_before, figures.usage_after, path, labels=labels)
  return {**written, "table": table}


def _markdown_report(study: study_lib.Study, table: str) -> str:
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


def run_study(config: study_config.StudyConfig, *,
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
  study = study_lib.Study(config)
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


_REGISTERED: dict[str, Any] = {}


def register_configurables() -> dict[str, Any]:
  """Registers (once) what the experiment gin files name, besides train.py's names.

  Gin names: `StudyConfig`, `TrainSettings`, `Runtime`, `run_study`, plus
  `configs.get`, `finetune.ProgressiveDropping`, ... (`train.register_configurables`).
  """
  if not _REGISTERED:
    train_lib.register_configurables()
    module = "uncurl_jax.experiment"
    _REGISTERED.update(
        StudyConfig=gin.external_configurable(study_config.StudyConfig, module=module),
        TrainSettings=gin.external_configurable(study_config.TrainSettings, module=module),
        Runtime=gin.external_configurable(study_config.Runtime, module=module),
        run_study=gin.external_configurable(run_study, module=module))
  return dict(_REGISTERED)


def parse_gin(*, gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
              gin_search_paths: Sequence[str] = (".",)) -> None:
  """Clears gin and parses the files (default: the synthetic study), then the bindings.

  The repository root is searched too, so the experiment files resolve from anywhere.
  """
  register_configurables()
  gin.clear_config()
  for path in list(gin_search_paths) + [REPOSITORY_ROOT]:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(list(gin_files) or [DEFAULT_GIN_FILE],
                                      list(gin_bindings))


def run_with_gin(*, gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
                 gin_search_paths: Sequence[str] = (".",)) -> dict[str, Any]:
  """Parses the gin configuration (`parse_gin`) and runs `run_study`.

  Example:
    >>> run_with_gin(gin_bindings=["SEED = 1", "OUTPUT_DIR = '/tmp/study_seed1'"])
  """
  parse_gin(gin_files=gin_files, gin_bindings=gin_bindings, gin_search_paths=gin_search_paths)
  logging.info("Gin configuration:\n%s", gin.config_str())
  return register_configurables()["run_study"]()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_with_gin(gin_files=FLAGS.gin_file, gin_bindings=FLAGS.gin_bindings,
               gin_search_paths=FLAGS.gin_search_paths)


if __name__ == "__main__":
  app.run(main, flags_parser=train_lib.parse_flags)
