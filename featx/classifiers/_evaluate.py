"""Scoring a fitted classifier: the metrics every report and model file shares, class scores
and probabilities."""

from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np

from featx.errors import DataError

from ._uncertainty import proportion_interval


def _blas_limit(threads):
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def evaluate(estimator, X, y, class_names, *, blas_threads: int | None = 1) -> dict:
    """Score a fitted classifier on one split.

    Parameters
    ----------
    estimator : fitted classifier
    X : ndarray of shape (n, dim)
    y : ndarray of shape (n,)
        Integer labels indexing ``class_names``.
    class_names : sequence of str
    blas_threads : int or None
        BLAS threads while predicting (timed), as in :func:`fit_classifier`.

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (over the classes present in
        ``y`` or predicted), ``per_class`` (one dict per class name, in order: ``class``,
        ``precision``, ``recall``, ``f1``, ``support``, ``recall_interval``),
        ``confusion_matrix`` (list of lists, rows = true class, columns = predicted, every
        class in order), ``predict_seconds``, ``predict_ms_per_image``.
    """
    X, y = np.asarray(X), np.asarray(y)
    if len(y) == 0:
        raise DataError("no rows to evaluate on: the evaluation split is empty")
    with _blas_limit(blas_threads):
        started = time.perf_counter()
        pred = estimator.predict(X)
        predict_seconds = time.perf_counter() - started
    return _timed_metrics(y, pred, class_names, predict_seconds)


def _timed_metrics(y, pred, class_names, predict_seconds) -> dict:
    return {**classification_metrics(y, pred, class_names),
            "predict_seconds": predict_seconds,
            "predict_ms_per_image": 1000.0 * predict_seconds / len(y)}


def classification_metrics(y_true, y_pred, class_names) -> dict:
    """Scores of predicted labels: :func:`evaluate`'s numbers without the timing.

    Parameters
    ----------
    y_true, y_pred : array-like of int
        Labels indexing ``class_names``.
    class_names : sequence of str

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (over the classes present
        in ``y_true`` or predicted), ``per_class`` (one dict per class name, in order:
        ``class``, ``precision``, ``recall``, ``f1``, ``support``, ``recall_interval``: the
        exact 95% interval of the recall, None without support), ``confusion_matrix``
        (list of lists, rows = true class, columns = predicted, every class in order).
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 f1_score, precision_recall_fscore_support)

    labels = np.arange(len(class_names))
    with warnings.catch_warnings():
        # classes missing from a small split make balanced accuracy warn; the number is still right
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y_true, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    per_class = [
        {"class": str(c), "precision": float(p), "recall": float(r), "f1": float(f),
         "support": int(s),
         "recall_interval": proportion_interval(int(k), int(s)) if s else None}
        for c, p, r, f, s, k in zip(class_names, precision, recall, f1, support,
                                    np.diag(matrix))]
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def predict_probabilities(estimator, X):
    """Class probabilities, or None for a model that only has decision values (svm)."""
    if not hasattr(estimator, "predict_proba"):
        return None
    try:
        return estimator.predict_proba(X)
    except AttributeError:
        return None


def class_scores(estimator, X) -> np.ndarray:
    """Per-class scores: probabilities when the model has them, else decision values."""
    probabilities = predict_probabilities(estimator, X)
    if probabilities is not None:
        return probabilities
    scores = estimator.decision_function(X)
    if scores.ndim == 1:  # binary: score of the positive class
        scores = np.stack([-scores, scores], axis=1)
    return scores


SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "n", "predict_ms_per_image")


def summary_metrics(scores: dict) -> dict:
    """The headline numbers of :func:`evaluate` (what a saved model's metadata keeps)."""
    return {k: scores[k] for k in SUMMARY_METRICS if k in scores}
