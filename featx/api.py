"""High-level API over the cache: fit, predict, compare, export and audit. The CLI wraps
these functions.

Each function orchestrates: the options object (:mod:`featx.options`), extraction, the
classifiers, persistence and reports each live in their own module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featx.errors import DataError, UsageError
from featx.options import AuditOptions, ExtractOptions, backbone_parts

log = logging.getLogger(__name__)


def fit(data_dir, clf="svm", *, tune=True, class_weight=None, out="models", name=None,
        use_augmented=False, cv=5, calibrate=None, tuning="fast",
        options: ExtractOptions | None = None, **values) -> dict:
    """Extract (or reuse) embeddings, fit ``clf`` on the train split, evaluate, save.

    ``calibrate`` ("sigmoid" or "isotonic") wraps the tuned classifier in cross-validated
    calibration, so that its scores are probabilities (the SVM's too); the saved model
    records it. ``tuning``: "fast" or "exhaustive" (:func:`featx.classifiers.fit_classifier`).

    ``options`` (or the same names as keyword arguments, :class:`ExtractOptions`) say
    how the features are extracted and split. Returns a dict with ``model`` (path),
    ``clf``, ``val_accuracy``, ``val_macro_f1``, ``fit_seconds``, ``best_params`` and,
    when a test split exists, ``test_*``.
    """
    from featx.classifiers import evaluate, fit_classifier, make_classifier, summary_metrics
    from featx.extraction import extract
    from featx.persist import classifier_metadata, save_model

    options = ExtractOptions.create(options, **values)
    make_classifier(clf)  # unknown names fail before any extraction
    features = extract(data_dir, options)
    if use_augmented:
        features.require_views()
    X_train, y_train = features.arrays("train", views=use_augmented)
    present = sorted(set(y_train.tolist()))
    if len(present) < 2:
        found = ", ".join(repr(features.class_names[i]) for i in present) or "none"
        raise DataError(f"{data_dir}: the train split has only one class ({found}); "
                        "a classifier needs at least two")
    groups = features.groups("train", views=True) if use_augmented else None
    result = fit_classifier(clf, X_train, y_train, tune=tune, class_weight=class_weight,
                            seed=options.seed, cv=cv, groups=groups, calibrate=calibrate,
                            tuning=tuning)
    metrics, predictions = {}, {}
    for split in ("val", "test"):
        if features.has_split(split):
            X, y = features.arrays(split)
            metrics[split] = summary_metrics(evaluate(result.estimator, X, y,
                                                      features.class_names))
            idx = features.indices(split)
            predictions[split] = dict(zip(features.paths[idx].tolist(),
                                          result.estimator.predict(X).tolist()))
    name = name or (f"{clf}-{features.backbone}{'-flip' if features.flip_average else ''}"
                    f"-{features.root.name}")
    metadata = classifier_metadata(features, clf, result, options, metrics, predictions,
                                   n_train=len(y_train), use_augmented=use_augmented)
    metadata["n_excluded"] = features.stats.n_excluded
    path = save_model(result.estimator, out, name, metadata)
    outcome = {
        "model": str(path),
        "clf": clf,
        "backbone": features.backbone,
        "weights": features.weights,
        "val_accuracy": metrics.get("val", {}).get("accuracy"),
        "val_macro_f1": metrics.get("val", {}).get("macro_f1"),
        "fit_seconds": result.fit_seconds,
        "best_params": result.best_params,
        "calibration": result.calibration,
        "extract_reused": features.stats.reused,
        "n_excluded": features.stats.n_excluded,
        "runtime": features.provenance(),
        "precision": features.precision,
        "cache": None if features.cache_path is None else str(features.cache_path),
        "caches": [str(path) for path in features.cache_paths],
    }
    if "test" in metrics:
        outcome["test_accuracy"] = metrics["test"]["accuracy"]
        outcome["test_macro_f1"] = metrics["test"]["macro_f1"]
    return outcome


# ----- predict ---------------------------------------------------------------------
def predict(model_path, paths, *, top_k=3, batch_size=32, runtime="auto",
            min_score=None) -> list[dict]:
    """Label image files with a model saved by ``fit`` (or ``finetune``).

    Known files (same content as a row of the model's cache) reuse their cached embedding;
    others are embedded with the backbone and preprocessing recorded in the model metadata.
    ``min_score`` (a probability): files whose top probability is below it are labelled
    "unknown", their best guess kept in ``best_guess``; models without probabilities (an
    uncalibrated svm) refuse it.
    """
    from featx.data import expand_paths
    from featx.inference import classifier_scores, label_rows

    model_path = Path(model_path)
    if model_path.suffix == ".keras":
        return _predict_finetuned(model_path, expand_paths(paths), top_k, batch_size,
                                  min_score)
    from featx.persist import load_model

    estimator, metadata = load_model(model_path)
    if min_score is not None and not hasattr(estimator, "predict_proba"):
        raise UsageError(f"{model_path}: --min-score needs probabilities, and this "
                         f"{metadata.get('clf', 'model')} gives decision values; refit it "
                         "with `featx fit --calibrate`")
    _check_unknown_free(metadata["classes"], min_score, model_path)
    files = expand_paths(paths)
    scores, labels, errors, sources = classifier_scores(estimator, metadata, files, runtime,
                                                        batch_size)
    rows = label_rows(files, errors, scores, labels, estimator.classes_, metadata["classes"],
                      top_k, min_score=min_score)
    for row, source in zip(rows, sources):
        row["embedded_by"] = source
    return rows


def _predict_finetuned(model_path, files, top_k, batch_size, min_score=None):
    """Rows for a fine-tuned end-to-end Keras model (its own preprocessing and head)."""
    from featx.finetuning import load_finetuned, probabilities_and_errors
    from featx.inference import label_rows

    model, metadata = load_finetuned(model_path)
    classes = metadata["class_names"]
    _check_unknown_free(classes, min_score, model_path)
    probabilities, errors = probabilities_and_errors(model, metadata, files, batch_size)
    scores = probabilities[np.array([not e for e in errors], dtype=bool)]
    return label_rows(files, errors, scores, scores.argmax(axis=1), range(len(classes)),
                      classes, top_k, min_score=min_score)


def _check_unknown_free(classes, min_score, model_path):
    from featx.inference import UNKNOWN

    if min_score is not None and UNKNOWN in classes:
        raise UsageError(f"{model_path}: a class is named {UNKNOWN!r}, so --min-score could "
                         "not tell an abstention from that class; rename the class folder")


# ----- export ----------------------------------------------------------------------
def export(model_path, format="onnx", *, precision="fp32", out=None, check=None,
           batch_size=32) -> dict:
    """Write a deployable file of a saved model (:func:`featx.deploy.export_model`); with
    ``check`` (a data folder), prove parity with ``predict`` on its validation images.

    Returns a dict with ``path``, ``format``, ``precision``, ``output``, ``classes``,
    ``size_bytes``, ``sha256``, ``seconds`` and, with ``check``, ``parity``.
    """
    from featx.deploy import check_export, export_model

    exported = export_model(model_path, format, precision=precision, out=out)
    outcome = {"path": str(exported.path), "format": exported.format,
               "precision": exported.precision, "output": exported.metadata["output"],
               "classes": exported.metadata["classes"], "size_bytes": exported.size_bytes,
               "sha256": exported.sha256, "seconds": exported.seconds}
    if check is not None:
        outcome["parity"] = check_export(exported.path, model_path, check,
                                         batch_size=batch_size).as_dict()
    return outcome


# ----- audit -------------------------------------------------------------------------
def audit(data_dir, *, report_dir="reports/audit", write_exclude=None, audit_options=None,
          options: ExtractOptions | None = None, **values) -> dict:
    """Find near-duplicates, leakage across splits, likely label errors and outliers in the
    cached embeddings of ``data_dir`` (extracting first what the cache lacks); write the
    report (:mod:`featx.audit_report`) and, with ``write_exclude``, the exclude list.

    ``audit_options``: a :class:`featx.options.AuditOptions` (default: its defaults, seeded
    by ``options.seed``). The report lists the first ``top`` findings of each type; the
    exclude list holds every flagged file, and the files ``options.exclude`` already left
    out. Returns a dict with ``report``, ``files``, ``counts``,
    ``skipped``, ``n_images``, ``n_extracted`` and, with ``write_exclude``,
    ``exclude_file`` and ``n_exclude``.
    """
    import time

    from featx.audit_checks import audit_rows
    from featx.audit_report import (audit_findings, exclude_entries, summary_counts,
                                    write_audit_report)
    from featx.data import read_exclude_file, write_exclude_file
    from featx.extraction import extract

    started = time.perf_counter()
    options = ExtractOptions.create(options, **values)
    audit_options = audit_options or AuditOptions(seed=options.seed)
    features = extract(data_dir, options)
    rows = np.flatnonzero(features.view == 0)
    if len(rows) < 2:
        raise DataError(f"{data_dir}: {len(rows)} cached image(s); an audit needs two or more")
    X, labels = features.take(rows)
    paths, splits = features.paths[rows], features.split[rows]
    found = audit_rows(X, labels, splits, features.sha256[rows], features.class_names,
                       audit_options)
    findings = audit_findings(found, paths, labels, splits, features.class_names)
    dataset = {"root": str(features.root), "n_images": len(rows),
               "class_names": list(features.class_names), "backbone": features.backbone,
               "weights_id": features.weights_id, "provenance": features.provenance(),
               "n_excluded": features.stats.n_excluded,
               "n_extracted": features.stats.n_extracted}
    files = write_audit_report(found, findings, dataset, report_dir, labels=labels)
    outcome = {"report": files["markdown"], "files": files,
               "counts": summary_counts(found.counts), "skipped": found.skipped,
               "n_images": len(rows), "n_extracted": features.stats.n_extracted}
    if write_exclude is not None:
        entries = exclude_entries(findings)
        if options.exclude:  # the files this audit ran without stay out
            listed = {path for path, _ in entries}
            entries += [(path, f"listed in {options.exclude}") for path in
                        sorted(read_exclude_file(options.exclude, features.root) - listed)]
        outcome["exclude_file"] = str(write_exclude_file(write_exclude, entries))
        outcome["n_exclude"] = len(entries)
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    return outcome


# ----- compare ---------------------------------------------------------------------
def compare(data_dir, clfs=("all",), *, backbones=None, report_dir="reports", tune=True,
            class_weight=None, eval_split="val", cv=5, finetune=None, augmented="no",
            calibrate=None, tuning="fast", repeats=None,
            options: ExtractOptions | None = None, **values) -> dict:
    """Fit every classifier on the same cached features of every backbone; write a report.

    ``backbones``: names to compare (default: ``options.backbone``). ``augmented``: "no"
    (original images only), "yes" (train on augmented views too, when the cache holds them)
    or "both" (one row each). ``finetune``: None, or a dict of
    :func:`featx.finetuning.finetune` recipe options to add a fine-tuning row.
    ``calibrate`` and ``tuning``: as in :func:`fit`. ``repeats``: also evaluate every
    classifier on R re-drawn splits of the cached rows (:mod:`featx.resampling`), zero
    forward passes; summarised under ``repeated``.
    """
    import dataclasses

    from featx.classifiers import check_names, compare as compare_features, significance
    from featx.extraction import check_backbone, extract
    from featx.reports import dataset_summary, write_compare_report

    options = ExtractOptions.create(options, **values)
    names = check_names(clfs)
    if repeats and augmented != "no":
        raise UsageError("--repeats re-draws splits of the original images; use it without "
                         "--augmented")
    backbones = tuple(backbones or (options.backbone,))
    for backbone in backbones:  # a bad name or option fails before any extraction
        check_backbone(dataclasses.replace(options, backbone=backbone))
    if finetune is not None:
        from featx.finetuning import require_tf_data

        require_tf_data()  # before the classifiers' work, not after it
    if finetune is not None and len(backbone_parts(backbones[0])) > 1:
        raise UsageError(f"--finetune fine-tunes the first backbone, and {backbones[0]!r} "
                         "combines several; name a single backbone first")
    results, features_list, repeated = [], [], []
    for backbone in backbones:
        features = extract(data_dir, dataclasses.replace(options, backbone=backbone))
        features_list.append(features)
        if not features.has_split(eval_split):
            raise DataError(f"{data_dir}: the {eval_split} split is empty")
        variants = {"no": [False], "yes": [True], "both": [False, True]}[augmented]
        if augmented != "no":
            features.require_views()
        for use_views in variants:
            rows = compare_features([features], names, tune=tune, class_weight=class_weight,
                                    seed=options.seed, eval_split=eval_split, cv=cv,
                                    views=use_views, calibrate=calibrate, tuning=tuning)
            for row in rows:
                row.pop("estimator", None)
                row["augmented_views"] = bool(use_views)
                if use_views:
                    row["clf"] += "+aug"
            results.extend(rows)
        if repeats:
            repeated += _repeated(features, names, repeats, eval_split, options, tune=tune,
                                  class_weight=class_weight, cv=cv, calibrate=calibrate,
                                  tuning=tuning)
    notes = []
    if finetune is not None:
        notes.extend(_add_finetune_row(data_dir, results, backbones[0], options,
                                       finetune, eval_split))
    significance(results)
    dataset = dataset_summary(features_list[0])
    report = write_compare_report(results, dataset, report_dir, notes=notes,
                                  repeated=repeated)
    for row in results:
        row.pop("eval_rows", None)
    return {"report": str(Path(report_dir) / "report.md"), "results": results,
            "repeated": repeated, "report_files": report, "dataset": dataset}


def _repeated(features, names, repeats, eval_split, options, **fit_options) -> list[dict]:
    from featx.classifiers import compare_repeated
    from featx.resampling import plan_repeats

    train, evaluation = features.indices("train"), features.indices(eval_split)
    plan = plan_repeats(features.paths, features.labels, np.concatenate([train, evaluation]),
                        repeats=repeats, layout=features.layout,
                        eval_fraction=len(evaluation) / (len(train) + len(evaluation)),
                        seed=options.seed, train_per_class=options.split.train_per_class,
                        cv=fit_options["cv"], class_names=features.class_names)
    return compare_repeated(features, names, plan, **fit_options)


def _add_finetune_row(data_dir, results, backbone, options, recipe, eval_split) -> list[str]:
    import dataclasses

    from featx.finetuning import finetune
    from featx.reports import finetune_notes, finetune_row

    outcome = finetune(data_dir, options=dataclasses.replace(options, backbone=backbone),
                       **recipe)
    row = finetune_row(outcome, backbone, options.weights, split=eval_split)
    row["augmented_views"] = False
    results.append(row)
    return finetune_notes(results, row, backbone)
