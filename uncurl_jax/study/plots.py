"""The study's plots: scores, score against pruning factor, similarity, expert usage.

matplotlib's object-oriented API with the Agg canvas (no display needed, no global
backend switch). Every plot takes the report's `ResultRow`s or plain arrays.

Example:
  >>> plot_scores(rows, "outputs/synthetic/scores.png")
  >>> plot_pruning_factor(rows, "outputs/sweep/pruning_factor.png")
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
import numpy as np

from uncurl_jax.pruning import methods as pruning_methods
from uncurl_jax.study import arms
from uncurl_jax.study import statistics
from uncurl_jax.study.rows import ResultRow
from uncurl_jax.study.rows import ordered_models


# The arms that frame the methods in `plot_pruning_factor`: the floor, then the ceiling.


def _frame(method: str) -> str | None:
  """'floor' for a method that zeroes the experts' outputs, 'ceiling' for the oracle arm."""
  if method == arms.ORACLE:
    return "ceiling"
  if method in pruning_methods.names() and pruning_methods.get(method).zero_outputs:
    return "floor"
  return None


FRAMES = ("floor", "ceiling")

def _save(figure: Figure, path: str | os.PathLike) -> None:
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=110, bbox_inches="tight")


def _task_axes(figure: Figure, count: int):
  return [figure.add_subplot(1, count, i + 1) for i in range(count)]


def _estimate_or_nan(summary, key) -> tuple[float, float]:
  estimate = summary.get(key)
  if estimate is None:
    return math.nan, math.nan
  return estimate.mean, (estimate.se if math.isfinite(estimate.se) else 0.0)


def plot_scores(rows: Sequence[ResultRow], path: str | os.PathLike) -> Figure:
  """Horizontal bars: every model's mean score per task with its standard error over
  seeds; dashed lines mark the same-size models from scratch. Tasks with the same models
  name them once, left of the first panel. Returns the figure (written to `path`).

  Example:
    >>> plot_scores(rows, "outputs/synthetic/scores.png")
  """
  tasks = list(dict.fromkeys(row.task for row in rows))
  models = ordered_models(rows)
  summary = statistics.summarize(rows)
  kinds = {row.model: row.kind for row in rows}
  figure = Figure(figsize=(4.5 * len(tasks), 0.35 * len(models) + 1.5))
  colors = {"dense": "0.6", "scratch": "tab:gray", "pruned": "tab:blue"}
  shown_by_task = [[m for m in models if (task, m) in summary] for task in tasks]
  shared = all(shown == shown_by_task[0] for shown in shown_by_task)
  for i, (axis, task, shown) in enumerate(zip(_task_axes(figure, len(tasks)), tasks,
                                              shown_by_task)):
    means, errors = zip(*(_estimate_or_nan(summary, (task, m)) for m in shown))
    positions = np.arange(len(shown))[::-1]
    axis.barh(positions, means, xerr=errors, color=[colors[kinds[m]] for m in shown],
              error_kw={"linewidth": 0.8})
    # The same models in every panel: their names once, left of the first.
    axis.set_yticks(positions, shown if i == 0 or not shared else [], fontsize=8)
    sizes = sorted({r.num_experts for r in rows if r.task == task and r.kind == "pruned"})
    for size in sizes:
      reference = summary.get((task, f"+{size}e" if size else "dense"))
      if reference is not None:
        axis.axvline(reference.mean, color="k", linestyle="--", linewidth=0.8,
                     label="same size from scratch" if size == sizes[0] else None)
    if sizes:
      axis.legend(fontsize=7, loc="lower right")
    low, high = min(means), max(means)
    axis.set_xlim(max(0.0, low - 0.1 * (high - low + 1.0)), high * 1.02 + 0.5)
    axis.set_title(task)
    axis.set_xlabel(f"{rows[0].metric} (mean ± SE over seeds)")
  figure.tight_layout()
  _save(figure, path)
  return figure


_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p")


def _line_styles(labels: Sequence[str]) -> dict[str, dict]:
  """A colour and marker per method label, the same in every panel (matplotlib's 10
  colours, tab20's 20 beyond ten labels; the markers tell apart what colours repeat)."""
  colors = [f"C{i}" for i in range(10)] if len(labels) <= 10 else [
      matplotlib.colormaps["tab20"](i) for i in range(20)]
  return {label: {"color": colors[i % len(colors)], "marker": _MARKERS[i % len(_MARKERS)]}
          for i, label in enumerate(labels)}


def plot_pruning_factor(rows: Sequence[ResultRow], path: str | os.PathLike) -> Figure:
  """Mean score (± SE over seeds) against the pruning factor E/D per method; the
  same-size models from scratch as a dashed black line (where merging stops paying,
  the lines cross); the floor (`experts_off`) and the ceiling (`oracle`) arms, where
  present, as a grey band that frames the methods. Each method keeps its colour and
  marker in every task's panel; one legend beside the panels names them. Returns the
  figure (written to `path`).

  Example:
    >>> plot_pruning_factor(rows, "outputs/sweep/pruning_factor.png")
  """
  tasks = list(dict.fromkeys(row.task for row in rows))
  summary = statistics.summarize(rows)
  styles = _line_styles(list(dict.fromkeys(
      r.model.split(" ", 1)[1] for r in rows if r.kind == "pruned")))
  figure = Figure(figsize=(4.2 * len(tasks), 3.8))
  for axis, task in zip(_task_axes(figure, len(tasks)), tasks):
    pruned = [r for r in rows if r.task == task and r.kind == "pruned"]
    sources = sorted({r.source_experts for r in pruned})
    for source in sources:
      labels = dict.fromkeys(r.model.split(" ", 1)[1] for r in pruned
                             if r.source_experts == source)
      frames = {_frame(r.method): r.model.split(" ", 1)[1] for r in pruned
                if r.source_experts == source and _frame(r.method)}
      prefix = f"E={source} " if len(sources) > 1 else ""
      if len(frames) == len(FRAMES):
        sizes = sorted({r.num_experts for r in pruned if r.source_experts == source
                        and _frame(r.method)}, reverse=True)
        low, high = ([_estimate_or_nan(summary, (task, f"{source}->{d} {frames[m]}"))[0]
                      for d in sizes] for m in FRAMES)
        x = [source / d for d in sizes]
        if len(x) == 1:  # one factor: a band around it
          x, low, high = [x[0] / 1.12, x[0] * 1.12], low * 2, high * 2
        axis.fill_between(x, low, high, color="0.85", zorder=0,
                          label=f"{prefix}floor (experts off) to ceiling (oracle)")
      for label in labels:
        if label in frames.values() and len(frames) == len(FRAMES):
          continue
        sizes = sorted({r.num_experts for r in pruned if r.source_experts == source
                        and r.model.split(" ", 1)[1] == label}, reverse=True)
        points = [(source / d, *_estimate_or_nan(summary, (task, f"{source}->{d} {label}")))
                  for d in sizes]
        x, y, err = zip(*points)
        axis.errorbar(x, y, yerr=err, capsize=2, label=prefix + label, markersize=4,
                      **styles[label])
      scratch = [(source / d, *_estimate_or_nan(summary, (task, f"+{d}e")))
                 for d in sorted({r.num_experts for r in pruned}, reverse=True)
                 if d and d < source and source % d == 0 and (task, f"+{d}e") in summary]
      if scratch:
        x, y, err = zip(*scratch)
        axis.errorbar(x, y, yerr=err, fmt="k--", marker="s", capsize=2,
                      label=f"from scratch, {source} / x experts")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("pruning factor E / D")
    axis.set_ylabel(rows[0].metric)
    axis.set_title(task)
  legend = {}
  for axis in figure.axes:
    for handle, label in zip(*axis.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  figure.legend(list(legend.values()), list(legend.keys()), fontsize=7,
                loc="center left", bbox_to_anchor=(1.0, 0.5))
  figure.tight_layout()
  _save(figure, path)
  return figure


def cluster_order(labels: Sequence[int]) -> np.ndarray:
  """Expert indices sorted by cluster (dropped experts, label -1, last).

  Example:
    >>> cluster_order([1, 0, 1, -1, 0]).tolist()
    [1, 4, 0, 2, 3]
  """
  labels = np.asarray(labels)
  keys = np.where(labels < 0, labels.max() + 1, labels)
  return np.argsort(keys, kind="stable")


def plot_similarity(layers: Mapping[str, tuple[np.ndarray, Sequence[int], Sequence[int]]],
                    path: str | os.PathLike, *, title: str = "") -> None:
  """Per-layer heatmaps of the experts' router-logit similarity, clusters boxed.

  Args:
    layers: {layer name: (similarity [E, E], cluster labels [E], anchors [D])}; experts
      are reordered by cluster, each cluster is framed and anchors are starred.
    path: PNG path.
    title: Figure title.

  Example:
    >>> plot_similarity({"layers_0/mlp": (s, plan.layers["layers_0/mlp"].labels,
    ...                                   plan.layers["layers_0/mlp"].anchors)}, "sim.png")
  """
  if not layers:
    raise ValueError("plot_similarity needs at least one layer")
  figure = Figure(figsize=(4.6 * len(layers), 4.4))
  for axis, (name, (similarity, labels, anchors)) in zip(_task_axes(figure, len(layers)),
                                                         layers.items()):
    order = cluster_order(labels)
    image = axis.imshow(np.asarray(similarity)[np.ix_(order, order)], cmap="viridis",
                        vmin=0.0, vmax=1.0)
    sorted_labels = np.asarray(labels)[order]
    start = 0
    for end in range(1, len(order) + 1):
      if end == len(order) or sorted_labels[end] != sorted_labels[start]:
        if sorted_labels[start] >= 0:
          axis.add_patch(Rectangle((start - 0.5, start - 0.5), end - start, end - start,
                                   fill=False, edgecolor="red", linewidth=1.2))
        start = end
    anchor_set = set(int(a) for a in anchors)
    tick_labels = [f"{e}*" if e in anchor_set else str(e) for e in order]
    axis.set_xticks(range(len(order)), tick_labels, fontsize=5, rotation=90)
    axis.set_yticks(range(len(order)), tick_labels, fontsize=5)
    axis.set_title(f"{name}: {len(anchor_set)} clusters", fontsize=9)
    figure.colorbar(image, ax=axis, fraction=0.046)
  if title:
    figure.suptitle(title, fontsize=10)
  _save(figure, path)


def plot_expert_usage(before: Mapping[str, np.ndarray],
                      after: Mapping[str, Mapping[str, np.ndarray]],
                      path: str | os.PathLike, *,
                      labels: Mapping[str, Sequence[int]] | None = None) -> None:
  """Expert-usage histograms on the task: the source model, then each pruned model.

  Args:
    before: {layer: [E] selection frequencies of the source model}.
    after: {model label: {layer: [D] selection frequencies after pruning and finetuning}}.
    path: PNG path.
    labels: {layer: [E] cluster labels} of one plan: source bars are coloured by the
      new expert they go to (the colour of that expert's bar below), dropped ones grey.

  Example:
    >>> plot_expert_usage(freq_source, {"uncurl (reinit)": freq_uncurl}, "usage.png",
    ...                   labels={k: plan.layers[k].labels for k in plan.layers})
  """
  if not before:
    raise ValueError("plot_expert_usage needs the source model's frequencies")
  layer_names = list(before)
  rows = 1 + len(after)
  figure = Figure(figsize=(4.8 * len(layer_names), 2.2 * rows))
  palette = [f"C{i % 10}" for i in range(64)]
  for column, layer in enumerate(layer_names):
    axis = figure.add_subplot(rows, len(layer_names), column + 1)
    frequencies = np.asarray(before[layer])
    colors = "tab:blue"
    if labels is not None and layer in labels:
      colors = [palette[c] if c >= 0 else "0.75" for c in labels[layer]]
    axis.bar(np.arange(len(frequencies)), frequencies, color=colors)
    axis.set_title(f"{layer}: source ({len(frequencies)} experts)", fontsize=8)
    axis.set_ylabel("share of tokens", fontsize=7)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for row, (model, usage) in enumerate(after.items(), start=1):
      axis = figure.add_subplot(rows, len(layer_names), row * len(layer_names) + column + 1)
      frequencies = np.asarray(usage[layer])
      axis.bar(np.arange(len(frequencies)), frequencies, color=palette[:len(frequencies)])
      axis.set_title(f"{layer}: {model} ({len(frequencies)} experts)", fontsize=8)
      axis.set_ylabel("share of tokens", fontsize=7)
      axis.xaxis.set_major_locator(MaxNLocator(integer=True))
  figure.tight_layout()
  _save(figure, path)
