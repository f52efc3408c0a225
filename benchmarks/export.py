"""`featx export`: file sizes, single-image CPU latency and parity with `featx predict`.

For each data set (--data, default $FEATX_DOGCAT, and scikit-learn's digits written as
PNGs, 10 classes) and each linear classifier: `featx fit` on fp32 features (Lite0 ImageNet
weights, tuned) exported as ONNX fp32, ONNX int8 and Keras fp32, and `featx fit --precision
int8` exported as ONNX int8; each file checked against `featx predict` of its model on the
validation images (featx.deploy.check_export): label agreement and score differences. These
are the measurements the int8 bound in featx/deploy.py comes from.

Latency (first data set, first classifier): one image (1, S, S, 3) uint8 through each
exported file with its own runtime alone (onnxruntime, Keras), after 10 warm-up calls;
--rounds rounds, each timing --runs calls of every file in turn, so a slow period of the
machine shows in all of them; min / median / max over all calls and the int8/fp32 ratio of
each round's medians.

Usage:
    python benchmarks/export.py [--data $FEATX_DOGCAT] [--clf softmax logistic svm]
Prints tables and writes JSON (benchmarks/results/export.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featx import __version__, api  # noqa: E402
from featx.deploy import ExportedRunner, check_export, export_model  # noqa: E402
from featx.data import write_digits  # noqa: E402

# (features the model is fitted on, export format, export precision)
VARIANTS = (("fp32", "onnx", "fp32"), ("fp32", "onnx", "int8"), ("fp32", "keras", "fp32"),
            ("int8", "onnx", "int8"))


def summary(values) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def exports_of(name, data, clfs, work: Path) -> list[dict]:
    rows = []
    for clf in clfs:
        fitted = {p: api.fit(data, clf, out=work / f"models-{p}", cache_dir=work / "cache",
                             precision=p, progress=False) for p in ("fp32", "int8")}
        for fitted_on, fmt, precision in VARIANTS:
            model = fitted[fitted_on]["model"]
            exported = export_model(model, fmt, precision=precision)
            parity = check_export(exported.path, model, data)
            rows.append({"data": name, "clf": clf, "format": fmt, "precision": precision,
                         "path": str(exported.path), "size_mb": exported.size_bytes / 1e6,
                         "export_seconds": exported.seconds, "val_accuracy":
                         fitted[fitted_on]["val_accuracy"], **parity.as_dict()})
            print(f"{name:8} {clf:9} {fmt:6} {precision:5} {exported.size_bytes / 1e6:6.1f} MB "
                  f"{parity.line()}", flush=True)
    return rows


def latency(rows, rounds: int, runs: int) -> dict:
    """Single-image latency of each exported file of the first (data, clf)."""
    first = [r for r in rows if (r["data"], r["clf"]) == (rows[0]["data"], rows[0]["clf"])]
    runners = {_label(r): ExportedRunner(r["path"]) for r in first}
    size = next(iter(runners.values())).metadata["input"]["shape"][1]
    image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    for runner in runners.values():
        for _ in range(10):
            runner(image)
    times = {name: [] for name in runners}
    round_medians = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            these = []
            for _ in range(runs):
                start = time.perf_counter()
                runner(image)
                these.append((time.perf_counter() - start) * 1000)
            times[name].extend(these)
            round_medians[name].append(statistics.median(these))
    out = {name: {"ms": summary(values), "round_medians_ms": round_medians[name]}
           for name, values in times.items()}
    for label in (label for label in runners if label.startswith("onnx int8")):
        ratios = [f / i for f, i in zip(round_medians["onnx fp32"], round_medians[label])]
        out[f"speed-up of {label} over onnx fp32"] = summary(ratios)
    out["data"], out["clf"] = first[0]["data"], first[0]["clf"]
    return out


def _label(row) -> str:
    """"onnx fp32", "onnx int8 (fitted fp32)", ...: the file and, when they differ, the
    precision of the features the model was fitted on."""
    label = f"{row['format']} {row['precision']}"
    return label if row["fitted_on"] == row["precision"] else f"{label} (fitted {row['fitted_on']})"


def print_tables(rows, lat):
    print(f"\n{'data':8} {'clf':9} {'file':24} {'MB':>6} {'val acc':>8} {'agree':>7} "
          f"{'max diff':>9} {'mean diff':>9}")
    for r in rows:
        print(f"{r['data']:8} {r['clf']:9} {_label(r):24} "
              f"{r['size_mb']:6.1f} {r['val_accuracy']:8.4f} {r['agreement']:7.2%} "
              f"{r['max_score_diff']:9.2e} {r['mean_score_diff']:9.2e}")
    print(f"\nsingle-image latency, {lat['data']} {lat['clf']} (ms: min / median / max)")
    for name, value in lat.items():
        if isinstance(value, dict) and "ms" in value:
            ms = value["ms"]
            print(f"  {name:24} {ms['min']:7.2f} {ms['median']:7.2f} {ms['max']:7.2f}")
    for name, s in lat.items():
        if name.startswith("speed-up"):
            print(f"  {name}, per round: {s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FEATX_DOGCAT"))
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--clf", nargs="+", default=["softmax", "logistic", "svm"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "export.json"))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="featx-export-bench-") as tmp:
        work = Path(tmp)
        sets = [("dogcat", Path(args.data))] if args.data else []
        if not args.no_digits:
            sets.append(("digits", write_digits(work / "digits")))
        rows = []
        for name, data in sets:
            rows += exports_of(name, data, args.clf, work / name)
        lat = latency(rows, args.rounds, args.runs)
    result = {"featx_version": __version__, "backbone": "efficientnet_lite0 (ImageNet)",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "exports": rows, "latency": lat}
    print_tables(rows, lat)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}; load average before {load_before[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
