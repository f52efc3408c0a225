"""How far a score can be trusted: intervals, paired tests, calibration, abstention.

Everything here works on predictions that are already computed (labels, top-label
confidences), so it costs milliseconds, never a forward pass or a refit.

- :func:`score_intervals`: intervals of accuracy (exact binomial), balanced accuracy and
  macro-F1 (the same at an effective sample size) that stay honest at 0 and 1.
- :func:`mcnemar` and :func:`holm`: is one classifier better than another on the same images?
- :func:`expected_calibration_error` and :func:`reliability_bins`: do the probabilities mean
  what they say?
- :func:`coverage_curve`: what abstaining below a score threshold buys.
"""

from __future__ import annotations


import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
CONFIDENCE = 0.95
INTERVAL_METHODS = {
    "accuracy": "exact binomial (Clopper-Pearson)",
    "balanced_accuracy": "Clopper-Pearson at the Kish effective sample size (Korn-Graubard)",
    "macro_f1": "Clopper-Pearson at the Kish effective sample size (Korn-Graubard)",
}
ALPHA = 0.05
CALIBRATION_BINS = 15
COVERAGE_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


# ----- intervals ---------------------------------------------------------------------

def proportion_interval(successes, n, confidence: float = CONFIDENCE) -> list[float]:
    """Exact binomial (Clopper-Pearson) interval of a proportion: its coverage is at least
    ``confidence`` at every true proportion, 0 and 1 included.

    ``successes`` and ``n`` may be fractional (an effective sample size); the beta quantiles
    that define the interval take them as they are.
    """
    from scipy.stats import beta

    tail = (1 - confidence) / 2
    low = 0.0 if successes <= 0 else float(beta.ppf(tail, successes, n - successes + 1))
    high = 1.0 if successes >= n else float(beta.ppf(1 - tail, successes + 1, n - successes))
    return [low, high]


def score_intervals(y_true, y_pred, n_classes: int, *, confidence: float = CONFIDENCE,
                    images=None) -> dict[str, list]:
    """95% interval of each metric over the evaluation images, honest at 0 and 1 too.

    Each metric is a weighted share of correctly labelled images (:func:`metric_weights`):
    accuracy weighs every image alike, so its interval is the exact binomial
    (Clopper-Pearson) one; balanced accuracy and macro-F1 weigh images by their classes,
    and get the Clopper-Pearson interval at the Kish effective sample size (Korn and
    Graubard, 1998). None of them collapses to a point when every image is right (or wrong),
    and each contains its point estimate, scikit-learn's figure.

    Parameters
    ----------
    y_true, y_pred : array-like of int of shape (n,)
    n_classes : int
    confidence : float
    images : array-like of shape (n,), optional
        Which image each row is. An image evaluated several times (in several repeats)
        weighs 1 in all, shared evenly among its rows, and counts as one unit of the
        sample size, so repeats of the same images do not pass for independent evidence.

    Returns
    -------
    dict
        ``{metric: [low, high]}`` for :data:`METRICS`.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        raise ValueError("no evaluation rows to score")
    images = np.arange(len(y_true)) if images is None else np.asarray(images)
    _, unit, evaluations = np.unique(images, return_inverse=True, return_counts=True)
    share = 1.0 / evaluations[unit]
    correct = (y_true == y_pred).astype(float)
    out = {}
    for name, weight in metric_weights(y_true, y_pred, n_classes, share).items():
        per_image = np.bincount(unit, weights=weight)
        right = np.bincount(unit, weights=weight * correct)
        total = per_image.sum()
        point = right.sum() / total
        n_effective = total ** 2 / np.square(per_image).sum()
        low, high = proportion_interval(point * n_effective, n_effective, confidence)
        out[name] = [min(low, point), max(high, point)]
    return out


def metric_weights(y_true, y_pred, n_classes: int, share=None) -> dict[str, np.ndarray]:
    """How much each row counts in each metric, as a weighted share of right rows.

    Accuracy: ``share`` (1 per row by default). Balanced accuracy: share / (classes with
    true rows x the row's class size). Macro-F1: class c's F1 is TP / (TP + (FP + FN) / 2),
    so a right row counts 1 / (classes involved x m) for its class's m = (support +
    predicted) / 2, and a wrong row half that for its true class plus half for its
    predicted class. The weighted share of right rows is then exactly scikit-learn's
    balanced accuracy and macro-F1.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    share = np.ones(len(y_true)) if share is None else np.asarray(share, dtype=float)
    support = np.bincount(y_true, weights=share, minlength=n_classes)
    predicted = np.bincount(y_pred, weights=share, minlength=n_classes)
    present = int((support > 0).sum())
    half_total = (support + predicted) / 2
    involved = int((half_total > 0).sum())
    per_class = np.divide(1.0, involved * half_total, out=np.zeros(n_classes),
                          where=half_total > 0)
    right = y_true == y_pred
    f1_weight = np.where(right, per_class[y_true],
                         (per_class[y_true] + per_class[y_pred]) / 2)
    return {"accuracy": share,
            "balanced_accuracy": share / (present * support[y_true]),
            "macro_f1": share * f1_weight}


def repeated_interval(per_repeat: list[tuple], n_classes: int, *,
                      confidence: float = CONFIDENCE) -> dict[str, list]:
    """Interval of the mean over repeats, counting each distinct image once.

    ``per_repeat``: one ``(rows, y_true, y_pred)`` per repeat, ``rows`` identifying the
    images evaluated (an image may be evaluated in several repeats): :func:`score_intervals`
    on every evaluation, with ``images`` set, so repeats that share images do not pass for
    independent evidence. The spread between repeats (training variation) is reported
    separately. Each interval also contains the mean over repeats.
    """
    out = score_intervals(np.concatenate([t for _, t, _ in per_repeat]),
                          np.concatenate([p for _, _, p in per_repeat]), n_classes,
                          confidence=confidence,
                          images=np.concatenate([r for r, _, _ in per_repeat]))
    means = np.mean([list(point_metrics(t, p, n_classes).values()) for _, t, p in per_repeat],
                    axis=0)
    for name, mean in zip(METRICS, means):
        out[name] = [min(out[name][0], float(mean)), max(out[name][1], float(mean))]
    return out


def point_metrics(y_true, y_pred, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1: scikit-learn's figures, from
    :func:`metric_weights` (without the warnings a class missing from a tiny set raises)."""
    right = np.asarray(y_true) == np.asarray(y_pred)
    return {name: float((weight * right).sum() / weight.sum())
            for name, weight in metric_weights(y_true, y_pred, n_classes).items()}


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
