"""featx's one Python entry point: every command of the CLI is one function here, and each
returns a typed result whose ``to_dict()`` is what the command's ``--json`` prints.

==========================  ===============================================================
``extract``                 :class:`featx.cache.Features` (``CombinedFeatures`` for A+B)
``fit``                     :class:`FitSummary`
``compare``                 :class:`CompareSummary`
``predict``                 :class:`featx.inference.Predictions`
``finetune``                :class:`featx.finetuning.FinetuneResult`
``audit``                   :class:`AuditSummary`
``export``                  :class:`featx.deploy.Exported`
``convert_model``           :class:`ConvertedModel`
``list_caches``...          :class:`featx.cache.CacheSummary` and the other cache results
``augment_preview``         :class:`AugmentPreview`
``demo``                    :class:`Demo`
==========================  ===============================================================

Every function that reads images takes :class:`~featx.options.ExtractOptions` as
``options=`` or the same names as keyword arguments. Each one orchestrates; the work is
done in the packages along an image's route (data, extraction, cache, classifiers, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from featx._io import sidecar_for
from featx.auditing import (CopyVerifier, LocalFeatureStore, audit_findings, audit_rows,
                            exclude_entries, summary_counts, write_audit_report)
from featx.backbones import describe_backbones
from featx.base import Result
from featx.cache import (cache_info, compact_cache, export_embeddings, list_caches,
                         verify_cache)
from featx.classifiers import (CompareRow, check_names, classifier_metadata, compare_repeated,
                               evaluate, fit_classifier, make_classifier, plan_repeats,
                               save_model, significance, summary_metrics)
from featx.classifiers import compare as compare_features
from featx.classifiers import convert_model as convert_saved_model
from featx.data import expand_paths, read_exclude_file, write_digits, write_exclude_file
from featx.deploy import Exported, check_export, export_model
from featx.errors import DataError, UsageError
from featx.extraction import check_backbone, extract
from featx.inference import Predictions, SavedModel, label_rows
from featx.options import AuditOptions, ExtractOptions, backbone_parts
from featx.reports import dataset_summary, finetune_notes, write_compare_report

log = logging.getLogger(__name__)

__all__ = [
    "AugmentPreview", "AuditSummary", "CompareSummary", "ConvertedModel", "Demo", "FitSummary",
    "audit", "augment_preview", "cache_info", "compact_cache", "compare", "convert_model", "demo",
    "describe_backbones",
    "export", "export_embeddings", "extract", "finetune", "fit", "list_caches", "predict",
    "verify_cache", "write_digits",
]


# ----- fit ---------------------------------------------------------------------------
@dataclasses.dataclass
class FitSummary(Result):
    """What :func:`fit` saved and how well it scores; ``test_*`` only with a test split."""

    model: str  # the .skops file (its .json sidecar beside it)
    clf: str
    backbone: str
    weights: str
    val_accuracy: float | None
    val_macro_f1: float | None
    fit_seconds: float
    best_params: dict
    calibration: str | None
    extract_reused: bool
    n_excluded: int
    runtime: str  # which runtime(s) and precision computed the features
    precision: str
    cache: str | None
    caches: list
    test_accuracy: float | None = None
    test_macro_f1: float | None = None
    _optional = ("test_accuracy", "test_macro_f1")


def fit(data_dir, clf="svm", *, tune=True, class_weight=None, out="models", name=None,
        use_augmented=False, cv=5, calibrate=None, tuning="fast",
        options: ExtractOptions | None = None, **values) -> FitSummary:
    """Extract (or reuse) embeddings, fit ``clf`` on the train split, evaluate, save.

    ``calibrate`` ("sigmoid" or "isotonic") wraps the tuned classifier in cross-validated
    calibration, so that its scores are probabilities (the SVM's too); the saved model
    records it. ``tuning``: "fast" or "exhaustive" (:func:`featx.classifiers.fit_classifier`).
    ``options`` (or the same names as keyword arguments) say how the features are
    extracted and split.
    """
    options = ExtractOptions.create(options, **values)
    make_classifier(clf)  # unknown names fail before any extraction
    features = extract(data_dir, options)
    if use_augmented:
        features.require_views()
    X_train, y_train = features.arrays("train", views=use_augmented)
    _require_two_classes(data_dir, y_train, features.class_names)
    groups = features.groups("train", views=True) if use_augmented else None
    result = fit_classifier(clf, X_train, y_train, tune=tune, class_weight=class_weight,
                            seed=options.seed, cv=cv, groups=groups, calibrate=calibrate,
                            tuning=tuning)
    metrics, predictions = _scores_by_split(result.estimator, features)
    name = name or (f"{clf}-{features.backbone}{'-flip' if features.flip_average else ''}"
                    f"-{features.root.name}")
    metadata = classifier_metadata(features, clf, result, options, metrics, predictions,
                                   n_train=len(y_train), use_augmented=use_augmented)
    metadata["n_excluded"] = features.stats.n_excluded
    path = save_model(result.estimator, out, name, metadata)
    return FitSummary(
        model=str(path), clf=clf, backbone=features.backbone, weights=features.weights,
        val_accuracy=metrics.get("val", {}).get("accuracy"),
        val_macro_f1=metrics.get("val", {}).get("macro_f1"), fit_seconds=result.fit_seconds,
        best_params=result.best_params, calibration=result.calibration,
        extract_reused=features.stats.reused, n_excluded=features.stats.n_excluded,
        runtime=features.provenance(), precision=features.precision,
        cache=None if features.cache_path is None else str(features.cache_path),
        caches=[str(p) for p in features.cache_paths],
        test_accuracy=metrics.get("test", {}).get("accuracy"),
        test_macro_f1=metrics.get("test", {}).get("macro_f1"))


def _require_two_classes(data_dir, y_train, class_names) -> None:
    present = sorted(set(y_train.tolist()))
    if len(present) < 2:
        found = ", ".join(repr(class_names[i]) for i in present) or "none"
        raise DataError(f"{data_dir}: the train split has only one class ({found}); "
                        "a classifier needs at least two")


def _scores_by_split(estimator, features):
    """Headline metrics per evaluation split, and each evaluated file's predicted class."""
    metrics, predictions = {}, {}
    for split in ("val", "test"):
        if features.has_split(split):
            X, y = features.arrays(split)
            metrics[split] = summary_metrics(evaluate(estimator, X, y, features.class_names))
            idx = features.indices(split)
            predictions[split] = dict(zip(features.paths[idx].tolist(),
                                          estimator.predict(X).tolist()))
    return metrics, predictions


# ----- predict ---------------------------------------------------------------------
def predict(model_path, paths, *, top_k=3, batch_size=32, runtime="auto",
            min_score=None, trust_pickle=False) -> Predictions:
    """Label image files (or folders of them) with a model saved by ``fit`` or ``finetune``.

    Known files (same content as a row of the model's cache) reuse their cached embedding;
    others are embedded with the backbone and preprocessing recorded in the model metadata.
    ``min_score`` (a probability): files whose top probability is below it are labelled
    "unknown", their best guess kept in ``best_guess``; models without probabilities (an
    uncalibrated svm) refuse it. ``trust_pickle``: also load a featx 0.1 ``.joblib`` model,
    a pickle that runs code when loaded (:func:`convert_model` converts one once).
    """
    model = SavedModel.load(model_path, trust_pickle=trust_pickle)
    model.check_min_score(min_score)
    files = expand_paths(paths)
    scores, labels, errors, sources = model.scores(files, runtime, batch_size)
    rows = label_rows(files, errors, scores, labels, model.score_classes, model.class_names,
                      top_k, min_score=min_score)
    for row, source in zip(rows, sources):
        if source:
            row["embedded_by"] = source
    return Predictions(str(model_path), rows, top_k, min_score)


# ----- export ----------------------------------------------------------------------
def export(model_path, format="onnx", *, precision="fp32", out=None, check=None,
           batch_size=32, trust_pickle=False) -> Exported:
    """Write a deployable file of a saved model (:func:`featx.deploy.export_model`); with
    ``check`` (a data folder), prove parity with ``predict`` on its validation images.
    ``trust_pickle``: as for :func:`predict`."""
    exported = export_model(model_path, format, precision=precision, out=out,
                            trust_pickle=trust_pickle)
    if check is not None:
        parity = check_export(exported.path, model_path, check, batch_size=batch_size,
                              trust_pickle=trust_pickle)
        exported = dataclasses.replace(exported, parity=parity)
    return exported


# ----- convert-model -----------------------------------------------------------------
@dataclasses.dataclass
class ConvertedModel(Result):
    """A featx 0.1 pickle rewritten as ``.skops`` (:func:`convert_model`)."""

    model: str  # the .skops file written
    sidecar: str  # its .json sidecar, which now names it
    converted_from: str  # the pickle, left in place
    sha256: str


def convert_model(model_path, *, trust_pickle=False) -> ConvertedModel:
    """Rewrite a featx 0.1 ``.joblib`` classifier (or its ``.json`` sidecar's) as
    ``.skops`` beside it, which loads without running code, and point the sidecar at it.

    The pickle is loaded once, and loading a pickle runs whatever code it holds: without
    ``trust_pickle=True`` this refuses (UsageError), as :func:`predict` does.
    """
    path, record = convert_saved_model(model_path, trust_pickle=trust_pickle)
    return ConvertedModel(str(path), str(sidecar_for(path)),
                          str(path.with_name(record["converted_from"])), record["sha256"])


# ----- audit -------------------------------------------------------------------------
@dataclasses.dataclass
class AuditSummary(Result):
    """What :func:`audit` found and wrote (``exclude_file`` only with ``write_exclude``)."""

    report: str  # audit.md
    files: dict
    counts: dict  # groups and findings per type
    skipped: list  # one line per check that could not run, and why
    n_images: int
    n_extracted: int
    exclude_file: str | None = None
    n_exclude: int | None = None
    seconds: float = 0.0
    _optional = ("exclude_file", "n_exclude")

    def to_dict(self) -> dict:
        """What ``featx audit --json`` prints."""
        return {k: getattr(self, k) for k in ("report", "counts", "n_images", "n_extracted",
                                              "exclude_file", "n_exclude", "skipped",
                                              "seconds")}


def audit(data_dir, *, report_dir="reports/audit", write_exclude=None, audit_options=None,
          options: ExtractOptions | None = None, **values) -> AuditSummary:
    """Find near-duplicates, leakage across splits, likely label errors and outliers in the
    cached embeddings of ``data_dir`` (extracting first what the cache lacks); write the
    report (:mod:`featx.auditing`) and, with ``write_exclude``, the exclude list.

    ``audit_options``: a :class:`featx.options.AuditOptions` (default: its defaults, seeded
    by ``options.seed``). The report lists the first ``top`` findings of each type; the
    exclude list holds every flagged file, and the files ``options.exclude`` already left
    out.
    """
    started = time.perf_counter()
    options = ExtractOptions.create(options, **values)
    audit_options = audit_options or AuditOptions(seed=options.seed)
    features = extract(data_dir, options)
    rows = np.flatnonzero(features.view == 0)
    if len(rows) < 2:
        raise DataError(f"{data_dir}: {len(rows)} cached image(s); an audit needs two or more")
    X, labels = features.take(rows)
    paths, splits = features.paths[rows], features.split[rows]
    verify = None
    if audit_options.verify:
        # beside the dataset's caches: keypoints do not depend on the backbone
        store = LocalFeatureStore(Path(features.cache_paths[0]).parent / "local_features.h5")
        verify = CopyVerifier(features.root, paths, features.sha256[rows], store=store,
                              min_inliers=audit_options.min_inliers,
                              fallback_cosine=audit_options.threshold,
                              progress=options.progress)
    found = audit_rows(X, labels, splits, features.sha256[rows], features.class_names,
                       audit_options, verify=verify)
    findings = audit_findings(found, paths, labels, splits, features.class_names)
    dataset = {"root": str(features.root), "n_images": len(rows),
               "class_names": list(features.class_names), "backbone": features.backbone,
               "weights_id": features.weights_id, "provenance": features.provenance(),
               "n_excluded": features.stats.n_excluded,
               "n_extracted": features.stats.n_extracted}
    files = write_audit_report(found, findings, dataset, report_dir, labels=labels)
    summary = AuditSummary(files["markdown"], files, summary_counts(found.counts),
                           found.skipped, len(rows), features.stats.n_extracted)
    if write_exclude is not None:
        entries = _exclude_entries(findings, options, features.root)
        summary.exclude_file = str(write_exclude_file(write_exclude, entries))
        summary.n_exclude = len(entries)
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _exclude_entries(findings, options, root) -> list[tuple[str, str]]:
    """Every flagged file, and the files this audit ran without (they stay out)."""
    entries = exclude_entries(findings)
    if options.exclude:
        listed = {path for path, _ in entries}
        entries += [(path, f"listed in {options.exclude}") for path in
                    sorted(read_exclude_file(options.exclude, root) - listed)]
    return entries


# ----- compare ---------------------------------------------------------------------
@dataclasses.dataclass
class CompareSummary(Result):
    """What :func:`compare` measured and wrote: every row in full (``results``), the
    repeated-evaluation summaries, the report's files and the dataset summary."""

    report: str  # report.md
    results: list  # CompareRow per (backbone, classifier[, augmented]) and the fine-tuning row
    repeated: list
    report_files: dict  # the content of report.json
    dataset: dict
    JSON_KEYS = ("clf", "backbone", "weights", "split", "accuracy", "balanced_accuracy",
                 "macro_f1", "intervals", "interval_methods", "vs_best", "ece", "calibration",
                 "fit_seconds", "predict_seconds", "extract_seconds", "extract_parts",
                 "flip_average", "augmented_views", "best_params", "runtime", "precision",
                 "int8_agreement")

    def to_dict(self) -> dict:
        """What ``featx compare --json`` prints: the report and each row's headline fields."""
        return {"report": self.report,
                "results": [{k: r.get(k) for k in self.JSON_KEYS} for r in self.results],
                "repeated": self.repeated}


def compare(data_dir, clfs=("all",), *, backbones=None, report_dir="reports", tune=True,
            class_weight=None, eval_split="val", cv=5, finetune=None, augmented="no",
            calibrate=None, tuning="fast", repeats=None,
            options: ExtractOptions | None = None, **values) -> CompareSummary:
    """Fit every classifier on the same cached features of every backbone; write a report.

    ``backbones``: names to compare (default: ``options.backbone``). ``augmented``: "no"
    (original images only), "yes" (train on augmented views too, when the cache holds them)
    or "both" (one row each). ``finetune``: None, or a dict of
    :func:`featx.finetuning.finetune` recipe options to add a fine-tuning row.
    ``calibrate`` and ``tuning``: as in :func:`fit`. ``repeats``: also evaluate every
    classifier on R re-drawn splits of the cached rows (zero forward passes), summarised
    under ``repeated``.
    """
    options = ExtractOptions.create(options, **values)
    names = check_names(clfs)
    backbones = tuple(backbones or (options.backbone,))
    _check_compare(backbones, options, augmented, repeats, finetune)
    fit_options = dict(tune=tune, class_weight=class_weight, cv=cv, calibrate=calibrate,
                       tuning=tuning)
    results, features_list, repeated = [], [], []
    for backbone in backbones:
        features = extract(data_dir, dataclasses.replace(options, backbone=backbone))
        features_list.append(features)
        if not features.has_split(eval_split):
            raise DataError(f"{data_dir}: the {eval_split} split is empty")
        results += _classifier_rows(features, names, eval_split, augmented, options.seed,
                                    fit_options)
        if repeats:
            repeated += _repeated(features, names, repeats, eval_split, options, **fit_options)
    notes = []
    if finetune is not None:
        notes = _add_finetune_row(data_dir, results, backbones[0], options, finetune,
                                  eval_split)
    significance(results)
    dataset = dataset_summary(features_list[0])
    report = write_compare_report(results, dataset, report_dir, notes=notes,
                                  repeated=repeated)
    for row in results:
        row.drop("eval_rows")
    return CompareSummary(str(Path(report_dir) / "report.md"), results, repeated, report,
                          dataset)


def _check_compare(backbones, options, augmented, repeats, finetune) -> None:
    """Every refusal before the first image is embedded."""
    if repeats and augmented != "no":
        raise UsageError("--repeats re-draws splits of the original images; use it without "
                         "--augmented")
    for backbone in backbones:
        check_backbone(dataclasses.replace(options, backbone=backbone))
    if finetune is not None:
        from featx.finetuning import require_tf_data

        require_tf_data()  # before the classifiers' work, not after it
        if len(backbone_parts(backbones[0])) > 1:
            raise UsageError(f"--finetune fine-tunes the first backbone, and "
                             f"{backbones[0]!r} combines several; name a single backbone "
                             "first")


def _classifier_rows(features, names, eval_split, augmented, seed,
                     fit_options) -> list[CompareRow]:
    """Every classifier on ``features``: on the original images, with their augmented
    views too, or both (``augmented``: "no", "yes", "both")."""
    variants = {"no": [False], "yes": [True], "both": [False, True]}[augmented]
    if augmented != "no":
        features.require_views()
    rows = []
    for use_views in variants:
        for row in compare_features([features], names, seed=seed, eval_split=eval_split,
                                    views=use_views, **fit_options):
            row.drop("estimator").update(augmented_views=bool(use_views))
            if use_views:
                row.clf += "+aug"
            rows.append(row)
    return rows


def _repeated(features, names, repeats, eval_split, options, **fit_options) -> list[dict]:
    train, evaluation = features.indices("train"), features.indices(eval_split)
    plan = plan_repeats(features.paths, features.labels, np.concatenate([train, evaluation]),
                        repeats=repeats, layout=features.layout,
                        eval_fraction=len(evaluation) / (len(train) + len(evaluation)),
                        seed=options.seed, train_per_class=options.split.train_per_class,
                        cv=fit_options["cv"], class_names=features.class_names)
    return compare_repeated(features, names, plan, **fit_options)


def _add_finetune_row(data_dir, results, backbone, options, recipe, eval_split) -> list[str]:
    from featx.finetuning import finetune, finetune_row

    outcome = finetune(data_dir, options=dataclasses.replace(options, backbone=backbone),
                       **recipe)
    row = finetune_row(outcome, backbone, options.weights, split=eval_split)
    row.augmented_views = False
    results.append(row)
    return finetune_notes(results, row, backbone)


# ----- the rest of the commands --------------------------------------------------------
def finetune(data_dir, **kwargs):
    """Fine-tune the backbone on ``data_dir`` in two stages (:func:`featx.finetuning.finetune`,
    which documents every argument); returns its
    :class:`~featx.finetuning.FinetuneResult`."""
    from featx.finetuning import finetune as run  # imports Keras

    return run(data_dir, **kwargs)


@dataclasses.dataclass
class AugmentPreview(Result):
    path: str  # the PNG grid written


def augment_preview(image, out_png, augment=None, *, n=16, seed=0, size=224) -> AugmentPreview:
    """A PNG grid of ``n`` cells: ``image`` as the model sees it, then augmented versions
    (``augment``: :class:`featx.options.AugmentOptions`, a dict of its fields, or None for
    the defaults)."""
    from featx.data import read_image

    read_image(image)  # a file that is no image is refused before Keras loads
    from featx.data.augment import augment_preview as draw  # imports Keras

    return AugmentPreview(str(draw(image, out_png, augment, n=n, seed=seed, size=size)))


DIGITS_FOLDER = "examples/digits"  # where the demo writes its data when given none


@dataclasses.dataclass
class Demo(Result):
    """The main job end to end: which folder, its extraction and its comparison."""

    data: str
    wrote_digits: bool  # the folder is scikit-learn's digits, written for the demo
    features: object  # Features
    compared: CompareSummary
    _internal = ("features", "compared")


def demo(data=None, *, report_dir="reports", cache_dir="cache",
         backbone="efficientnet_lite0") -> Demo:
    """Extract, then compare every classifier. Without ``data``, scikit-learn's bundled
    digits (1797 images, 10 classes) are written as PNG class folders under examples/digits
    first."""
    wrote = data is None
    if wrote:
        data = write_digits(DIGITS_FOLDER)
    features = extract(data, backbone=backbone, cache_dir=cache_dir)
    compared = compare(data, ("all",), backbones=(backbone,), report_dir=report_dir,
                       cache_dir=cache_dir, progress=False)
    return Demo(str(data), wrote, features, compared)
