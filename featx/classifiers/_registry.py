"""The classifiers featx offers: a registry of scikit-learn pipelines and their grids.

Every classifier is a scikit-learn :class:`~sklearn.pipeline.Pipeline` whose preprocessing
(scaling or L2 normalisation) is a pipeline step, so it is fitted on training rows only,
and inside cross-validation on each fold's training part only. The last step of every
pipeline is named ``"clf"``; grid keys are pipeline parameter names (``"clf__C"``), so
``make_classifier(name).set_params(**result.best_params)`` reproduces a fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from featx.errors import UsageError

log = logging.getLogger(__name__)


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
