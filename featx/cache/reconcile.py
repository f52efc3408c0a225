"""Reconciling a data folder with its cache: the same split everywhere, and what to compute.

A cache records, per row, the file's path, content hash, size, mtime, split and label. Every
stage that needs the dataset's split or its rows asks here:

- extraction: :func:`read_state` -> :func:`discover` -> :func:`file_columns` ->
  :func:`plan` -> :func:`apply_plan`, then only ``plan.extract`` goes through the model;
- fine-tuning: :func:`resolve_split` (the split the cache recorded, no image embedded);
- predict: :func:`cached_embeddings` (rows whose content a saved model's cache holds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from featx.data import discover as discover_files
from featx.data import hash_files
from featx.errors import CacheError
from featx.options import SplitOptions

from ._index import FeatureCache
from ._key import cache_path_for

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CacheState:
    """What an existing cache recorded: its rows, failed files and split parameters."""

    rows: dict
    failed: list
    split_params: dict | None


@dataclasses.dataclass
class Plan:
    """Per file of the folder: keep its cached row, copy another row, or run the model."""

    keep: np.ndarray  # bool per cached row
    copy_from: dict  # file index -> cached row with the same content (a moved file)
    extract: np.ndarray  # file indices that go through the model
    known_failed: list  # (path, sha256, reason) of files that failed before, unchanged


def recorded_key(cache_path) -> dict | None:
    """The key an existing cache was written with, or None when there is no cache."""
    if not Path(cache_path).exists():
        return None
    with FeatureCache.open(cache_path) as cache:
        return cache.key


def read_state(cache_path, key) -> CacheState | None:
    """The state of the cache at ``cache_path`` (None when absent); its key must match."""
    if not Path(cache_path).exists():
        return None
    with FeatureCache.open(cache_path) as cache:
        if cache.key != json.loads(json.dumps(key)):
            raise CacheError(f"{cache_path}: cache key does not match the requested backbone")
        return CacheState(rows=cache.rows(), failed=cache.failed(),
                          split_params=cache.json_attr("split_params"))


def discover(root, split: SplitOptions, state: CacheState | None):
    """The folder's manifest; files the cache already split keep their split."""
    previous_splits = None
    options = split.as_dict()
    if state is not None:
        recorded = state.split_params or {}
        wanted = {k: options.get(k) for k in recorded}
        if recorded == wanted:
            originals = state.rows["view"] == 0
            previous_splits = dict(zip(state.rows["paths"][originals],
                                       state.rows["split"][originals]))
        else:
            log.warning("split options changed (%s -> %s): splitting again", recorded, wanted)
    return discover_files(root, previous_splits=previous_splits, **options)


def file_columns(manifest, state: CacheState | None) -> dict[str, np.ndarray]:
    """The per-row columns of the folder's files (hashing only files whose stat changed)."""
    known = None
    if state is not None:
        rows = state.rows
        known = {p: (s, m, h) for p, s, m, h in zip(rows["paths"], rows["size"].tolist(),
                                                    rows["mtime_ns"].tolist(), rows["sha256"])}
    hashes, stats = hash_files(manifest.root, manifest.paths, known=known)
    return {
        "labels": np.asarray(manifest.labels, dtype=np.int64),
        "paths": np.asarray(manifest.paths, dtype=object),
        "split": np.asarray(manifest.splits, dtype=object),
        "sha256": np.asarray(hashes, dtype=object),
        "size": np.asarray([s[0] for s in stats], dtype=np.int64),
        "mtime_ns": np.asarray([s[1] for s in stats], dtype=np.int64),
        "view": np.zeros(len(manifest.paths), dtype=np.int16),
    }


def plan(state: CacheState | None, current: dict) -> Plan:
    """Decide, per file, whether to keep its cached row, copy one, or run the model."""
    n_files = len(current["paths"])
    file_key = list(zip(current["paths"], current["sha256"]))
    if state is None:
        return Plan(keep=np.zeros(0, bool), copy_from={}, extract=np.arange(n_files),
                    known_failed=[])
    rows = state.rows
    split_of = dict(zip(current["paths"], current["split"]))
    index = {k: i for i, k in enumerate(file_key)}
    # an augmented view survives only while its image is still a training image
    keep = np.array([
        (p, h) in index and (v == 0 or split_of.get(p) == "train")
        for p, h, v in zip(rows["paths"], rows["sha256"], rows["view"])
    ], dtype=bool)
    cached = {(p, h) for p, h, v, k in zip(rows["paths"], rows["sha256"], rows["view"], keep)
              if k and v == 0}
    by_hash = {h: i for i, (h, v) in enumerate(zip(rows["sha256"], rows["view"])) if v == 0}
    failed = {(p, h): (p, h, r) for p, h, r in state.failed}
    known_failed, copy_from, extract = [], {}, []
    for i, k in enumerate(file_key):
        if k in cached:
            continue
        if k in failed:
            known_failed.append(failed[k])
        elif k[1] in by_hash:
            copy_from[i] = by_hash[k[1]]
        else:
            extract.append(i)
    return Plan(keep=keep, copy_from=copy_from, extract=np.asarray(extract, dtype=np.int64),
                known_failed=known_failed)


def apply_plan(cache, plan: Plan, current: dict):
    """Drop rows of removed/changed files, copy rows of moved files, refresh per-file columns.

    Labels and splits follow the current folders and split options; size and mtime are
    refreshed so a touched but unchanged file is not read again to hash it next time.
    Returns ``(cache, n_copied)``: the session to go on with (compaction may replace it).
    """
    keep = plan.keep
    if plan.copy_from:
        files = np.fromiter(plan.copy_from.keys(), dtype=np.int64)
        sources = np.fromiter(plan.copy_from.values(), dtype=np.int64)
        cache.append(cache.embeddings(sources), **{k: v[files] for k, v in current.items()})
        keep = np.concatenate([keep, np.ones(len(files), bool)])
    if keep.size and not keep.all():
        log.info("removing %d cached rows of files that were removed or changed",
                 int((~keep).sum()))
        cache = cache.keep_rows(keep)
    if cache.n_rows:
        rows = cache.rows()
        where = {p: i for i, p in enumerate(current["paths"])}
        files = np.array([where[p] for p in rows["paths"]], dtype=np.int64)
        for name in ("labels", "split", "size", "mtime_ns"):
            cache.rewrite_column(name, current[name][files])
    return cache, len(plan.copy_from)


def resolve_split(data_dir, backbone, *, cache_dir="cache", split: SplitOptions | None = None):
    """The manifest fine-tuning trains on: the same split ``featx.extract`` records.

    ``backbone``: a :class:`featx.backbones.Backbone`. If a feature cache of this dataset
    and backbone exists in ``cache_dir``, the split it recorded is kept (files added since
    are assigned as the extractor would assign them); otherwise the data directory is split
    by :func:`featx.data.discover`, which is deterministic and so gives what a later
    ``extract`` with the same options records.
    No image goes through the backbone here.

    Returns ``(manifest, source)``, ``source`` being "cache" or "discover".
    """
    root = Path(data_dir)
    key = backbone.key()
    cache_path = cache_path_for(cache_dir, root, backbone.cfg.name, backbone.weights, key)
    state = read_state(cache_path, key) if root.is_dir() else None
    manifest = discover(root, split or SplitOptions(), state)
    if state is not None:
        log.info("using the split recorded in %s", cache_path)
    return manifest, "discover" if state is None else "cache"


def cached_embeddings(cache_path, key: dict, hashes) -> dict:
    """Content hash -> embedding, for the ``hashes`` the cache holds (original images only).

    An absent or unreadable cache, or one written under another key, holds nothing: its
    rows would not be the features the caller expects.
    """
    cache_path = Path(cache_path)
    if not cache_path.is_file():
        return {}
    try:
        with FeatureCache.open(cache_path) as cache:
            if cache.key != key:
                return {}
            rows = cache.rows()
            wanted = set(hashes)
            found = {s: i for i, (s, v) in enumerate(zip(rows["sha256"], rows["view"]))
                     if v == 0 and s in wanted}
            if not found:
                return {}
            shas = list(found)
            return dict(zip(shas, cache.embeddings([found[s] for s in shas])))
    except CacheError:
        return {}
