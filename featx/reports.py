"""Compare report: report.md, report.json, confusion-matrix PNGs and an accuracy-vs-fit-time plot.

Also the fine-tuning pieces of a report: its compare row (:func:`finetune_row`), its notes
against the best probe (:func:`finetune_notes`) and its history plot (:func:`plot_history`).

Figures are drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas), never through
pyplot, so writing a report neither needs a display nor changes the caller's backend.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featx._json import json_default
from featx.errors import UsageError
from featx.classifiers import ranking_key
from featx.uncertainty import ALPHA, CALIBRATION_BINS, coverage_points

REQUIRED_KEYS = ("clf", "backbone", "weights", "split", "accuracy", "balanced_accuracy",
                 "macro_f1", "fit_seconds")
# Keys that hold live objects, not numbers: kept out of report.json.
NOT_SERIALISED = ("estimator", "eval_rows")
CELL_TEXT_MAX_CLASSES = 30
TICK_LABELS_MAX = 120
RANDOM_WEIGHTS_BANNER = (
    "> **WARNING: RANDOM BACKBONE WEIGHTS.** At least one backbone below used random "
    "(untrained) weights. Those numbers say nothing about transfer learning; random weights "
    "are for tests and throughput benchmarks only.")


# ----- dataset summary ------------------------------------------------------------------

def dataset_summary(features, splits=("train", "val", "test")) -> dict:
    """The ``dataset`` argument of :func:`write_compare_report`, from a Features-like object.

    Counts original images only (``view == 0``) when the object has a ``view`` array.

    Returns
    -------
    dict
        ``root`` (str), ``class_names`` (list), ``counts`` ({split: [count per class]}, only
        splits that have rows), ``split_sizes`` ({split: n}).
    """
    labels = np.asarray(features.labels)
    split = np.asarray(features.split)
    keep = np.ones(len(labels), bool)
    if getattr(features, "view", None) is not None:
        keep = np.asarray(features.view) == 0
    n_classes = len(features.class_names)
    counts = {}
    for name in splits:
        rows = keep & (split == name)
        if rows.any():
            counts[name] = np.bincount(labels[rows], minlength=n_classes).tolist()
    return {
        "root": str(getattr(features, "root", "")),
        "class_names": [str(c) for c in features.class_names],
        "counts": counts,
        "split_sizes": {name: int(sum(c)) for name, c in counts.items()},
        "excluded": int(getattr(getattr(features, "stats", None), "n_excluded", 0)),
    }


# ----- formatting helpers ---------------------------------------------------------------

def _md(text) -> str:
    """Escape what would break a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value, digits) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_params(params) -> str:
    """``{"clf__estimator__C": 0.1}`` -> ``"C=0.1"``; "-" when empty."""
    if not params:
        return "-"
    return ", ".join(f"{key.rsplit('__', 1)[-1]}={value}" for key, value in params.items())


def _sorted(results):
    return sorted(results, key=ranking_key)


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def _check_results(results):
    if not results:
        raise ValueError("no results to report")
    for i, result in enumerate(results):
        missing = [key for key in REQUIRED_KEYS if key not in result]
        if missing:
            raise ValueError(f"result {i} ({result.get('clf', '?')}) lacks {', '.join(missing)}")


# ----- markdown ------------------------------------------------------------------------

RESULT_COLUMNS = ("rank", "classifier", "backbone", "weights", "split", "accuracy (95% interval)",
                  "vs best", "balanced accuracy", "macro-F1", "extraction s", "fit s",
                  "predict ms/image",
                  "best parameters")


def _with_interval(r, metric) -> str:
    interval = (r.get("intervals") or {}).get(metric)
    text = _num(r[metric], 4)
    return text if not interval else f"{text} ({interval[0]:.3f}-{interval[1]:.3f})"


def backbone_label(r) -> str:
    """A row's backbone as the tables show it: "efficientnet_lite0 int8 flip-averaged"."""
    return (r["backbone"] + (" int8" if r.get("precision") == "int8" else "")
            + (" flip-averaged" if r.get("flip_average") else ""))


def vs_best_text(r) -> str:
    """A row's "vs best" cell: "best", "worse (p=...)", "n.s. (p=...)" or "-" (not tested)."""
    if "vs_best" not in r:
        return "-"
    test = r["vs_best"]
    if test is None:
        return "best"
    verdict = "worse" if test["significant"] else "n.s."
    return f"{verdict} (p={test['p_value']:.3g})"


def _ranks(rows) -> list[int]:
    """Competition ranking by accuracy: equal accuracies share a rank (1, 1, 3)."""
    return [1 + sum(other["accuracy"] > r["accuracy"] for other in rows) for r in rows]


def _results_table(rows) -> list[str]:
    lines = ["| " + " | ".join(RESULT_COLUMNS) + " |",
             "|" + "|".join(["---:"] + ["---"] * 4 + ["---:", "---"] + ["---:"] * 5 + ["---"])
             + "|"]
    for rank, r in zip(_ranks(rows), rows):
        backbone = backbone_label(r)
        cells = [rank, r["clf"], backbone, r["weights"], r["split"],
                 _with_interval(r, "accuracy"), vs_best_text(r),
                 _with_interval(r, "balanced_accuracy"), _with_interval(r, "macro_f1"),
                 extraction_cell(r), _num(r["fit_seconds"], 2),
                 _num(r.get("predict_ms_per_image"), 3),
                 format_params(r.get("best_params"))
                 + (" (not tuned)" if r.get("tuned") is False and r.get("best_params") else "")
                 + (f", {r['calibration']}-calibrated" if r.get("calibration") else "")]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return lines


def extraction_cell(r) -> str:
    """What computing the row's cached features cost, part by part: "41.2 + 97.5"."""
    return " + ".join(_num(p["seconds"], 1) for p in r.get("extract_parts") or []) or "-"


def _per_class_table(result) -> list[str]:
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for row in result["per_class"]:
        lines.append(f"| {_md(row['class'])} | {row['precision']:.4f} | {row['recall']:.4f} | "
                     f"{row['f1']:.4f} | {row['support']} |")
    return lines


def _dataset_section(dataset) -> list[str]:
    lines = ["## Dataset", "", f"Root: `{dataset.get('root', '?')}`", ""]
    names = dataset.get("class_names", [])
    counts = dataset.get("counts") or {}
    if counts:
        splits = list(counts)
        lines += ["| class | " + " | ".join(splits) + " | total |",
                  "|---|" + "---:|" * (len(splits) + 1)]
        for i, name in enumerate(names):
            per_split = [counts[s][i] for s in splits]
            lines.append(f"| {_md(name)} | " + " | ".join(map(str, per_split))
                         + f" | {sum(per_split)} |")
        lines.append("")
    elif names:
        lines += [f"Classes ({len(names)}): " + ", ".join(_md(n) for n in names), ""]
    sizes = dataset.get("split_sizes") or {s: sum(c) for s, c in counts.items()}
    if sizes:
        lines += ["Split sizes: " + ", ".join(f"{s} {n}" for s, n in sizes.items()), ""]
    if dataset.get("excluded"):
        lines += [f"Excluded: {dataset['excluded']} images left out by `--exclude` "
                  "(every other image kept its split).", ""]
    return lines


def _provenance_line(results, dataset) -> str:
    splits = sorted({r["split"] for r in results})
    sizes = dataset.get("split_sizes") or {}
    n_eval = ", ".join(f"**{s}** split ({sizes[s]} images)" if s in sizes else f"**{s}** split"
                       for s in splits)
    n_train = sizes.get("train")
    train = f"train split ({n_train} images)" if n_train is not None else "train split"
    weights = sorted({f"{r['weights']} (`{r['weights_id']}`)" if r.get("weights_id")
                      else str(r["weights"]) for r in results})
    line = (f"Numbers come from the {n_eval}; every classifier, its scaling and its "
            f"hyperparameter tuning were fitted on the {train} only. "
            f"Backbone weights: {', '.join(weights)}.")
    runtimes = sorted({r["runtime"] for r in results if r.get("runtime")})
    if runtimes:
        line += f" Embeddings computed by: {'; '.join(runtimes)}."
    if any(r.get("precision") == "int8" for r in results):
        line += " **int8 embeddings** (quantised backbone) in the rows marked int8."
    if "train" in splits:
        line += " Scores on the train split are optimistic."
    if any(r["weights"] == "random" for r in results):
        line += " **RANDOM weights: not a transfer-learning result.**"
    return line


def _trust_lines(ordered) -> list[str]:
    """What the intervals and the paired tests say, in words."""
    best = next((r for r in ordered if "vs_best" in r and r["vs_best"] is None), None)
    tested = [r for r in ordered if r.get("vs_best")] if best is not None else []
    if not any(r.get("intervals") for r in ordered):
        return []
    n = ordered[0].get("n_eval")
    lines = [f"Intervals: 95% percentile bootstrap over the evaluation images "
             f"({ordered[0].get('interval_resamples', '?')} resamples, seeded)."]
    if n:
        lines[0] += f" On {n} images one image is {100 / n:.2f} points of accuracy."
    if tested:
        tied = ", ".join(f"{r['clf']}/{r['backbone']}" for r in tested
                         if not r["vs_best"]["significant"])
        verdict = (f"Not significantly different from the best: {tied}; their order in the "
                   "table is not evidence that one is better." if tied
                   else "Every other row is significantly worse than the best.")
        lines.append(f"\"vs best\": exact McNemar test of each row against {best['clf']} on "
                     f"{best['backbone']}, on the images both were scored on, Holm-corrected "
                     f"over {len(tested)} comparisons (alpha {ALPHA}). {verdict}")
    return lines


def _calibration_section(ordered, files) -> list[str]:
    rows = [r for r in ordered if "ece" in r]
    if not rows:
        return []
    lines = ["## Calibration", "",
             f"Expected calibration error (ECE, {CALIBRATION_BINS} equal-width bins of the top "
             "probability; 0 = the probabilities mean what they say). Models without probabilities (an "
             "uncalibrated svm gives decision values) show \"-\"; `--calibrate` gives them "
             "probabilities.", "", "| classifier | backbone | calibration | ECE |",
             "|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {_md(r['clf'])} | {_md(r['backbone'])} | "
                     f"{r.get('calibration') or 'none'} | {_num(r['ece'], 4)} |")
    if files.get("reliability"):
        lines += ["", f"Reliability diagram: [{files['reliability']}]({files['reliability']})"]
    return lines + [""]


def _abstention_section(ordered, files) -> list[str]:
    rows = [r for r in ordered if r.get("coverage")]
    if not rows:
        return []
    thresholds = [c["threshold"] for c in rows[0]["coverage"]]
    lines = ["## Answering only when confident", "",
             "Share of images answered (coverage) and accuracy on them when images whose top "
             "probability is below P are labelled unknown (`featx predict --min-score P`).", "",
             "| classifier | backbone | " + " | ".join(f"P={t:g}" for t in thresholds) + " |",
             "|---|---|" + "---:|" * len(thresholds)]
    for r in rows:
        cells = [f"{c['coverage']:.0%} / {_num(c['accuracy'], 3)}" for c in r["coverage"]]
        lines.append(f"| {_md(r['clf'])} | {_md(r['backbone'])} | " + " | ".join(cells) + " |")
    if files.get("coverage"):
        lines += ["", f"Coverage vs accuracy: [{files['coverage']}]({files['coverage']})"]
    return lines + [""]


def _repeated_section(repeated) -> list[str]:
    if not repeated:
        return []
    lines = ["## Repeated evaluation", "", f"Protocol: {repeated[0]['description']}. Every "
             "classifier is tuned inside each repeat's training rows; no evaluation image of a "
             "repeat is used to fit or tune it. Mean +/- standard deviation over repeats; the "
             "interval is a 95% bootstrap interval of the mean, resampling the evaluated "
             "images (an image evaluated in several repeats is drawn once for all of "
             "them).", "",
             "| classifier | backbone | repeats | accuracy | interval | balanced accuracy | "
             "macro-F1 | min-max accuracy |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(repeated, key=lambda r: -r["mean"]["accuracy"]):
        def stat(m):
            return f"{r['mean'][m]:.4f} +/- {r['std'][m]:.4f}"
        low, high = r["interval"]["accuracy"]
        lines.append(f"| {_md(r['clf'])} | {_md(backbone_label(r))} | {r['repeats']} | "
                     f"{stat('accuracy')} | {low:.3f}-{high:.3f} | {stat('balanced_accuracy')} "
                     f"| {stat('macro_f1')} | {r['min']['accuracy']:.4f}-"
                     f"{r['max']['accuracy']:.4f} |")
    return lines + [""]


def _markdown(ordered, dataset, notes, files, repeated=None) -> str:
    best = ordered[0]
    lines = ["# featx compare report", ""]
    if any(r["weights"] == "random" for r in ordered):
        lines += [RANDOM_WEIGHTS_BANNER, ""]
    lines += [_provenance_line(ordered, dataset), "",
              "## Results (sorted by accuracy)", ""]
    lines += _results_table(ordered)
    trust = _trust_lines(ordered)
    if trust:
        lines += [""] + trust
    if any(r.get("tuned") for r in ordered):
        lines += ["", "Best parameters were chosen by stratified k-fold cross-validation on the "
                  "train split (fold counts in report.json); \"fit s\" includes that tuning, "
                  "with the classifiers fitted side by side on the machine's cores (each "
                  "shares memory bandwidth with the others). Equal accuracies share a rank; "
                  "among them the faster fit is listed first."]
    if any(r.get("extract_parts") for r in ordered):
        lines += ["", "\"extraction s\" is what computing the cached embeddings cost, read "
                  "from the caches (summed over the extraction runs that wrote them; a "
                  "combined backbone shows one figure per part, and a warm cache costs "
                  "nothing more now)."]
    lines += [""]
    if best.get("per_class"):
        lines += [f"## Per-class metrics of the best model: {best['clf']} on {best['backbone']} "
                  f"({best['weights']}), {best['split']} split", ""]
        lines += _per_class_table(best) + [""]
    lines += _repeated_section(repeated)
    lines += _calibration_section(ordered, files)
    lines += _abstention_section(ordered, files)
    lines += _dataset_section(dataset)
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    lines += ["## Figures", ""]
    if files.get("accuracy_vs_fit_time"):
        lines.append(f"- [accuracy vs fit time]({files['accuracy_vs_fit_time']})")
    for label, name in files.get("confusion", {}).items():
        lines.append(f"- [confusion matrix: {_md(label)}]({name})")
    return "\n".join(lines) + "\n"


# ----- figures -------------------------------------------------------------------------

def _confusion_names(results) -> list[str]:
    """One unique file name per result: confusion_<clf>_<backbone>[_<weights>][_<k>].png."""
    base = [f"{_slug(r['clf'])}_{_slug(r['backbone'])}" for r in results]
    names = [b if base.count(b) == 1 else f"{b}_{_slug(r['weights'])}"
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
        ax.set_title(title, fontsize=axis_size)
    if n <= CELL_TEXT_MAX_CLASSES:
        for i in range(n):
            for j in range(n):
                if cm[i, j] or i == j:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                            fontsize=label_size, color="white" if fraction[i, j] > 0.5 else "black")
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_accuracy_vs_fit_time(results, path) -> Path:
    """Scatter of accuracy against fit seconds (log x), one labelled point per result."""
    from matplotlib.figure import Figure

    several_backbones = len({r["backbone"] for r in results}) > 1
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(sorted(results, key=lambda r: float(r["fit_seconds"]))):
        seconds = max(float(r["fit_seconds"]), 1e-3)  # log axis: keep instant fits visible
        label = f"{r['clf']}/{r['backbone']}" if several_backbones else r["clf"]
        if r["weights"] == "random":
            label += " (RANDOM)"
        ax.scatter(seconds, r["accuracy"], s=36, color="tab:red" if r["weights"] == "random"
                   else "tab:blue")
        ax.annotate(label, (seconds, r["accuracy"]), textcoords="offset points",
                    xytext=(5, 4 + 10 * (i % 3)), fontsize=8)  # staggered: near ties
    ax.set_xscale("log")
    ax.set_xlabel("fit time including tuning (s, log scale)")
    ax.set_ylabel(f"accuracy ({', '.join(sorted({r['split'] for r in results}))} split)")
    ax.set_title("accuracy vs fit time")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_reliability(results, path) -> Path:
    """Reliability diagram: accuracy against mean top probability per bin, one line per
    classifier with probabilities; the diagonal is perfect calibration."""
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
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_coverage(results, path) -> Path:
    """Accuracy on the answered images against the share answered, as the minimum top
    probability rises (every distinct probability is a point of the curve)."""
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
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
    return Path(path)


def _series_label(r) -> str:
    label = f"{r['clf']}/{r['backbone']}"
    return label + (f" ({r['calibration']})" if r.get("calibration") else "")


def _confusion_title(r) -> str:
    title = (f"{r['clf']} on {r['backbone']} ({r['weights']}), "
             f"{r['split']} accuracy {r['accuracy']:.3f}")
    return title + ("  [RANDOM WEIGHTS]" if r["weights"] == "random" else "")


# ----- the report ----------------------------------------------------------------------

def write_compare_report(results: list[dict], dataset: dict, report_dir, *,
                         notes: list[str] | None = None,
                         repeated: list[dict] | None = None) -> dict:
    """Write report.md, report.json and the PNGs of a compare run into ``report_dir``.

    Parameters
    ----------
    results : list of dict
        One per (classifier, feature set), as returned by :func:`featx.classifiers.compare`.
        Required keys:

        - ``clf`` (str): classifier name; extra rows such as ``"finetune"`` are welcome.
        - ``backbone`` (str), ``weights`` (str: "imagenet", "random", "file").
        - ``split`` (str): the split the numbers come from ("val" or "test").
        - ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (float in [0, 1]).
        - ``fit_seconds`` (float): wall time of the fit including tuning.

        Optional keys (shown as "-" or skipped when missing):

        - ``weights_id`` (str), ``n_train``, ``n_eval`` (int).
        - ``predict_seconds`` (float), ``predict_ms_per_image`` (float).
        - ``extract_seconds`` (float or None): what extracting the cached features cost;
          ``extract_parts`` (list of {``backbone``, ``seconds``}): the same per part of a
          combined backbone (the table shows each); ``flip_average`` (bool).
        - ``tuned`` (bool), ``cv_splits`` (int), ``cv_score`` (float or None),
          ``best_params`` (dict; keys may be pipeline names like ``clf__C``),
          ``class_weight`` (str or None), ``seed`` (int).
        - ``class_names`` (list of str), ``per_class`` (list of dicts ``class``,
          ``precision``, ``recall``, ``f1``, ``support``), ``confusion_matrix`` (list of
          lists, rows true, columns predicted); a confusion PNG is drawn when present.
        - ``intervals`` ({metric: [low, high]}, 95% bootstrap), ``interval_resamples``;
          ``vs_best`` (None for the best row, else ``p_value``, ``significant``,
          ``best_only``, ``this_only``, ``n``: :func:`featx.classifiers.significance`).
        - ``ece`` (float or None), ``reliability`` (bins of
          :func:`featx.uncertainty.reliability_bins`), ``coverage`` (rows of
          :func:`featx.uncertainty.coverage_curve`), ``calibration`` (method or None):
          the calibration and abstention sections and reliability.png.
        - ``eval_rows`` (``paths``, ``y_true``, ``y_pred``, ``confidence`` arrays): draws
          coverage.png; never written to report.json.
        - ``estimator``: ignored here, never written to report.json.
        - anything else JSON-serialisable is copied to report.json as is.
    dataset : dict
        ``root``, ``class_names``, optional ``counts`` ({split: [count per class]}) and
        ``split_sizes`` ({split: n}), ``excluded`` (images left out by an exclude list);
        :func:`dataset_summary` builds it from Features.
    report_dir : str or Path
        Created if missing; files in it with the same names are overwritten.
    notes : list of str, optional
        Extra lines for a "Notes" section (e.g. a fine-tuning cost ratio).
    repeated : list of dict, optional
        :func:`featx.classifiers.compare_repeated` summaries: a "Repeated evaluation"
        section, and ``repeated`` in report.json.

    Returns
    -------
    dict
        The content of report.json: ``featx_version``, ``created``, ``splits``, ``weights``,
        ``random_weights``, ``dataset``, ``best`` (clf, backbone, weights, accuracy),
        ``results`` (sorted by accuracy, best first), ``notes`` and ``files`` (names relative
        to ``report_dir``: ``markdown``, ``json``, ``accuracy_vs_fit_time``, ``confusion``
        mapping "clf/backbone/weights" to a PNG name).
    """
    from featx.persist import featx_version

    _check_results(results)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    ordered = _sorted(results)
    notes = list(notes or [])

    files = {"markdown": "report.md", "json": "report.json",
             "accuracy_vs_fit_time": "accuracy_vs_fit_time.png", "confusion": {}}
    for r, name in zip(ordered, _confusion_names(ordered)):
        if r.get("confusion_matrix") is None:
            continue
        class_names = r.get("class_names") or dataset.get("class_names")
        plot_confusion(r["confusion_matrix"], class_names, report_dir / name, _confusion_title(r))
        files["confusion"][f"{r['clf']}/{r['backbone']}/{r['weights']}"] = name
    plot_accuracy_vs_fit_time(ordered, report_dir / files["accuracy_vs_fit_time"])
    with_probabilities = [r for r in ordered if r.get("reliability")]
    if with_probabilities:
        files["reliability"] = "reliability.png"
        plot_reliability(with_probabilities, report_dir / files["reliability"])
    with_confidence = [r for r in with_probabilities
                       if (r.get("eval_rows") or {}).get("confidence") is not None]
    if with_confidence:
        files["coverage"] = "coverage.png"
        plot_coverage(with_confidence, report_dir / files["coverage"])

    best = ordered[0]
    report = {
        "featx_version": featx_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "splits": sorted({r["split"] for r in ordered}),
        "weights": sorted({r["weights"] for r in ordered}),
        "random_weights": any(r["weights"] == "random" for r in ordered),
        "dataset": dataset,
        "best": {key: best[key] for key in ("clf", "backbone", "weights", "accuracy")},
        "results": [{k: v for k, v in r.items() if k not in NOT_SERIALISED} for r in ordered],
        "notes": notes,
        "repeated": repeated or [],
        "files": files,
    }
    (report_dir / "report.md").write_text(_markdown(ordered, dataset, notes, files, repeated),
                                          encoding="utf-8")
    (report_dir / "report.json").write_text(
        json.dumps(report, indent=2, default=json_default) + "\n", encoding="utf-8")
    return json.loads(json.dumps(report, default=json_default))


# ----- fine-tuning ---------------------------------------------------------------------

def finetune_row(result, backbone=None, weights=None, split=None) -> dict:
    """One row of the ``compare`` results (schema of :func:`featx.classifiers.result_dict`).

    Parameters
    ----------
    result : featx.finetuning.FinetuneResult
        Or anything with its attributes (``metrics``, ``backbone``, ``weights``,
        ``weights_id``, ``split_counts``, ``train_seconds``, ``recipe``, ``epochs_run``,
        ``stage1_epochs``, ``best_epoch``, ``class_names``, ``model_path``).
    backbone, weights : str, optional
        Labels for the row; default the result's backbone name and weights kind.
    split : str, optional
        Split the scores come from; default "test" when the run had one, else "val".
        Note that the val split also chose the best epoch.

    Returns
    -------
    dict
        ``clf="finetune"``, ``backbone``, ``weights``, ``weights_id``, ``split``,
        ``n_train``, ``n_eval``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
        ``fit_seconds`` (wall time of both training stages; images are decoded every
        epoch), ``predict_seconds``, ``predict_ms_per_image`` (end to end from decoded
        images), ``extract_seconds`` (None: nothing is cached), ``tuned`` (False),
        ``cv_splits`` (0), ``cv_score`` (None), ``best_params`` (the recipe, epochs run and
        best epoch), ``class_weight`` (None), ``seed``, ``class_names``, ``per_class``,
        ``confusion_matrix``, ``model_path``; when the result has ``eval_rows``, the
        intervals, calibration and coverage fields of
        :func:`featx.classifiers.uncertainty_summary` and ``eval_rows``. No ``estimator``.
    """
    split = split or ("test" if "test" in result.metrics else "val")
    if split not in result.metrics:
        raise UsageError(f"the fine-tuning run has no {split!r} scores "
                         f"(it has {', '.join(result.metrics)})")
    scores = result.metrics[split]
    row = {
        "clf": "finetune",
        "backbone": backbone or result.backbone,
        "weights": weights or result.weights,
        "weights_id": result.weights_id,
        "split": split,
        "n_train": result.split_counts.get("train", 0),
        "n_eval": scores["n"],
        "accuracy": scores["accuracy"],
        "balanced_accuracy": scores["balanced_accuracy"],
        "macro_f1": scores["macro_f1"],
        "fit_seconds": result.train_seconds,
        "predict_seconds": scores["predict_seconds"],
        "predict_ms_per_image": scores["predict_ms_per_image"],
        "extract_seconds": None,
        "tuned": False,
        "cv_splits": 0,
        "cv_score": None,
        "best_params": {**result.recipe, "epochs_run": result.epochs_run,
                        "stage1_epochs": result.stage1_epochs, "best_epoch": result.best_epoch},
        "class_weight": None,
        "seed": result.recipe.get("seed"),
        "class_names": list(result.class_names),
        "per_class": scores["per_class"],
        "confusion_matrix": scores["confusion_matrix"],
        "model_path": str(result.model_path),
    }
    rows = (getattr(result, "eval_rows", None) or {}).get(split)
    if rows is not None:
        from featx.classifiers import uncertainty_summary

        row.update(uncertainty_summary(rows["y_true"], rows["y_pred"], rows["confidence"],
                                       len(result.class_names), result.recipe.get("seed", 0)))
        row["eval_rows"] = rows
    return row


def finetune_notes(results: list[dict], row: dict, backbone: str) -> list[str]:
    """The report's notes on a fine-tuning row: its cost and accuracy against the best probe.

    Parameters
    ----------
    results : list of dict
        The compare rows; the probes are those of ``backbone`` that are not fine-tuning
        (at least one is needed).
    row : dict
        The fine-tuning row (:func:`finetune_row`).
    backbone : str

    Returns
    -------
    list of str
        The cost ratio (fine-tuning time against the best probe's extraction + fit), the
        accuracy difference, and, when the row is scored on the val split, a note that it
        is slightly optimistic.
    """
    probes = [r for r in results if r["clf"] != "finetune" and r["backbone"] == backbone]
    best = max(probes, key=lambda r: r["accuracy"])
    probe_cost = best["fit_seconds"] + (best.get("extract_seconds") or 0.0)
    ratio = row["fit_seconds"] / probe_cost if probe_cost else float("nan")
    diff = row["accuracy"] - best["accuracy"]
    return [
        f"Fine-tuning took {row['fit_seconds']:.1f} s against {probe_cost:.1f} s for the best "
        f"linear probe ({best['clf']}, extraction {best.get('extract_seconds') or 0:.1f} s + "
        f"fit {best['fit_seconds']:.1f} s): a cost ratio of {ratio:.1f}x.",
        f"Accuracy difference (fine-tune minus best probe, {row['split']} split): {diff:+.4f}.",
    ] + ([
        "The fine-tune row is scored on the val split, which also chose its best epoch "
        "(early stopping), so it is slightly optimistic; a test split avoids this.",
    ] if row["split"] == "val" else [])


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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    return out_png
