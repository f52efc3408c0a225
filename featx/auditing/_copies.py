"""Is this pair of images one picture? Local features with a geometric fit decide.

Embeddings find candidates (:func:`featx.auditing.candidate_pairs`, at a lower cosine);
:class:`CopyVerifier` confirms them as a person would: ORB keypoints on both images,
Lowe's ratio test, then a RANSAC fit of a similarity transform (rotation, scale,
translation: ``cv2.estimateAffinePartial2D``). Enough inliers make the pair one picture,
and the fitted transform says how one became the other: ``same``, ``scaled``, ``cropped``
or ``mirrored`` (tried on the mirror image when the direct fit fails). Two photos of a
similar scene rarely agree on many keypoints under one transform; a crop, a resize, a
re-encode or a light edit does.

Keypoints are computed only for the images in candidate pairs, once per audit, and kept
in a :class:`LocalFeatureStore` (an HDF5 file keyed by content hash) so that a warm audit
computes none again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIDE = 480  # images are scaled to this longer side before ORB (speed; detail in small ones)
N_FEATURES = 1000  # 500 confirmed 68% of captioned copies, 83% of 40% crops; 1000: 99%, 96%
RATIO = 0.75  # Lowe's ratio test
# Measured with benchmarks/audit_copies.py on dogcat: the most similar distinct photos
# reached 9 inliers at most, copies a median of 36 (20% crops) to 892 (mirror images)
MIN_INLIERS = 25
RANSAC_PIXELS = 5.0
# Fits that shrink or grow by more than 5x are refused: on generated pictures of flat shapes
# a scale-0 fit (every point onto one corner) "explained" 26-35 matches of distinct images
MIN_SCALE = 0.2
MIRROR_COSINE = 0.90  # mirror images were at 0.97 (median); below this, no mirror fit
RECIPE = f"orb{N_FEATURES}-side{SIDE}-ratio{RATIO}-ransac{RANSAC_PIXELS}-scale{MIN_SCALE}"
COPY_KINDS = ("same", "scaled", "cropped", "mirrored")


def orb_features(image) -> tuple[np.ndarray, np.ndarray]:
    """Keypoint positions (k, 2) float32, in pixels of the image scaled to a longer side of
    :data:`SIDE`, and ORB descriptors (k, 32) uint8, of an RGB or gray uint8 image."""
    import cv2

    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    scale = SIDE / max(gray.shape[:2])
    if scale != 1:  # small images grow: ORB finds few corners in a thumbnail
        gray = cv2.resize(gray, None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    keypoints, descriptors = cv2.ORB_create(nfeatures=N_FEATURES).detectAndCompute(gray, None)
    if descriptors is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    xy = np.array([k.pt for k in keypoints], dtype=np.float32)
    return xy, descriptors


def match(a, b) -> dict | None:
    """Fit one similarity transform from image a's keypoints to b's: ``{"inliers",
    "matrix"}`` (how many ratio-test matches agree with it), or None without three matches.
    ``a`` and ``b`` are ``(xy, descriptors, (height, width), scale)``: keypoints in the
    scaled pixels, the scaled size, and the scale from the original image."""
    import cv2

    (xy_a, desc_a, *_), (xy_b, desc_b, *_) = a, b
    if len(desc_a) < 2 or len(desc_b) < 2:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(desc_a, desc_b, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < 3:
        return None
    src = xy_a[[m.queryIdx for m in good]]
    dst = xy_b[[m.trainIdx for m in good]]
    matrix, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                                  ransacReprojThreshold=RANSAC_PIXELS)
    if matrix is None or not MIN_SCALE <= np.hypot(matrix[0, 0], matrix[1, 0]) <= 1 / MIN_SCALE:
        return None  # a degenerate fit (everything onto one spot) explains repeated corners
    return {"inliers": int(inliers.sum()), "matrix": matrix}


def transform_kind(matrix, a, b) -> str:
    """What the similarity transform from image a's keypoints to b's did: ``same`` (a's
    frame maps onto b's at the same size), ``scaled`` (onto b's frame at another size),
    else ``cropped`` (one frame covers only part of the other). ``a`` and ``b`` as for
    :func:`match`: frames are compared in the scaled pixels, sizes in the original ones."""
    size_a, size_b = a[2], b[2]
    scale = float(np.hypot(matrix[0, 0], matrix[1, 0])) * a[3] / b[3]
    corners = np.array([[0, 0], [size_a[1], 0], [0, size_a[0]], [size_a[1], size_a[0]]],
                       dtype=np.float64)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    span = np.array([size_b[1], size_b[0]], dtype=np.float64)
    gap = np.abs(mapped - corners * (span / [size_a[1], size_a[0]])).max() / span.max()
    if gap > 0.05:
        return "cropped"
    return "same" if abs(scale - 1) < 0.03 else "scaled"


class LocalFeatureStore:
    """ORB keypoints by content hash, and the fits of pairs already checked, in an HDF5
    file (``path``), or in memory when ``path`` is None. ``get(key, compute)`` reads
    keypoints, or computes and keeps them; ``fit(key, compute)`` the same for a pair."""

    def __init__(self, path=None):
        self.path = None if path is None else Path(path)
        self._memory: dict = {}
        self._new: dict = {}
        self._fits: dict | None = None
        self._new_fits: dict = {}
        self.computed = 0

    def fit(self, key: str, compute):
        if self._fits is None:
            self._fits = self._read_fits()
        if key not in self._fits:
            self._fits[key] = self._new_fits[key] = compute()
        return self._fits[key]

    def forget(self, key: str) -> None:
        for fits in (self._fits or {}, self._new_fits):
            fits.pop(key, None)

    def _read_fits(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        import h5py

        with h5py.File(self.path, "r", locking=False) as h5:
            return self._read_fits_from(h5)

    def get(self, key: str, compute):
        if key in self._memory:
            return self._memory[key]
        found = self._read(key)
        if found is None:
            found = compute()
            self.computed += 1
            if found is not None:  # an unreadable image is tried again next time
                self._new[key] = found
        self._memory[key] = found
        return found

    def _read(self, key):
        if self.path is None or not self.path.exists():
            return None
        import h5py

        with h5py.File(self.path, "r", locking=False) as h5:
            if key not in h5:
                return None
            group = h5[key]
            return (group["xy"][:], group["descriptors"][:], tuple(group.attrs["size"]),
                    float(group.attrs["scale"]))

    def save(self) -> None:
        """Append what was computed since the last save (nothing without a path)."""
        if self.path is None or not (self._new or self._new_fits):
            return
        import json

        import h5py

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.path, "a", locking=False) as h5:
            for key, (xy, descriptors, size, scale) in self._new.items():
                if key in h5:
                    continue
                group = h5.create_group(key)
                group.create_dataset("xy", data=xy)
                group.create_dataset("descriptors", data=descriptors)
                group.attrs["size"] = np.asarray(size, dtype=np.int64)
                group.attrs["scale"] = scale
            if self._new_fits:
                fits = {**self._read_fits_from(h5), **self._new_fits}
                if "fits" in h5:
                    del h5["fits"]
                h5["fits"] = np.bytes_(json.dumps(fits))
        self._new, self._new_fits = {}, {}

    @staticmethod
    def _read_fits_from(h5) -> dict:
        import json

        return json.loads(h5["fits"][()].decode()) if "fits" in h5 else {}


class CopyVerifier:
    """Confirms candidate pairs from the images themselves.

    Parameters
    ----------
    root : path
        The folder the paths are relative to.
    paths, sha256 : sequences, aligned with the audited rows
    store : LocalFeatureStore, optional
        Where keypoints and fits are kept between audits (default: in memory).
    min_inliers : int
    fallback_cosine : float
        A pair with an image that cannot be read is a copy when its cosine reaches this
        (the embedding-only rule), with kind ``unverified``.
    read : callable, optional
        ``read(path) -> RGB uint8 array`` (default: featx's decoder).
    progress : bool
        A bar over the pairs checked (:func:`featx.auditing.verified_pairs` draws it).
    """

    def __init__(self, root, paths, sha256, *, store: LocalFeatureStore | None = None,
                 min_inliers: int = MIN_INLIERS, fallback_cosine: float = 0.90, read=None,
                 progress: bool = False):
        self.root = Path(root)
        self.paths, self.sha256 = list(paths), list(sha256)
        self.store = store or LocalFeatureStore()
        self.min_inliers = min_inliers
        self.fallback_cosine = fallback_cosine
        self.read = read or _read_rgb
        self.unreadable: set = set()
        self.progress = progress

    def __call__(self, i: int, j: int, cosine: float = 1.0) -> dict | None:
        """``{"kind", "inliers"}`` when rows i and j show one picture, else None."""
        if i > j:
            i, j = j, i
        mirror = cosine >= MIRROR_COSINE
        key = f"{RECIPE}:{self._key(i)}:{self._key(j)}:{mirror:d}"
        found = self.store.fit(key, lambda: self.best_fit(i, j, mirror=mirror))
        if {i, j} & self.unreadable:
            self.store.forget(key)  # asked again next time: the file may be back
            return ({"kind": "unverified", "inliers": None}
                    if cosine >= self.fallback_cosine else None)
        if found is None or (found["inliers"] is not None
                             and found["inliers"] < self.min_inliers):
            return None
        return found

    def notes(self) -> list[str]:
        """One line when some images could not be read for the check."""
        if not self.unreadable:
            return []
        return [f"near-duplicates: {len(self.unreadable)} image(s) could not be read for the "
                f"local-feature check; their pairs count as copies from cosine "
                f"{self.fallback_cosine} (e.g. {self.root / self.paths[min(self.unreadable)]})"]

    def _key(self, row) -> str:
        return self.sha256[row] or str(self.paths[row])

    def best_fit(self, i: int, j: int, mirror: bool = True) -> dict | None:
        """The better of the direct and the mirrored fit, ``{"kind", "inliers"}``,
        whatever its inlier count (None when neither could be fitted). Identical files
        are ``same`` with ``inliers`` None."""
        if self.sha256[i] and self.sha256[i] == self.sha256[j]:
            return {"kind": "same", "inliers": None}
        a, b = self._features(i), self._features(j)
        if a is None or b is None:
            return None
        direct = match(a, b)
        fit = None if direct is None else {"kind": transform_kind(direct["matrix"], a, b),
                                           "inliers": direct["inliers"]}
        if not mirror or (fit is not None and fit["inliers"] >= self.min_inliers):
            return fit
        mirrored = self._features(j, mirrored=True)
        flipped = match(a, mirrored) if mirrored is not None else None
        if flipped is not None and (fit is None or flipped["inliers"] > fit["inliers"]):
            return {"kind": "mirrored", "inliers": flipped["inliers"]}
        return fit

    def _features(self, row: int, mirrored: bool = False):
        key = f"{RECIPE}/{self._key(row)}{'-mirror' if mirrored else ''}"

        def compute():
            image = self.read(self.root / self.paths[row])
            if image is None:
                self.unreadable.add(row)
                return None
            if mirrored:
                image = np.ascontiguousarray(image[:, ::-1])
            xy, descriptors = orb_features(image)
            scale = SIDE / max(image.shape[:2])
            size = (round(image.shape[0] * scale), round(image.shape[1] * scale))
            return xy, descriptors, size, scale

        found = self.store.get(key, compute)
        return found if found is not None and len(found[1]) else None

    def save(self) -> None:
        self.store.save()


def _read_rgb(path):
    from featx.data import read_image

    try:
        return read_image(path, reduced_decode=True, resize_size=SIDE)
    except Exception:  # noqa: BLE001 - an unreadable image confirms nothing
        return None
