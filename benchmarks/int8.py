"""int8 against fp32 per calibration method and exclusion setting, on real photos.

For each dataset (DATA, and with --derived sets made from DATA's photos: turned16, 16 classes
of photos turned by 0, 90, 180 or 270 degrees and kept sharp or shrunk to 64 px, one variant
per photo; small, every photo at 64 px; crops, the central half of every photo), on featx's
default split (seed 42):

  fp32     the backbone's ONNX export on ONNX Runtime (featx's default runtime)
  int8     featx's accuracy-aware int8 (featx.extraction.search_int8) with each calibration
           method: calibrated on the seeded 64 training images featx uses, measured on the
           64 it holds back; a row for the plain model ("none") and, when the search kept
           nodes float, one for its model ("searched"); "featx uses" says what featx
           extracts with

Each row: the agreement featx records (mean / min cosine and nearest-class decisions on the
64 held-back training images), the linear probe of `featx compare` (softmax, no tuning;
train -> val accuracy and balanced accuracy) on every image, and images/s of int8 and fp32
on the same 256 pre-decoded images in alternating passes (--passes each, median; the ratio
is int8 / fp32 of the medians). Prints a table and writes benchmarks/results/int8.json.

Usage:
    python benchmarks/int8.py --data $FEATX_DOGCAT --derived turned16 small crops
Takes the machine to itself (2 threads): run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featx.backbones import create_backbone
from featx.classifiers import make_classifier
from featx.data import discover, load_for_model
from featx.extraction import (QUANTIZATION, Agreement, OnnxMapper, OnnxModel, ensure_fp32,
                              recipe, sample_indices, search_int8, store_for)

from _results import write_results

TURNS = (None, "90", "180", "270")


def make_derived(source: Path, out: Path, kind: str) -> Path:
    """A set made from ``source``'s photos (class folders of JPEGs), written once:

    turned16  photo i of each class becomes class <class>-r<turn>-<sharp|small>, by i: turned
              by 0/90/180/270 degrees, and kept or shrunk to 64 px (16 classes from 2)
    small     every photo shrunk to 64 px on its short side (then upscaled by featx)
    crops     the central half of every photo (a quarter of its area)
    """
    import cv2

    rotate = {"90": cv2.ROTATE_90_CLOCKWISE, "180": cv2.ROTATE_180,
              "270": cv2.ROTATE_90_COUNTERCLOCKWISE}
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    for animal in sorted(p.name for p in source.iterdir() if p.is_dir()):
        for i, path in enumerate(sorted((source / animal).glob("*.jpg"))):
            image, label = cv2.imread(str(path)), animal
            turn, small = TURNS[i % 4], (i // 4) % 2 == 1
            if kind == "turned16":
                image = cv2.rotate(image, rotate[turn]) if turn else image
                label = f"{animal}-r{turn or 0}-{'small' if small else 'sharp'}"
            small = small if kind == "turned16" else kind == "small"
            if small:
                scale = 64 / min(image.shape[:2])
                image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            if kind == "crops":
                h, w = image.shape[:2]
                image = image[h // 4:h - h // 4, w // 4:w - w // 4]
            (tmp / label).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(tmp / label / path.name), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    tmp.rename(out)
    return out


def mapper_for(path):
    return OnnxMapper(OnnxModel(Path(path), "", "int8", True))


def decode_all(manifest, pre):
    def one(rel):
        return load_for_model(manifest.root / rel, pre["input_size"], pre["resize_size"],
                              pre["interpolation"])
    with ThreadPoolExecutor(2) as pool:
        return np.stack(list(pool.map(one, manifest.paths)))


def embed(mapper, images, batch=32):
    return np.concatenate([mapper(images[i:i + batch]) for i in range(0, len(images), batch)])


def rate(mapper, images, batch=32):
    start = time.perf_counter()
    embed(mapper, images, batch)
    return len(images) / (time.perf_counter() - start)


def probe(features, manifest):
    from sklearn.metrics import balanced_accuracy_score

    splits, labels = np.asarray(manifest.splits), manifest.labels
    train, val = splits == "train", splits == "val"
    clf = make_classifier("softmax").fit(features[train], labels[train])
    predicted = clf.predict(features[val])
    return float(np.mean(predicted == labels[val])), \
        float(balanced_accuracy_score(labels[val], predicted))


def speed(fp32_mapper, int8_mapper, images, passes):
    """Alternating passes over the same images: medians and the ratio of the medians."""
    fp32_mapper(images[:32])
    int8_mapper(images[:32])
    fp32, int8 = [], []
    for _ in range(passes):
        fp32.append(rate(fp32_mapper, images))
        int8.append(rate(int8_mapper, images))
    return {"fp32_images_per_second": fp32, "int8_images_per_second": int8,
            "speedup": statistics.median(int8) / statistics.median(fp32)}


def run_dataset(name, root, net, fp32_model, args, work):
    started = time.perf_counter()
    manifest = discover(root)
    images = decode_all(manifest, net.preprocessing)
    print(f"\n{name}: {len(images)} images, {len(manifest.class_names)} classes, decoded in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    fp32_mapper = OnnxMapper(fp32_model)
    fp32 = embed(fp32_mapper, images)
    accuracy, balanced = probe(fp32, manifest)
    rows = [{"dataset": name, "calibration": "-", "excluded": 0, "precision": "fp32",
             "accuracy": accuracy, "balanced_accuracy": balanced}]
    print(f"  fp32: accuracy {accuracy:.4f}, balanced {balanced:.4f}", flush=True)
    calibration, held = sample_indices(manifest, 42, QUANTIZATION["calibration_images"])
    timing = images[np.linspace(0, len(images) - 1, 256).astype(int)]
    for method in args.methods:
        folder = Path(tempfile.mkdtemp(dir=work))
        started = time.perf_counter()
        record = search_int8(fp32_model, images[calibration], images[held],
                             manifest.labels[held], recipe(method), folder / "searched.onnx",
                             folder, mapper_for)
        search_s = time.perf_counter() - started
        plain = {"float_nodes": [], "agreement": record["tried"][0]["agreement"]}
        for setting, path, found in (("none", folder / "plain.onnx", plain),
                                     ("searched", folder / "searched.onnx", record)):
            if setting == "searched" and not record["float_nodes"]:
                continue  # the plain model was kept: the same row
            mapper = mapper_for(path)
            accuracy, balanced = probe(embed(mapper, images), manifest)
            agreement = found["agreement"]
            row = {"dataset": name, "calibration": method, "setting": setting,
                   "excluded": len(found["float_nodes"]), "precision": "int8",
                   "excluded_nodes": found["float_nodes"], "agreement": agreement,
                   "agreement_holds": Agreement(**agreement).holds(),
                   "featx_uses": record["use"], "search_seconds": search_s,
                   "accuracy": accuracy, "balanced_accuracy": balanced,
                   **speed(fp32_mapper, mapper, timing, args.passes)}
            rows.append(row)
            print(f"  {method:10s} {setting:8s} float {row['excluded']:2d} "
                  f"cos {agreement['mean_cosine']:.4f}/{agreement['min_cosine']:.4f} "
                  f"dec {agreement['decisions']:.3f} acc {accuracy:.4f} bal {balanced:.4f} "
                  f"x{row['speedup']:.2f}; featx uses {record['use']} "
                  f"(search {search_s:.0f} s)", flush=True)
    return rows


def table(rows):
    lines = ["| dataset | calibration | float nodes (search) | cosine mean / min | decisions "
             "| holds | probe acc | vs fp32 | balanced acc | int8 images/s | int8 / fp32 speed "
             "| featx uses |",
             "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|"]
    base = {r["dataset"]: r for r in rows if r["precision"] == "fp32"}
    for r in rows:
        if r["precision"] == "fp32":
            lines.append(f"| {r['dataset']} | fp32 | | | | | {r['accuracy']:.4f} | | "
                         f"{r['balanced_accuracy']:.4f} | | | |")
            continue
        a = r["agreement"]
        lines.append(
            f"| {r['dataset']} | {r['calibration']} | {r['excluded']} ({r['setting']}) | "
            f"{a['mean_cosine']:.4f} / {a['min_cosine']:.4f} | {a['decisions']:.3f} | "
            f"{'yes' if r['agreement_holds'] else 'no'} | {r['accuracy']:.4f} | "
            f"{r['accuracy'] - base[r['dataset']]['accuracy']:+.4f} | "
            f"{r['balanced_accuracy']:.4f} | "
            f"{statistics.median(r['int8_images_per_second']):.1f} | {r['speedup']:.2f}x | "
            f"{r['featx_uses']} |")
    return "\n".join(lines)


def cpu_flags():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines()
                  if line.startswith("Flags")), [])
    return {"model": next((line.split(":", 1)[1].strip() for line in out.splitlines()
                           if line.startswith("Model name")), ""),
            "isa": QUANTIZATION["isa"],
            "flags": [f for f in flags if f.startswith(("avx", "amx", "vnni", "fma"))]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--derived", nargs="*", default=[],
                        choices=["turned16", "small", "crops"],
                        help="sets made from DATA's photos (see make_derived)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy"])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "featx-int8")
    parser.add_argument("--cache-dir", default="cache", help="its ONNX store has the export")
    parser.add_argument("--out", default="benchmarks/results/int8.json")
    parser.add_argument("--table", metavar="JSON", help="print the table of a results file")
    args = parser.parse_args()
    if args.table:
        results = json.loads(Path(args.table).read_text())
        print(f"CPU: {results['cpu']['model']}, {results['cpu']['isa']} "
              f"({' '.join(results['cpu']['flags'])})\n\n{table(results['rows'])}")
        return
    load_before = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    net = create_backbone(args.backbone)
    fp32_model = ensure_fp32(net, store_for(args.cache_dir))
    cpu = cpu_flags()
    print(f"CPU: {cpu['model']}, {cpu['isa']} ({' '.join(cpu['flags'])})")
    datasets = [(args.data.name, args.data)]
    for kind in args.derived:
        name = f"{args.data.name}-{kind}"
        datasets.append((name, make_derived(args.data, args.work / name, kind)))
    rows = []
    for name, root in datasets:
        rows += run_dataset(name, root, net, fp32_model, args, args.work)
    print("\n" + table(rows))
    write_results(args.out, {"backbone": args.backbone, "cpu": cpu, "rows": rows,
                             "command": "python benchmarks/int8.py " + " ".join(
                                 json.dumps(a) if " " in a else a
                                 for a in os.sys.argv[1:])}, load_before)


if __name__ == "__main__":
    main()
