"""Decoding throughput of featx.data.load_for_model, stage by stage, full vs reduced decode.

Two image sets: the JPEGs of --data (dogcat: ~500x375) and --large JPEGs of 2000x1500
generated into a temporary folder from the first ones (upscaled, plus a little noise so that
they compress like photos). For each set, decode mode (full, reduced) and thread count
(1: a plain loop; N: a ThreadPoolExecutor), --repeats runs of:

  staged   the files in chunks of 64, each chunk read (np.fromfile), then decoded
           (cv2.imdecode + BGR->RGB, with the flag read_image would choose), then resized
           and centre-cropped; images/s of each stage = images / wall time of that stage
  e2e      load_for_model over all files: images/s end to end

cv2.setNumThreads(1), so N threads means N images at a time. Files are read once before
timing: reads come from the page cache. Also the pixel difference of reduced vs full decode
(load_for_model outputs, uint8).

Usage:
    python benchmarks/decode.py [--data $FEATX_DOGCAT] [--large 24] [--repeats 3]
Prints a table and writes JSON (benchmarks/results/decode.json by default).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featx.data import _images as decoding  # noqa: E402

STAGES = ("read", "decode", "resize_crop", "e2e")
CHUNK = 64


def find_images(root, limit=None) -> list[Path]:
    files = sorted(p for p in Path(root).rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg") and not p.name.startswith("."))
    return files[:limit] if limit else files


def make_large(sources, folder: Path, n: int, height: int, width: int) -> list[Path]:
    """``n`` JPEGs of height x width made from evenly spaced ``sources``."""
    rng = np.random.default_rng(0)
    picks = [sources[i * len(sources) // n] for i in range(n)]
    out = []
    for i, src in enumerate(picks):
        image = cv2.resize(cv2.imread(str(src)), (width, height), interpolation=cv2.INTER_CUBIC)
        noisy = image.astype(np.int16) + rng.normal(0, 4, image.shape).astype(np.int16)
        path = folder / f"large_{i:03d}.jpg"
        cv2.imwrite(str(path), np.clip(noisy, 0, 255).astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(path)
    return out


def decode(raw: np.ndarray, reduced: bool, resize_size: int) -> np.ndarray:
    """The decode step of read_image for JPEGs (the flag choice included)."""
    flag = decoding._reduced_flag(raw, resize_size) if reduced else cv2.IMREAD_COLOR
    return cv2.cvtColor(cv2.imdecode(raw, flag), cv2.COLOR_BGR2RGB)


def staged(files, mapper, reduced, size, resize_size) -> dict[str, float]:
    """Wall seconds of each stage over all files, chunk by chunk."""
    seconds = dict.fromkeys(STAGES[:3], 0.0)
    for start in range(0, len(files), CHUNK):
        t0 = time.perf_counter()
        raw = list(mapper(lambda f: np.fromfile(f, np.uint8), files[start:start + CHUNK]))
        t1 = time.perf_counter()
        images = list(mapper(lambda r: decode(r, reduced, resize_size), raw))
        t2 = time.perf_counter()
        list(mapper(lambda im: decoding.resize_and_crop(im, size, resize_size), images))
        t3 = time.perf_counter()
        seconds["read"] += t1 - t0
        seconds["decode"] += t2 - t1
        seconds["resize_crop"] += t3 - t2
    return seconds


def end_to_end(files, mapper, reduced, size, resize_size) -> float:
    start = time.perf_counter()
    list(mapper(lambda f: decoding.load_for_model(f, size, resize_size,
                                                    reduced_decode=reduced), files))
    return time.perf_counter() - start


def run_config(files, threads, reduced, args) -> dict[str, float]:
    """Images/s of each stage and end to end, for one run."""
    if threads == 1:
        seconds = staged(files, map, reduced, args.size, args.resize_size)
        seconds["e2e"] = end_to_end(files, map, reduced, args.size, args.resize_size)
    else:
        with ThreadPoolExecutor(threads) as pool:
            seconds = staged(files, pool.map, reduced, args.size, args.resize_size)
            seconds["e2e"] = end_to_end(files, pool.map, reduced, args.size, args.resize_size)
    return {stage: len(files) / s for stage, s in seconds.items()}


def pixel_difference(files, args) -> dict:
    """|reduced - full| over the load_for_model outputs of ``files``, and how many reduce."""
    diffs = []
    reduced_files = 0
    for f in files:
        raw = np.fromfile(f, np.uint8)
        reduced_files += decoding._reduced_flag(raw, args.resize_size) != cv2.IMREAD_COLOR
        full = decoding.load_for_model(f, args.size, args.resize_size)
        fast = decoding.load_for_model(f, args.size, args.resize_size, reduced_decode=True)
        diffs.append(np.abs(full.astype(np.int16) - fast).ravel())
    diffs = np.concatenate(diffs)
    return {"files_reduced": int(reduced_files), "mean_abs_diff": float(diffs.mean()),
            "p99_abs_diff": float(np.percentile(diffs, 99)), "max_abs_diff": int(diffs.max())}


def summary(values) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def describe(files) -> dict:
    first = cv2.imread(str(files[0]))
    sizes = [os.path.getsize(f) for f in files]
    return {"n_images": len(files), "first_image_hw": list(first.shape[:2]),
            "mean_file_kb": round(sum(sizes) / len(sizes) / 1024, 1)}


def print_table(results):
    print(f"\n{'set':8} {'decode':8} {'thr':>3} " + " ".join(
        f"{name:>20}" for name in ("read", "imdecode", "resize+crop", "load_for_model")))
    for r in results:
        cells = [f"{s['median']:7.0f} ({s['min']:.0f}-{s['max']:.0f})"
                 for s in (r["images_per_s"][stage] for stage in STAGES)]
        print(f"{r['set']:8} {r['decode']:8} {r['threads']:>3} "
              + " ".join(f"{c:>20}" for c in cells))
    print("images/s: median (min-max) over repeats")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FEATX_DOGCAT",
                                                         "/work/shared/datasets/dogcat"))
    parser.add_argument("--limit", type=int, help="use only the first N images of --data")
    parser.add_argument("--large", type=int, default=24, help="large JPEGs to generate (0: none)")
    parser.add_argument("--large-hw", type=int, nargs=2, default=(1500, 2000))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--resize-size", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=(1, 2))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    load_before = os.getloadavg()  # other work on the machine skews the threaded numbers

    with tempfile.TemporaryDirectory(prefix="featx-decode-") as tmp:
        sets = {"dogcat": find_images(args.data, args.limit)}
        if args.large:
            sets["large"] = make_large(sets["dogcat"], Path(tmp), args.large, *args.large_hw)
        for files in sets.values():  # page cache and first-call costs out of the timings
            for f in files:
                decoding.load_for_model(f, args.size, args.resize_size)

        configs = [(name, mode, threads) for name in sets for mode in ("full", "reduced")
                   for threads in args.threads]
        runs = {c: [] for c in configs}
        for _ in range(args.repeats):  # repeats outermost, so drift touches every config
            for name, mode, threads in configs:
                runs[name, mode, threads].append(
                    run_config(sets[name], threads, mode == "reduced", args))

        results = [{"set": name, "decode": mode, "threads": threads,
                    "images_per_s": {s: summary([r[s] for r in runs[name, mode, threads]])
                                     for s in STAGES}}
                   for name, mode, threads in configs]
        report = {
            "settings": {"size": args.size, "resize_size": args.resize_size,
                         "repeats": args.repeats, "chunk": CHUNK, "cv2_threads": 1},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "cv2": cv2.__version__,
                        "numpy": np.__version__, "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
            "sets": {name: describe(files) for name, files in sets.items()},
            "pixel_difference": {name: pixel_difference(files, args)
                                 for name, files in sets.items()},
            "results": results,
        }

    print_table(results)
    for name, diff in report["pixel_difference"].items():
        print(f"{name}: reduced vs full, {diff['files_reduced']}/{report['sets'][name]['n_images']}"
              f" files reduced; |diff| mean {diff['mean_abs_diff']:.3f}, p99 "
              f"{diff['p99_abs_diff']:.0f}, max {diff['max_abs_diff']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
