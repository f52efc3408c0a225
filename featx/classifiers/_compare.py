"""Every classifier on the same cached rows, side by side on the cores: compare rows
(:class:`~._rows.CompareRow`), paired tests against the best, and repeated evaluation on
re-drawn splits."""

from __future__ import annotations

import logging
import time

import numpy as np

from featx.base import FeaturesLike
from featx.errors import DataError
from featx.options import usable_cores

from . import _uncertainty as uncertainty
from ._evaluate import _blas_limit, _timed_metrics, classification_metrics, predict_probabilities
from ._fit import fit_classifier
from ._registry import check_names
from ._rows import CompareRow, ranking_key, uncertainty_summary

log = logging.getLogger(__name__)


def compare(features_list: list[FeaturesLike], clfs, *, tune: bool = True,
            class_weight: str | None = None, seed: int = 0, eval_split: str = "val",
            cv: int = 5, n_jobs: int | None = None, views: bool = False,
            calibrate: str | None = None, tuning: str = "fast") -> list[CompareRow]:
    """Fit every classifier on every feature set's train rows and score it on ``eval_split``.

    Parameters
    ----------
    features_list : iterable of :class:`featx.base.FeaturesLike`
        Also read when present: ``sha256`` (with ``views``), ``weights_id``,
        ``stats.seconds`` and the provenance fields of :class:`featx.cache.Features`.
    clfs : iterable of str
        Classifier names (validated before anything is fitted).
    tune, class_weight, seed, cv, calibrate, tuning
        As in :func:`fit_classifier`.
    eval_split : str
        "val" or "test"; the caller decides which (use "test" only for the final numbers).
    n_jobs : int or None
        Processes (None: every usable core), shared between classifiers fitted side by side.
    views : bool
        Train on the cached augmented views too, with cross-validation grouped by content
        hash so an image and its views stay in one fold.

    Returns
    -------
    list of :class:`CompareRow`
        One row per (features, classifier), in input order. Each also carries the fitted
        pipeline (``estimator``) and its evaluation rows (``eval_rows``), which report.json
        leaves out.
    """
    clfs = check_names(clfs)
    results = []
    for features in features_list:
        train = features.indices("train", views)
        evaluation = features.indices(eval_split)
        if len(evaluation) == 0:
            raise DataError(f"the {eval_split} split of {features.backbone} features is empty; "
                            "nothing to evaluate on")
        results += compare_rows(features, clfs, train, evaluation, split=eval_split,
                                groups=features.sha256[train] if views else None,
                                tune=tune, class_weight=class_weight, seed=seed, cv=cv,
                                n_jobs=n_jobs, calibrate=calibrate, tuning=tuning)
    return results


# Slowest first, so that classifiers fitted side by side finish together (1280-d features).
COST_ORDER = ("tree", "svm", "logistic", "softmax", "knn")


def compare_rows(features, clfs, train, evaluation, *, split="val", groups=None,
                 tune=True, class_weight=None, seed=0, cv=5, n_jobs=None, calibrate=None,
                 tuning="fast", summarise=True) -> list[CompareRow]:
    """:func:`compare` on explicit row indices of one feature set (``train`` to fit,
    ``evaluation`` to score): the classifiers are fitted side by side on the usable cores."""
    X_train, y_train = features.take(train)
    X_eval, y_eval = features.take(evaluation)
    n_jobs = n_jobs or usable_cores()
    side_by_side = max(1, min(n_jobs, len(clfs)))
    fit_options = dict(tune=tune, class_weight=class_weight, seed=seed, cv=cv,
                       n_jobs=max(1, n_jobs // side_by_side), groups=groups,
                       calibrate=calibrate, tuning=tuning)
    order = sorted(clfs, key=lambda n: COST_ORDER.index(n) if n in COST_ORDER else -1)
    from joblib import Parallel, delayed

    outcomes = dict(zip(order, Parallel(n_jobs=side_by_side)(
        delayed(fit_and_score)(name, X_train, y_train, X_eval, y_eval, features.class_names,
                               fit_options) for name in order)))
    rows = []
    for name in clfs:
        fit, scores, predicted, confidence = outcomes[name]
        row = CompareRow.from_fit(name, features, fit, scores, split, seed)
        if summarise:
            row.update(uncertainty_summary(y_eval, predicted, confidence,
                                           len(features.class_names)))
        row.eval_rows = {"paths": np.asarray(features.paths)[evaluation], "y_true": y_eval,
                         "y_pred": predicted, "confidence": confidence}
        log.info("%s on %s: %s accuracy %.4f, fit %.2f s", name, features.backbone, split,
                 scores["accuracy"], fit.fit_seconds)
        rows.append(row)
    return rows


def fit_and_score(name, X_train, y_train, X_eval, y_eval, class_names, fit_options):
    """Fit one classifier and score it: ``(FitResult, scores, predicted, confidence)``,
    ``confidence`` being the top probability per row (None without probabilities)."""
    fit = fit_classifier(name, X_train, y_train, **fit_options)
    with _blas_limit(1):
        started = time.perf_counter()
        probabilities = predict_probabilities(fit.estimator, X_eval)
        if probabilities is None:
            predicted, confidence = fit.estimator.predict(X_eval), None
        else:
            predicted = fit.estimator.classes_[np.argmax(probabilities, axis=1)]
            confidence = probabilities.max(axis=1)
        seconds = time.perf_counter() - started
    return fit, _timed_metrics(y_eval, predicted, class_names, seconds), predicted, confidence


def significance(results, alpha: float = uncertainty.ALPHA) -> None:
    """Mark each row against the best one (highest accuracy, then fastest fit, as the report
    sorts): exact McNemar test on the evaluation images both were scored on,
    Holm-corrected over the comparisons at ``alpha``.

    Sets ``vs_best`` on every row that has ``eval_rows`` and shares images with the best:
    None for the best itself, else ``p_value``, ``significant``, ``best_only`` /
    ``this_only`` (images only one got right) and ``n`` (images compared).
    """
    scored = [r for r in results if r.get("eval_rows") is not None]
    if len(scored) < 2:
        return
    best = min(scored, key=ranking_key)
    best_correct = _correct_by_path(best)
    tests = []
    for row in scored:
        if row is best:
            row.vs_best = None
            continue
        mine = _correct_by_path(row)
        common = sorted(set(mine) & set(best_correct))
        if not common:  # e.g. scored on other images: nothing to pair, no claim
            row.drop("vs_best")
            continue
        test = uncertainty.mcnemar([best_correct[p] for p in common], [mine[p] for p in common])
        row.vs_best = {"p_value": test["p_value"], "best_only": test["a_only"],
                       "this_only": test["b_only"], "n": len(common)}
        tests.append(row.vs_best)
    for test, significant in zip(tests, uncertainty.holm([t["p_value"] for t in tests], alpha)):
        test["significant"] = significant


def compare_repeated(features, clfs, plan, *, tune=True, class_weight=None, cv=5,
                     n_jobs=None, calibrate=None, tuning="fast") -> list[dict]:
    """Every classifier on every repeat of ``plan`` (:func:`featx.classifiers.plan_repeats`),
    tuned inside each repeat's training rows; one summary dict per classifier.

    Each dict has ``clf``, ``backbone``, ``weights``, ``protocol``, ``description``,
    ``repeats``, ``per_repeat`` (one dict of metrics per repeat, ``seed`` included),
    ``mean``, ``std`` (sample standard deviation over repeats), ``min``, ``max`` and
    ``interval`` (95% interval of the mean, each evaluated image counted once,
    :func:`featx.classifiers.repeated_interval`): dicts over accuracy, balanced accuracy
    and macro-F1; ``interval_methods``.
    """
    clfs = check_names(clfs)
    n_classes = len(features.class_names)
    outcomes = {name: [] for name in clfs}  # per repeat: (rows, y_true, y_pred)
    for repeat in plan.repeats:
        pooled = {name: ([], [], []) for name in clfs}
        for train, evaluation in repeat.folds:
            for row in compare_rows(features, clfs, train, evaluation, tune=tune,
                                    class_weight=class_weight, seed=repeat.seed, cv=cv,
                                    n_jobs=n_jobs, calibrate=calibrate, tuning=tuning,
                                    summarise=False):
                pooled[row["clf"]][0].append(evaluation)
                pooled[row["clf"]][1].append(row["eval_rows"]["y_true"])
                pooled[row["clf"]][2].append(row["eval_rows"]["y_pred"])
        for name in clfs:
            outcomes[name].append(tuple(np.concatenate(part) for part in pooled[name]))
    summaries = []
    for name in clfs:
        per_repeat = []
        for repeat, (_, y_true, y_pred) in zip(plan.repeats, outcomes[name]):
            scores = classification_metrics(y_true, y_pred, features.class_names)
            per_repeat.append({"seed": repeat.seed, "n": int(len(y_true)),
                               **{m: scores[m] for m in uncertainty.METRICS}})
        values = {m: np.array([r[m] for r in per_repeat]) for m in uncertainty.METRICS}
        summaries.append({
            "clf": name, "backbone": features.backbone, "weights": features.weights,
            "precision": getattr(features, "precision", "fp32"),
            "int8_agreement": getattr(features, "int8_agreement", None),
            "flip_average": bool(getattr(features, "flip_average", False)),
            "protocol": plan.protocol, "description": plan.description,
            "repeats": len(plan.repeats), "per_repeat": per_repeat,
            "mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
            "min": {m: float(v.min()) for m, v in values.items()},
            "max": {m: float(v.max()) for m, v in values.items()},
            "interval": uncertainty.repeated_interval(outcomes[name], n_classes),
            "interval_methods": dict(uncertainty.INTERVAL_METHODS)})
    return summaries


def _correct_by_path(row) -> dict:
    rows = row["eval_rows"]
    return dict(zip(rows["paths"].tolist(),
                    (np.asarray(rows["y_true"]) == np.asarray(rows["y_pred"])).tolist()))
