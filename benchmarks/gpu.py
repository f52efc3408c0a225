"""The Keras runtime's extraction stage per backend and device, with its targets.

For each Keras backend asked for (default: jax and torch, those installed), one fresh worker
process with KERAS_BACKEND set measures on --device (default: a GPU where the backend sees
one, else the CPU), fp32 and mixed precision:

  (a) the model alone: featx.extraction.KerasMapper on pre-decoded uint8 batches, after a
      warm-up batch (compilation excluded); images/s
  (b) decoding and resizing alone: featx.extraction.ImageReader over every file with a thread
      per usable core, nothing else running; images/s
  (c) `featx extract` end to end through the Python API (fresh cache each run): the pipeline
      rate after the first batch (steady), and with it (first-batch compilation included)

and the embeddings of --probe images. A second worker computes the same images' fp32
embeddings on the CPU, for each image's cosine between device and CPU embeddings.

Targets (issue 13): (c) steady >= 0.8 x min(a, b); cosine >= 0.9999 in fp32 and >= 0.999 in
mixed precision (mixed precision is measured on a GPU only: float16 on a CPU is emulated).
Every figure is the median of --repeats runs, with min and max in the JSON.

Usage:
    python benchmarks/gpu.py --data DATA [--backends jax torch] [--device auto|gpu|cpu]
Writes benchmarks/results/gpu-<device kind>.json. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {"c/min(a,b)": 0.8, "cosine fp32": 0.9999, "cosine mixed": 0.999}
HERE = Path(__file__).resolve().parent


def spread(values) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# ----- the worker: one backend, one process -------------------------------------------
def worker(args) -> dict:
    from featx.backbones import create_backbone
    from featx.data import discover
    from featx.extraction import mixed_precision, setup_device
    from featx.extraction import extract
    from featx.options import usable_cores
    from featx.extraction import KerasMapper, batch_size_for

    device = setup_device(args.device)
    manifest = discover(args.data)
    paths = [str(manifest.root / p) for p in manifest.paths]
    batch = batch_size_for(device, args.batch_size)
    out = {"backend": device.backend, "device": str(device), "device_kind": device.kind,
           "batch_size": batch, "n_files": len(paths), "cores": usable_cores()}
    precisions = ["fp32"] + (["mixed"] if device.kind == "gpu" and not args.cpu_reference
                             else [])
    net = create_backbone(args.backbone)
    probe = sorted(paths)[:args.probe]
    out["probe"] = {}
    for precision in precisions:
        mixed = precision == "mixed"
        with mixed_precision(mixed):  # the model is built (and compiled) under the policy
            mapper = KerasMapper(create_backbone(args.backbone) if mixed else net, batch,
                                 device=device)
            out["probe"][precision] = embed_paths(mapper, net, probe, batch).tolist()
            if args.cpu_reference:
                continue
            out[f"a_{precision}"] = model_alone(mapper, net, paths, batch, args.repeats)
        out[f"c_{precision}"] = end_to_end(extract, args, mixed, batch)
    if not args.cpu_reference:
        out["b"] = decode_alone(net, paths, batch, args.repeats)
    return out


def decode(net, paths, batch) -> np.ndarray:
    """The decoded, resized uint8 images of ``paths``, as the pipeline's reader gives them."""
    from featx.extraction import ImageReader

    return np.concatenate([b["image"] for b in ImageReader(paths, net.preprocessing, batch)])


def embed_paths(mapper, net, paths, batch) -> np.ndarray:
    images = decode(net, paths, batch)
    return np.concatenate([mapper(images[i:i + batch]) for i in range(0, len(images), batch)])


def model_alone(mapper, net, paths, batch, repeats, seconds=3.0) -> dict:
    """Full batches of decoded images (repeated when the folder has fewer), run for at
    least ``seconds`` per repeat, so that a fast GPU is not timed on a few milliseconds."""
    n = min(len(paths), max(batch * 4, 512))
    images = decode(net, paths[:n], batch)
    images = np.resize(images, (max(len(images), batch), *images.shape[1:]))
    batches = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    mapper(batches[0])  # compilation
    rates = []
    for _ in range(repeats):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for images_batch in batches:
                mapper(images_batch)
            done += len(batches) * batch
        rates.append(done / (time.perf_counter() - started))
    return spread(rates)


def decode_alone(net, paths, batch, repeats) -> dict:
    from featx.extraction import ImageReader

    rates = []
    for _ in range(repeats + 1):  # the first pass warms the page cache; not counted
        started = time.perf_counter()
        for _batch in ImageReader(paths, net.preprocessing, batch):
            pass
        rates.append(len(paths) / (time.perf_counter() - started))
    return spread(rates[1:])


def end_to_end(extract, args, mixed, batch) -> dict:
    steady, whole, walls = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache_dir:
            started = time.perf_counter()
            features = extract(args.data, backbone=args.backbone, cache_dir=cache_dir,
                               runtime="keras", device=args.device, mixed_precision=mixed,
                               batch_size=batch, progress=False)
            walls.append(time.perf_counter() - started)
        s = features.stats
        whole.append(s.images_per_second)
        steady.append((s.n_extracted - s.first_batch_images)
                      / max(s.model_seconds - s.first_batch_seconds, 1e-9))
    return {"steady": spread(steady), "whole": spread(whole), "wall_seconds": spread(walls),
            "runtime": s.runtime, "n_extracted": s.n_extracted}


# ----- the driver ---------------------------------------------------------------------
def run_worker(args, backend, device, cpu_reference=False) -> dict:
    command = [sys.executable, __file__, "--worker", "--data", str(args.data),
               "--backbone", args.backbone, "--device", device, "--repeats", str(args.repeats),
               "--probe", str(args.probe)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if cpu_reference:
        command.append("--cpu-reference")
    env = {**os.environ, "KERAS_BACKEND": backend}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{backend} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def summarise(measured: dict, reference: dict) -> dict:
    out = {k: v for k, v in measured.items() if k != "probe"}
    cpu = reference["probe"]["fp32"]
    for precision, embeddings in measured["probe"].items():
        out[f"cosine_{precision}_min"] = float(cosines(embeddings, cpu).min())
    for precision in ("fp32", "mixed"):
        if f"a_{precision}" in measured:
            bound = min(measured[f"a_{precision}"]["median"], measured["b"]["median"])
            out[f"c_over_min_ab_{precision}"] = measured[f"c_{precision}"]["steady"]["median"] \
                / bound
    return out


def print_table(results: dict) -> None:
    print(f"\n{'backend':<8} {'device':<34} {'prec':<6} {'(a) model':>10} {'(b) decode':>11} "
          f"{'(c) steady':>11} {'(c) whole':>10} {'c/min(a,b)':>11} {'cos min':>9}")
    for backend, r in results.items():
        for precision in ("fp32", "mixed"):
            if f"a_{precision}" not in r:
                continue
            print(f"{backend:<8} {r['device'][:34]:<34} {precision:<6} "
                  f"{r[f'a_{precision}']['median']:>10.0f} {r['b']['median']:>11.0f} "
                  f"{r[f'c_{precision}']['steady']['median']:>11.0f} "
                  f"{r[f'c_{precision}']['whole']['median']:>10.0f} "
                  f"{r[f'c_over_min_ab_{precision}']:>11.2f} "
                  f"{r[f'cosine_{precision}_min']:>9.6f}")
    print("images/s, medians; cosine: the lowest over the probe images, device vs CPU fp32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--backends", nargs="+", default=["jax", "torch"])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", type=int, default=64, help="images for the cosines")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sys.path.insert(0, str(HERE))
    from _results import write_results

    load_before = os.getloadavg()
    results = {}
    for backend in args.backends:
        if importlib.util.find_spec(backend) is None:
            print(f"{backend}: not installed, skipped")
            continue
        measured = run_worker(args, backend, args.device)
        reference = run_worker(args, backend, "cpu", cpu_reference=True)
        results[backend] = summarise(measured, reference)
    print_table(results)
    kind = next(iter(results.values()))["device_kind"] if results else "none"
    met = {backend: {"c/min(a,b)": all(r[k] >= TARGETS["c/min(a,b)"]
                                       for k in r if k.startswith("c_over_min_ab")),
                     "cosine": r["cosine_fp32_min"] >= TARGETS["cosine fp32"]
                     and r.get("cosine_mixed_min", 1.0) >= TARGETS["cosine mixed"]}
           for backend, r in results.items()}
    print("targets met:", json.dumps(met))
    write_results(args.out or HERE / "results" / f"gpu-{kind}.json",
                  {"targets": TARGETS, "targets_met": met, "backbone": args.backbone,
                   "data": str(args.data), "repeats": args.repeats, "results": results},
                  load_before)


if __name__ == "__main__":
    main()
