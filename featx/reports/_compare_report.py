"""``featx compare``'s report: report.md, report.json and the PNGs, from its compare rows;
and the notes on a fine-tuning row against the best probe."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featx._io import featx_version, to_json
from featx.classifiers import NOT_SERIALISED, REQUIRED, ranking_key

from ._figures import (_confusion_names, _confusion_title, plot_accuracy_vs_fit_time,
                       plot_confusion, plot_coverage, plot_reliability)
from ._markdown import _markdown


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


def _check_results(results):
    if not results:
        raise ValueError("no results to report")
    for i, result in enumerate(results):
        missing = [key for key in REQUIRED if key not in result]
        if missing:
            raise ValueError(f"result {i} ({result.get('clf', '?')}) lacks {', '.join(missing)}")


def write_compare_report(results, dataset: dict, report_dir, *, notes: list[str] | None = None,
                         repeated: list[dict] | None = None) -> dict:
    """Write report.md, report.json and the PNGs of a compare run into ``report_dir``.

    Parameters
    ----------
    results : list of :class:`featx.classifiers.CompareRow`
        One per (classifier, feature set), as :func:`featx.classifiers.compare` returns
        them, plus any fine-tuning row; dicts with the same keys work too. The required
        keys are :data:`featx.classifiers.REQUIRED`; the report shows "-" for an optional
        one that is missing, draws a confusion PNG for rows with ``confusion_matrix``,
        reliability.png for rows with ``reliability`` and coverage.png for rows with
        ``eval_rows``. Everything but ``estimator`` and ``eval_rows`` goes to report.json.
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
    _check_results(results)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(results, key=ranking_key)
    notes = list(notes or [])
    files = _draw_figures(ordered, dataset, report_dir)
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
    text = to_json(report, indent=2)
    (report_dir / "report.json").write_text(text + "\n", encoding="utf-8")
    return json.loads(text)


def _draw_figures(ordered, dataset, report_dir: Path) -> dict:
    """The PNGs of the report; returns the report's files by role (names in report_dir)."""
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
    return files


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
