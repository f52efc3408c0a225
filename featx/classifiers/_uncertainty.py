"""How far a score can be trusted: bootstrap intervals, paired tests, calibration, abstention.

Everything here works on predictions that are already computed (labels, top-label
confidences), so it costs milliseconds, never a forward pass or a refit.

- :func:`bootstrap_intervals`: percentile intervals of accuracy, balanced accuracy and
  macro-F1, resampling the evaluation images (seeded).
- :func:`mcnemar` and :func:`holm`: is one classifier better than another on the same images?
- :func:`expected_calibration_error` and :func:`reliability_bins`: do the probabilities mean
  what they say?
- :func:`coverage_curve`: what abstaining below a score threshold buys.
"""

from __future__ import annotations

import warnings

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
N_RESAMPLES = 2000
CONFIDENCE = 0.95
ALPHA = 0.05
CALIBRATION_BINS = 15
COVERAGE_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
# Resamples drawn at once: bounds the (chunk, n) count matrices (5M cells, ~40 MB int64).
_CHUNK_CELLS = 5_000_000


# ----- intervals ---------------------------------------------------------------------

def resampled_metrics(y_true, y_pred, n_classes: int, counts) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 of each resample, all at once.

    ``counts`` (B, n) says how many times each row is drawn in each resample; per-class
    counts are sums over the rows of each class (O(B n), whatever the number of classes).
    Balanced accuracy averages recall over the classes present in that resample's true
    labels and macro-F1 averages F1 over the classes present in its true or predicted
    labels: scikit-learn's definitions, so a resample equal to the data gives
    scikit-learn's numbers.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float32)
    hit = y_true == y_pred
    support = _class_sums(counts, y_true, n_classes)
    predicted = _class_sums(counts, y_pred, n_classes)
    correct = _class_sums(counts[:, hit], y_true[hit], n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, correct / support, np.nan)
        involved = (support + predicted) > 0
        f1 = np.where(involved, 2 * correct / (support + predicted), np.nan)
        accuracy = counts[:, hit].sum(axis=1) / counts.sum(axis=1)
    return {"accuracy": accuracy,
            "balanced_accuracy": np.nanmean(recall, axis=1),
            "macro_f1": np.nanmean(f1, axis=1)}


def _class_sums(counts, labels, n_classes) -> np.ndarray:
    """(B, n_classes): the sum of ``counts`` over the rows of each class."""
    out = np.zeros((counts.shape[0], n_classes), dtype=np.float32)
    if len(labels) == 0:
        return out
    order = np.argsort(labels, kind="stable")
    present, starts = np.unique(labels[order], return_index=True)
    out[:, present] = np.add.reduceat(counts[:, order], starts, axis=1)
    return out


def bootstrap_intervals(y_true, y_pred, n_classes: int, *, n_resamples: int = N_RESAMPLES,
                        confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, list]:
    """Percentile bootstrap interval of each metric over the evaluation images.

    Parameters
    ----------
    y_true, y_pred : array-like of int of shape (n,)
    n_classes : int
    n_resamples : int
        Resamples of n images drawn with replacement (at least 1000 for a 95% interval).
    confidence : float
    seed : int
        The same seed gives the same intervals, and the same resamples for every
        classifier scored on the same images (so their intervals are comparable).

    Returns
    -------
    dict
        ``{metric: [low, high]}`` for :data:`METRICS`.
    """
    if len(y_true) == 0:
        raise ValueError("no evaluation rows to resample")
    one_repeat = (np.arange(len(y_true)), y_true, y_pred)
    return repeated_interval([one_repeat], n_classes, n_resamples=n_resamples,
                             confidence=confidence, seed=seed)


def _resample_counts(n, n_resamples, seed):
    """Chunks of (B, n) draw counts: B resamples of n rows with replacement, seeded."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        drawn = rng.integers(0, n, size=(size, n)) + (np.arange(size) * n)[:, None]
        yield np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n)


def repeated_interval(per_repeat: list[tuple], n_classes: int, *,
                      n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                      seed: int = 0) -> dict[str, list]:
    """Interval of the mean over repeats, by a paired bootstrap over images (with one
    repeat, :func:`bootstrap_intervals`).

    ``per_repeat``: one ``(rows, y_true, y_pred)`` per repeat, ``rows`` identifying the
    images evaluated (an image may be evaluated in several repeats). Each resample draws
    the distinct images once, with replacement, and gives every repeat's copy of an image
    the same weight, so repeats that share images do not pass for independent evidence.
    The spread between repeats (training variation) is reported separately.
    """
    images = np.unique(np.concatenate([np.asarray(rows) for rows, _, _ in per_repeat]))
    positions = [np.searchsorted(images, rows) for rows, _, _ in per_repeat]
    means = {name: [] for name in METRICS}
    for counts in _resample_counts(len(images), n_resamples, seed):
        scores = [resampled_metrics(y_true, y_pred, n_classes, counts[:, where])
                  for where, (_, y_true, y_pred) in zip(positions, per_repeat)]
        for name in METRICS:
            with warnings.catch_warnings():  # a repeat none of whose images was drawn
                warnings.simplefilter("ignore", RuntimeWarning)
                means[name].append(np.nanmean([s[name] for s in scores], axis=0))
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name in METRICS:
        values = np.concatenate(means[name])
        out[name] = [float(np.nanpercentile(values, tail)),
                     float(np.nanpercentile(values, 100 - tail))]
    return out


# ----- paired tests ------------------------------------------------------------------

def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test of two classifiers on the same images.

    Parameters
    ----------
    correct_a, correct_b : array-like of bool, aligned by image

    Returns
    -------
    dict
        ``a_only`` (images only A got right), ``b_only``, ``p_value`` (two-sided exact
        binomial test on the discordant images; 1.0 when there are none).
    """
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(min(a_only, b_only), discordant, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": min(p, 1.0)}


def holm(p_values, alpha: float = ALPHA) -> list[bool]:
    """Holm's step-down correction: which of several p-values are significant together."""
    order = np.argsort(p_values)
    significant = [False] * len(p_values)
    m = len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (m - rank):
            break
        significant[int(i)] = True
    return significant


# ----- calibration -------------------------------------------------------------------

def reliability_bins(confidence, correct, n_bins: int = CALIBRATION_BINS) -> list[dict]:
    """Equal-width bins of top-label confidence: ``low``, ``high``, ``count``,
    ``confidence`` (mean) and ``accuracy`` per non-empty bin."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = which == b
        if members.any():
            bins.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                         "count": int(members.sum()),
                         "confidence": float(confidence[members].mean()),
                         "accuracy": float(correct[members].mean())})
    return bins


def expected_calibration_error(confidence, correct, n_bins: int = CALIBRATION_BINS) -> float:
    """Count-weighted mean gap between confidence and accuracy over the bins (0 = calibrated)."""
    bins = reliability_bins(confidence, correct, n_bins)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)


# ----- abstention --------------------------------------------------------------------

def coverage_points(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """The whole coverage curve: (coverage, accuracy on the answered images) at every
    distinct score, highest first (images with equal scores are answered together)."""
    order = np.argsort(-np.asarray(confidence, dtype=float), kind="stable")
    ranked = np.asarray(confidence, dtype=float)[order]
    hits = np.cumsum(np.asarray(correct, dtype=bool)[order])
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
    answered = ends + 1
    return answered / len(ranked), hits[ends] / answered


def coverage_curve(confidence, correct, thresholds=COVERAGE_THRESHOLDS) -> list[dict]:
    """Answering only when the top score is at least t: ``threshold``, ``coverage`` (share
    answered), ``accuracy`` on the answered images (None when none is) and ``answered``."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    rows = []
    for t in thresholds:
        answered = confidence >= t
        n = int(answered.sum())
        rows.append({"threshold": float(t), "coverage": n / len(confidence),
                     "accuracy": float(correct[answered].mean()) if n else None,
                     "answered": n})
    return rows
