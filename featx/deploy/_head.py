"""A fitted linear classifier folded into one dense layer: the scaler's mean and scale moved
into the weights, one-vs-rest and binary models given predict's columns."""

from __future__ import annotations

import dataclasses

import numpy as np

from featx.errors import UsageError

_LINEAR = ("softmax", "logistic", "svm")


@dataclasses.dataclass(frozen=True)
class Head:
    """A linear classifier folded into one dense layer: ``activation(W x + b)``.

    ``activation``: "softmax"; "ovr" (one-vs-rest sigmoids renormalised to sum to one,
    computed as softmax(log_sigmoid(z))); or "linear" (decision values). ``l2_normalize``:
    divide each feature row by its L2 norm first (scikit-learn's ``Normalizer``).
    """

    kernel: np.ndarray  # (dim, n_outputs)
    bias: np.ndarray  # (n_outputs,)
    activation: str
    l2_normalize: bool = False

    @property
    def output(self) -> str:
        return "decision_values" if self.activation == "linear" else "probabilities"


def linear_head(estimator, clf: str) -> Head:
    """The fitted pipeline's scaler and linear classifier as one :class:`Head`.

    Raises UsageError for a classifier that is not one linear layer (knn, tree).
    """
    if clf not in _LINEAR:
        raise UsageError(
            f"a {clf} model cannot be exported as one graph: "
            + ("it looks up its training rows at prediction time"
               if clf == "knn" else "its decision rules are not a neural-network layer")
            + f"; export a {', '.join(_LINEAR)} model, or use `featx predict`")
    if hasattr(estimator, "calibrated_classifiers_"):
        raise UsageError(f"a calibrated {clf} model cannot be exported as one graph: its "
                         "probabilities average cross-validated copies, each with its own "
                         "calibration map; export the model fitted without --calibrate, or "
                         "use `featx predict`")
    steps = dict(estimator.steps)
    final = steps["clf"]
    weights, bias = _coefficients(final)
    binary = weights.shape[0] == 1
    if clf == "svm":
        if binary:  # class_scores gives binary decision values as [-s, s]
            weights, bias = np.vstack([-weights, weights]), np.concatenate([-bias, bias])
        return Head(weights.T.astype(np.float32), bias.astype(np.float32), "linear",
                    l2_normalize="normalize" in steps)
    if binary:  # [1 - sigmoid(z), sigmoid(z)] == softmax([0, z])
        weights = np.vstack([np.zeros_like(weights), weights])
        bias = np.concatenate([[0.0], bias])
    activation = "softmax" if binary or clf == "softmax" else "ovr"
    weights, bias = _fold_scaler(steps.get("scale"), weights, bias)
    return Head(weights.T.astype(np.float32), bias.astype(np.float32), activation)


def _coefficients(final):
    """(W, b) of a linear model, or of a one-vs-rest set of them (one row per class)."""
    if hasattr(final, "estimators_"):
        for est in final.estimators_:
            if not hasattr(est, "coef_"):
                raise UsageError("this one-vs-rest model has a class that was constant in "
                                 "training; it is not one linear layer")
        weights = np.vstack([est.coef_ for est in final.estimators_])
        bias = np.concatenate([np.ravel(est.intercept_) for est in final.estimators_])
        return weights.astype(np.float64), bias.astype(np.float64)
    return np.asarray(final.coef_, np.float64), np.ravel(final.intercept_).astype(np.float64)


def _fold_scaler(scaler, weights, bias):
    """W((x - m) / s) + b == (W / s) x + (b - (W / s) m)."""
    if scaler is None:
        return weights, bias
    with_mean = getattr(scaler, "with_mean", True) and getattr(scaler, "mean_", None) is not None
    with_std = getattr(scaler, "with_std", True) and getattr(scaler, "scale_", None) is not None
    mean = scaler.mean_ if with_mean else 0.0
    scale = scaler.scale_ if with_std else 1.0
    folded = weights / scale
    return folded, bias - folded @ np.broadcast_to(mean, weights.shape[1:])
