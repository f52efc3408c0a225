"""How the cache scales: incremental runs on 1k, 10k and 50k-row caches, memory, Ray vs local.

For each size N, a folder of N small generated JPEGs (48 x 48 noise over a class colour, 10
classes; every file distinct) is extracted cold with a small random-weight model
(MobileNetV2 at 32 px, 1280-d; --runtime auto, i.e. ONNX Runtime fp32, exported once by a
warm-up run before anything is timed, so no run imports TensorFlow). Then, --repeats
times, each as a fresh `featx extract` process (start-up included, as a user pays it):
a rerun with no change, a rerun after adding 10 images, and one after removing those 10.
Peak resident memory is the process's own (ru_maxrss from wait4); a cold run with
--runtime keras (TensorFlow in the process) gives it for the Keras runtime too. `featx
compare --no-tune` on the same cache with --clf tree (scikit-learn fits float32 as given) and
--clf logistic (lbfgs copies the standardised features to float64) gives compare's peak memory
beside the bytes of the embeddings it reads (train + val rows x 1280 x 4), and a process that
does what compare does before any classifier (a warm extract, then the train and val
embeddings read through the API) separates featx's own memory from scikit-learn's.

The Ray part extracts the same folder (sizes in --ray-sizes) with --engine ray on a local
Ray started by featx (--workers cores) into a second cache, reports its wall time beside the
local cold run, and checks that the two caches hold the same rows (sorted by path) and
embeddings (max abs diff). Only the driver's memory is measured there (the actors are
Ray's processes, not featx's children).

Usage:
    python benchmarks/scale.py [--sizes 1000 10000 50000] [--ray-sizes 1000 10000]
                               [--repeats 3] [--workdir /tmp/featx-scale]
Prints a table and writes JSON (benchmarks/results/scale.json by default).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from _results import write_results  # noqa: E402  (benchmarks/, the script's folder)

MODEL = ["--backbone", "mobilenet_v2", "--weights", "random", "--input-size", "32"]
# tree: sklearn fits float32 as it is; logistic: lbfgs works on a float64 copy of the
# standardised features, so its peak shows scikit-learn's copies beside featx's own
COMPARE_CLASSIFIERS = ("tree", "logistic")
CLASSES = 10
FEATX = [sys.executable, "-m", "featx"]
STORE = Path("/tmp/featx-scale-onnx")  # set from --workdir: one ONNX export for every run


def make_images(folder: Path, n: int, start: int = 0, seed: int = 0):
    """``n`` distinct small JPEGs, named img_<start>..., spread over the class folders."""
    import cv2

    rng = np.random.default_rng(seed + start)
    for i in range(start, start + n):
        label = i % CLASSES
        colour = np.array([(label * 25) % 256, (label * 70) % 256, (label * 110) % 256])
        image = np.clip(colour + rng.normal(0, 40, (48, 48, 3)), 0, 255).astype(np.uint8)
        path = folder / f"class{label}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), image)


def run_featx(args) -> dict:
    """Run a featx command in a fresh process: wall seconds, stdout, and its peak RSS in
    MB (wait4 reaps the child and returns its own rusage; ru_maxrss is in KB on Linux)."""
    import threading

    started = time.perf_counter()
    proc = subprocess.Popen(FEATX + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "FEATX_ONNX_STORE": str(STORE)})
    chunks = {}

    def drain(name, stream):
        chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in
               (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"featx {' '.join(args)} failed:\n{chunks['err'].decode()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stdout": chunks["out"].decode()}


def last_json(stdout: str) -> dict:
    import json

    return json.loads(stdout.strip().splitlines()[-1])


def summary(values) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def one_size(n: int, workdir: Path, repeats: int, workers: int) -> dict:
    data, extra = workdir / f"data-{n}", workdir / f"extra-{n}"
    cache = workdir / f"cache-{n}"
    for folder in (data, extra, cache):
        shutil.rmtree(folder, ignore_errors=True)
    make_images(data, n)
    make_images(extra, 10, start=n)
    extract = ["extract", str(data), *MODEL, "--cache-dir", str(cache), "--no-progress",
               "--workers", str(workers), "--json"]
    cold = run_featx(extract)
    record = {"n": n, "cold_seconds": cold["seconds"], "cold_peak_rss_mb": cold["peak_rss_mb"]}
    costs = {"no_change": [], "add_10": [], "remove_10": []}
    rss = {"no_change": [], "add_10": [], "remove_10": []}
    added = sorted(extra.rglob("*.jpg"))
    for _ in range(repeats):
        for step in costs:
            if step == "add_10":
                for path in added:
                    target = data / path.relative_to(extra)
                    shutil.copy2(path, target)
            elif step == "remove_10":
                for path in added:
                    (data / path.relative_to(extra)).unlink()
            outcome = run_featx(extract)
            expected = {"no_change": 0, "add_10": 10, "remove_10": 0}[step]
            assert last_json(outcome["stdout"])["n_extracted"] == expected, outcome["stdout"]
            costs[step].append(outcome["seconds"])
            rss[step].append(outcome["peak_rss_mb"])
    for step in costs:
        record[step] = summary(costs[step])
        record[step + "_peak_rss_mb"] = max(rss[step])
    (index,) = cache.glob("*/*.h5")
    shards = index.with_name(index.name + ".shards")
    record["index_mb"] = index.stat().st_size / 2**20
    record["shards"] = len(list(shards.glob("*.h5")))
    record["shard_mb"] = sum(f.stat().st_size for f in shards.glob("*.h5")) / 2**20
    for clf in COMPARE_CLASSIFIERS:
        compare = run_featx(["compare", str(data), *MODEL, "--cache-dir", str(cache),
                             "--clf", clf, "--no-tune", "--no-progress",
                             "--report-dir", str(workdir / f"report-{n}"), "--json"])
        record[f"compare_{clf}_seconds"] = compare["seconds"]
        record[f"compare_{clf}_peak_rss_mb"] = compare["peak_rss_mb"]
    record["compare_embeddings_mb"] = n * 1280 * 4 / 2**20  # train + val rows it reads
    record["read_peak_rss_mb"] = read_peak_rss(data, cache)
    keras = run_featx(["extract", str(data), *MODEL, "--cache-dir", str(workdir / f"keras-{n}"),
                       "--runtime", "keras", "--no-progress", "--workers", str(workers)])
    record["keras_cold_seconds"] = keras["seconds"]
    record["keras_cold_peak_rss_mb"] = keras["peak_rss_mb"]
    shutil.rmtree(workdir / f"keras-{n}")
    record["cache"] = str(index)
    return record


READ_SCRIPT = """
import resource, sys
import featx
features = featx.extract(sys.argv[1], cache_dir=sys.argv[2], backbone="mobilenet_v2",
                         weights="random", input_size=32, progress=False)
X_train, y_train = features.arrays("train")
X_val, y_val = features.arrays("val")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def read_peak_rss(data: Path, cache: Path) -> float:
    """Peak RSS (MB) of what compare does before any classifier: a warm extract and the
    train and val embeddings read (a fresh process)."""
    out = subprocess.run([sys.executable, "-c", READ_SCRIPT, str(data), str(cache)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "FEATX_ONNX_STORE": str(STORE)})
    return float(out.stdout.strip().splitlines()[-1])


def ray_size(n: int, workdir: Path, workers: int, local_index: str) -> dict:
    from featx.cache import FeatureCache

    data, cache = workdir / f"data-{n}", workdir / f"ray-cache-{n}"
    shutil.rmtree(cache, ignore_errors=True)
    outcome = run_featx(["extract", str(data), *MODEL, "--cache-dir", str(cache),
                         "--no-progress", "--workers", str(workers), "--engine", "ray",
                         "--json"])
    (index,) = cache.glob("*/*.h5")
    sides = []
    for path in (local_index, index):
        with FeatureCache.open(path) as c:
            paths = c.rows()["paths"]
            order = np.argsort(paths)
            sides.append((paths[order], c.embeddings(order)))
    (paths_l, emb_l), (paths_r, emb_r) = sides
    same_rows = bool(np.array_equal(paths_l, paths_r))
    return {"n": n, "ray_seconds": outcome["seconds"],
            "ray_driver_peak_rss_mb": outcome["peak_rss_mb"], "same_rows": same_rows,
            "max_abs_diff": float(np.abs(emb_l - emb_r).max()) if same_rows else None,
            "n_shards": len(list(index.with_name(index.name + ".shards").glob("*.h5")))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--ray-sizes", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/featx-scale"))
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    args.workdir.mkdir(parents=True, exist_ok=True)
    global STORE
    STORE = args.workdir / "onnx-store"
    warm = args.workdir / "warm-up"
    make_images(warm / "data", 20, seed=1)  # the one-off ONNX export, outside every figure
    run_featx(["extract", str(warm / "data"), *MODEL, "--cache-dir", str(warm / "cache"),
               "--no-progress"])
    rows = []
    for n in args.sizes:
        print(f"... {n} images", flush=True)
        rows.append(one_size(n, args.workdir, args.repeats, args.workers))
    ray_rows = []
    for n in args.ray_sizes:
        local = next((r for r in rows if r["n"] == n), None)
        if local is None:
            continue
        print(f"... {n} images on Ray", flush=True)
        ray_rows.append({**ray_size(n, args.workdir, args.workers, local["cache"]),
                         "local_cold_seconds": local["cold_seconds"]})

    fmt = lambda s: f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"  # noqa: E731
    print("\nincremental `featx extract` runs, seconds min / median / max "
          f"({args.repeats} fresh processes each, start-up included)")
    print("| rows | cold s | no change | add 10 | remove 10 | index MB | shards (MB) |")
    print("|---:|---:|---|---|---|---:|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['cold_seconds']:.1f} | {fmt(r['no_change'])} | "
              f"{fmt(r['add_10'])} | {fmt(r['remove_10'])} | {r['index_mb']:.1f} | "
              f"{r['shards']} ({r['shard_mb']:.0f}) |")
    print("\npeak RSS MB of one process")
    print("| rows | extract cold (ONNX) | extract add 10 | extract cold, --runtime keras "
          "(s) | embeddings compare reads | extract + read them | compare --clf tree | "
          "compare --clf logistic |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['cold_peak_rss_mb']:.0f} | {r['add_10_peak_rss_mb']:.0f} | "
              f"{r['keras_cold_peak_rss_mb']:.0f} ({r['keras_cold_seconds']:.1f}) | "
              f"{r['compare_embeddings_mb']:.0f} | {r['read_peak_rss_mb']:.0f} | "
              f"{r['compare_tree_peak_rss_mb']:.0f} | {r['compare_logistic_peak_rss_mb']:.0f} |")
    small, large = rows[0], rows[-1]
    ratio = large["add_10"]["median"] / small["add_10"]["median"]
    rss_growth = large["cold_peak_rss_mb"] / small["cold_peak_rss_mb"] - 1
    keras_growth = large["keras_cold_peak_rss_mb"] / small["keras_cold_peak_rss_mb"] - 1
    print(f"\nadding 10 to {large['n']:,} rows costs {ratio:.2f} x adding 10 to "
          f"{small['n']:,} (target < 1.5); cold extract peak RSS {small['n']:,} -> "
          f"{large['n']:,}: {rss_growth:+.1%}, with --runtime keras {keras_growth:+.1%} "
          "(target within +15%)")
    if ray_rows:
        print("\n| rows | local cold s | ray cold s (local Ray, "
              f"{args.workers} CPUs) | ray/local | shards | same rows | max abs diff |")
        print("|---:|---:|---:|---:|---:|---|---:|")
        for r in ray_rows:
            print(f"| {r['n']:,} | {r['local_cold_seconds']:.1f} | {r['ray_seconds']:.1f} | "
                  f"{r['ray_seconds'] / r['local_cold_seconds']:.2f} | {r['n_shards']} | "
                  f"{r['same_rows']} | {r['max_abs_diff']} |")
    write_results(args.out, {"model": " ".join(MODEL), "repeats": args.repeats,
                             "sizes": rows, "ray": ray_rows, "add_10_ratio": ratio,
                             "cold_rss_growth": rss_growth,
                             "keras_cold_rss_growth": keras_growth}, load_before)


if __name__ == "__main__":
    main()
