"""Classical classifiers on cached embeddings: registry, tuning by CV on train rows, evaluation.

Every classifier is a scikit-learn :class:`~sklearn.pipeline.Pipeline` whose preprocessing
(scaling or L2 normalisation) is a pipeline step, so it is fitted on training rows only, and
inside cross-validation on each fold's training part only. Nothing here ever sees validation
or test rows unless the caller passes them to :func:`evaluate`.

The last step of every pipeline is named ``"clf"``; grid keys are pipeline parameter names
(``"clf__C"``), so ``make_classifier(name).set_params(**result.best_params)`` reproduces a fit.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from featx import uncertainty
from featx.errors import DataError, UsageError
from featx.options import usable_cores

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("sigmoid", "isotonic")
TUNINGS = ("fast", "exhaustive")
RACE_Z = 2.58  # a candidate leaves the race this many standard errors behind the leader
LARGE_TRAIN_ROWS = 2000
LARGE_CV = 2
LIMITED_CV_WARNING = ("a class has fewer than 2 training rows; fitting {name} with default "
                      "parameters, no tuning")


@dataclass(frozen=True)
class ClassifierSpec:
    """How to build one classifier.

    Attributes
    ----------
    factory : callable
        ``factory(class_weight, seed) -> Pipeline`` with default hyperparameters.
    grid : dict
        Short hyperparameter grid for :class:`~sklearn.model_selection.GridSearchCV`
        (pipeline parameter names -> candidate values).
    description : str
        One line for humans (``featx compare --help``, reports).
    supports_class_weight : bool
        Whether ``class_weight="balanced"`` changes anything.
    adapt_grid : callable or None
        ``adapt_grid(grid, n_fold_train) -> grid``: drops candidates that cannot be fitted on
        the smallest CV training fold (e.g. more neighbours than rows).
    """

    factory: Callable[[Any, int], Any]
    grid: dict
    description: str
    supports_class_weight: bool = True
    adapt_grid: Callable[[dict, int], dict] | None = None
    tuner: str = "grid"  # a key of TUNERS


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


# ----- factories ------------------------------------------------------------------------
# Scaling choices: the logistic models see standardised features (lbfgs converges quickly
# on them); the SVM sees L2-normalised rows because liblinear's dual solver stalls on
# standardised 1280-d features (||x||^2 ~ 1280) and finishes in a few passes on unit rows;
# kNN tunes its own metric (cosine is L2 normalisation in disguise); trees need no scaling.

def _softmax(class_weight, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(C=1.0, max_iter=1000, class_weight=class_weight, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _logistic(class_weight, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    binary = LogisticRegression(C=1.0, max_iter=1000, class_weight=class_weight, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("clf", OneVsRestClassifier(binary))])


def _svm(class_weight, seed):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer
    from sklearn.svm import LinearSVC

    clf = LinearSVC(C=1.0, dual=True, max_iter=2000, class_weight=class_weight, random_state=seed)
    return Pipeline([("normalize", Normalizer()), ("clf", clf)])


def _knn(class_weight, seed):
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline

    # Brute force: tree indexes do not help in 1000+ dimensions.
    clf = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute")
    return Pipeline([("clf", clf)])


def _tree(class_weight, seed):
    from sklearn.pipeline import Pipeline
    from sklearn.tree import DecisionTreeClassifier

    clf = DecisionTreeClassifier(max_depth=None, class_weight=class_weight, random_state=seed)
    return Pipeline([("clf", clf)])


def _knn_grid(grid, n_fold_train):
    ks = [k for k in grid["clf__n_neighbors"] if k <= n_fold_train] or [1]
    return {**grid, "clf__n_neighbors": ks}


CLASSIFIERS: dict[str, ClassifierSpec] = {
    "softmax": ClassifierSpec(
        _softmax, {"clf__C": [0.01, 0.1, 1.0]},
        "multinomial logistic regression (lbfgs) on standardised features"),
    "logistic": ClassifierSpec(
        _logistic, {"clf__estimator__C": [0.01, 0.1, 1.0]},
        "one-vs-rest binary logistic regressions on standardised features"),
    "svm": ClassifierSpec(
        _svm, {"clf__C": [0.1, 1.0]},
        "linear SVM (liblinear, dual, one-vs-rest) on L2-normalised features"),
    "knn": ClassifierSpec(
        _knn, {"clf__n_neighbors": [1, 5, 15], "clf__metric": ["cosine", "euclidean"]},
        "k-nearest neighbours (k and metric tuned); no class weighting",
        supports_class_weight=False, adapt_grid=_knn_grid),
    "tree": ClassifierSpec(
        _tree, {"clf__max_depth": [4, 8, 16]},
        "decision tree (depth tuned)", tuner="depth"),
}


def classifier_names() -> list[str]:
    """Registered classifier names, in registry order.

    Examples
    --------
    >>> classifier_names()
    ['softmax', 'logistic', 'svm', 'knn', 'tree']
    """
    return list(CLASSIFIERS)


def _spec(name: str) -> ClassifierSpec:
    try:
        return CLASSIFIERS[name]
    except KeyError:
        raise UsageError(f"unknown classifier {name!r}; valid names: "
                         f"{', '.join(classifier_names())}") from None


def check_names(names) -> list[str]:
    """Classifier names from a user: "all" expands, comma-separated lists split.

    Raises UsageError for an unknown name, listing the valid ones (the one check the CLI
    and the API share).
    """
    if isinstance(names, str):
        names = [names]
    out = []
    for item in names:
        for name in (part.strip() for part in str(item).split(",")):
            if name == "all":
                out.extend(classifier_names())
            elif name in CLASSIFIERS:
                out.append(name)
            else:
                raise UsageError(f"unknown classifier {name!r}; valid: "
                                 f"{', '.join(classifier_names())} (or all)")
    return list(dict.fromkeys(out))


def _effective_class_weight(name, spec, class_weight):
    if class_weight is None:
        return None
    if class_weight != "balanced":
        raise UsageError(f"class_weight must be None or 'balanced', not {class_weight!r}")
    if not spec.supports_class_weight:
        log.warning("%s does not support class_weight='balanced'; fitting it unweighted", name)
        return None
    return class_weight


def make_classifier(name: str, *, class_weight: str | None = None, seed: int = 0):
    """Build an unfitted pipeline with default hyperparameters.

    Parameters
    ----------
    name : str
        One of :func:`classifier_names`.
    class_weight : {None, "balanced"}
        Ignored, with a logged warning, for classifiers that do not support it (knn).
    seed : int
        ``random_state`` of every randomised step.

    Returns
    -------
    sklearn.pipeline.Pipeline

    Raises
    ------
    UsageError
        Unknown name (the message lists the valid ones) or bad ``class_weight``.

    Examples
    --------
    >>> [step for step, _ in make_classifier("svm").steps]
    ['normalize', 'clf']
    """
    spec = _spec(name)
    return spec.factory(_effective_class_weight(name, spec, class_weight), seed)


# ----- fitting --------------------------------------------------------------------------

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


def _n_splits(y, cv, large=True):
    """min(cv, smallest class count), and at most LARGE_CV folds from LARGE_TRAIN_ROWS rows.

    StratifiedKFold needs every class in every fold. On large training sets fewer folds
    pick the same hyperparameters (measured in benchmarks/classifiers.py) for less work.
    """
    if large and len(y) >= LARGE_TRAIN_ROWS:
        cv = min(cv, LARGE_CV)
    return int(min(cv, np.unique(y, return_counts=True)[1].min()))


def _tuner(spec, exhaustive, n_train) -> str:
    if exhaustive:
        return "grid"
    if spec.tuner == "grid" and n_train >= LARGE_TRAIN_ROWS:
        return "race"
    return spec.tuner


def _check_calibration(method):
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}"
                         f", not {method!r}")


def _calibration_splits(y, cv, large=True) -> int:
    n_splits = _n_splits(y, cv, large)
    if n_splits < 2:
        raise DataError("calibration needs at least 2 training images in every class "
                        "(it fits on some and calibrates on the others)")
    return n_splits


def _current_params(estimator, grid):
    params = estimator.get_params()
    return {key: params[key] for key in grid}


def _run_quietly(fit):
    """Run ``fit()``, turning per-fit ConvergenceWarnings into one summary log line."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        result = fit()
    not_converged = 0
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            not_converged += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result, not_converged


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


def _blas_limit(threads):
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def _folds(y, n_splits, seed, groups=None):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    # keep every augmented view in its image's fold, or CV scores leak
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def grid_tune(spec, pipeline, X, y, folds, n_jobs, scoring, groups=None):
    """Exhaustive grid search by cross-validation: ``(best_params, mean CV score, 0)``.

    Ties go to the first candidate. It runs in this process whatever ``n_jobs`` says, so
    that the caller counts its ConvergenceWarnings: it serves small data (cheap) and
    ``tuning="exhaustive"`` (featx 0.1's search, one process as it was).
    """
    from sklearn.model_selection import GridSearchCV

    search = GridSearchCV(pipeline, _grid_for(spec, y, folds), cv=folds, scoring=scoring,
                          n_jobs=1, refit=False, error_score="raise")
    search.fit(X, y, groups=groups)
    return dict(search.best_params_), float(search.best_score_), 0


def _grid_for(spec, y, folds) -> dict:
    if spec.adapt_grid is None:
        return spec.grid
    smallest_fold_train = len(y) - int(np.ceil(len(y) / folds.get_n_splits()))
    return spec.adapt_grid(spec.grid, smallest_fold_train)


def race_tune(spec, pipeline, X, y, folds, n_jobs, scoring, groups=None):
    """Grid search fold by fold, dropping candidates that are already clearly worse.

    After each fold, a candidate whose accuracy on the held-out rows seen so far is more
    than :data:`RACE_Z` standard errors of the paired per-row difference below the
    leader's stops there; the search ends when one candidate is left or the folds run
    out. Close calls therefore get every fold, clear ones one. Ties go to the first
    candidate, as in :func:`grid_tune`; other scorings than accuracy use it. Returns
    ``(best_params, its accuracy over the held-out rows it was scored on, fits that did
    not converge)``; candidates are fitted on ``n_jobs`` processes.
    """
    if scoring != "accuracy":
        return grid_tune(spec, pipeline, X, y, folds, n_jobs, scoring, groups)
    from joblib import Parallel, delayed
    from sklearn.model_selection import ParameterGrid

    candidates = list(ParameterGrid(_grid_for(spec, y, folds)))
    alive = list(range(len(candidates)))
    hits = {c: [] for c in alive}  # per candidate: per-row correctness, fold after fold
    total_not_converged = 0
    for train, test in folds.split(X, y, groups):
        outcomes = Parallel(n_jobs=min(n_jobs, len(alive)))(
            delayed(_held_out_hits)(pipeline, candidates[c], X, y, train, test) for c in alive)
        for c, (outcome, not_converged) in zip(alive, outcomes):
            hits[c].append(outcome)
            total_not_converged += not_converged
        alive = _still_racing(alive, {c: np.concatenate(hits[c]) for c in alive})
        if len(alive) == 1:
            break
    means = {c: float(np.concatenate(hits[c]).mean()) for c in alive}
    best = max(alive, key=lambda c: (means[c], -c))
    return dict(candidates[best]), means[best], total_not_converged


def _held_out_hits(pipeline, params, X, y, train, test) -> tuple[np.ndarray, int]:
    """Per-row correctness of one candidate on one fold, and its unconverged fits (counted
    here: this runs in a worker process, out of reach of the caller's warning filter)."""
    from sklearn.base import clone

    fitted, not_converged = _run_quietly(
        lambda: clone(pipeline).set_params(**params).fit(X[train], y[train]))
    return fitted.predict(X[test]) == y[test], not_converged


def _still_racing(alive, hits) -> list[int]:
    leader = max(alive, key=lambda c: (hits[c].mean(), -c))
    kept = []
    for c in alive:
        difference = hits[leader].astype(float) - hits[c]
        error = difference.std(ddof=1) / np.sqrt(len(difference))
        behind = difference.mean()
        if c == leader or behind <= 0 or (error > 0 and behind <= RACE_Z * error):
            kept.append(c)
    return kept


def depth_tune(spec, pipeline, X, y, folds, n_jobs, scoring, groups=None):
    """Tune a tree's ``max_depth``: one tree per fold, grown to the deepest candidate on a
    seeded quarter of the features (at least 64), scored at every candidate depth by
    truncation.

    A tree grown to depth 16 and cut at depth 4 makes the same first four levels of splits
    as a tree grown to depth 4 (up to ties between equally good splits), so one fit per
    fold replaces one per candidate; the feature subset makes each fit 4x cheaper. Only
    the choice of depth comes from these trees (and the CV score: that of the truncated
    trees on those features); the model is then fitted on every feature. Other scorings
    than accuracy fall back to :func:`grid_tune`.
    """
    if scoring != "accuracy":
        return grid_tune(spec, pipeline, X, y, folds, n_jobs, scoring, groups)
    from joblib import Parallel, delayed

    depths = list(spec.grid["clf__max_depth"])
    rng = np.random.default_rng(pipeline.get_params()["clf__random_state"])
    n_features = X.shape[1]
    keep = np.sort(rng.choice(n_features, size=min(n_features, max(64, n_features // 4)),
                              replace=False))
    scores = Parallel(n_jobs=n_jobs)(
        delayed(_truncated_scores)(pipeline, X[train][:, keep], y[train], X[test][:, keep],
                                   y[test], depths)
        for train, test in folds.split(X, y, groups))
    mean = np.mean(scores, axis=0)
    best = int(np.argmax(mean))  # first of ties, as GridSearchCV
    return {"clf__max_depth": depths[best]}, float(mean[best]), 0


def _truncated_scores(pipeline, X_train, y_train, X_test, y_test, depths) -> list[float]:
    from sklearn.base import clone

    deepest = None if None in depths else max(depths)
    tree = clone(pipeline).set_params(clf__max_depth=deepest).fit(X_train, y_train)[-1]
    path = tree.decision_path(X_test)  # CSR rows: node ids root to leaf, in increasing order
    lengths = np.diff(path.indptr)
    values = tree.tree_.value[:, 0, :]
    scores = []
    for depth in depths:
        cut = lengths - 1 if depth is None else np.minimum(depth, lengths - 1)
        nodes = path.indices[path.indptr[:-1] + cut]
        predicted = tree.classes_[np.argmax(values[nodes], axis=1)]
        scores.append(float(np.mean(predicted == y_test)))
    return scores


def calibrated(pipeline, method, folds, X, y, groups=None):
    """``pipeline`` wrapped in scikit-learn's cross-validated calibration and fitted:
    each fold fits a copy on its training part and a ``method`` ("sigmoid" or "isotonic")
    map of its scores on the held-out part; predictions average the folds' calibrated
    probabilities."""
    from sklearn.calibration import CalibratedClassifierCV

    _check_calibration(method)
    splits = list(folds.split(X, y, groups))
    return CalibratedClassifierCV(pipeline, method=method, cv=splits).fit(X, y)


TUNERS = {"grid": grid_tune, "race": race_tune, "depth": depth_tune}


# ----- evaluation -----------------------------------------------------------------------

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
        ``precision``, ``recall``, ``f1``, ``support``), ``confusion_matrix`` (list of lists,
        rows = true class, columns = predicted, every class in order), ``predict_seconds``,
        ``predict_ms_per_image``.
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
        ``class``, ``precision``, ``recall``, ``f1``, ``support``), ``confusion_matrix``
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
    per_class = [
        {"class": str(c), "precision": float(p), "recall": float(r), "f1": float(f),
         "support": int(s)}
        for c, p, r, f, s in zip(class_names, precision, recall, f1, support)]
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


# ----- compare --------------------------------------------------------------------------

def compare(features_list, clfs, *, tune: bool = True, class_weight: str | None = None,
            seed: int = 0, eval_split: str = "val", cv: int = 5, n_jobs: int | None = None,
            views: bool = False, calibrate: str | None = None,
            tuning: str = "fast") -> list[dict]:
    """Fit every classifier on every feature set's train rows and score it on ``eval_split``.

    Parameters
    ----------
    features_list : iterable of Features-like
        Needs ``indices(split, views)``, ``take(idx) -> (X, y)``, ``paths``, ``sha256``,
        ``class_names``, ``backbone`` and ``weights``; ``weights_id`` and ``stats.seconds``
        are used when present.
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
    list of dict
        One result dict per (features, classifier), in input order; the schema is documented
        in :func:`featx.reports.write_compare_report`. Each also carries the fitted pipeline
        under ``"estimator"`` and its evaluation rows under ``"eval_rows"`` (neither is
        written to report.json).
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
                 tuning="fast", summarise=True) -> list[dict]:
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
        row = result_dict(name, features, fit, scores, split, seed)
        if summarise:
            row.update(uncertainty_summary(y_eval, predicted, confidence,
                                           len(features.class_names), seed))
        row["eval_rows"] = {"paths": np.asarray(features.paths)[evaluation], "y_true": y_eval,
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


def predict_probabilities(estimator, X):
    """Class probabilities, or None for a model that only has decision values (svm)."""
    if not hasattr(estimator, "predict_proba"):
        return None
    try:
        return estimator.predict_proba(X)
    except AttributeError:
        return None


def uncertainty_summary(y_true, y_pred, confidence, n_classes, seed=0) -> dict:
    """The trust fields of a compare row: ``intervals`` (95% bootstrap, per metric),
    ``ece``, ``reliability`` and ``coverage`` (None without probabilities)."""
    out = {"intervals": uncertainty.bootstrap_intervals(y_true, y_pred, n_classes, seed=seed),
           "interval_resamples": uncertainty.N_RESAMPLES,
           "ece": None, "reliability": None, "coverage": None}
    if confidence is not None:
        correct = np.asarray(y_true) == np.asarray(y_pred)
        out["ece"] = uncertainty.expected_calibration_error(confidence, correct)
        out["reliability"] = uncertainty.reliability_bins(confidence, correct)
        out["coverage"] = uncertainty.coverage_curve(confidence, correct)
    return out


def ranking_key(row):
    """How compare rows are ordered (the report's order): accuracy, then the faster fit."""
    return -row["accuracy"], row["fit_seconds"]


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
            row["vs_best"] = None
            continue
        mine = _correct_by_path(row)
        common = sorted(set(mine) & set(best_correct))
        if not common:  # e.g. scored on other images: nothing to pair, no claim
            row.pop("vs_best", None)
            continue
        test = uncertainty.mcnemar([best_correct[p] for p in common], [mine[p] for p in common])
        row["vs_best"] = {"p_value": test["p_value"], "best_only": test["a_only"],
                          "this_only": test["b_only"], "n": len(common)}
        tests.append(row["vs_best"])
    for test, significant in zip(tests, uncertainty.holm([t["p_value"] for t in tests], alpha)):
        test["significant"] = significant


def compare_repeated(features, clfs, plan, *, tune=True, class_weight=None, cv=5,
                     n_jobs=None, calibrate=None, tuning="fast") -> list[dict]:
    """Every classifier on every repeat of ``plan`` (:func:`featx.resampling.plan_repeats`),
    tuned inside each repeat's training rows; one summary dict per classifier.

    Each dict has ``clf``, ``backbone``, ``weights``, ``protocol``, ``description``,
    ``repeats``, ``per_repeat`` (one dict of metrics per repeat, ``seed`` included),
    ``mean``, ``std`` (sample standard deviation over repeats), ``min``, ``max`` and
    ``interval`` (95% paired bootstrap interval of the mean over the evaluated images,
    :func:`featx.uncertainty.repeated_interval`): dicts over accuracy, balanced accuracy
    and macro-F1.
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
            "flip_average": bool(getattr(features, "flip_average", False)),
            "protocol": plan.protocol, "description": plan.description,
            "repeats": len(plan.repeats), "per_repeat": per_repeat,
            "mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
            "min": {m: float(v.min()) for m, v in values.items()},
            "max": {m: float(v.max()) for m, v in values.items()},
            "interval": uncertainty.repeated_interval(outcomes[name], n_classes,
                                                      seed=plan.repeats[0].seed)})
    return summaries


def _correct_by_path(row) -> dict:
    rows = row["eval_rows"]
    return dict(zip(rows["paths"].tolist(),
                    (np.asarray(rows["y_true"]) == np.asarray(rows["y_pred"])).tolist()))


def result_dict(name, features, fit: FitResult, scores: dict, split: str, seed: int = 0) -> dict:
    """Assemble one compare result from a fit and its evaluation (schema in featx.reports)."""
    stats = getattr(features, "stats", None)
    return {
        "clf": name,
        "backbone": features.backbone,
        "weights": features.weights,
        "weights_id": getattr(features, "weights_id", None),
        "precision": getattr(features, "precision", "fp32"),
        "runtime": features.provenance() if hasattr(features, "provenance") else None,
        "split": split,
        "n_train": fit.n_train,
        "n_eval": scores["n"],
        "accuracy": scores["accuracy"],
        "balanced_accuracy": scores["balanced_accuracy"],
        "macro_f1": scores["macro_f1"],
        "fit_seconds": fit.fit_seconds,
        "predict_seconds": scores["predict_seconds"],
        "predict_ms_per_image": scores["predict_ms_per_image"],
        # what computing the cached features cost (summed over extraction runs), so a
        # probe's full cost is known even when this run reused the cache
        "extract_seconds": getattr(features, "extraction_seconds", None)
        if getattr(features, "extraction_seconds", None) else getattr(stats, "seconds", None),
        "extract_parts": extraction_costs(features),
        "dim": getattr(features, "dim", None),
        "flip_average": bool(getattr(features, "flip_average", False)),
        "tuned": fit.tuned,
        "cv_splits": fit.cv_splits,
        "cv_score": fit.cv_score,
        "best_params": fit.best_params,
        "class_weight": fit.class_weight,
        "seed": seed,
        "class_names": [str(c) for c in features.class_names],
        "per_class": scores["per_class"],
        "confusion_matrix": scores["confusion_matrix"],
        "calibration": fit.calibration,
        "estimator": fit.estimator,
    }


def extraction_costs(features) -> list[dict]:
    """What computing each part's cached rows cost: [{"backbone", "seconds"}], one entry
    per backbone of a combination (seconds None where the cache did not record it)."""
    costs = []
    for part in getattr(features, "parts", [features]):
        seconds = getattr(part, "extraction_seconds", None) or None
        costs.append({"backbone": part.backbone,
                      "seconds": None if seconds is None else float(seconds)})
    return costs


# ----- scoring new rows -----------------------------------------------------------------

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "n", "predict_ms_per_image")


def summary_metrics(scores: dict) -> dict:
    """The headline numbers of :func:`evaluate` (what a saved model's metadata keeps)."""
    return {k: scores[k] for k in SUMMARY_METRICS if k in scores}


def class_scores(estimator, X) -> np.ndarray:
    """Per-class scores: probabilities when the model has them, else decision values."""
    probabilities = predict_probabilities(estimator, X)
    if probabilities is not None:
        return probabilities
    scores = estimator.decision_function(X)
    if scores.ndim == 1:  # binary: score of the positive class
        scores = np.stack([-scores, scores], axis=1)
    return scores
