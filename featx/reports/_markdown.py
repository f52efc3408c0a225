"""report.md of ``featx compare``: its sections, from compare rows
(:class:`featx.classifiers.CompareRow`, or dicts with the same keys)."""

from __future__ import annotations

import math

from featx.classifiers import ALPHA, CALIBRATION_BINS

RANDOM_WEIGHTS_BANNER = (
    "> **WARNING: RANDOM BACKBONE WEIGHTS.** At least one backbone below used random "
    "(untrained) weights. Those numbers say nothing about transfer learning; random weights "
    "are for tests and throughput benchmarks only.")


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
    """A row's backbone as the tables show it: "efficientnet_lite0 int8 (cos 0.979, 100%)
    flip-averaged", an int8 row with its measured agreement with fp32 (mean cosine, share of
    nearest-class decisions kept)."""
    int8 = ""
    if r.get("precision") == "int8":
        agreement = r.get("int8_agreement")
        int8 = " int8" + (f" (cos {agreement['mean_cosine']:.3f}, {agreement['decisions']:.0%})"
                          if agreement else " (agreement unmeasured)")
    return r["backbone"] + int8 + (" flip-averaged" if r.get("flip_average") else "")


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
    lines = ["| class | precision | recall (95% interval) | F1 | support |",
             "|---|---:|---:|---:|---:|"]
    for row in result["per_class"]:
        interval = row.get("recall_interval")
        recall = f"{row['recall']:.4f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})"
                                           if interval else "")
        lines.append(f"| {_md(row['class'])} | {row['precision']:.4f} | {recall} | "
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
        line += (" **int8 embeddings** (quantised backbone) in the rows marked int8, each with"
                 " its model's agreement with fp32 on held-back training images (mean cosine"
                 ", share of nearest-class decisions kept).")
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
    lines = [interval_methods_line(next(r for r in ordered if r.get("intervals")))]
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


def interval_methods_line(row) -> str:
    """Which method made each of a row's intervals, in one sentence."""
    by_method = {}
    for metric, method in row["interval_methods"].items():
        by_method.setdefault(method, []).append(METRIC_NAMES.get(metric, metric))
    parts = [f"{' and '.join(metrics)}: {method}" for method, metrics in by_method.items()]
    return ("Intervals (95%, over the evaluation images): " + "; ".join(parts) + ". They "
            "stay honest at 0 and 1: a perfect score on n images keeps a lower bound below 1.")


METRIC_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                "macro_f1": "macro-F1"}


def _calibration_section(ordered, files) -> list[str]:
    rows = [r for r in ordered if "ece" in r]
    if not rows:
        return []
    lines = ["## Calibration", "",
             f"Expected calibration error (ECE, {CALIBRATION_BINS} equal-width bins of the top "
             "probability; 0 = the probabilities mean what they say). Models without "
             "probabilities (an uncalibrated svm gives decision values) show \"-\"; "
             "`--calibrate` gives them probabilities.", "",
             "| classifier | backbone | calibration | ECE |", "|---|---|---|---:|"]
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
             "interval is a 95% interval of the mean (exact binomial, Clopper-Pearson, at the "
             "effective sample size), each evaluated image counted once however many repeats "
             "evaluated it.", "",
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
