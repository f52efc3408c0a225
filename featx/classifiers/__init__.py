"""The fourth room of an image's route: cached embeddings -> fitted classifiers -> scores
with their uncertainty.

Modules, in import order: ``_uncertainty`` (bootstrap intervals, McNemar + Holm,
calibration error, coverage), ``_registry`` (the classifiers and their grids),
``_evaluate`` (metrics), ``_tuning`` (cross-validated choice of hyperparameters,
calibration), ``_fit`` (one classifier), ``_resampling`` (re-drawn splits),
``_rows`` (:class:`CompareRow`, the compare row's one schema), ``_compare`` (every
classifier side by side), ``_model_files`` (a fitted classifier saved and loaded).
"""

from ._compare import (COST_ORDER, compare, compare_repeated, compare_rows, fit_and_score,
                       significance)
from ._evaluate import (SUMMARY_METRICS, class_scores, classification_metrics, evaluate,
                        predict_probabilities, summary_metrics)
from ._fit import TUNINGS, FitResult, fit_classifier
from ._model_files import (TRUST_WARNING, classifier_metadata, feature_source, load_model,
                           read_metadata, save_model)
from ._registry import CLASSIFIERS, ClassifierSpec, check_names, classifier_names, make_classifier
from ._resampling import Repeat, RepeatPlan, kfold_splits, plan_repeats
from ._rows import (NOT_SERIALISED, REQUIRED, UNSET, CompareRow, extraction_costs, ranking_key,
                    uncertainty_summary)
from ._tuning import CALIBRATION_METHODS, TUNERS, calibrated, depth_tune, grid_tune, race_tune
from ._uncertainty import (ALPHA, CALIBRATION_BINS, METRICS, N_RESAMPLES, bootstrap_intervals,
                           coverage_curve, coverage_points, expected_calibration_error, holm,
                           mcnemar, reliability_bins, repeated_interval)

__all__ = [
    "ALPHA", "CALIBRATION_BINS", "CALIBRATION_METHODS", "CLASSIFIERS", "COST_ORDER",
    "ClassifierSpec", "CompareRow", "FitResult", "METRICS", "NOT_SERIALISED", "N_RESAMPLES",
    "REQUIRED", "Repeat", "RepeatPlan", "SUMMARY_METRICS", "TRUST_WARNING", "TUNERS",
    "TUNINGS", "UNSET", "bootstrap_intervals", "calibrated", "check_names", "class_scores",
    "classification_metrics", "classifier_metadata", "classifier_names", "compare",
    "compare_repeated", "compare_rows", "coverage_curve", "coverage_points", "depth_tune",
    "evaluate", "expected_calibration_error", "extraction_costs", "feature_source",
    "fit_and_score", "fit_classifier", "grid_tune", "holm", "kfold_splits", "load_model",
    "make_classifier", "mcnemar", "plan_repeats", "predict_probabilities", "race_tune",
    "ranking_key", "read_metadata", "reliability_bins", "repeated_interval", "save_model",
    "significance", "summary_metrics", "uncertainty_summary",
]
