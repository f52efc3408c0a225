"""Linear probe on cached embeddings vs fine-tuning: accuracy and wall time.

Same data, same split (stratified, --val-fraction, --seed), same backbone and weights:

  probe            extract embeddings (fresh cache) + softmax regression on the train rows
  probe+views      the same, plus K augmented views of every training image in the cache
                   (--probe-views K; 0 skips it)
  finetune         two-stage fine-tuning without augmentation
  finetune+aug     two-stage fine-tuning with the default augmentation

Scores are on the validation split. Fine-tuning also picks its best epoch on that split,
which flatters it slightly; the probe never sees the validation rows.

Usage:
    python benchmarks/finetune.py [--data $FEATX_DOGCAT] [--backbone efficientnet_lite0]
Quick check on a tiny folder:
    python benchmarks/finetune.py --data DIR --backbone mobilenet_v2 --weights random \
        --input-size 32 --warmup-epochs 1 --epochs 1 --probe-views 1
Prints a markdown table and writes JSON (default benchmarks/results/finetune.json).
Expect roughly 15 minutes on dogcat with two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import featx  # noqa: E402
from featx.classifiers import classification_metrics  # noqa: E402
from featx.extraction import extract  # noqa: E402
from featx.finetuning import finetune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "finetune.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("FEATX_DOGCAT"),
                        help="Image folder [default: $FEATX_DOGCAT].")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--unfreeze", default="20", help="Layers to unfreeze, or 'all'.")
    parser.add_argument("--lr-head", type=float, default=1e-3)
    parser.add_argument("--lr-base", type=float, default=1e-5)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--probe-views", type=int, default=3,
                        help="Augmented views per training image for probe+views (0: skip).")
    parser.add_argument("--no-tune", action="store_true",
                        help="Fit the probe with default C instead of a CV grid.")
    parser.add_argument("--only", default="probe,probe+views,finetune,finetune+aug",
                        help="Comma-separated subset of the methods to run.")
    parser.add_argument("--work-dir", default=None,
                        help="Cache and models go here [default: a temporary folder, removed].")
    parser.add_argument("--json-out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not args.data or not Path(args.data).is_dir():
        parser.error("--data (or $FEATX_DOGCAT) must name an image folder")
    if args.unfreeze != "all":
        args.unfreeze = int(args.unfreeze)
    return args


def fit_probe(X, y, seed, tune):
    """Softmax regression from featx.classifiers, or sklearn's if that module is absent."""
    start = time.perf_counter()
    try:
        from featx.classifiers import fit_classifier
    except ImportError:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(X, y)
        return model, time.perf_counter() - start
    fit = fit_classifier("softmax", X, y, tune=tune, seed=seed)
    return fit.estimator, time.perf_counter() - start


def run_probe(args, cache_dir, views: int, label: str) -> dict:
    common = dict(backbone=args.backbone, weights=args.weights, input_size=args.input_size,
                  batch_size=args.batch_size, cache_dir=cache_dir,
                  val_fraction=args.val_fraction, seed=args.seed, progress=False)
    features = extract(args.data, **common)
    extract_seconds = features.stats.seconds
    if views:
        features = extract(args.data, augment=views, **common)
        extract_seconds += features.stats.seconds
    X, y = features.arrays("train", views=bool(views))
    model, fit_seconds = fit_probe(X, y, args.seed, not args.no_tune)
    Xv, yv = features.arrays("val")
    start = time.perf_counter()
    pred = model.predict(Xv)
    predict_seconds = time.perf_counter() - start
    scores = classification_metrics(yv, pred, features.class_names)
    return {"method": label, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
            "seconds": extract_seconds + fit_seconds, "extract_seconds": extract_seconds,
            "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
            "n_train_rows": int(len(y)), "n_val": int(len(yv)), "views": views,
            "weights_id": features.weights_id}


def run_finetune(args, cache_dir, out_dir, augment: bool, label: str) -> dict:
    result = finetune(args.data, backbone=args.backbone, weights=args.weights,
                      input_size=args.input_size, val_fraction=args.val_fraction,
                      seed=args.seed, cache_dir=cache_dir, warmup_epochs=args.warmup_epochs,
                      epochs=args.epochs, unfreeze=args.unfreeze, lr_head=args.lr_head,
                      lr_base=args.lr_base, batch_size=args.batch_size,
                      patience=args.patience, augment=augment, out=out_dir,
                      name=f"bench-{label.replace('+', '-')}", progress=False)
    return {"method": label, "accuracy": result.val_accuracy, "macro_f1": result.val_macro_f1,
            "seconds": result.seconds, "train_seconds": result.train_seconds,
            "epochs_run": result.epochs_run, "stage1_epochs": result.stage1_epochs,
            "best_epoch": result.best_epoch, "split_source": result.split_source,
            "trainable_params": result.trainable_params, "n_train": result.split_counts["train"],
            "n_val": result.split_counts["val"], "weights_id": result.weights_id}


def markdown(rows) -> str:
    lines = ["| method | val accuracy | val macro-F1 | wall time (s) | detail |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["method"].startswith("probe"):
            detail = (f"extract {r['extract_seconds']:.1f} s + fit {r['fit_seconds']:.1f} s, "
                      f"{r['n_train_rows']} train rows")
        else:
            detail = (f"train {r['train_seconds']:.1f} s, {r['epochs_run']} epochs "
                      f"({r['stage1_epochs']} head-only), best epoch {r['best_epoch']}")
        lines.append(f"| {r['method']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['seconds']:.1f} | {detail} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    only = {m.strip() for m in args.only.split(",")}
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="featx-bench-ft-"))
    rows = []
    try:
        cache_dir = work / "cache"
        # The first extraction creates the cache, so every method below shares its split.
        if "probe" in only:
            rows.append(run_probe(args, work / "cache-probe", 0, "probe"))
        if "probe+views" in only and args.probe_views > 0:
            rows.append(run_probe(args, cache_dir, args.probe_views,
                                  f"probe+views({args.probe_views})"))
        for augment, label in ((False, "finetune"), (True, "finetune+aug")):
            if label in only:
                rows.append(run_finetune(args, cache_dir, work / "models", augment, label))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.backbone} ({args.weights}) on {args.data}, val fraction "
          f"{args.val_fraction}, seed {args.seed}\n")
    print(markdown(rows))
    report = {
        "benchmark": "finetune",
        "data": str(Path(args.data).resolve()),
        "backbone": args.backbone,
        "weights": args.weights,
        "args": {k: v for k, v in vars(args).items() if k != "json_out"},
        "featx_version": featx.__version__,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=lambda v: v.item()
                              if isinstance(v, np.generic) else str(v)))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
