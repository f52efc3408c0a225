"""The compare row: one classifier (or the fine-tuning run) on one feature set, scored on one
split. Its schema is :class:`CompareRow`, written once; the report reads it
(:mod:`featx.reports`) and ``compare --json`` prints a selection of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _uncertainty as uncertainty


class _Unset:
    def __repr__(self):
        return "UNSET"


UNSET = _Unset()  # a field a row does not carry: absent from the row's keys and its JSON
REQUIRED = ("clf", "backbone", "weights", "split", "accuracy", "balanced_accuracy",
            "macro_f1", "fit_seconds")
NOT_SERIALISED = ("estimator", "eval_rows")  # live objects, kept out of report.json


@dataclasses.dataclass(kw_only=True, eq=False)
class CompareRow(Mapping):
    """One row of ``featx compare``. Reads like a dict of the fields it carries
    (``row["accuracy"]``, ``"vs_best" in row``); a field left :data:`UNSET` is not one of its
    keys. :meth:`to_dict` is the row as report.json holds it.

    Required: ``clf`` ("softmax"..., "logistic+aug" for a row trained on augmented views,
    "finetune"), ``backbone``, ``weights`` ("imagenet", "random", "file"), ``split`` (where
    the numbers come from: "val" or "test"), ``accuracy``, ``balanced_accuracy``,
    ``macro_f1`` (in [0, 1]) and ``fit_seconds`` (the fit's wall time, tuning included).
    The report shows "-" for an optional field that is missing or None.
    """

    clf: str
    backbone: str
    weights: str
    weights_id: Any = UNSET
    precision: Any = UNSET  # "fp32" | "int8": of the cached features
    int8_agreement: Any = None  # int8: the model's measured agreement with fp32
    runtime: Any = UNSET  # what computed the features (Features.provenance())
    split: str
    n_train: Any = UNSET
    n_eval: Any = UNSET
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    fit_seconds: float
    predict_seconds: Any = UNSET
    predict_ms_per_image: Any = UNSET
    # what computing the cached features cost (summed over extraction runs), so a probe's
    # full cost is known even when this run reused the cache; None when not recorded
    extract_seconds: Any = UNSET
    extract_parts: Any = UNSET  # [{"backbone", "seconds"}]: the same per part of a combination
    dim: Any = UNSET
    flip_average: Any = UNSET
    tuned: Any = UNSET
    cv_splits: Any = UNSET
    cv_score: Any = UNSET
    best_params: Any = UNSET  # pipeline names ("clf__C"); fine-tuning: its recipe
    class_weight: Any = UNSET
    seed: Any = UNSET
    class_names: Any = UNSET
    per_class: Any = UNSET  # [{"class", "precision", "recall", "f1", "support"}]
    confusion_matrix: Any = UNSET  # rows true class, columns predicted
    calibration: Any = UNSET  # None, "sigmoid" or "isotonic"
    model_path: Any = UNSET  # the fine-tuning row's saved model
    estimator: Any = UNSET  # the fitted pipeline (not serialised)
    # trust (uncertainty_summary): 95% intervals per metric and the method of each,
    # calibration error and bins, coverage against a minimum score (None without
    # probabilities)
    intervals: Any = UNSET
    interval_methods: Any = UNSET
    ece: Any = UNSET
    reliability: Any = UNSET
    coverage: Any = UNSET
    eval_rows: Any = UNSET  # paths, y_true, y_pred, confidence arrays (not serialised)
    augmented_views: Any = UNSET  # trained on cached augmented views too
    # None for the best row, else the paired test against it ({"p_value", "significant",
    # "best_only", "this_only", "n"}); UNSET when not tested (no images in common)
    vs_best: Any = UNSET

    def __getitem__(self, key):
        value = getattr(self, key, UNSET) if key in _FIELDS else UNSET
        if value is UNSET:
            raise KeyError(key)
        return value

    def __iter__(self):
        return (name for name in _FIELDS if getattr(self, name) is not UNSET)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __setitem__(self, key, value):  # row["vs_best"] = ..., as on featx 0.1's dicts
        if key not in _FIELDS:
            raise KeyError(f"a compare row has no field {key!r}")
        setattr(self, key, value)

    def update(self, values: dict | None = None, **more) -> CompareRow:
        """Set fields (in place), as ``dict.update`` sets keys; returns the row."""
        for name, value in {**(values or {}), **more}.items():
            self[name] = value
        return self

    def drop(self, *names) -> CompareRow:
        """Leave ``names`` unset (in place); returns the row."""
        for name in names:
            setattr(self, name, UNSET)
        return self

    def to_dict(self) -> dict:
        """The row as report.json holds it: every field it carries but the live objects."""
        return {k: v for k, v in self.items() if k not in NOT_SERIALISED}

    @classmethod
    def from_fit(cls, name, features, fit, scores: dict, split: str, seed: int = 0):
        """A classifier's row: its fit (:class:`~featx.classifiers.FitResult`) and scores
        (:func:`~featx.classifiers.evaluate`) on a Features-like object."""
        seconds = getattr(features, "extraction_seconds", None) or \
            getattr(getattr(features, "stats", None), "seconds", None)
        return cls(
            clf=name, backbone=features.backbone, weights=features.weights,
            weights_id=getattr(features, "weights_id", None),
            precision=getattr(features, "precision", "fp32"),
            int8_agreement=getattr(features, "int8_agreement", None),
            runtime=features.provenance() if hasattr(features, "provenance") else None,
            split=split, n_train=fit.n_train, **_scores(scores), fit_seconds=fit.fit_seconds,
            extract_seconds=seconds, extract_parts=extraction_costs(features),
            dim=getattr(features, "dim", None),
            flip_average=bool(getattr(features, "flip_average", False)),
            tuned=fit.tuned, cv_splits=fit.cv_splits, cv_score=fit.cv_score,
            best_params=fit.best_params, class_weight=fit.class_weight, seed=seed,
            class_names=[str(c) for c in features.class_names],
            per_class=scores["per_class"], confusion_matrix=scores["confusion_matrix"],
            calibration=fit.calibration, estimator=fit.estimator)


_FIELDS = tuple(f.name for f in dataclasses.fields(CompareRow))


def _scores(scores: dict) -> dict:
    return {"n_eval": scores["n"], **{k: scores[k] for k in (
        "accuracy", "balanced_accuracy", "macro_f1", "predict_seconds",
        "predict_ms_per_image")}}


def extraction_costs(features) -> list[dict]:
    """What computing each part's cached rows cost: [{"backbone", "seconds"}], one entry
    per backbone of a combination (seconds None where the cache did not record it)."""
    costs = []
    for part in getattr(features, "parts", [features]):
        seconds = getattr(part, "extraction_seconds", None) or None
        costs.append({"backbone": part.backbone,
                      "seconds": None if seconds is None else float(seconds)})
    return costs


def ranking_key(row):
    """How compare rows are ordered (the report's order): accuracy, then the faster fit."""
    return -row["accuracy"], row["fit_seconds"]


def uncertainty_summary(y_true, y_pred, confidence, n_classes) -> dict:
    """The trust fields of a compare row: ``intervals`` (95%, per metric:
    :func:`~featx.classifiers.score_intervals`), ``interval_methods``, ``ece``,
    ``reliability`` and ``coverage`` (None without probabilities)."""
    out = {"intervals": uncertainty.score_intervals(y_true, y_pred, n_classes),
           "interval_methods": dict(uncertainty.INTERVAL_METHODS),
           "ece": None, "reliability": None, "coverage": None}
    if confidence is not None:
        correct = np.asarray(y_true) == np.asarray(y_pred)
        out["ece"] = uncertainty.expected_calibration_error(confidence, correct)
        out["reliability"] = uncertainty.reliability_bins(confidence, correct)
        out["coverage"] = uncertainty.coverage_curve(confidence, correct)
    return out
