"""Coverage of featx's 95% intervals at and near the edges, against the percentile bootstrap.

A simulated classifier is right with probability p on each of n images (its errors spread
evenly over the other classes). For each (p, n), --trials data sets are drawn and each
interval method is scored on how often it contains the true figure (coverage; 95% is the
target) and on its mean width:

  accuracy  featx's exact binomial (Clopper-Pearson) interval, and the percentile bootstrap
            featx used before (2000 resamples of the n images)
  balanced accuracy, macro-F1
            featx's interval (Clopper-Pearson at the Kish effective sample size) on four
            unequal classes (n split 2/8/30/60%), the true value computed from the
            population confusion matrix

Usage:
    python benchmarks/intervals.py [--trials 2000]
Prints a table and writes JSON (benchmarks/results/intervals.json by default).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import write_results  # noqa: E402  (benchmarks/, the script's folder)
from featx.classifiers import score_intervals  # noqa: E402

ACCURACIES = (0.5, 0.9, 0.99, 0.999)
SIZES = (100, 256, 500)
CLASS_SHARES = (0.02, 0.08, 0.30, 0.60)
RESAMPLES = 2000


def _accuracy_row(p, n, trials, rng):
    """Coverage and mean width of both accuracy intervals over ``trials`` data sets."""
    successes = rng.binomial(n, p, trials)
    exact, bootstrap = [], []
    for k in successes:
        y_pred = (np.arange(n) >= k).astype(int)
        exact.append(score_intervals(np.zeros(n, int), y_pred, 2)["accuracy"])
        resampled = rng.binomial(n, k / n, RESAMPLES) / n  # resampling n images, k right
        bootstrap.append(np.percentile(resampled, [2.5, 97.5]))
    return {"p": p, "n": n, **_scored("exact", exact, p), **_scored("bootstrap", bootstrap, p)}


def _scored(name, intervals, truth):
    intervals = np.asarray(intervals)
    covered = (intervals[:, 0] <= truth) & (truth <= intervals[:, 1])
    return {f"{name}_coverage": float(covered.mean()),
            f"{name}_width": float((intervals[:, 1] - intervals[:, 0]).mean())}


def _class_weighted_row(p, n, trials, rng):
    sizes = np.maximum(1, np.round(np.asarray(CLASS_SHARES) * n)).astype(int)
    y_true = np.repeat(np.arange(len(sizes)), sizes)
    truth = {"balanced_accuracy": p, "macro_f1": _population_macro_f1(p, sizes)}
    got = {metric: [] for metric in truth}
    for _ in range(trials):
        right = rng.random(len(y_true)) < p
        wrong_class = (y_true + rng.integers(1, len(sizes), len(y_true))) % len(sizes)
        intervals = score_intervals(y_true, np.where(right, y_true, wrong_class), len(sizes))
        for metric in truth:
            got[metric].append(intervals[metric])
    row = {"p": p, "n": int(len(y_true)), "sizes": sizes.tolist()}
    for metric, value in truth.items():
        row.update(_scored(metric, got[metric], value))
    return row


def _population_macro_f1(p, sizes):
    support = np.asarray(sizes, dtype=float)
    missed = support * (1 - p)
    wrongly_predicted = (missed.sum() - missed) / (len(sizes) - 1)
    hits = support * p
    return float(np.mean(2 * hits / (2 * hits + missed + wrongly_predicted)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/intervals.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    accuracy = [_accuracy_row(p, n, args.trials, rng) for n in SIZES for p in ACCURACIES]
    weighted = [_class_weighted_row(p, n, args.trials, rng) for n in SIZES for p in ACCURACIES]
    print(f"accuracy, {args.trials} simulated data sets per row: coverage (mean width)")
    print(f"{'n':>5} {'p':>6} {'exact (featx)':>22} {'percentile bootstrap':>22}")
    for r in accuracy:
        print(f"{r['n']:>5} {r['p']:>6} {r['exact_coverage']:>13.3f} ({r['exact_width']:.4f})"
              f" {r['bootstrap_coverage']:>13.3f} ({r['bootstrap_width']:.4f})")
    print(f"\nfour unequal classes ({', '.join(f'{s:.0%}' for s in CLASS_SHARES)} of n): "
          "coverage (mean width)")
    print(f"{'n':>5} {'p':>6} {'balanced accuracy':>22} {'macro-F1':>22}")
    for r in weighted:
        print(f"{r['n']:>5} {r['p']:>6} {r['balanced_accuracy_coverage']:>13.3f} "
              f"({r['balanced_accuracy_width']:.4f}) {r['macro_f1_coverage']:>13.3f} "
              f"({r['macro_f1_width']:.4f})")
    write_results(args.out, {"trials": args.trials, "seed": args.seed, "resamples": RESAMPLES,
                             "accuracy": accuracy, "class_weighted": weighted}, load_before)


if __name__ == "__main__":
    main()
