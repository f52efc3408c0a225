"""A tuned `compare` of all five classifiers: featx 0.1's exhaustive search vs the fast one.

Data sets:
- synthetic: 100 classes, 3000 training rows (30 per class) and 2000 evaluation rows of
  1280 non-negative columns (class means in a 64-d latent space through a random
  projection and softplus, plus sparse class-specific channels), the shape of Lite0
  features of a 100-class photo set; seeded.
- dogcat: Lite0 ImageNet features of $FEATX_DOGCAT (--data), its own train/val split;
  extracted into --cache-dir on the first run, reused afterwards.

Tuning policies, each a full compare (tuned; the same evaluation rows):
- exhaustive: featx 0.1: every grid candidate on 5 folds, classifiers one after another.
- fewer-folds: 2 folds from 2000 training rows (LARGE_CV in featx.classifiers._tuning); every
  candidate on every fold, trees too; one process.
- fast: the default: fewer folds, candidates raced (a clearly worse one stops after the
  first fold, featx.classifiers.race_tune), trees tuned by depth truncation on a quarter of
  the features, classifiers fitted side by side on every usable core.

Each classifier's accuracy is compared with the exhaustive search's (target: within 0.005)
and the total wall time with the 30 s target. Intervals (2000 bootstrap resamples) and the
calibration summary are part of every row, so their cost is in the totals.

Usage:
    python benchmarks/classifiers.py [--data $FEATX_DOGCAT] [--policies exhaustive fast] [--runs N]
Prints a table and writes JSON (benchmarks/results/classifiers.json by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featx import classifiers  # noqa: E402
from featx.classifiers import classifier_names, compare_rows  # noqa: E402
from _results import write_results  # noqa: E402  (benchmarks/, the script's folder)

POLICIES = ("exhaustive", "fewer-folds", "fast")


class ArrayFeatures:
    """The slice of featx's Features that compare_rows needs, over in-memory arrays."""

    backbone, weights, weights_id, precision = "synthetic", "none", None, "fp32"

    def __init__(self, X, y, n_train):
        self.X, self.labels = X, y
        self.class_names = [f"class{i:03d}" for i in range(int(y.max()) + 1)]
        self.paths = np.array([f"row{i:05d}" for i in range(len(y))])
        self.sha256 = self.paths
        self.split = np.where(np.arange(len(y)) < n_train, "train", "val")

    def indices(self, split, views=False):
        return np.flatnonzero(self.split == split)

    def take(self, idx):
        return self.X[idx], self.labels[idx]


def synthetic(n_classes=100, per_class=30, eval_per_class=20, dim=1280, latent=64, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, latent))
    projection = rng.normal(size=(latent, dim)) / np.sqrt(latent)
    signature = np.stack([rng.choice(dim, 24, replace=False) for _ in range(n_classes)])

    def draw(k):
        y = np.repeat(np.arange(n_classes), k)
        z = means[y] + 2.0 * rng.normal(size=(len(y), latent))
        x = np.log1p(np.exp(z @ projection + 0.5 * rng.normal(size=(len(y), dim))))
        fire = rng.random((len(y), 24)) < 0.35
        x[np.arange(len(y))[:, None], signature[y]] += fire * rng.exponential(2.0, (len(y), 24))
        return x.astype(np.float32), y

    (X_train, y_train), (X_eval, y_eval) = draw(per_class), draw(eval_per_class)
    return ArrayFeatures(np.concatenate([X_train, X_eval]), np.concatenate([y_train, y_eval]),
                         len(y_train))


def dogcat(data, cache_dir):
    from featx.extraction import extract

    return extract(data, cache_dir=cache_dir, progress=False)


def run_policy(features, policy) -> dict:
    saved, tuners = classifiers.CLASSIFIERS["tree"], dict(classifiers.TUNERS)
    if policy == "fewer-folds":
        classifiers.CLASSIFIERS["tree"] = dataclasses.replace(saved, tuner="grid")
        classifiers.TUNERS["race"] = classifiers.grid_tune  # every candidate, every fold
    try:
        started = time.perf_counter()
        rows = compare_rows(features, classifier_names(), features.indices("train"),
                            features.indices("val"), seed=42,
                            tuning="exhaustive" if policy == "exhaustive" else "fast",
                            n_jobs=1 if policy != "fast" else None)
        total = time.perf_counter() - started
    finally:
        classifiers.CLASSIFIERS["tree"] = saved
        classifiers.TUNERS.update(tuners)
    return {"policy": policy, "total_seconds": total, "rows": [
        {"clf": r["clf"], "accuracy": r["accuracy"], "interval": r["intervals"]["accuracy"],
         "fit_seconds": r["fit_seconds"], "cv_splits": r["cv_splits"],
         "best_params": r["best_params"], "ece": r["ece"]} for r in rows]}


def print_table(name, runs):
    reference = {r["clf"]: r for r in runs[0]["rows"]}
    print(f"\n{name}: accuracy (fit s) per policy; delta vs {runs[0]['policy']}")
    print(f"{'classifier':<10}" + "".join(f"{run['policy']:>34}" for run in runs))
    for clf in reference:
        cells = []
        for run in runs:
            row = next(r for r in run["rows"] if r["clf"] == clf)
            delta = row["accuracy"] - reference[clf]["accuracy"]
            cells.append(f"{row['accuracy']:.4f} ({row['fit_seconds']:6.1f} s) {delta:+.4f}")
        print(f"{clf:<10}" + "".join(f"{c:>34}" for c in cells))
    print(f"{'total s':<10}" + "".join(f"{run['total_seconds']:>34.1f}" for run in runs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("FEATX_DOGCAT"))
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--runs", type=int, default=1,
                        help="Runs of each policy (the table shows the first; totals min / "
                        "median / max over all)")
    parser.add_argument("--out", default="benchmarks/results/classifiers.json")
    args = parser.parse_args(argv)

    sets = [("synthetic 3000x1280, 100 classes", synthetic())]
    if args.data:
        sets.append((f"dogcat Lite0 ({args.data})", dogcat(args.data, args.cache_dir)))
    load_before = os.getloadavg()
    results = []
    for name, features in sets:
        runs = [run_policy(features, policy) for policy in args.policies
                for _ in range(args.runs)]
        print_table(name, [r for i, r in enumerate(runs) if i % args.runs == 0])
        for policy in args.policies:
            totals = [r["total_seconds"] for r in runs if r["policy"] == policy]
            print(f"{policy}: total s over {len(totals)} run(s): min {min(totals):.1f} / "
                  f"median {statistics.median(totals):.1f} / max {max(totals):.1f}")
        results.append({"data": name, "n_train": int(len(features.indices("train"))),
                        "n_eval": int(len(features.indices("val"))),
                        "n_classes": len(features.class_names), "runs": runs})
    write_results(args.out, {"sets": results}, load_before)


if __name__ == "__main__":
    main()
