"""Which copies of a photo the audit finds: embedding candidates, then local-feature checks.

From --originals photos of --data (seeded choice), copies of each kind are written to a
temporary folder: crops keeping 60%, 40% and 20% of the area (resized back to the original
size), a mirror image, a rotation of 3-5 degrees (cropped to drop the corners), a caption
drawn over the photo, a JPEG re-encode at quality 30, and a half-size copy. Every image is
embedded (featx extract, EfficientNet-Lite0 ImageNet weights, ONNX Runtime fp32). For
each copy kind the table gives:

  cosine     median cosine between copy and original, and the share above each candidate
             threshold
  nearest    share of copies whose nearest other image is their original
  verified   share confirmed by featx.auditing.CopyVerifier (ORB + ratio test + RANSAC
             similarity fit, MIN_INLIERS) among the pairs, and the inlier counts (5th
             percentile, median)

Negatives: each original's --negatives most similar other originals (same class mostly:
the look-alikes that chain groups together), with their cosines and how many the verifier
wrongly confirms (precision = confirmed copies / all confirmed pairs among candidates).

Usage:
    python benchmarks/audit_copies.py --data $FEATX_DOGCAT [--originals 200]
Prints tables and writes JSON (benchmarks/results/audit_copies.json by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import write_results  # noqa: E402  (benchmarks/, the script's folder)

CANDIDATE_COSINES = (0.6, 0.7, 0.75, 0.8, 0.9)
INLIER_THRESHOLDS = (15, 20, 25, 30, 40, 60)
KINDS = ("crop60", "crop40", "crop20", "mirror", "rotate", "caption", "jpeg30", "half")


def make_copy(image, kind, rng):
    """A BGR copy of ``image`` of the given kind."""
    h, w = image.shape[:2]
    if kind.startswith("crop"):
        keep = int(kind[4:]) / 100
        ch, cw = int(h * np.sqrt(keep)), int(w * np.sqrt(keep))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return cv2.resize(image[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_CUBIC)
    if kind == "mirror":
        return image[:, ::-1].copy()
    if kind == "rotate":
        angle = rng.uniform(3, 5) * rng.choice([-1, 1])
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.12)  # zoom hides corners
        return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR)
    if kind == "caption":
        out = image.copy()
        cv2.putText(out, "featx copy 2026", (int(0.05 * w), int(0.55 * h)),
                    cv2.FONT_HERSHEY_DUPLEX, w / 300, (255, 255, 255), max(2, w // 150))
        return out
    if kind == "jpeg30":
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 30])
        return cv2.imdecode(data, cv2.IMREAD_COLOR)
    if kind == "half":
        return cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    raise ValueError(kind)


def build(data: Path, out: Path, n: int, seed: int):
    rng = np.random.default_rng(seed)
    photos = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    chosen = [photos[i] for i in rng.choice(len(photos), n, replace=False)]
    pairs = []  # (copy path, original path, kind), relative to out
    for k, photo in enumerate(chosen):
        image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        cls = photo.parent.name
        (out / cls).mkdir(parents=True, exist_ok=True)
        original = f"{cls}/o{k:04d}.jpg"
        cv2.imwrite(str(out / original), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        for kind in KINDS:
            copy = f"{cls}/c{k:04d}_{kind}.jpg"
            cv2.imwrite(str(out / copy), make_copy(image, kind, rng),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            pairs.append((copy, original, kind))
    return pairs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--originals", type=int, default=200)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/audit_copies.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    from featx.auditing import CopyVerifier, normalized
    from featx.auditing._copies import MIN_INLIERS
    from featx.extraction import extract

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "copies"
        pairs = build(Path(args.data), folder, args.originals, args.seed)
        features = extract(folder, cache_dir=Path(tmp) / "cache", progress=False)
        index = {p: i for i, p in enumerate(features.paths)}
        Z = normalized(features.take(np.arange(len(features.paths)))[0])
        verifier = CopyVerifier(features.root, features.paths, features.sha256)
        similarity = Z @ Z.T
        np.fill_diagonal(similarity, -1)
        rows, started = {}, time.perf_counter()
        for kind in KINDS:
            cos, nearest, inliers = [], [], []
            for copy, original, k in pairs:
                if k != kind:
                    continue
                i, j = index[copy], index[original]
                cos.append(float(similarity[i, j]))
                nearest.append(int(np.argmax(similarity[i])) == j)
                found = verifier.best_fit(j, i)
                inliers.append(found["inliers"] if found else 0)
            rows[kind] = _row(cos, nearest, inliers)
        originals = sorted(index[o] for o in {o for _, o, _ in pairs})
        sub = similarity[np.ix_(originals, originals)]
        neg_cos, neg_inliers = [], []
        for a, row in enumerate(sub):
            for b in np.argsort(-row)[:args.negatives]:
                i, j = originals[a], originals[int(b)]
                neg_cos.append(float(row[b]))
                found = verifier.best_fit(i, j)
                neg_inliers.append(found["inliers"] if found else 0)
        seconds = time.perf_counter() - started
    negatives = {"n": len(neg_cos), "cosine_median": float(np.median(neg_cos)),
                 "cosine_p95": float(np.quantile(neg_cos, 0.95)),
                 "inliers_median": float(np.median(neg_inliers)),
                 "inliers_p95": float(np.quantile(neg_inliers, 0.95)),
                 "inliers_p99": float(np.quantile(neg_inliers, 0.99)),
                 "inliers_max": int(max(neg_inliers)),
                 "confirmed_at": {str(t): int(np.sum(np.asarray(neg_inliers) >= t))
                                  for t in INLIER_THRESHOLDS},
                 "above": {str(c): float(np.mean(np.asarray(neg_cos) >= c))
                           for c in CANDIDATE_COSINES}}
    print(f"{args.originals} originals from {args.data}; min_inliers {MIN_INLIERS}")
    print(f"{'kind':>8} {'cos med':>8} " + " ".join(f">={c:<5}" for c in CANDIDATE_COSINES)
          + f" {'nearest':>8} {'inl p5':>7} {'inl med':>8} {'verified':>9}")
    for kind, r in rows.items():
        print(f"{kind:>8} {r['cosine_median']:>8.3f} "
              + " ".join(f"{r['above'][str(c)]:>7.2f}" for c in CANDIDATE_COSINES)
              + f" {r['nearest']:>8.2f} {r['inliers_p5']:>7.0f} {r['inliers_median']:>8.0f}"
              f" {r['verified_at'][str(MIN_INLIERS)]:>9.2f}")
    print("verified share per inlier threshold: " + "; ".join(
        f"{kind} " + "/".join(f"{r['verified_at'][str(t)]:.2f}" for t in INLIER_THRESHOLDS)
        for kind, r in rows.items()) + f" (at {INLIER_THRESHOLDS})")
    print(f"negatives ({negatives['n']} most-similar other originals): cosine median "
          f"{negatives['cosine_median']:.3f}, p95 {negatives['cosine_p95']:.3f}; inliers median "
          f"{negatives['inliers_median']:.0f}, p95 {negatives['inliers_p95']:.0f}, p99 "
          f"{negatives['inliers_p99']:.0f}, max {negatives['inliers_max']}")
    write_results(args.out, {"data": str(args.data), "originals": args.originals,
                             "seed": args.seed, "min_inliers": MIN_INLIERS,
                             "copies": rows, "negatives": negatives,
                             "verify_seconds": seconds}, load_before)


def _row(cos, nearest, inliers):
    cos, inliers = np.asarray(cos), np.asarray(inliers)
    return {"n": int(len(cos)), "cosine_median": float(np.median(cos)),
            "above": {str(c): float(np.mean(cos >= c)) for c in CANDIDATE_COSINES},
            "nearest": float(np.mean(nearest)),
            "inliers_p5": float(np.quantile(inliers, 0.05)),
            "inliers_median": float(np.median(inliers)),
            "verified_at": {str(t): float(np.mean(inliers >= t)) for t in INLIER_THRESHOLDS}}


if __name__ == "__main__":
    main()
