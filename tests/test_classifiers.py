"""Classifier registry, tuning, evaluation, leakage and model persistence, on synthetic features."""

import json
import logging

import numpy as np
import pytest
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.datasets import make_blobs, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from conftest import ArrayFeatures
from featx import classifiers
from featx.classifiers import _model_files as persist
from featx.classifiers import (CLASSIFIERS, ClassifierSpec, classifier_names, compare, evaluate,
                               fit_classifier, make_classifier)
from featx.errors import DataError, UsageError

NAMES = classifier_names()


def blobs(n=160, classes=3, dim=24, seed=0, std=1.5):
    """Separable 'embedding-like' features, split into stratified-ish train / val halves."""
    X, y = make_blobs(n_samples=n, centers=classes, n_features=dim, cluster_std=std,
                      center_box=(-6, 6), random_state=seed)
    X = X.astype(np.float32)
    return X[::2], y[::2], X[1::2], y[1::2]


def fake_features(n=150, classes=3, dim=16, seed=0, val_shift=0.0):
    X, y = make_blobs(n_samples=n, centers=classes, n_features=dim, cluster_std=1.0,
                      random_state=seed)
    split = np.array(["train", "train", "val"] * (n // 3))
    X[split == "val"] += val_shift
    return ArrayFeatures(X.astype(np.float32), y, split, [f"c{i}" for i in range(classes)])


# ----- registry -------------------------------------------------------------------------

def test_registry_names_and_specs():
    assert NAMES == ["softmax", "logistic", "svm", "knn", "tree"]
    for name, spec in CLASSIFIERS.items():
        pipe = make_classifier(name)
        assert isinstance(pipe, Pipeline) and pipe.steps[-1][0] == "clf"
        assert spec.description
        pipe.set_params(**{key: values[0] for key, values in spec.grid.items()})


@pytest.mark.parametrize("call", [
    lambda: make_classifier("forest"),
    lambda: fit_classifier("forest", *blobs()[:2]),
    lambda: compare([fake_features()], ["softmax", "forest"]),
])
def test_unknown_name_lists_valid_names(call):
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "forest" in message and "\n" not in message
    assert all(name in message for name in NAMES)


def test_logistic_is_one_vs_rest_and_softmax_multinomial():
    X, y, _, _ = blobs(classes=4)
    ovr = fit_classifier("logistic", X, y, tune=False).estimator
    assert len(ovr.named_steps["clf"].estimators_) == 4
    soft = fit_classifier("softmax", X, y, tune=False).estimator
    assert soft.named_steps["clf"].coef_.shape == (4, X.shape[1])


# ----- fitting and tuning ---------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_each_classifier_is_accurate_on_separable_features(name):
    X, y, Xv, yv = blobs()
    result = fit_classifier(name, X, y, cv=3)
    scores = evaluate(result.estimator, Xv, yv, ["a", "b", "c"])
    assert scores["accuracy"] >= 0.9, (name, scores["accuracy"])
    assert result.fit_seconds > 0


@pytest.mark.parametrize("name", NAMES)
def test_tuning_picks_params_from_the_grid(name):
    X, y, _, _ = blobs()
    result = fit_classifier(name, X, y, cv=3, seed=1)
    grid = CLASSIFIERS[name].grid
    assert result.tuned and result.cv_splits == 3 and 0 <= result.cv_score <= 1
    assert set(result.best_params) == set(grid)
    for key, value in result.best_params.items():
        assert value in grid[key]
        assert result.estimator.get_params()[key] == value


def test_untuned_fit_uses_defaults():
    X, y, _, _ = blobs()
    result = fit_classifier("softmax", X, y, tune=False)
    assert not result.tuned and result.cv_score is None and result.cv_splits == 0
    assert result.best_params == {"clf__C": make_classifier("softmax").get_params()["clf__C"]}


def test_folds_are_capped_by_the_smallest_class():
    X, y, _, _ = blobs(n=200, classes=2)
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:3]]
    result = fit_classifier("knn", X[keep], y[keep], cv=5)
    assert result.cv_splits == 3


def test_class_with_one_row_falls_back_to_defaults(caplog):
    X, y, _, _ = blobs(classes=2)
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:1]]
    with caplog.at_level(logging.WARNING, logger="featx.classifiers"):
        result = fit_classifier("softmax", X[keep], y[keep], cv=3)
    assert not result.tuned and result.cv_score is None
    assert "fewer than 2 training rows" in caplog.text


def test_knn_grid_shrinks_to_tiny_folds():
    X, y, _, _ = blobs(n=24, classes=2)  # 12 train rows: 8 per 3-fold training part
    result = fit_classifier("knn", X, y, cv=3)
    assert result.best_params["clf__n_neighbors"] <= 8


def test_one_class_train_split_is_a_data_error():
    X, y, _, _ = blobs()
    with pytest.raises(DataError) as info:
        fit_classifier("softmax", X, np.zeros_like(y))
    assert "only one class" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="empty"):
        fit_classifier("softmax", X[:0], y[:0])


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_predictions(name):
    X, y, Xv, _ = blobs(std=3.0)  # overlapping classes: ties and randomness would show
    first = fit_classifier(name, X, y, cv=3, seed=7).estimator.predict(Xv)
    second = fit_classifier(name, X, y, cv=3, seed=7).estimator.predict(Xv)
    np.testing.assert_array_equal(first, second)


def imbalanced(seed=0):
    X, y = make_classification(n_samples=400, n_features=20, n_informative=4, weights=[0.9, 0.1],
                               class_sep=0.5, flip_y=0.05, random_state=seed)
    return X[::2], y[::2], X[1::2], y[1::2]


@pytest.mark.parametrize("name", ["softmax", "logistic", "svm", "tree"])
def test_class_weight_balanced(name):
    X, y, Xv, yv = imbalanced()
    plain = fit_classifier(name, X, y, tune=False)
    balanced = fit_classifier(name, X, y, tune=False, class_weight="balanced")
    assert balanced.class_weight == "balanced" and plain.class_weight is None
    params = balanced.estimator.get_params()
    assert "balanced" in [v for k, v in params.items() if k.endswith("class_weight")]
    minority_recall = [evaluate(r.estimator, Xv, yv, ["major", "minor"])["per_class"][1]["recall"]
                       for r in (plain, balanced)]
    if name != "tree":  # a fully grown tree fits the training rows either way
        assert minority_recall[1] > minority_recall[0]


def test_class_weight_is_ignored_with_a_warning_for_knn(caplog):
    X, y, _, _ = blobs()
    with caplog.at_level(logging.WARNING, logger="featx.classifiers"):
        result = fit_classifier("knn", X, y, tune=False, class_weight="balanced")
    assert result.class_weight is None
    assert "knn does not support class_weight" in caplog.text
    with pytest.raises(UsageError):
        make_classifier("softmax", class_weight="heavy")


# ----- evaluation -----------------------------------------------------------------------

def test_evaluate_reports_every_class():
    X, y, Xv, yv = blobs(classes=3)
    estimator = fit_classifier("softmax", X, y, tune=False).estimator
    keep = yv != 2  # class 2 absent from the evaluation rows
    scores = evaluate(estimator, Xv[keep], yv[keep], ["a", "b", "c"])
    assert scores["n"] == keep.sum()
    assert np.array(scores["confusion_matrix"]).shape == (3, 3)
    assert np.array(scores["confusion_matrix"]).sum() == keep.sum()
    assert [row["class"] for row in scores["per_class"]] == ["a", "b", "c"]
    assert scores["per_class"][2]["support"] == 0
    assert scores["accuracy"] == pytest.approx(np.mean(estimator.predict(Xv[keep]) == yv[keep]))
    assert scores["predict_ms_per_image"] == pytest.approx(
        1000 * scores["predict_seconds"] / keep.sum())
    json.dumps(scores)
    with pytest.raises(DataError, match="empty"):
        evaluate(estimator, Xv[:0], yv[:0], ["a", "b", "c"])


# ----- compare and leakage --------------------------------------------------------------

def test_compare_fits_on_train_and_scores_eval_split():
    features = fake_features(val_shift=0.0)
    results = compare([features], ["softmax", "knn"], cv=3)
    assert [r["clf"] for r in results] == ["softmax", "knn"]
    X_train, _ = features.arrays("train")
    X_val, _ = features.arrays("val")
    for r in results:
        assert r["split"] == "val" and r["backbone"] == "toy" and r["weights"] == "random"
        assert r["n_train"] == len(X_train) and r["n_eval"] == len(X_val)
        assert r["accuracy"] >= 0.9 and r["class_names"] == ["c0", "c1", "c2"]
    with pytest.raises(DataError, match="test split"):
        compare([features], ["softmax"], eval_split="test")


def test_scaler_sees_train_rows_only():
    # Validation rows are shifted far away: any leak would move the scaler's mean.
    features = fake_features(val_shift=100.0)
    result = compare([features], ["softmax"], cv=3)[0]
    X_train, _ = features.arrays("train")
    scaler = result["estimator"].named_steps["scale"]
    np.testing.assert_allclose(scaler.mean_, X_train.mean(axis=0), rtol=1e-5, atol=1e-4)
    assert scaler.n_samples_seen_ == len(X_train)


class RowSpy(TransformerMixin, BaseEstimator):
    """Records the row ids (column 0) of every fit; clones share the record."""

    seen = []

    def fit(self, X, y=None):
        RowSpy.seen.append(np.asarray(X)[:, 0].astype(int))
        return self

    def transform(self, X):
        return np.asarray(X)[:, 1:]


def test_tuning_folds_stay_inside_the_train_rows(monkeypatch):
    features = fake_features(n=150)
    features.X = np.column_stack([np.arange(len(features.X)), features.X])  # id column
    spec = ClassifierSpec(
        lambda class_weight, seed: Pipeline([("spy", RowSpy()), ("scale", StandardScaler()),
                                             ("clf", LogisticRegression())]),
        {"clf__C": [0.1, 1.0]}, "spy")
    monkeypatch.setitem(classifiers.CLASSIFIERS, "spy", spec)
    RowSpy.seen = []
    compare([features], ["spy"], cv=3, n_jobs=1)  # in this process: the spy records here

    train_ids = set(np.flatnonzero(features.split == "train"))
    assert len(RowSpy.seen) == 3 * 2 + 1  # folds x grid + refit
    for ids in RowSpy.seen:
        assert set(ids) <= train_ids
    assert [len(ids) for ids in RowSpy.seen].count(len(train_ids)) == 1  # only the refit
    assert set(RowSpy.seen[-1]) == train_ids


# ----- persistence ----------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    X, y, Xv, _ = blobs()
    estimator = fit_classifier("svm", X, y, tune=False).estimator
    path = classifiers.save_model(estimator, tmp_path / "models", "svm-toy",
                              {"classifier": "svm", "class_names": ["a", "b", "c"],
                               "backbone": "toy", "best_params": {"clf__C": 1.0}})
    return path, estimator, Xv


def test_save_load_round_trip(saved):
    path, estimator, Xv = saved
    assert path.name == "svm-toy.skops" and path.with_suffix(".json").is_file()
    for p in (path, path.with_suffix(".json")):
        loaded, metadata = persist.load_model(p)
        np.testing.assert_array_equal(loaded.predict(Xv), estimator.predict(Xv))
    assert metadata["class_names"] == ["a", "b", "c"] and metadata["classifier"] == "svm"
    for key in ("featx_version", "sklearn_version", "created", "sha256"):
        assert metadata[key]
    assert metadata["artifact"] == "svm-toy.skops" and metadata["format"] == 2


def test_tampered_artifact_is_refused(saved):
    path, _, _ = saved
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError) as info:
        persist.load_model(path)
    message = str(info.value)
    assert message.startswith("refusing to load") and "SHA-256 does not match" in message
    assert "damaged or replaced" in message


def test_missing_files_are_data_errors(saved, tmp_path):
    path, _, _ = saved
    with pytest.raises(DataError, match="not found"):
        persist.load_model(tmp_path / "nothing.skops")
    path.unlink()
    with pytest.raises(DataError, match="model file not found"):
        persist.load_model(path.with_suffix(".json"))
    with pytest.raises(UsageError):
        persist.load_model(tmp_path / "model.pkl")
    with pytest.raises(UsageError):
        classifiers.save_model(object(), tmp_path, "../escape", {})
