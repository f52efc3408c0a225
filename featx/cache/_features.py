"""The cached rows every later stage reads: :class:`Features` (one backbone's cache) and,
in :mod:`._combined`, :class:`CombinedFeatures` (several backbones' caches side by side).

Both offer the same reading interface (``paths``, ``labels``, ``split``, ``view``,
``sha256``, ``indices``, ``arrays``, ``take``, ``groups``...), so the classifiers, reports
and persistence never ask which one they were given.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from featx.errors import CacheError, DataError

from ._index import FeatureCache

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
        counts = {s: int(((self.split == s) & (self.view == 0)).sum())
                  for s in ("train", "val", "test")}
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

    def to_dict(self) -> dict:
        """What ``featx extract --json`` prints: caches, backbone, counts, splits, timing,
        what computed the rows and the files that failed (and each part of a combination)."""
        stats = self.stats
        out = {
            "cache": None if self.cache_path is None else str(self.cache_path),
            "caches": [str(path) for path in self.cache_paths],
            "backbone": self.backbone, "weights": self.weights, "weights_id": self.weights_id,
            "n_images": stats.n_images, "n_failed": stats.n_failed,
            "n_ignored": stats.n_ignored, "n_excluded": stats.n_excluded,
            "n_extracted": stats.n_extracted, "n_augmented": stats.n_augmented,
            "dim": self.dim, "classes": self.class_names,
            "splits": {s: int(len(self.indices(s))) for s in ("train", "val", "test")},
            "seconds": round(stats.seconds, 3),
            "images_per_second": round(stats.images_per_second, 2),
            "runtime": stats.runtime or None, "device": stats.device or None,
            "batch_size": stats.batch_size or None, "computed_by": self.computed_by,
            "engine": stats.engine, "precision": self.precision,
            "int8_agreement": self.int8_agreement, "reused": stats.reused,
            "flip_average": self.flip_average,
            "failed": [{"path": p, "reason": r} for p, r in stats.failed],
        }
        if len(self.parts) > 1:
            out["parts"] = [{"backbone": p.backbone, "cache": str(p.cache_path), "dim": p.dim,
                             "n_extracted": p.stats.n_extracted,
                             "seconds": round(p.stats.seconds, 3)} for p in self.parts]
        return out

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
            # what computed the rows: "onnxruntime/cpu", "keras/jax/gpu" (extraction.computed_by)
            self.computed_by = cache.json_attr("computed_by", [])
            self._index_id = cache.attr("index_id")
            self._augment_recipe = cache.attr("augment_recipe")
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

    @property
    def int8_agreement(self) -> dict | None:
        """int8 rows: their model's measured agreement with fp32 (the cache key records it)."""
        return self.key.get("int8_agreement")

    def provenance(self) -> str:
        """Which runtime(s) and precision computed the cached rows, for reports."""
        ran = self.stats.runtime or ", ".join(self.runtimes) or "unrecorded runtime"
        flip = "; flip-averaged" if self.flip_average else ""
        return f"{ran}; cached rows {self.precision}{flip}"

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of the rows ``idx`` (indices into this object's rows, any order)."""
        idx = np.asarray(idx, dtype=np.int64)
        with FeatureCache.open(self.cache_path) as cache:
            same = cache.attr("index_id") == self._index_id
            rows = self._cache_rows[idx] if same else self._rows_now(cache, idx)
            return cache.embeddings(rows), self.labels[idx]

    def _rows_now(self, cache, idx) -> np.ndarray:
        """Where rows ``idx`` are in an index written since this object read its rows (an
        extract or a compaction meanwhile): found by path, content and view, never by
        position, which another index gives to other images."""
        if cache.attr("augment_recipe") != self._augment_recipe and (self.view[idx] > 0).any():
            raise CacheError(f"{self.cache_path}: its augmented views were made again with "
                             "other options since they were read; read the cache again")
        now = cache.rows()
        where = {row: i for i, row in enumerate(zip(now["paths"], now["sha256"],
                                                    now["view"].tolist()))}
        try:
            return np.array([where[row] for row in zip(self.paths[idx], self.sha256[idx],
                                                        self.view[idx].tolist())], np.int64)
        except KeyError:
            raise CacheError(f"{self.cache_path}: rows were removed or changed since they were "
                             "read; read the cache again") from None
