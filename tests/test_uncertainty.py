"""Intervals, paired tests, calibration error, abstention and repeated splits."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.tree import DecisionTreeClassifier

from conftest import ArrayFeatures
from featx.classifiers import _uncertainty as uncertainty
from featx.classifiers import (compare, compare_repeated, depth_tune, fit_classifier,
                               predict_probabilities, significance, CLASSIFIERS, make_classifier,
                               classification_metrics, uncertainty_summary)
from featx.errors import DataError
from featx.inference import UNKNOWN, label_rows
from featx.classifiers import plan_repeats


# ----- intervals ---------------------------------------------------------------------

def test_metric_weights_give_scikit_learns_metrics():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 6, 200))  # class 5: never true
    right = y_true == y_pred
    weights = uncertainty.metric_weights(y_true, y_pred, 6)
    share = {name: (w * right).sum() / w.sum() for name, w in weights.items()}
    assert share["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert share["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert share["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_the_accuracy_interval_is_scipys_exact_binomial_interval():
    from scipy.stats import binomtest

    for k, n in [(0, 40), (3, 40), (20, 40), (39, 40), (40, 40), (250, 256)]:
        y_true = np.zeros(n, dtype=int)
        y_pred = np.where(np.arange(n) < k, 0, 1)
        exact = binomtest(k, n).proportion_ci(0.95, method="exact")
        got = uncertainty.score_intervals(y_true, y_pred, 2)["accuracy"]
        assert got == pytest.approx([exact.low, exact.high])


def test_a_perfect_score_on_256_images_keeps_a_lower_bound_near_0_986():
    y = np.repeat([0, 1], 128)
    perfect = uncertainty.score_intervals(y, y, 2)
    for metric in uncertainty.METRICS:  # Clopper-Pearson for 256 of 256: 0.9857-1
        assert perfect[metric][0] == pytest.approx(0.9857, abs=5e-4)
        assert perfect[metric][1] == 1.0
    wrong = uncertainty.score_intervals(y, 1 - y, 2)
    assert wrong["accuracy"] == pytest.approx([0.0, 0.0143], abs=5e-4)
    small = classification_metrics(np.array([0] * 50 + [1] * 4), np.array([0] * 50 + [1] * 4),
                                   ["big", "small"])
    low, high = small["per_class"][1]["recall_interval"]  # a class of 4, all right
    assert low == pytest.approx(0.3976, abs=5e-4) and high == 1.0


def _simulated(true_accuracy, sizes, seed, classes=None):
    """Labels of a classifier right with probability true_accuracy, its errors spread evenly
    over the other classes."""
    classes = classes or len(sizes)
    rng = np.random.default_rng(seed)
    y_true = np.repeat(np.arange(len(sizes)), sizes)
    right = rng.random(len(y_true)) < true_accuracy
    return y_true, np.where(right, y_true, (y_true + rng.integers(1, classes, len(y_true)))
                            % classes)


# Stated band: at least 95% minus 3 Monte Carlo standard errors; the exact interval is
# conservative, so coverage may reach 100% (at 0.999 with 100 images it is 99.5%).
@pytest.mark.parametrize("true_accuracy", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("n", [100, 500])
def test_accuracy_intervals_keep_95_percent_coverage_up_to_the_edge(true_accuracy, n):
    trials = 4000
    rng = np.random.default_rng(n)
    successes = rng.binomial(n, true_accuracy, trials)  # the interval depends on k alone
    covers = {}
    for k in np.unique(successes):
        low, high = uncertainty.score_intervals(np.zeros(n, int), (np.arange(n) >= k) * 1,
                                                2)["accuracy"]
        covers[k] = low <= true_accuracy <= high
    coverage = np.mean([covers[k] for k in successes])
    assert 0.95 - 3 * np.sqrt(0.95 * 0.05 / trials) <= coverage <= 1.0


def _population_macro_f1(true_accuracy, sizes):
    support = np.asarray(sizes, dtype=float)
    missed = support * (1 - true_accuracy)
    wrongly_predicted = (missed.sum() - missed) / (len(sizes) - 1)
    hits = support * true_accuracy
    return float(np.mean(2 * hits / (2 * hits + missed + wrongly_predicted)))


@pytest.mark.parametrize("true_accuracy", [0.5, 0.9, 0.99, 0.999])
def test_balanced_accuracy_and_macro_f1_intervals_keep_their_coverage(true_accuracy):
    sizes, trials = [10, 40, 150, 300], 300  # unequal classes: the weights matter
    truth = {"balanced_accuracy": true_accuracy,
             "macro_f1": _population_macro_f1(true_accuracy, sizes)}
    covered = dict.fromkeys(truth, 0)
    for seed in range(trials):
        y_true, y_pred = _simulated(true_accuracy, sizes, seed)
        intervals = uncertainty.score_intervals(y_true, y_pred, len(sizes))
        for metric, value in truth.items():
            covered[metric] += intervals[metric][0] <= value <= intervals[metric][1]
    for metric in truth:
        assert covered[metric] / trials >= 0.95 - 3 * np.sqrt(0.95 * 0.05 / trials), metric


def test_intervals_bracket_the_point_estimate_and_tiny_sets_give_no_warning():
    y_true = np.repeat([0, 1, 2], 30)
    y_pred = np.roll(y_true, 7)
    a = uncertainty.score_intervals(y_true, y_pred, 3)
    assert a["accuracy"][0] <= accuracy_score(y_true, y_pred) <= a["accuracy"][1]
    assert a["accuracy"][1] - a["accuracy"][0] > 0.05  # 90 images: a wide interval
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice", no division by zero
        tiny = uncertainty.score_intervals([0, 2, 2], [0, 2, 1], 3)  # class 1 has no image
        uncertainty.repeated_interval([([0, 1], [0, 2], [0, 2]), ([2], [2], [1])], 3)
        uncertainty_summary([1], [1], np.array([0.9]), 3)
    assert tiny["accuracy"][0] > 0.0 and tiny["accuracy"][1] < 1.0


# ----- paired tests ------------------------------------------------------------------

def test_mcnemar_counts_discordant_images_and_tests_them():
    a = np.array([True] * 30 + [False] * 5 + [True] * 65)
    b = np.array([False] * 30 + [True] * 5 + [True] * 65)
    test = uncertainty.mcnemar(a, b)
    assert (test["a_only"], test["b_only"]) == (30, 5)
    assert test["p_value"] < 0.001
    assert uncertainty.mcnemar(a, a)["p_value"] == 1.0
    same_errors = uncertainty.mcnemar(a[:40], np.roll(a[:40], 1))
    assert same_errors["p_value"] > 0.5


def test_holm_is_stricter_than_each_test_alone():
    assert uncertainty.holm([0.01, 0.04, 0.03]) == [True, False, False]
    assert uncertainty.holm([0.001, 0.01, 0.02]) == [True, True, True]


def _features(n=300, classes=3, seed=0, flip=0.0):
    X, y = make_classification(n_samples=n, n_features=20, n_informative=8, n_classes=classes,
                               flip_y=flip, random_state=seed)
    split = np.array(["train", "train", "val"] * (n // 3))
    return ArrayFeatures(X.astype(np.float32), y, split, [f"c{i}" for i in range(classes)])


def test_significance_marks_a_much_worse_classifier_and_not_a_tie():
    rows = compare([_features()], ["softmax", "logistic", "tree"], cv=3, n_jobs=1)
    significance(rows)
    best = [r for r in rows if r["vs_best"] is None]
    assert len(best) == 1 and best[0]["accuracy"] == max(r["accuracy"] for r in rows)
    for r in rows:
        if r["vs_best"] is not None:
            assert r["vs_best"]["n"] == 100
            assert r["vs_best"]["best_only"] - r["vs_best"]["this_only"] == round(
                100 * (best[0]["accuracy"] - r["accuracy"]))
    tree = next(r for r in rows if r["clf"] == "tree")
    linear = next(r for r in rows if r["clf"] in ("softmax", "logistic") and r["vs_best"])
    assert tree["vs_best"]["p_value"] < linear["vs_best"]["p_value"]


# ----- calibration -------------------------------------------------------------------

def test_ece_is_small_for_honest_probabilities_and_large_for_overconfident_ones():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 5000)
    honest = rng.random(5000) < confidence
    assert uncertainty.expected_calibration_error(confidence, honest) < 0.03
    overconfident = rng.random(5000) < confidence - 0.25
    assert uncertainty.expected_calibration_error(confidence, overconfident) > 0.2
    bins = uncertainty.reliability_bins(confidence, honest)
    assert sum(b["count"] for b in bins) == 5000 and all(b["low"] < b["high"] for b in bins)


def test_calibration_lowers_the_ece_of_an_overconfident_model():
    features = _features(n=900, flip=0.3, seed=1)  # 30% noisy labels: a deep tree says 1.0
    X_train, y_train = features.arrays("train")
    X_val, y_val = features.arrays("val")

    def ece(fit):
        probabilities = predict_probabilities(fit.estimator, X_val)
        predicted = fit.estimator.classes_[probabilities.argmax(axis=1)]
        return uncertainty.expected_calibration_error(probabilities.max(axis=1),
                                                      predicted == y_val)

    raw = fit_classifier("tree", X_train, y_train, tune=False, n_jobs=1)
    calibrated = fit_classifier("tree", X_train, y_train, tune=False, n_jobs=1,
                                calibrate="sigmoid")
    assert calibrated.calibration == "sigmoid"
    assert ece(raw) > 0.2
    assert ece(calibrated) < ece(raw) / 2


def test_calibrated_svm_has_probabilities():
    features = _features()
    X, y = features.arrays("train")
    plain = fit_classifier("svm", X, y, tune=False, n_jobs=1)
    assert predict_probabilities(plain.estimator, X) is None
    calibrated = fit_classifier("svm", X, y, tune=True, cv=3, n_jobs=1, calibrate="isotonic")
    probabilities = predict_probabilities(calibrated.estimator, X)
    assert probabilities.shape == (len(y), 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0)


def test_calibration_refuses_a_class_with_one_image():
    X = np.random.default_rng(0).normal(size=(7, 4))
    with pytest.raises(DataError, match="at least 2 training images"):
        fit_classifier("softmax", X, np.array([0, 0, 0, 1, 1, 1, 2]), tune=False,
                       calibrate="sigmoid")


# ----- abstention --------------------------------------------------------------------

def test_coverage_curve():
    confidence = np.array([0.95, 0.9, 0.6, 0.4])
    correct = np.array([True, True, False, False])
    rows = uncertainty.coverage_curve(confidence, correct, thresholds=(0.0, 0.5, 0.92, 0.99))
    assert [(r["coverage"], r["accuracy"]) for r in rows] == [
        (1.0, 0.5), (0.75, 2 / 3), (0.25, 1.0), (0.0, None)]


def test_label_rows_with_min_score_says_unknown_and_keeps_the_best_guess():
    scores = np.array([[0.9, 0.1], [0.55, 0.45]])
    rows = label_rows(["a.png", "b.png", "c.png"], ["", "", "broken"], scores,
                      np.array([0, 0]), [0, 1], ["cat", "dog"], 2, min_score=0.6)
    assert [(r["label"], r["best_guess"]) for r in rows] == [
        ("cat", "cat"), (UNKNOWN, "cat"), ("", "")]
    plain = label_rows(["a.png"], [""], scores[:1], np.array([0]), [0, 1], ["cat", "dog"], 2)
    assert "best_guess" not in plain[0]


# ----- trees -------------------------------------------------------------------------

def test_depth_truncation_scores_equal_depth_limited_trees():
    X, y = make_classification(n_samples=400, n_features=10, n_informative=6, n_classes=3,
                               random_state=0)
    from featx.classifiers._tuning import _truncated_scores

    train, test = np.arange(300), np.arange(300, 400)
    got = _truncated_scores(make_classifier("tree", seed=0), X[train], y[train], X[test],
                            y[test], [1, 2, 3, None])
    for depth, score in zip([1, 2, 3, None], got):
        tree = DecisionTreeClassifier(max_depth=depth, random_state=0).fit(X[train], y[train])
        # equal, up to splits that tie (two features cutting off the same rows) and are
        # broken by the random feature order, which a deeper tree has advanced further
        tolerance = 0 if depth in (1, 2, None) else 0.02
        assert abs(score - tree.score(X[test], y[test])) <= tolerance + 1e-12


def test_depth_tune_picks_a_grid_depth_and_the_tree_is_refitted_on_every_feature():
    features = _features(n=300)
    X, y = features.arrays("train")
    fit = fit_classifier("tree", X, y, cv=3, n_jobs=1)
    assert fit.best_params["clf__max_depth"] in CLASSIFIERS["tree"].grid["clf__max_depth"]
    assert fit.estimator[-1].n_features_in_ == X.shape[1]
    assert 0 < fit.cv_score <= 1
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    params, score, not_converged = depth_tune(CLASSIFIERS["tree"], make_classifier("tree"), X,
                                              y, folds, 1, "accuracy")
    assert set(params) == {"clf__max_depth"} and 0 < score <= 1 and not_converged == 0


# ----- repeats -----------------------------------------------------------------------

def _pool(per_class=(12, 12, 6)):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    paths = np.array([f"c{lab}/img{i:03d}.jpg" for i, lab in enumerate(labels)])
    return paths, labels


@pytest.mark.parametrize("layout", ["pool", "split"])
@pytest.mark.parametrize("train_per_class", [None, 3])
def test_repeats_never_train_on_an_evaluation_row(layout, train_per_class):
    paths, labels = _pool()
    pool = np.arange(len(labels))
    plan = plan_repeats(paths, labels, pool, repeats=4, layout=layout, eval_fraction=0.25,
                        seed=7, train_per_class=train_per_class, cv=3)
    assert len(plan.repeats) == 4 and [r.seed for r in plan.repeats] == [7, 8, 9, 10]
    draws = set()
    for repeat in plan.repeats:
        evaluated = []
        for train, evaluation in repeat.folds:
            assert not set(train) & set(evaluation)
            assert set(train) | set(evaluation) <= set(pool)
            evaluated += evaluation.tolist()
            if train_per_class:
                assert np.bincount(labels[train]).max() <= train_per_class
        assert len(evaluated) == len(set(evaluated))  # each row evaluated at most once
        if layout == "split":
            assert sorted(evaluated) == pool.tolist()  # k-fold: every row once per repeat
        draws.add(tuple(sorted(evaluated)) if layout == "pool" else tuple(repeat.folds[0][1]))
    assert len(draws) > 1  # each repeat draws anew
    assert plan.protocol == ("kfold" if layout == "split" else "resplit")


def test_a_too_small_class_is_reported_once_not_once_per_repeat(caplog):
    paths, labels = _pool((12, 12, 3))
    plan_repeats(paths, labels, np.arange(len(labels)), repeats=4, layout="pool",
                 eval_fraction=0.25, train_per_class=5, class_names=["a", "b", "tiny"])
    assert caplog.text.count("class 'tiny' has 3 images for 5 train per class") == 1


def test_kfold_repeats_fall_back_to_the_folds_the_smallest_class_allows(caplog):
    paths, labels = _pool((12, 12, 3))
    plan = plan_repeats(paths, labels, np.arange(len(labels)), repeats=2, layout="split",
                        eval_fraction=0.2, cv=5, class_names=["a", "b", "tiny"])
    assert len(plan.repeats[0].folds) == 3
    assert "class 'tiny' has only 3 labelled images: repeats use 3-fold instead of 5-fold" \
        in caplog.text
    paths, labels = _pool((12, 12, 1))
    with pytest.raises(DataError, match="class 'tiny' has 1 labelled image"):
        plan_repeats(paths, labels, np.arange(len(labels)), repeats=2, layout="split",
                     eval_fraction=0.2, class_names=["a", "b", "tiny"])


def test_compare_repeated_summarises_every_classifier():
    features = _features(n=180)
    pool = np.arange(180)
    plan = plan_repeats(features.paths, features.labels, pool, repeats=3, layout="pool",
                        eval_fraction=1 / 3, seed=0)
    summaries = compare_repeated(features, ["softmax", "knn"], plan, cv=3, n_jobs=1)
    assert [s["clf"] for s in summaries] == ["softmax", "knn"]
    for s in summaries:
        accuracies = [r["accuracy"] for r in s["per_repeat"]]
        assert s["repeats"] == 3 and len(accuracies) == 3
        assert s["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
        assert s["std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
        low, high = s["interval"]["accuracy"]
        assert low <= s["mean"]["accuracy"] <= high
        assert all(r["n"] == 60 for r in s["per_repeat"])


def test_race_tune_stops_clearly_worse_candidates_after_one_fold(monkeypatch):
    from sklearn.model_selection import StratifiedKFold

    from featx import classifiers
    from featx.classifiers import ClassifierSpec, race_tune

    X, y = make_classification(n_samples=600, n_features=20, n_informative=10, n_classes=3,
                               random_state=0)
    spec = ClassifierSpec(lambda w, s: make_classifier("tree"), {"clf__max_depth": [1, 12]}, "t")
    fits = []
    real = classifiers._tuning._held_out_hits
    monkeypatch.setattr(classifiers._tuning, "_held_out_hits",
                        lambda *a: fits.append(a[1]) or real(*a))
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    params, score, not_converged = race_tune(spec, make_classifier("tree"), X, y, folds, 1,
                                             "accuracy")
    assert params == {"clf__max_depth": 12}  # depth 1 cannot tell 3 classes apart
    assert len(fits) == 2  # both on the first fold; the race is then decided
    assert 0.5 < score <= 1


def test_race_keeps_close_candidates_to_the_end():
    from featx.classifiers._tuning import _still_racing

    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.80
    b = a.copy()
    b[:3] = ~b[:3]  # three rows apart: not significant
    assert _still_racing([0, 1], {0: a, 1: b}) == [0, 1]
    c = rng.random(200) < 0.5  # far behind
    assert _still_racing([0, 2], {0: a, 2: c}) == [0]


def test_repeats_that_share_images_do_not_narrow_the_interval():
    rng = np.random.default_rng(0)
    rows = np.arange(150)
    y_true = rng.integers(0, 3, 150)
    y_pred = np.where(rng.random(150) < 0.8, y_true, (y_true + 1) % 3)
    single = uncertainty.score_intervals(y_true, y_pred, 3)
    # k-fold repeats evaluate the same images: five identical repeats are one repeat
    repeated = uncertainty.repeated_interval([(rows, y_true, y_pred)] * 5, 3)
    for metric in uncertainty.METRICS:
        assert repeated[metric] == pytest.approx(single[metric])


def test_perfect_rows_tie_in_the_report_with_intervals_below_1_and_no_warning():
    from featx.reports._markdown import _markdown

    features = _features(n=180, classes=2)
    features.X[:, 0] = np.where(features.labels == 1, 50.0, -50.0)  # separable by one feature
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = compare([features], ["softmax", "logistic", "knn"], cv=3, n_jobs=1)
        significance(rows)
        plan = plan_repeats(features.paths, features.labels, np.arange(180), repeats=3,
                            layout="pool", eval_fraction=1 / 3, seed=0)
        repeated = compare_repeated(features, ["softmax", "knn"], plan, cv=3, n_jobs=1)
        markdown = _markdown(rows, {"root": "/data/toy"}, [], {}, repeated)
    assert all(r["accuracy"] == 1.0 for r in rows)
    for r in rows:
        assert 0.94 < r["intervals"]["accuracy"][0] < 1.0 == r["intervals"]["accuracy"][1]
        assert r["vs_best"] is None or (r["vs_best"]["p_value"] == 1.0
                                        and not r["vs_best"]["significant"])
    for s in repeated:
        assert s["std"]["accuracy"] == 0.0 and s["interval"]["accuracy"][0] < 1.0
    assert "exact binomial (Clopper-Pearson)" in markdown and "1.000-1.000" not in markdown
    assert markdown.count("| 1 | ") == 3  # equal accuracies share rank 1


def test_rows_scored_on_other_images_are_not_tested_against_the_best():
    rows = compare([_features()], ["softmax", "tree"], cv=3, n_jobs=1)
    moved = np.array([f"other/{p}" for p in rows[1]["eval_rows"]["paths"]])
    rows[1]["eval_rows"] = {**rows[1]["eval_rows"], "paths": moved}
    significance(rows)
    assert [r.get("vs_best", "untested") for r in rows].count(None) == 1  # the best
    assert ["vs_best" in r for r in rows].count(False) == 1  # no images in common: no test


def test_min_score_is_refused_when_a_class_is_named_unknown():
    from featx.inference import check_unknown_free as _check_unknown_free
    from featx.errors import UsageError

    _check_unknown_free(["cat", "dog"], 0.9, "m.skops")
    _check_unknown_free(["unknown", "dog"], None, "m.skops")
    with pytest.raises(UsageError, match="a class is named 'unknown'"):
        _check_unknown_free(["unknown", "dog"], 0.9, "m.skops")


def test_coverage_points_answer_equal_scores_together():
    coverage, accuracy = uncertainty.coverage_points([0.9, 0.6, 0.9, 0.3],
                                                     [True, False, False, True])
    assert coverage.tolist() == [0.5, 0.75, 1.0]
    assert accuracy.tolist() == [0.5, 1 / 3, 0.5]
