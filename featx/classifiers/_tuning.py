"""Choosing hyperparameters by cross-validation on training rows only: an exhaustive grid,
a race that drops clearly worse candidates, and tree depth by truncation; and
cross-validated probability calibration."""

from __future__ import annotations

import warnings

import numpy as np

from featx.errors import DataError, UsageError

CALIBRATION_METHODS = ("sigmoid", "isotonic")
RACE_Z = 2.58  # a candidate leaves the race this many standard errors behind the leader
LARGE_TRAIN_ROWS = 2000
LARGE_CV = 2


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


def _folds(y, n_splits, seed, groups=None):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None:
        return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    # keep every augmented view in its image's fold, or CV scores leak
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)


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


TUNERS = {"grid": grid_tune, "race": race_tune, "depth": depth_tune}


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


def calibrated(pipeline, method, folds, X, y, groups=None):
    """``pipeline`` wrapped in scikit-learn's cross-validated calibration and fitted:
    each fold fits a copy on its training part and a ``method`` ("sigmoid" or "isotonic")
    map of its scores on the held-out part; predictions average the folds' calibrated
    probabilities."""
    from sklearn.calibration import CalibratedClassifierCV

    _check_calibration(method)
    splits = list(folds.split(X, y, groups))
    return CalibratedClassifierCV(pipeline, method=method, cv=splits).fit(X, y)
