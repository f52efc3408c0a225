"""High-level API over the cache: fit, predict and compare. The CLI wraps these functions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from featx.errors import DataError, UsageError

log = logging.getLogger(__name__)

EXTRACT_OPTIONS = ("weights", "layer", "pooling", "input_size", "batch_size", "cache_dir",
                   "val_fraction", "test_fraction", "seed", "train_per_class",
                   "mixed_precision", "workers", "runtime", "precision", "reduced_decode",
                   "progress")


def _extract(data_dir, backbone, options):
    from featx.extraction import extract

    return extract(data_dir, backbone=backbone,
                   **{k: v for k, v in options.items() if k in EXTRACT_OPTIONS})


def _metrics(scores: dict) -> dict:
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "n", "predict_ms_per_image")
    return {k: scores[k] for k in keep if k in scores}


def fit(data_dir, clf="svm", *, backbone="efficientnet_lite0", tune=True, class_weight=None,
        out="models", name=None, use_augmented=False, cv=5, **options) -> dict:
    """Extract (or reuse) embeddings, fit ``clf`` on the train split, evaluate, save.

    Returns a dict with ``model`` (path), ``clf``, ``val_accuracy``, ``val_macro_f1``,
    ``fit_seconds``, ``best_params`` and, when a test split exists, ``test_*``.
    """
    from featx.classifiers import evaluate, fit_classifier, make_classifier
    from featx.persist import save_model

    make_classifier(clf)  # unknown names fail before any extraction
    features = _extract(data_dir, backbone, options)
    if use_augmented and not (features.view > 0).any():
        raise DataError(f"{features.cache_path}: no augmented views cached; "
                        "run `featx extract --augment K` first")
    X_train, y_train = features.arrays("train", views=use_augmented)
    present = sorted(set(y_train.tolist()))
    if len(present) < 2:
        found = ", ".join(repr(features.class_names[i]) for i in present) or "none"
        raise DataError(f"{data_dir}: the train split has only one class ({found}); "
                        "a classifier needs at least two")
    groups = features.sha256[features.indices("train", views=True)] if use_augmented else None
    result = fit_classifier(clf, X_train, y_train, tune=tune, class_weight=class_weight,
                            seed=options.get("seed", 42), cv=cv, groups=groups)
    metrics, predictions = {}, {}
    for split in ("val", "test"):
        if features.has_split(split):
            X, y = features.arrays(split)
            metrics[split] = _metrics(evaluate(result.estimator, X, y, features.class_names))
            idx = features.indices(split)
            predictions[split] = dict(zip(features.paths[idx].tolist(),
                                          result.estimator.predict(X).tolist()))
    name = name or f"{clf}-{features.backbone}-{features.root.name}"
    metadata = {
        "kind": "featx-classifier",
        "clf": clf,
        "classes": list(features.class_names),
        "backbone": features.backbone,
        "weights": features.weights,
        "weights_id": features.weights_id,
        "backbone_options": {"layer": features.key.get("layer"), "pooling": features.key.get("pooling"),
                             "input_size": features.preprocessing.get("input_size"),
                             "seed": options.get("seed", 42),
                             "weights_arg": str(options.get("weights", "imagenet"))},
        "cache_key": features.key,
        "cache": str(features.cache_path),
        "preprocessing": features.preprocessing,
        "data_root": str(features.root),
        "split_params": features.split_params,
        "n_train": int(len(y_train)),
        "trained_on_augmented_views": bool(use_augmented),
        "metrics": metrics,
        "best_params": result.best_params,
        "tuned": result.tuned,
        "class_weight": result.class_weight,
        "fit_seconds": result.fit_seconds,
        "val_predictions": {p: features.class_names[i]
                            for p, i in predictions.get("val", {}).items()},
    }
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
        "extract_reused": features.stats.reused,
        "runtime": features.provenance(),
        "precision": features.precision,
        "cache": str(features.cache_path),
    }
    if "test" in metrics:
        outcome["test_accuracy"] = metrics["test"]["accuracy"]
        outcome["test_macro_f1"] = metrics["test"]["macro_f1"]
    return outcome


# ----- predict ---------------------------------------------------------------------
def expand_paths(paths) -> list[Path]:
    """Files as given, folders searched recursively for image files (hidden ones skipped)."""
    from featx.data import IMAGE_EXTENSIONS

    out = []
    for item in map(Path, paths):
        if item.is_dir():
            out.extend(sorted(
                p for p in item.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(item).parts)))
        elif item.is_file():
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not out:
        raise DataError("no image files among the given paths")
    return out


def _sha256(path) -> str:
    from featx.data import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return ""


def _cached_embeddings(metadata, hashes):
    """Rows of the model's own cache whose content hash matches (train/predict parity)."""
    from featx.errors import CacheError
    from featx.extraction import Features

    cache = Path(metadata.get("cache", ""))
    if not cache.is_file():
        return {}
    try:
        features = Features.open(cache)
    except CacheError:
        return {}
    if features.key != metadata.get("cache_key"):
        return {}
    rows = features.lookup(hashes)
    if not rows:
        return {}
    from featx.cache import FeatureCache

    shas = list(rows)
    with FeatureCache.open(cache) as c:
        X = c.embeddings([rows[s] for s in shas])
    return dict(zip(shas, X))


def _backbone_for(metadata):
    from featx.backbones import create_backbone

    opts = metadata["backbone_options"]
    weights = metadata["weights"] if metadata["weights"] != "file" else opts["weights_arg"]
    net = create_backbone(metadata["backbone"], weights, layer=opts.get("layer") or None,
                          pooling=opts.get("pooling"), input_size=opts.get("input_size"),
                          seed=opts.get("seed", 0),
                          reduced_decode=bool(metadata["cache_key"].get("preprocessing", {})
                                              .get("reduced_decode")))
    if net.weights_id != metadata["weights_id"]:
        raise DataError(f"the model was trained on {metadata['weights_id']} features but "
                        f"{net.weights_id} is what is available here")
    from featx.extraction import RUN_KEY_FIELDS

    recorded = {k: v for k, v in metadata["cache_key"].items() if k not in RUN_KEY_FIELDS}
    if json.loads(json.dumps(net.key())) != recorded:
        raise DataError("the model's cache key does not match this featx's backbone "
                        f"({metadata['backbone']}): its features cannot be reproduced here")
    return net


def embed_files(net, files, batch_size=32, *, mapper=None):
    """Embeddings of image files (not cached). Returns (X, errors) with '' for success."""
    from featx.pipeline import ArrayWriter, ImageReader, run_pipeline
    from featx.runtimes import KerasMapper

    reader = ImageReader([Path(f).resolve() for f in files], net.preprocessing, batch_size)
    writer = ArrayWriter(len(files), net.dim)
    run_pipeline(reader, mapper or KerasMapper(net, batch_size), writer, progress=False)
    return writer.embeddings, writer.errors


def _mapper_for(metadata, net, runtime, batch_size):
    """The runtime that reproduces the model's training features (int8 only by its model)."""
    from featx.extraction import _open_mapper, detect_device
    from featx.onnx_export import store_for, stored_int8
    from featx.runtimes import choose_runtime

    key = metadata["cache_key"]
    precision = key.get("precision", "fp32")
    choose_runtime(runtime, precision)
    cache_dir = Path(metadata["cache"]).parent.parent  # <cache_dir>/<dataset>/<file>.h5
    int8_model = None
    if precision == "int8":
        int8_model = stored_int8(net, store_for(cache_dir), key.get("calibration", ""),
                                 key.get("int8_model_sha256"))
        if int8_model is None:
            sha = str(key.get("int8_model_sha256"))[:12]
            raise DataError(f"the model's int8 feature model ({sha}) is not in "
                            f"{store_for(cache_dir)}; run `featx extract --precision int8` "
                            "on its data again")
    return _open_mapper(net, runtime, precision, detect_device(runtime), cache_dir,
                        batch_size, int8_model)


def predict(model_path, paths, *, top_k=3, batch_size=32, runtime="auto") -> list[dict]:
    """Label image files with a model saved by ``fit`` (or ``finetune``).

    Known files (same content as a row of the model's cache) reuse their cached embedding;
    others are embedded with the backbone and preprocessing recorded in the model metadata.
    """
    model_path = Path(model_path)
    if model_path.suffix == ".keras":
        return _predict_keras(model_path, expand_paths(paths), top_k, batch_size)
    from featx.persist import load_model

    estimator, metadata = load_model(model_path)
    files = expand_paths(paths)
    hashes = [_sha256(f) for f in files]
    cached = _cached_embeddings(metadata, hashes)
    todo = [i for i, h in enumerate(hashes) if h not in cached]
    X = np.zeros((len(files), estimator.n_features_in_), np.float32)
    errors = [""] * len(files)
    sources = ["cache"] * len(files)
    if todo:
        from featx.runtimes import describe

        net = _backbone_for(metadata)
        mapper = _mapper_for(metadata, net, runtime, batch_size)
        X[todo], new_errors = embed_files(net, [files[i] for i in todo], batch_size,
                                          mapper=mapper)
        embedded_by = describe(mapper)
        for i, error in zip(todo, new_errors):
            errors[i] = error
            sources[i] = embedded_by
    for i, h in enumerate(hashes):
        if h in cached:
            X[i] = cached[h]
    rows = _label_rows(estimator, metadata["classes"], files, X, errors, top_k)
    for row, source in zip(rows, sources):
        row["embedded_by"] = source
    return rows


def _predict_keras(model_path, files, top_k, batch_size):
    """Rows for a fine-tuned end-to-end Keras model (its own preprocessing and head)."""
    from featx.finetuning import load_finetuned, predict_images

    model, metadata = load_finetuned(model_path)
    classes = metadata["class_names"]
    probabilities = predict_images(model, metadata, files, batch_size, on_error="nan")
    rows = []
    for path, p in zip(files, probabilities):
        if np.isnan(p).any():
            rows.append({"path": str(path), "label": "", "score": None,
                         "error": "cannot decode image"})
            continue
        order = np.argsort(-p)[:top_k]
        rows.append({"path": str(path), "label": classes[int(order[0])],
                     "score": float(p[order[0]]),
                     "top": [{"label": classes[int(j)], "score": float(p[j])} for j in order],
                     "error": ""})
    return rows


def class_scores(estimator, X) -> np.ndarray:
    """Per-class scores: probabilities when the model has them, else decision values."""
    if hasattr(estimator, "predict_proba"):
        try:
            return estimator.predict_proba(X)
        except AttributeError:
            pass
    scores = estimator.decision_function(X)
    if scores.ndim == 1:  # binary: score of the positive class
        scores = np.stack([-scores, scores], axis=1)
    return scores


def _label_rows(estimator, classes, files, X, errors, top_k):
    ok = np.array([not e for e in errors])
    rows = []
    labels = estimator.predict(X[ok]) if ok.any() else []
    scores = class_scores(estimator, X[ok]) if ok.any() else []
    k = 0
    for i, path in enumerate(files):
        if not ok[i]:
            rows.append({"path": str(path), "label": "", "score": None, "error": errors[i]})
            continue
        order = np.argsort(-scores[k])[:top_k]
        label = classes[int(labels[k])]
        rows.append({"path": str(path), "label": label,
                     "score": float(scores[k][list(estimator.classes_).index(labels[k])]),
                     "top": [{"label": classes[int(estimator.classes_[j])],
                              "score": float(scores[k][j])} for j in order],
                     "error": ""})
        k += 1
    return rows


# ----- compare ---------------------------------------------------------------------
def compare(data_dir, clfs=("all",), *, backbones=("efficientnet_lite0",), report_dir="reports",
            tune=True, class_weight=None, eval_split="val", cv=5, finetune=None,
            augmented="no", **options) -> dict:
    """Fit every classifier on the same cached features of every backbone; write a report.

    ``augmented``: "no" (original images only), "yes" (train on augmented views too, when
    the cache holds them) or "both" (one row each). ``finetune``: None, or a dict of
    :func:`featx.finetuning.finetune` options to add a fine-tuning row.
    """
    from featx.classifiers import classifier_names, compare as compare_features
    from featx.reports import write_compare_report

    names = classifier_names() if "all" in clfs else list(clfs)
    for name in names:
        if name not in classifier_names():
            raise UsageError(f"unknown classifier {name!r}; valid: {', '.join(classifier_names())}")
    results, features_list = [], []
    for backbone in backbones:
        features = _extract(data_dir, backbone, options)
        features_list.append(features)
        if not features.has_split(eval_split):
            raise DataError(f"{data_dir}: the {eval_split} split is empty")
        variants = {"no": [False], "yes": [True], "both": [False, True]}[augmented]
        if augmented != "no" and not (features.view > 0).any():
            raise DataError(f"{features.cache_path}: no augmented views cached; "
                            "run `featx extract --augment K` first")
        for use_views in variants:
            view = _AugmentedView(features) if use_views else features
            rows = compare_features([view], names, tune=tune, class_weight=class_weight,
                                    seed=options.get("seed", 42), eval_split=eval_split, cv=cv)
            for row in rows:
                row.pop("estimator", None)
                row["augmented_views"] = bool(use_views)
                if use_views:
                    row["clf"] += "+aug"
            results.extend(rows)
    notes = []
    if finetune is not None:
        notes.extend(_add_finetune_row(data_dir, results, backbones[0], options, finetune,
                                       eval_split))
    from featx.reports import dataset_summary

    dataset = dataset_summary(features_list[0])
    report = write_compare_report(results, dataset, report_dir, notes=notes)
    return {"report": str(Path(report_dir) / "report.md"), "results": results,
            "report_files": report, "dataset": dataset}


class _AugmentedView:
    """A Features stand-in whose train split includes the cached augmented views."""

    def __init__(self, features):
        self._features = features

    def __getattr__(self, name):
        return getattr(self._features, name)

    def arrays(self, split, views=False):
        return self._features.arrays(split, views=(split == "train"))

    def train_groups(self):
        """Content hash per training row, so CV keeps an image and its views together."""
        return self._features.sha256[self._features.indices("train", views=True)]


def _add_finetune_row(data_dir, results, backbone, options, finetune_options,
                      eval_split) -> list[str]:
    from featx.finetuning import finetune, finetune_row

    keep = ("weights", "input_size", "val_fraction", "test_fraction", "seed",
            "train_per_class", "cache_dir", "progress")
    outcome = finetune(data_dir, backbone=backbone,
                       **{k: v for k, v in options.items() if k in keep}, **finetune_options)
    row = finetune_row(outcome, backbone, options.get("weights", "imagenet"), split=eval_split)
    row["augmented_views"] = False
    results.append(row)
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
