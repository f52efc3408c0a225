"""The figures of the reports, drawn on :class:`matplotlib.figure.Figure` objects (Agg
canvas), never through pyplot, so writing a report neither needs a display nor changes the
caller's backend."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from featx._io import slug
from featx.classifiers import coverage_points

CELL_TEXT_MAX_CLASSES = 30
TICK_LABELS_MAX = 120


def _confusion_names(results) -> list[str]:
    """One unique file name per result: confusion_<clf>_<backbone>[_<weights>][_<k>].png."""
    base = [f"{slug(r['clf'])}_{slug(r['backbone'])}" for r in results]
    names = [b if base.count(b) == 1 else f"{b}_{slug(r['weights'])}"
             for b, r in zip(base, results)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return [f"confusion_{name}.png" for name in unique]


def plot_confusion(matrix, class_names, path, title="") -> Path:
    """Confusion-matrix PNG: rows true class, columns predicted, colour = fraction of the row.

    Counts are written in the cells up to 30 classes; beyond that the figure grows, labels
    shrink and cells are left to the colour scale so that 100 classes stay legible.
    """
    return _save(confusion_figure(matrix, class_names, title), path)


def confusion_figure(matrix, class_names, title=""):
    from matplotlib.figure import Figure

    cm = np.asarray(matrix, dtype=float)
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    fraction = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(max(5.0, 0.25 * n + 2.5), 30.0)
    # Cells are 0.25 in (18 pt) wide beyond ~10 classes, so 7 pt labels still fit.
    label_size = 9 if n <= CELL_TEXT_MAX_CLASSES else 7

    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8 if n <= CELL_TEXT_MAX_CLASSES else 0.4,
                 label="fraction of the true class")
    step = max(1, math.ceil(n / TICK_LABELS_MAX))
    ticks = np.arange(0, n, step)
    ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=90, fontsize=label_size)
    ax.set_yticks(ticks, [class_names[i] for i in ticks], fontsize=label_size)
    axis_size = 10 if n <= CELL_TEXT_MAX_CLASSES else 16
    ax.set_xlabel("predicted class", fontsize=axis_size)
    ax.set_ylabel("true class", fontsize=axis_size)
    if title:
        ax.set_title(title, fontsize=axis_size, wrap=True)
    if n <= CELL_TEXT_MAX_CLASSES:
        for i in range(n):
            for j in range(n):
                if cm[i, j] or i == j:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                            fontsize=label_size, color="white" if fraction[i, j] > 0.5 else "black")
    return fig


def plot_accuracy_vs_fit_time(results, path) -> Path:
    """Scatter of accuracy against fit seconds (log x): one point per result, the marker
    says the classifier and the colour the backbone, both named in a legend outside the
    axes (labels next to the points collide and overflow once there are more than a few)."""
    return _save(accuracy_vs_fit_time_figure(results), path)


def accuracy_vs_fit_time_figure(results):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    classifiers = dict.fromkeys(r["clf"] for r in results)
    markers = {clf: _MARKERS[i % len(_MARKERS)] for i, clf in enumerate(classifiers)}
    backbones = list(dict.fromkeys((r["backbone"], r["weights"]) for r in results))
    colours = _backbone_colours(backbones)
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for r in results:
        seconds = max(float(r["fit_seconds"]), 1e-3)  # log axis: keep instant fits visible
        ax.scatter(seconds, r["accuracy"], s=40, marker=markers[r["clf"]],
                   color=colours[(r["backbone"], r["weights"])])
    handles = [Line2D([], [], marker=marker, linestyle="", color="dimgrey", label=clf)
               for clf, marker in markers.items()]
    handles += [Line2D([], [], marker="s", linestyle="", color=colours[key],
                       label=_backbone_label(*key)) for key in backbones]
    ax.set_xscale("log")
    ax.set_xlabel("fit time including tuning (s, log scale)")
    ax.set_ylabel(f"accuracy ({', '.join(sorted({r['split'] for r in results}))} split)")
    ax.set_title("accuracy vs fit time")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(fig, handles)
    return fig


def plot_reliability(results, path) -> Path:
    """Reliability diagram: accuracy against mean top probability per bin, one line per
    classifier with probabilities; the diagonal is perfect calibration."""
    return _save(reliability_figure(results), path)


def reliability_figure(results):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for r in results:
        bins = r["reliability"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                markersize=3, label=f"{_series_label(r)} (ECE {r['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean top probability in the bin")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title("reliability diagram")
    ax.grid(True, alpha=0.3)
    _legend_outside(fig, ax.get_lines())
    return fig


def plot_coverage(results, path) -> Path:
    """Accuracy on the answered images against the share answered, as the minimum top
    probability rises (every distinct probability is a point of the curve)."""
    return _save(coverage_figure(results), path)


def coverage_figure(results):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for r in results:
        rows = r["eval_rows"]
        coverage, accuracy = coverage_points(
            rows["confidence"], np.asarray(rows["y_true"]) == np.asarray(rows["y_pred"]))
        ax.plot(coverage, accuracy, marker=".", label=_series_label(r))
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy on the answered images")
    ax.set_title("abstaining below a minimum score")
    ax.grid(True, alpha=0.3)
    _legend_outside(fig, ax.get_lines())
    return fig


_MARKERS = "osD^vP*Xph<>8dH"
LEGEND_ROWS = 24


def _backbone_colours(backbones) -> dict:
    """One colour per (backbone, weights); random weights always red, so they stand out."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(backbones) <= 10 else "tab20"]
    real = [key for key in backbones if key[1] != "random"]
    colours = {key: palette(i % palette.N) for i, key in enumerate(real)}
    return {key: colours.get(key, "tab:red") for key in backbones}


def _backbone_label(backbone, weights) -> str:
    return f"{backbone} (RANDOM weights)" if weights == "random" else backbone


def _legend_outside(fig, handles):
    """The legend right of the axes, in as many columns as keep it within the figure's
    height; the figure widens by the legend's width, so the axes keep theirs."""
    handles = list(handles)
    columns = max(1, math.ceil(len(handles) / LEGEND_ROWS))
    legend = fig.legend(handles=handles, loc="outside right upper", fontsize=8, ncols=columns)
    width, height = fig.get_size_inches()
    legend_width = legend.get_window_extent().width / fig.dpi
    fig.set_size_inches(width + legend_width, height)


def _save(fig, path) -> Path:
    fig.savefig(path, dpi=100)
    return Path(path)


def _series_label(r) -> str:
    label = f"{r['clf']}/{r['backbone']}"
    return label + (f" ({r['calibration']})" if r.get("calibration") else "")


def _confusion_title(r) -> str:
    title = (f"{r['clf']} on {r['backbone']} ({r['weights']}), "
             f"{r['split']} accuracy {r['accuracy']:.3f}")
    return title + ("  [RANDOM WEIGHTS]" if r["weights"] == "random" else "")


def plot_history(history: dict, out_png, *, stage1_epochs: int, best_epoch: int = 0,
                 title: str = "") -> Path:
    """Train/val accuracy and loss per epoch (1-based), the stage boundary as a line.

    Parameters
    ----------
    history : dict
        Metric name -> values per epoch (``loss``, ``accuracy``, ``val_loss``,
        ``val_accuracy``), both stages of a fine-tuning run concatenated.
    out_png : str or Path
    stage1_epochs : int
        Epochs of stage 1; a vertical line is drawn after them when stage 2 ran.
    best_epoch : int
        1-based epoch kept; marked on the val_loss curve when > 0.
    title : str
    """
    return _save(history_figure(history, stage1_epochs=stage1_epochs, best_epoch=best_epoch,
                                title=title), out_png)


def history_figure(history: dict, *, stage1_epochs: int, best_epoch: int = 0, title: str = ""):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n = len(history.get("loss", []))
    epochs = np.arange(1, n + 1)
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            values = history.get(prefix + metric)
            if values:
                ax.plot(epochs, values, style, markersize=3, label=f"{prefix or 'train_'}{metric}")
        if 0 < stage1_epochs < n:
            ax.axvline(stage1_epochs + 0.5, color="gray", linestyle="--",
                       label="fine-tuning starts")
        if metric == "loss" and best_epoch > 0 and history.get("val_loss"):
            ax.plot([best_epoch], [history["val_loss"][best_epoch - 1]], "k*", markersize=12,
                    label=f"best (epoch {best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10, wrap=True)
    fig.tight_layout()
    return fig
