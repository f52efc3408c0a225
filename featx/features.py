"""The cached rows every later stage reads: :class:`Features` (one backbone's cache) and
:class:`CombinedFeatures` (several backbones' caches side by side, aligned by content hash).

Both offer the same reading interface (``paths``, ``labels``, ``split``, ``view``,
``sha256``, ``indices``, ``arrays``, ``take``, ``groups``...), so the classifiers, reports
and persistence never ask which one they were given.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from featx.cache import FeatureCache
from featx.errors import DataError
from featx.options import COMBINE

log = logging.getLogger(__name__)


# ----- results ---------------------------------------------------------------------
@dataclasses.dataclass
class ExtractStats:
    n_images: int = 0
    n_failed: int = 0
    n_ignored: int = 0
    n_extracted: int = 0  # images that went through the model in this run
    n_copied: int = 0  # rows reused from identical content under another path
    n_augmented: int = 0  # augmented views computed in this run
    seconds: float = 0.0
    model_seconds: float = 0.0  # the reader -> model -> writer pipeline, wall time
    first_batch_seconds: float = 0.0  # of which the first batch (model tracing included)
    first_batch_images: int = 0
    images_per_second: float = 0.0
    n_excluded: int = 0  # images of the folder left out by an exclude list
    reused: bool = False
    runtime: str = ""  # which runtime computed this run's rows ("" when none did)
    device: str = ""  # where the model ran: "CPU", or the GPU's name and the backend
    batch_size: int = 0  # images per model call (0 when no model ran)
    engine: str = "local"  # what drove the pipeline: "local" or "ray"
    n_shards_reused: int = 0  # ray: shards a stopped run had finished, checked and adopted
    failed: list = dataclasses.field(default_factory=list)
    ignored: list = dataclasses.field(default_factory=list)


class _Rows:
    """Row selection over ``paths``, ``labels``, ``split``, ``view`` and ``sha256``; a
    subclass reads embeddings in :meth:`take`."""

    def __len__(self):
        return int((self.view == 0).sum())

    def __repr__(self):
        counts = {s: int(((self.split == s) & (self.view == 0)).sum()) for s in ("train", "val", "test")}
        return (f"{type(self).__name__}({self.backbone}, weights={self.weights}, dim={self.dim}, "
                f"classes={len(self.class_names)}, splits={counts})")

    @property
    def flip_average(self) -> bool:
        return bool(self.key.get("flip_average", False))

    def has_split(self, split: str) -> bool:
        return bool(((self.split == split) & (self.view == 0)).any())

    def indices(self, split: str, views: bool = False) -> np.ndarray:
        """Row indices of ``split``; ``views=True`` adds augmented views of those images."""
        mask = self.split == split
        if not views:
            mask &= self.view == 0
        return np.flatnonzero(mask)

    def arrays(self, split: str, views: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of one split, in row order."""
        return self.take(self.indices(split, views))

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def require_views(self) -> None:
        """Raise DataError unless the rows include augmented views (``extract --augment``)."""
        if not (self.view > 0).any():
            where = " + ".join(str(p) for p in self.cache_paths)
            raise DataError(f"{where}: no augmented views cached; "
                            "run `featx extract --augment K` first")

    def groups(self, split: str, views: bool = False) -> np.ndarray:
        """Content hash per row of ``split``: cross-validation keeps an image and its views
        in one fold."""
        return self.sha256[self.indices(split, views)]


class Features(_Rows):
    """Cached embeddings of one dataset under one backbone; embeddings are read lazily.

    ``exclude``: relative paths whose rows (and augmented views) are left out; the cache
    keeps them, so a run without the exclude list reuses them.
    """

    def __init__(self, cache_path, stats: ExtractStats | None = None, exclude=frozenset()):
        self.cache_path = Path(cache_path)
        with FeatureCache.open(self.cache_path) as cache:
            rows = cache.rows()
            self.class_names = cache.json_attr("class_names", [])
            self.backbone = cache.attr("backbone")
            self.weights = cache.attr("weights")
            self.weights_id = cache.attr("weights_id")
            self.key = cache.key
            self.dim = cache.dim
            self.root = Path(cache.attr("root"))
            self.split_params = cache.json_attr("split_params", {})
            self.layout = cache.attr("layout", "pool")  # "split": given train/val folders
            self.preprocessing = cache.json_attr("preprocessing", {})
            self.extraction_seconds = float(cache.attr("extraction_seconds", 0.0))
            self.runtimes = cache.json_attr("runtimes", [])
            # what computed the rows: "onnxruntime/cpu", "keras/jax/gpu" (featx.runtimes)
            self.computed_by = cache.json_attr("computed_by", [])
            failed = cache.failed()
        # cache row of each of our rows: take() reads through it
        self._cache_rows = np.flatnonzero([p not in exclude for p in rows["paths"]])
        self.paths = rows["paths"][self._cache_rows]
        self.labels = rows["labels"][self._cache_rows]
        self.split = rows["split"][self._cache_rows]
        self.view = rows["view"][self._cache_rows]
        self.sha256 = rows["sha256"][self._cache_rows]
        self.parts = [self]
        self.cache_paths = [self.cache_path]
        if stats is None:
            failed = [(p, r) for p, _, r in failed if p not in exclude]
            excluded = int((rows["view"] == 0).sum() - (self.view == 0).sum())
            stats = ExtractStats(n_images=int((self.view == 0).sum()), n_failed=len(failed),
                                 failed=failed, n_excluded=excluded, reused=True)
        self.stats = stats

    @classmethod
    def open(cls, cache_path) -> "Features":
        return cls(cache_path)

    @property
    def precision(self) -> str:
        return self.key.get("precision", "fp32")

    def provenance(self) -> str:
        """Which runtime(s) and precision computed the cached rows, for reports."""
        ran = self.stats.runtime or ", ".join(self.runtimes) or "unrecorded runtime"
        flip = "; flip-averaged" if self.flip_average else ""
        return f"{ran}; cached rows {self.precision}{flip}"

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of the rows ``idx`` (indices into this object's rows, any order)."""
        idx = np.asarray(idx, dtype=np.int64)
        with FeatureCache.open(self.cache_path) as cache:
            return cache.embeddings(self._cache_rows[idx]), self.labels[idx]


class CombinedFeatures(_Rows):
    """Several backbones' cached rows of one dataset, side by side: a row's embedding is the
    concatenation of its parts' embeddings, in the order the parts are given.

    Rows are aligned by content hash and view number, so the parts' caches may list files in
    any order. The first part decides the rows, their labels and their split; an image that
    another part has no row for (it failed there) is left out and listed in
    ``stats.failed``. An augmented view's row joins each part's own random draw of that view
    number (the parts crop at other sizes), a fresh augmentation per part.
    """

    def __init__(self, parts):
        self.parts = list(parts)
        first = self.parts[0]
        for part in self.parts[1:]:
            if list(part.class_names) != list(first.class_names):
                raise DataError(f"{part.backbone} and {first.backbone} caches list other "
                                f"classes ({part.cache_path}, {first.cache_path}); combine "
                                "caches of one dataset")
        self.backbone = COMBINE.join(p.backbone for p in self.parts)
        self.class_names, self.root = first.class_names, first.root
        self.split_params, self.layout = first.split_params, first.layout
        self.weights = COMBINE.join(dict.fromkeys(p.weights for p in self.parts))
        self.weights_id = " + ".join(p.weights_id for p in self.parts)
        self.key = {"parts": [p.key for p in self.parts], "flip_average": first.flip_average}
        self.dim = sum(p.dim for p in self.parts)
        self.preprocessing = {"parts": [p.preprocessing for p in self.parts]}
        self.extraction_seconds = sum(p.extraction_seconds for p in self.parts)
        self.cache_path = None  # no file of its own: each part has its cache
        self.cache_paths = [p.cache_path for p in self.parts]
        self.rows, dropped = _align(self.parts)
        base = self.rows[0]
        self.paths, self.labels = first.paths[base], first.labels[base]
        self.split, self.view, self.sha256 = first.split[base], first.view[base], first.sha256[base]
        self.stats = self._stats(dropped)

    @property
    def precision(self) -> str:
        return self.parts[0].precision

    def provenance(self) -> str:
        return "; ".join(f"{p.backbone}: {p.provenance()}" for p in self.parts)

    @property
    def computed_by(self) -> list[str]:
        return sorted({who for part in self.parts for who in part.computed_by})

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        blocks = [part.take(rows[idx])[0] for part, rows in zip(self.parts, self.rows)]
        return np.concatenate(blocks, axis=1), self.labels[idx]

    def _stats(self, dropped) -> ExtractStats:
        stats = [p.stats for p in self.parts]
        failed = {}
        for part in self.parts:
            for path, reason in part.stats.failed:
                failed.setdefault(path, f"{part.backbone}: {reason}")
        for path, part in dropped:
            failed.setdefault(path, f"{part}: no row in this part's cache")
        n_failed = len(failed)
        return ExtractStats(
            n_images=len(self), n_failed=n_failed, n_ignored=stats[0].n_ignored,
            n_extracted=sum(s.n_extracted for s in stats),
            n_copied=sum(s.n_copied for s in stats),
            n_augmented=sum(s.n_augmented for s in stats),
            seconds=sum(s.seconds for s in stats),
            model_seconds=sum(s.model_seconds for s in stats),
            images_per_second=_rate(stats), n_excluded=stats[0].n_excluded,
            reused=all(s.reused for s in stats),
            runtime="; ".join(s.runtime for s in stats if s.runtime),
            failed=sorted(failed.items()), ignored=stats[0].ignored)


def _rate(stats) -> float:
    """Images through a model per second of model time, over every part."""
    seconds = sum(s.model_seconds for s in stats)
    return sum(s.n_extracted for s in stats) / seconds if seconds > 0 else 0.0


def _align(parts) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    """Row indices per part that line up, in the first part's row order, and the (path,
    part name) of the first part's original images that another part lacks.

    A row matches the other part's row of the same content hash and view, preferably under
    the same path (an image stored twice then keeps one row per path in every part).
    """
    first = parts[0]
    keep = np.ones(len(first.paths), dtype=bool)
    lookups, dropped = [], []
    for part in parts[1:]:
        by_path, by_content = {}, {}
        for i, (path, sha, view) in enumerate(zip(part.paths.tolist(), part.sha256.tolist(),
                                                  part.view.tolist())):
            by_path.setdefault((path, sha, view), i)
            by_content.setdefault((sha, view), i)
        found = np.array([by_path.get(row, by_content.get(row[1:], -1)) for row in
                          zip(first.paths.tolist(), first.sha256.tolist(),
                              first.view.tolist())], dtype=np.int64)
        lookups.append(found)
        keep &= found >= 0
        _warn_view_differences(first, part, found)
        missing = np.flatnonzero((found < 0) & (first.view == 0))
        dropped += [(str(first.paths[i]), part.backbone) for i in missing]
    base = np.flatnonzero(keep)
    rows = [base] + [found[base] for found in lookups]
    _warn_split_differences(parts, rows)
    return rows, dropped


def _warn_view_differences(first, part, found) -> None:
    views = first.view > 0
    if (views & (found < 0)).any() or views.sum() != (part.view > 0).sum():
        log.warning("%s and %s hold different augmented views (%d and %d rows); only views "
                    "cached in both are combined", first.backbone, part.backbone,
                    int(views.sum()), int((part.view > 0).sum()))


def _warn_split_differences(parts, rows) -> None:
    first = parts[0]
    for part, idx in zip(parts[1:], rows[1:]):
        differ = int((part.split[idx] != first.split[rows[0]]).sum())
        if differ:
            log.warning("%d images are in another split in %s than in %s; the split of %s "
                        "is used", differ, part.cache_path, first.cache_path, first.backbone)
