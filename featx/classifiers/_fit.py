"""Fitting one classifier on training rows, tuned by cross-validation on those rows."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featx.errors import DataError, UsageError
from featx.options import usable_cores

from ._evaluate import _blas_limit
from ._registry import _effective_class_weight, _spec
from ._tuning import (TUNERS, _calibration_splits, _check_calibration, _folds, _n_splits,
                      _run_quietly, _tuner, calibrated)

log = logging.getLogger(__name__)

TUNINGS = ("fast", "exhaustive")
LIMITED_CV_WARNING = ("a class has fewer than 2 training rows; fitting {name} with default "
                      "parameters, no tuning")


@dataclass
class FitResult:
    """A fitted classifier and how it was obtained.

    Attributes
    ----------
    estimator : Pipeline
        Refitted on all training rows with ``best_params``.
    best_params : dict
        Values of the grid parameters used for ``estimator`` (pipeline parameter names);
        the defaults when not tuned.
    cv_score : float or None
        Mean CV accuracy of ``best_params``; None when not tuned.
    fit_seconds : float
        Wall time of the whole fit, cross-validation included.
    tuned : bool
        Whether a grid search ran.
    cv_splits : int
        Number of CV folds (0 when not tuned).
    class_weight : str or None
        The class weighting actually applied (None where unsupported).
    n_train : int
        Number of training rows.
    """

    estimator: Any
    best_params: dict
    cv_score: float | None
    fit_seconds: float
    tuned: bool = False
    cv_splits: int = 0
    class_weight: str | None = None
    n_train: int = 0
    calibration: str | None = None
    converged: bool = field(default=True, repr=False)


def _check_training_data(X, y):
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise DataError(f"training features must be 2-D (rows, dim), got shape {X.shape}")
    if len(X) != len(y):
        raise DataError(f"{len(X)} training rows but {len(y)} labels")
    if len(y) == 0:
        raise DataError("the train split is empty: there is nothing to fit")
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(
            f"the train split has only one class (label {classes[0]!r}, {len(y)} rows); "
            "a classifier needs at least two")
    return X, y


def _current_params(estimator, grid):
    params = estimator.get_params()
    return {key: params[key] for key in grid}


def fit_classifier(name: str, X_train, y_train, *, tune: bool = True,
                   class_weight: str | None = None, seed: int = 0, cv: int = 5,
                   n_jobs: int | None = None, scoring: str = "accuracy",
                   blas_threads: int | None = 1, groups=None,
                   calibrate: str | None = None, tuning: str = "fast") -> FitResult:
    """Fit one classifier on training rows, tuning its grid by stratified CV on those rows.

    Parameters
    ----------
    name : str
        One of :func:`classifier_names`.
    X_train : ndarray of shape (n_train, dim)
        Training rows only; validation and test rows must never be passed here.
    y_train : ndarray of shape (n_train,)
        Integer labels.
    tune : bool
        Tune the grid by ``StratifiedKFold(min(cv, smallest class count), shuffle, seed)``
        (at most 2 folds from 2000 training rows); falls back to the defaults, with a
        logged warning, when a class has < 2 rows. Trees tune their depth with
        :func:`depth_tune`; the others with :func:`grid_tune`, or from 2000 training rows
        with :func:`race_tune` (clearly worse candidates stop after the first fold).
    class_weight : {None, "balanced"}
    seed : int
        Seeds the estimator and the CV shuffling; the same seed gives the same model.
    cv : int
        Upper bound on the number of folds.
    n_jobs : int or None
        Processes for the CV fits; None: every usable core.
    scoring : str
        GridSearchCV scoring.
    groups : array-like of shape (n_train,), optional
        Rows that must stay in the same CV fold (augmented views of one image share its
        content hash); folds then come from ``StratifiedGroupKFold``.
    blas_threads : int or None
        BLAS threads during the fit. The solvers here make many small matrix-vector
        products, for which one thread is fastest; with two threads on two shared cores an
        OvR logistic fit ran 4x slower. None leaves the BLAS library's setting alone.
    calibrate : {None, "sigmoid", "isotonic"}
        Wrap the tuned pipeline in cross-validated calibration (:func:`calibrated`), so
        that every classifier, the SVM included, gives probabilities.
    tuning : {"fast", "exhaustive"}
        "exhaustive": every grid candidate on ``min(cv, smallest class)`` folds, whatever
        the size (featx 0.1's search, for comparison).

    Returns
    -------
    FitResult

    Raises
    ------
    UsageError
        Unknown classifier name.
    DataError
        Empty train split or only one class in it.
    """
    spec = _spec(name)
    X, y = _check_training_data(X_train, y_train)
    weight = _effective_class_weight(name, spec, class_weight)
    n_jobs = n_jobs or usable_cores()
    pipeline = spec.factory(weight, seed)
    if tuning not in TUNINGS:
        raise UsageError(f"tuning must be one of {', '.join(TUNINGS)}, not {tuning!r}")
    if calibrate is not None:
        _check_calibration(calibrate)
    exhaustive = tuning == "exhaustive"
    n_splits = (_n_splits(y, cv, large=not exhaustive) if tune else 0)
    if tune and n_splits < 2:
        log.warning(LIMITED_CV_WARNING.format(name=name))
        tune, n_splits = False, 0

    started = time.perf_counter()
    with _blas_limit(blas_threads):
        if tune:
            folds = _folds(y, n_splits, seed, groups)
            (best_params, cv_score, in_workers), here = _run_quietly(
                lambda: TUNERS[_tuner(spec, exhaustive, len(y))](
                    spec, pipeline, X, y, folds, n_jobs, scoring, groups))
            pipeline.set_params(**best_params)
            tuning_not_converged = in_workers + here
        else:
            best_params, cv_score = _current_params(pipeline, spec.grid), None
            tuning_not_converged = 0
        if calibrate:
            n_calibration = _calibration_splits(y, n_splits or cv, large=not exhaustive)
            calibration_folds = _folds(y, n_calibration, seed, groups)
            estimator, fit_not_converged = _run_quietly(
                lambda: calibrated(pipeline, calibrate, calibration_folds, X, y, groups))
        else:
            estimator, fit_not_converged = _run_quietly(lambda: pipeline.fit(X, y))
    not_converged = tuning_not_converged + fit_not_converged
    fit_seconds = time.perf_counter() - started

    if not_converged:
        log.warning("%s: %d fit(s) stopped at max_iter before converging "
                    "(usually harmless on separable embeddings)", name, not_converged)
    return FitResult(estimator=estimator, best_params=best_params, cv_score=cv_score,
                     fit_seconds=fit_seconds, tuned=tune, cv_splits=n_splits,
                     class_weight=weight, n_train=len(y), calibration=calibrate,
                     converged=not not_converged)
