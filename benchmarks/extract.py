"""Extraction throughput: featx vs the model alone vs the ways people write it by hand.

Same model, same images, one process. For each method the median of --repeats runs; (b), (c)
and (d) start from a model that has not been called yet, as a user's run does:

  (a) model alone: the featx tf.function on images decoded beforehand, warm (the ceiling)
  (b) featx extract end to end (tf.data decode+resize -> model -> HDF5), fresh cache each run
  (c) the seed tutorial's way: a keras.utils.PyDataset (Sequence) reading files with cv2,
      then model.predict
  (d) keras.utils.image_dataset_from_directory + model.predict

Usage:
    python benchmarks/extract.py --data $FEATX_DOGCAT [--backbone efficientnet_lite0]
Prints a table and writes JSON (benchmarks/results/extract-<backbone>.json by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import featx  # noqa: E402
from featx.backbones import create_backbone  # noqa: E402
from featx.data import discover, load_for_model  # noqa: E402
from featx.extraction import EmbeddingMapper, extract  # noqa: E402


def model_alone(net, mapper, images, batch_size):
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        mapper(images[i:i + batch_size])
    return time.perf_counter() - start


def featx_end_to_end(data, args):
    cache_dir = tempfile.mkdtemp(prefix="featx-bench-")
    try:
        features = extract(data, backbone=args.backbone, weights=args.weights,
                           batch_size=args.batch_size, cache_dir=cache_dir, progress=False)
        return features.stats
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def tutorial_sequence(net, model, files, batch_size):
    import cv2
    import keras

    size = net.input_size

    class FileSequence(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()

        def __len__(self):
            return math.ceil(len(files) / batch_size)

        def __getitem__(self, i):
            batch = []
            for path in files[i * batch_size:(i + 1) * batch_size]:
                image = cv2.imread(str(path))
                image = cv2.resize(image, (size, size))
                batch.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            return np.stack(batch).astype("float32")

    start = time.perf_counter()
    model.predict(FileSequence(), verbose=0)
    return time.perf_counter() - start


def keras_directory(net, model, data, batch_size):
    import keras

    start = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(
        data, labels="inferred", image_size=(net.input_size, net.input_size),
        batch_size=batch_size, shuffle=False, verbose=False)
    model.predict(ds.map(lambda x, y: x), verbose=0)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FEATX_DOGCAT"),
                        help="labelled image folder (default: $FEATX_DOGCAT)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.data:
        parser.error("--data is required (or set FEATX_DOGCAT)")
    data = Path(args.data)

    net = create_backbone(args.backbone, args.weights)
    mapper = EmbeddingMapper(net, args.batch_size)
    manifest = discover(data)
    files = [manifest.root / p for p in manifest.paths]
    pre = net.preprocessing
    images = np.stack([load_for_model(f, pre["input_size"], pre["resize_size"],
                                      pre["interpolation"]) for f in files])
    n = len(files)
    model_alone(net, mapper, images[: args.batch_size * 2], args.batch_size)  # trace, warm up

    times = {name: [] for name in ("a", "b", "b_steady", "b_total", "c", "d")}
    for repeat in range(args.repeats):
        times["a"].append(model_alone(net, mapper, images, args.batch_size))
        stats = featx_end_to_end(data, args)
        assert stats.n_extracted == n, (stats.n_extracted, n)
        times["b"].append(stats.model_seconds)
        # the same run without its first batch (tracing the tf.function), scaled to n images
        steady = (stats.model_seconds - stats.first_batch_seconds) * n / (
            n - stats.first_batch_images)
        times["b_steady"].append(steady)
        times["b_total"].append(stats.seconds)
        # A fresh model each time, as in a user's script: every end-to-end method (b, c, d)
        # then pays its one-off tracing inside the timing; only (a) is measured warm.
        fresh = create_backbone(args.backbone, args.weights).feature_model()
        times["c"].append(tutorial_sequence(net, fresh, files, args.batch_size))
        fresh = create_backbone(args.backbone, args.weights).feature_model()
        times["d"].append(keras_directory(net, fresh, data, args.batch_size))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)

    rate = {k: n / statistics.median(v) for k, v in times.items()}
    labels = {
        "a": "(a) model alone, pre-decoded tensors (tf.function)",
        "b": "(b) featx extract: decode -> model -> HDF5 pipeline",
        "b_steady": "    same run, first batch (model tracing) excluded",
        "b_total": "    featx extract incl. discovery, hashing, model build",
        "c": "(c) tutorial: cv2 Sequence + model.predict",
        "d": "(d) image_dataset_from_directory + model.predict",
    }
    print(f"\n{n} images, {args.backbone} ({net.weights_id}), batch {args.batch_size}, "
          f"median of {args.repeats}, {os.cpu_count()} CPUs")
    print(f"| method | images/s | ratio to (a) |\n|---|---:|---:|")
    for k, label in labels.items():
        print(f"| {label} | {rate[k]:.1f} | {rate[k] / rate['a']:.2f} |")
    ratios = {"b/a": rate["b"] / rate["a"], "b_steady/a": rate["b_steady"] / rate["a"],
              "b/c": rate["b"] / rate["c"],
              "b/d": rate["b"] / rate["d"], "b_total/a": rate["b_total"] / rate["a"]}
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))

    out = Path(args.out or Path(__file__).parent / "results" / f"extract-{args.backbone}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "extract", "featx_version": featx.__version__, "data": str(data),
        "n_images": n, "backbone": args.backbone, "weights": net.weights_id,
        "batch_size": args.batch_size, "repeats": args.repeats, "cpus": os.cpu_count(),
        "machine": platform.platform(), "seconds": times, "images_per_second": rate,
        "ratios": ratios, "labels": labels,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
