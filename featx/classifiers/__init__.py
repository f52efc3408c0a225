"""The fourth room of an image's route: cached embeddings -> fitted classifiers -> scores
with their uncertainty.

Modules, in import order: ``_uncertainty`` (intervals, McNemar + Holm,
calibration error, coverage), ``_registry`` (the classifiers and their grids),
``_evaluate`` (metrics), ``_tuning`` (cross-validated choice of hyperparameters,
calibration), ``_fit`` (one classifier), ``_resampling`` (re-drawn splits),
``_rows`` (:class:`CompareRow`, the compare row's one schema), ``_compare`` (every
classifier side by side), ``_model_files`` (a fitted classifier saved and loaded, as
``.skops``).
"""

from ._compare import (COST_ORDER, compare, compare_repeated, compare_rows, fit_and_score,
                       significance)
from ._evaluate import (SUMMARY_METRICS, class_scores, classification_metrics, evaluate,
                        predict_probabilities, summary_metrics)
from ._fit import TUNINGS, FitResult, fit_classifier
from ._model_files import (TRUSTED_TYPES, classifier_metadata, convert_model, feature_source,
                           load_model, read_metadata, save_model)
from ._registry import CLASSIFIERS, ClassifierSpec, check_names, classifier_names, make_classifier
from ._resampling import Repeat, RepeatPlan, kfold_splits, plan_repeats
from ._rows import (NOT_SERIALISED, REQUIRED, UNSET, CompareRow, extraction_costs, ranking_key,
                    uncertainty_summary)
from ._tuning import CALIBRATION_METHODS, TUNERS, calibrated, depth_tune, grid_tune, race_tune
from ._uncertainty import (ALPHA, CALIBRATION_BINS, INTERVAL_METHODS, METRICS,
                           coverage_curve, coverage_points, expected_calibration_error, holm,
                           metric_weights, mcnemar, proportion_interval, reliability_bins,
                           repeated_interval, score_intervals)

__all__ = [
    "ALPHA", "CALIBRATION_BINS", "CALIBRATION_METHODS", "CLASSIFIERS", "COST_ORDER",
    "ClassifierSpec", "CompareRow", "FitResult", "INTERVAL_METHODS", "METRICS",
    "NOT_SERIALISED", "REQUIRED", "Repeat", "RepeatPlan", "SUMMARY_METRICS", "TRUSTED_TYPES",
    "TUNERS", "TUNINGS", "UNSET", "calibrated", "check_names", "class_scores",
    "classification_metrics", "classifier_metadata", "classifier_names", "compare",
    "compare_repeated", "compare_rows", "convert_model", "coverage_curve", "coverage_points",
    "depth_tune", "evaluate", "expected_calibration_error", "extraction_costs", "feature_source",
    "fit_and_score", "fit_classifier", "grid_tune", "holm", "kfold_splits", "load_model",
    "make_classifier", "mcnemar", "metric_weights", "plan_repeats", "predict_probabilities",
    "proportion_interval", "race_tune", "ranking_key", "read_metadata", "reliability_bins",
    "repeated_interval", "save_model", "score_intervals", "significance", "summary_metrics",
    "uncertainty_summary",
]
