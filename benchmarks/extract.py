"""Extraction throughput and accuracy per runtime: featx vs the model alone vs hand-written code.

One run, the same images, one table (and benchmarks/results/extract-<backbone>.json):

  (a)       TensorFlow model alone: featx.extraction.KerasMapper on pre-decoded uint8 batches
            (a fixed subset of --alone-images, decoded once); the reference every ratio uses
  (a_onnx)  the same on ONNX Runtime fp32 (OnnxMapper on featx's export)
  (a_int8)  the same on ONNX Runtime int8 (the very model featx quantised in the warm-up)
  (b)       `featx extract DATA` (default runtime) in a fresh process, empty embedding
            cache, ONNX store already populated; --pairs runs
  (b8)      the same with --precision int8
  (b_spin)  (b) with FEATX_ORT_SPINNING=1 (ONNX Runtime threads spin), 2 runs
  (c)       the seed tutorial's way: a keras.utils.PyDataset reading files with cv2,
            then model.predict on a fresh model
  (d)       keras.utils.image_dataset_from_directory + model.predict on a fresh model
  export    the one-off ONNX export + int8 quantisation: a warm-up `featx extract
            --precision int8` into an empty store, timed once, reported on its own row

Every (b), (b8) and (b_spin) run is paired with an (a) measured right before it
(a,b,a,b8,a,b,...); their ratios use the pipeline rate (images_per_second of featx's JSON);
the whole-process rate (images / process wall time incl. Python start-up) is shown too.
Then a linear probe (softmax, default tuning) on the val split per runtime, with the
embeddings' cosine to TensorFlow's.

Usage:
    python benchmarks/extract.py --data $FEATX_DOGCAT [--backbone efficientnet_lite0]
Takes the machine to itself for a while: run nothing else meanwhile (load is recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import featx
from featx.backbones import create_backbone
from featx.cache import FeatureCache
from featx.data import discover, load_for_model
from featx.extraction import extract
from featx.extraction import KerasMapper, OnnxMapper, ensure_fp32, recipe, stored_int8

TARGETS = {"b/a median": 1.8, "b8/a median": 3.0, "lowest/median": 0.85}
# featx settings the benchmark sets itself, here and in the `featx extract` processes: ONNX
# Runtime spinning at its default (but in b_spin), the ONNX store under the benchmark's caches
for _name in ("FEATX_ORT_SPINNING", "FEATX_ONNX_STORE"):
    os.environ.pop(_name, None)
CHILD_ENV = dict(os.environ)


# ----- (a): the model alone -------------------------------------------------------------
def decode_subset(net, files, k):
    """``k`` files spread evenly over the (sorted) list, decoded as featx's reader does."""
    pre = net.preprocessing
    chosen = np.unique(np.linspace(0, len(files) - 1, min(k, len(files))).astype(int))
    return np.stack([load_for_model(files[i], pre["input_size"], pre["resize_size"],
                                    pre["interpolation"],
                                    reduced_decode=bool(pre.get("reduced_decode")))
                     for i in chosen])


def model_alone(mapper, images, batch_size, warm=False):
    """Images per second of ``mapper`` over ``images``; ``warm=True``: one untimed call first."""
    if warm:
        mapper(images[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        mapper(images[i:i + batch_size])
    return len(images) / (time.perf_counter() - start)


# ----- (b), (b8), export: featx in fresh processes ------------------------------------------
def featx_process(args, cache_dir, extra=(), env=None, verbose=False):
    """Run `featx extract` in a new process; its JSON plus process wall time and rates."""
    cmd = [sys.executable, "-m", "featx", *(["-v"] if verbose else []), "extract", args.data,
           "--backbone", args.backbone, "--weights", args.weights,
           "--batch-size", str(args.batch_size), "--cache-dir", str(cache_dir),
           "--json", "--no-progress", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**CHILD_ENV, **(env or {})})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds per wall second: about 1 while a slow period leaves one core's worth
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    with FeatureCache.open(out["cache"]) as cache:
        key = cache.key
    return {"pipeline": out["images_per_second"], "process": out["n_extracted"] / wall,
            "wall": wall, "seconds": out["seconds"], "n": out["n_extracted"],
            "cpu_seconds": cpu, "cores_busy": cpu / wall,
            "runtime": out["runtime"], "precision": out["precision"],
            "int8_model_sha256": key.get("int8_model_sha256"),
            "calibration": key.get("calibration"), "stderr": proc.stderr}


def warm_up(args, work):
    """The one-off cost: export + int8 quantisation into an empty store (then int8 extract)."""
    run = featx_process(args, work / "warm", ["--precision", "int8"], verbose=True)
    found = {k: re.search(rf"{k} .* in ([\d.]+) s", run["stderr"])
             for k in ("exported", "quantised")}  # featx's INFO log lines (-v)
    return {"export_s": float(found["exported"][1]) if found["exported"] else None,
            "quantise_s": float(found["quantised"][1]) if found["quantised"] else None,
            "process_s": run["wall"], "int8_model_sha256": run["int8_model_sha256"],
            "calibration": run["calibration"]}


def cold_run(args, store, work, extra=(), env=None):
    """One (b)-style run: fresh process, empty embedding cache, the populated ONNX store."""
    cache_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    (cache_dir / "onnx").symlink_to(store, target_is_directory=True)
    try:
        return featx_process(args, cache_dir, extra, env)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def paired_runs(args, tf_mapper, alone, store, work, schedule, int8_sha, n_images):
    """Each scheduled run right after an (a) measurement; per-pair ratios."""
    runs = {name: [] for name, _, _ in schedule}
    for i, (name, extra, env) in enumerate(schedule, 1):
        a = model_alone(tf_mapper, alone, args.batch_size)
        run = cold_run(args, store, work, extra, env)
        run.pop("stderr")
        assert run["n"] == n_images, (name, run["n"], n_images)
        if "--precision" in extra:
            assert run["int8_model_sha256"] == int8_sha, "b8 ran another int8 model"
        run.update(a=a, ratio=run["pipeline"] / a, process_ratio=run["process"] / a)
        runs[name].append(run)
        print(f"  [{i}/{len(schedule)}] a {a:.1f} img/s, {name} {run['pipeline']:.1f} img/s "
              f"(process {run['process']:.1f}, {run['cores_busy']:.2f} cores busy), "
              f"ratio {run['ratio']:.2f}", flush=True)
    return runs


def summarize(runs):
    ratios = sorted(r["ratio"] for r in runs)
    median = statistics.median(ratios)
    return {"n": len(runs), "runtime": runs[0]["runtime"],
            "pipeline_ips": statistics.median(r["pipeline"] for r in runs),
            "process_ips": statistics.median(r["process"] for r in runs),
            "a_ips": statistics.median(r["a"] for r in runs),
            "ratio_min": ratios[0], "ratio_median": median, "ratio_max": ratios[-1],
            "lowest_over_median": ratios[0] / median,
            "process_ratio_median": statistics.median(r["process_ratio"] for r in runs)}


# ----- (c), (d): the ways people write it by hand -----------------------------------------
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


def hand_written(args, tf_mapper, alone, files):
    """Median (c) and (d) rates over --repeats, each repeat after an (a); fresh models."""
    rates = {"a": [], "c": [], "d": []}
    net = create_backbone(args.backbone, args.weights)
    fresh = lambda: create_backbone(args.backbone, args.weights).feature_model()  # noqa: E731
    for _ in range(args.repeats):
        rates["a"].append(model_alone(tf_mapper, alone, args.batch_size))
        rates["c"].append(len(files) / tutorial_sequence(net, fresh(), files, args.batch_size))
        rates["d"].append(len(files) / keras_directory(net, fresh(), args.data, args.batch_size))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"rates": rates, "median": med, "c/a": med["c"] / med["a"], "d/a": med["d"] / med["a"]}


# ----- linear probe per runtime ----------------------------------------------------------
def all_embeddings(features):
    """(X, paths, labels, split) of the original images, sorted by path."""
    idx = np.flatnonzero(features.view == 0)
    idx = idx[np.argsort(features.paths[idx], kind="stable")]
    with FeatureCache.open(features.cache_path) as cache:
        X = cache.embeddings(idx)
    return X, features.paths[idx], features.labels[idx], features.split[idx]


def probe(args, warm_dir, work):
    from featx.classifiers import evaluate, fit_classifier

    common = dict(backbone=args.backbone, weights=args.weights, batch_size=args.batch_size,
                  progress=False)
    runs = {  # keras and onnx fp32 share a cache key: separate cache dirs
        "tensorflow": extract(args.data, runtime="keras", cache_dir=work / "probe-keras", **common),
        "onnx_fp32": extract(args.data, runtime="onnx", cache_dir=warm_dir, **common),
        "onnx_int8": extract(args.data, runtime="onnx", precision="int8", cache_dir=warm_dir,
                             **common),
    }
    ref, paths, labels, split = all_embeddings(runs["tensorflow"])
    train, val = split == "train", split == "val"
    out = {}
    for name, features in runs.items():
        X, p, _, _ = all_embeddings(features)
        assert (p == paths).all(), f"{name}: other images than TensorFlow's"
        fit = fit_classifier("softmax", X[train], labels[train])
        scores = evaluate(fit.estimator, X[val], labels[val], features.class_names)
        cos = (X * ref).sum(1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(ref, axis=1))
        out[name] = {"runtime": features.provenance(), "val_accuracy": scores["accuracy"],
                     "n_train": int(train.sum()), "n_val": int(val.sum()),
                     "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                     "max_abs_diff": float(np.abs(X - ref).max())}
    return out


# ----- the machine ---------------------------------------------------------------------------
def loadavg():
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def environment():
    import keras
    import onnxruntime
    import tensorflow as tf

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_model": cpu,
            "cpus": os.cpu_count(), "machine": platform.platform(),
            "versions": {"featx": featx.__version__, "onnxruntime": onnxruntime.__version__,
                         "tensorflow": tf.__version__, "keras": keras.__version__,
                         "python": platform.python_version()}}


# ----- report -------------------------------------------------------------------------------
def print_table(r):
    a = r["alone"]["tensorflow"]
    rows = [("(a) TensorFlow model alone, pre-decoded (KerasMapper)", a, "1.00", "")]
    rows += [(f"(a) ONNX Runtime {k[5:]} model alone", r["alone"][k], f"{r['alone'][k] / a:.2f}",
              "") for k in ("onnx_fp32", "onnx_int8")]
    for name, label in (("b", "(b) featx extract, cold process"),
                        ("b8", "(b8) featx extract --precision int8"),
                        ("b_spin", "(b) with FEATX_ORT_SPINNING=1")):
        s = r["pairs"].get(name)
        if s:
            rows.append((f"{label} [{s['runtime']}]", s["pipeline_ips"],
                         f"{s['ratio_min']:.2f} / {s['ratio_median']:.2f} / {s['ratio_max']:.2f}"
                         f" (low/med {s['lowest_over_median']:.2f})",
                         f"{s['process_ips']:.1f} ({s['process_ratio_median']:.2f})"))
    if r.get("hand_written"):
        for k, label in (("c", "(c) tutorial: cv2 Sequence + model.predict"),
                         ("d", "(d) image_dataset_from_directory + model.predict")):
            hw = r["hand_written"]
            rows.append((label, hw["median"][k], f"{hw[k + '/a']:.2f} (to the (a) of its runs)",
                         ""))
    print(f"\n{r['n_images']} images ({r['n_alone']} for (a)), {r['backbone']}, batch "
          f"{r['batch_size']}, {r['cpus']} CPUs, {r['cpu_model']}; load {r['loadavg_start']} -> "
          f"{r['loadavg_end']}")
    print("| method | images/s | ratio to (a) per pair: min / median / max | "
          "whole process img/s (ratio) |\n|---|---:|---|---:|")
    for label, ips, ratio, process in rows:
        print(f"| {label} | {ips:.1f} | {ratio} | {process} |")
    w = r["export"]
    print(f"| one-off: ONNX export {w['export_s']} s + int8 quantisation {w['quantise_s']} s "
          f"(warm-up process {w['process_s']:.1f} s incl. int8 extract) | | | |")
    for k, v in r["probe"].items():
        print(f"probe {k:10s}: val accuracy {v['val_accuracy']:.4f}, cosine to TF mean "
              f"{v['cosine_mean']:.6f} min {v['cosine_min']:.6f}, "
              f"max |diff| {v['max_abs_diff']:.2e}")
    s = r["spinning"]
    print(f"ORT spinning: median b/a off {s['off_ratio_median']:.2f}, "
          f"on {s['on_ratio_median']:.2f}")
    for k, t in r["targets"].items():
        print(f"target {k}: {t['value']:.2f} (>= {t['target']}) {'met' if t['met'] else 'NOT met'}")
    if r.get("warning"):
        print("WARNING:", r["warning"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FEATX_DOGCAT"),
                        help="labelled image folder (default: $FEATX_DOGCAT)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=10, help="(a,b) and (a,b8) pairs each")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of (c) and (d)")
    parser.add_argument("--alone-images", type=int, default=320)
    parser.add_argument("--skip-cd", action="store_true", help="skip (c) and (d)")
    parser.add_argument("--skip-probe", action="store_true", help="skip the linear probe")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if "+" in args.backbone:
        parser.error("one backbone at a time (a combination costs the sum of its parts; "
                     "benchmarks/combine.py measures combinations)")
    if not args.data:
        parser.error("--data is required (or set FEATX_DOGCAT)")
    args.data = str(Path(args.data).resolve())

    r = {"benchmark": "extract", "data": args.data, "backbone": args.backbone,
         "weights": args.weights, "batch_size": args.batch_size, "pairs": args.pairs,
         "repeats": args.repeats, "loadavg_start": loadavg(), **environment(), "targets": {}}
    if r["loadavg_start"][0] > 0.5:
        r["warning"] = (f"other work was running: load average {r['loadavg_start'][0]} at "
                        "start (> 0.5)")
        print("WARNING:", r["warning"], flush=True)
    net = create_backbone(args.backbone, args.weights)
    manifest = discover(args.data)
    files = [manifest.root / p for p in manifest.paths]
    r["n_images"] = n = len(files)
    alone = decode_subset(net, files, args.alone_images)
    r["n_alone"] = len(alone)
    work = Path(tempfile.mkdtemp(prefix="featx-bench-"))
    try:
        print("warm-up: export + int8 quantisation into an empty ONNX store ...", flush=True)
        r["export"] = warm_up(args, work)
        store = work / "warm" / "onnx"
        fp32 = ensure_fp32(net, store)
        assert not fp32.built, "the in-process fp32 export differs from the CLI's"
        int8 = stored_int8(net, store, r["export"]["calibration"],
                           r["export"]["int8_model_sha256"], recipe())
        assert int8 is not None, ("the int8 model of the warm-up run is not in its store (did "
                                  "featx decline int8 on this CPU? its warm-up stderr says)")
        r["onnx_models"] = {"fp32": fp32.path.name, "int8": int8.path.name,
                            "int8_sha256": int8.sha256}

        print("(a) model alone ...", flush=True)
        tf_mapper = KerasMapper(net, args.batch_size)
        r["alone"] = {
            "tensorflow": model_alone(tf_mapper, alone, args.batch_size, warm=True),
            "onnx_fp32": model_alone(OnnxMapper(fp32), alone, args.batch_size, warm=True),
            "onnx_int8": model_alone(OnnxMapper(int8), alone, args.batch_size, warm=True),
        }

        print("(b) / (b8) cold processes, each after an (a) ...", flush=True)
        schedule = [("b", (), None), ("b8", ("--precision", "int8"), None)] * args.pairs
        schedule += [("b_spin", (), {"FEATX_ORT_SPINNING": "1"})] * 2
        runs = paired_runs(args, tf_mapper, alone, store, work, schedule, int8.sha256, n)
        r["runs"] = runs
        r["pairs"] = {k: summarize(v) for k, v in runs.items()}
        p = r["pairs"]
        r["targets"] = {name: {"value": value, "target": target, "met": value >= target}
                        for name, value, target in (
            ("b/a median", p["b"]["ratio_median"], TARGETS["b/a median"]),
            ("b8/a median", p["b8"]["ratio_median"], TARGETS["b8/a median"]),
            ("b lowest/median", p["b"]["lowest_over_median"], TARGETS["lowest/median"]),
            ("b8 lowest/median", p["b8"]["lowest_over_median"], TARGETS["lowest/median"]))}
        r["spinning"] = {"off_ratio_median": p["b"]["ratio_median"],
                         "on_ratio_median": p["b_spin"]["ratio_median"],
                         "off_pipeline_ips": p["b"]["pipeline_ips"],
                         "on_pipeline_ips": p["b_spin"]["pipeline_ips"]}

        if not args.skip_cd:
            print("(c) / (d) hand-written ...", flush=True)
            r["hand_written"] = hand_written(args, tf_mapper, alone, files)
        r["probe"] = {}
        if not args.skip_probe:
            print("linear probe per runtime ...", flush=True)
            r["probe"] = probe(args, work / "warm", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r["loadavg_end"] = loadavg()

    print_table(r)
    out = Path(args.out or Path(__file__).parent / "results" / f"extract-{args.backbone}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
