"""Several backbones' cached rows of one dataset side by side (``--backbone A+B``), aligned
by content hash and view."""

from __future__ import annotations

import logging

import numpy as np

from featx.errors import DataError
from featx.options import COMBINE

from ._features import ExtractStats, _Rows

log = logging.getLogger(__name__)


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

    @property
    def int8_agreement(self) -> dict | None:
        """The least agreeing part's, when every part is int8 (else None: not all are)."""
        found = [p.int8_agreement for p in self.parts]
        if any(a is None for a in found):
            return None
        return min(found, key=lambda a: (a["decisions"], a["mean_cosine"]))

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
