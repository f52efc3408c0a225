"""The warm audit of --n generated images in --classes classes, with and without the check
of copies from the images, and what each finds of the planted copies.

Each class is a family of generated pictures (shapes on a noisy ground, the class fixing
the palette and the kind of shapes), 192 x 192 JPEG; 1% of the images get a copy beside
them, evenly of five kinds: a crop keeping 40% of the area, a mirror image, a caption, a
JPEG re-encode at quality 30 and a half-size copy. Everything is embedded once
(EfficientNet-Lite0, ImageNet weights, ONNX Runtime fp32). Then, on the warm cache:

  before   `featx audit --no-verify`: near-duplicates by embedding cosine alone (0.90),
           the rule of the previous release
  cold     `featx audit` the first time: keypoints and fits computed for every candidate
  after    `featx audit` again: the keypoints and fits come from the store

Each is run --repeats times (min / median / max seconds of the whole audit). Found: planted
copies whose pair ended in one group, per kind, and groups holding no planted pair.

Usage:
    python benchmarks/audit_images.py [--n 10000] [--classes 100] [--repeats 3]
Prints a table and writes JSON (benchmarks/results/audit_images.json by default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import write_results  # noqa: E402  (benchmarks/, the script's folder)

SIZE = 192
KINDS = ("crop40", "mirror", "caption", "jpeg30", "half")


def scene(cls: int, seed: int) -> np.ndarray:
    """A BGR picture of class ``cls``: its palette and shapes, placed at random."""
    family = np.random.default_rng(cls)
    palette = family.integers(0, 255, (4, 3))
    circles = family.random()
    rng = np.random.default_rng(seed)
    image = np.full((SIZE, SIZE, 3), palette[0], np.uint8)
    image = cv2.add(image, rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8))
    image = cv2.GaussianBlur(image, (0, 0), 2)
    for _ in range(25):
        colour = tuple(int(c) for c in palette[rng.integers(1, 4)] + rng.integers(-30, 30, 3))
        x, y = (int(v) for v in rng.integers(0, SIZE, 2))
        if rng.random() < circles:
            cv2.circle(image, (x, y), int(rng.integers(3, 20)), colour, -1)
        else:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(5, 35)),
                                          y + int(rng.integers(5, 35))), colour, -1)
    return image


def make_copy(image, kind, rng):
    h, w = image.shape[:2]
    if kind == "crop40":
        ch, cw = int(h * 0.63), int(w * 0.63)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return cv2.resize(image[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_CUBIC)
    if kind == "mirror":
        return image[:, ::-1].copy()
    if kind == "caption":
        out = image.copy()
        cv2.putText(out, "copy", (10, h // 2), cv2.FONT_HERSHEY_DUPLEX, 1.5, (255, 255, 255), 2)
        return out
    if kind == "jpeg30":
        return cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 30])[1],
                            cv2.IMREAD_COLOR)
    return cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def build(folder: Path, n: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    planted = set(rng.choice(n, max(len(KINDS), n // 100), replace=False).tolist())
    pairs = []
    for i in range(n):
        cls = i % classes
        (folder / f"class{cls:03d}").mkdir(parents=True, exist_ok=True)
        name = f"class{cls:03d}/img{i:05d}.jpg"
        image = scene(cls, seed * 1_000_003 + i)
        cv2.imwrite(str(folder / name), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if i in planted:
            kind = KINDS[len(pairs) % len(KINDS)]
            copy = f"class{cls:03d}/img{i:05d}_{kind}.jpg"
            cv2.imwrite(str(folder / copy), make_copy(image, kind, rng),
                        [cv2.IMWRITE_JPEG_QUALITY, 92])
            pairs.append((name, copy, kind))
    return pairs


def scored(summary_json, pairs):
    import json

    report = json.loads(Path(summary_json).read_text())
    group_of = {}
    for k, group in enumerate(report["duplicates"]):
        for member in group["members"]:
            group_of[member["path"]] = k
    planted_groups = set()
    found = {kind: 0 for kind in KINDS}
    for original, copy, kind in pairs:
        if original in group_of and group_of[original] == group_of.get(copy):
            found[kind] += 1
            planted_groups.add(group_of[original])
    per_kind = {kind: sum(k == kind for _, _, k in pairs) for kind in KINDS}
    return {"found": found, "planted": per_kind,
            "groups": len(report["duplicates"]),
            "groups_without_a_planted_pair": len(report["duplicates"]) - len(planted_groups),
            "largest_group": max((len(g["members"]) for g in report["duplicates"]), default=0),
            "seconds": report["seconds"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/audit_images.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    from featx import api
    from featx.options import AuditOptions

    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "images", Path(tmp) / "cache"
        started = time.perf_counter()
        pairs = build(folder, args.n, args.classes, args.seed)
        made = time.perf_counter() - started
        started = time.perf_counter()
        extracted = api.extract(folder, cache_dir=cache, progress=False)
        extract_seconds = time.perf_counter() - started
        runs = {}

        def audit(name, verify):
            started = time.perf_counter()
            out = api.audit(folder, report_dir=Path(tmp) / name, cache_dir=cache,
                            progress=False, audit_options=AuditOptions(verify=verify))
            seconds = time.perf_counter() - started
            assert out["n_extracted"] == 0
            return seconds, scored(Path(tmp) / name / "audit.json", pairs)

        runs["before"] = [audit("before", False) for _ in range(args.repeats)]
        runs["cold"] = [audit("cold", True)]
        runs["after"] = [audit("after", True) for _ in range(args.repeats)]
    table = {}
    print(f"{args.n} generated images (+{len(pairs)} planted copies) in {args.classes} "
          f"classes; made in {made:.0f} s, embedded in {extract_seconds:.0f} s")
    print(f"{'audit':>7} | {'seconds min / median / max':^28} | found of "
          + "/".join(KINDS) + " | groups (without a planted pair) | largest")
    for name, results in runs.items():
        seconds = [s for s, _ in results]
        last = results[-1][1]
        table[name] = {"seconds": seconds, "min": min(seconds),
                       "median": statistics.median(seconds), "max": max(seconds), **last}
        print(f"{name:>7} | {min(seconds):8.1f} / {statistics.median(seconds):6.1f} / "
              f"{max(seconds):6.1f} | "
              + "/".join(f"{last['found'][k]}" for k in KINDS) + " of "
              + "/".join(f"{last['planted'][k]}" for k in KINDS)
              + f" | {last['groups']} ({last['groups_without_a_planted_pair']}) | "
              f"{last['largest_group']}")
    write_results(args.out, {"n": args.n, "classes": args.classes, "planted": len(pairs),
                             "extract_seconds": extract_seconds,
                             "n_images": len(extracted), "audits": table}, load_before)


if __name__ == "__main__":
    main()
