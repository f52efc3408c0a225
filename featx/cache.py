"""The HDF5 embedding cache: one file per (dataset, backbone key).

Crash safety: rows are appended batch by batch; the ``n_committed`` attribute is advanced
only after the rows are written and flushed, so a process killed at any moment leaves at
most one uncommitted batch, which the next writer truncates away. Writers keep HDF5's
metadata in memory between flushes (no evictions), so what is on disk between two flushes
is the last flushed, consistent state plus raw rows that are not committed yet. Whole-file rewrites
(compaction after files were removed) go to a temporary file that replaces the cache
atomically. A lock file prevents two writers on one cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from featx.errors import CacheError

CACHE_FORMAT_VERSION = 1
CHUNK_ROWS = 64
ROW_FIELDS = {
    # name: (dtype, fill) for the per-row 1-D datasets stored beside `embeddings`
    "labels": ("int64", None),
    "paths": ("str", None),
    "split": ("str", None),
    "sha256": ("str", None),
    "size": ("int64", None),
    "mtime_ns": ("int64", None),
    "view": ("int16", None),
}
FAILED_FIELDS = ("paths", "sha256", "reasons")


def key_hash(key: dict) -> str:
    """Stable 12-hex digest of a backbone key (plus the cache format version)."""
    payload = json.dumps({**key, "cache_format": CACHE_FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def cache_path_for(cache_dir, root, backbone: str, weights: str, key: dict) -> Path:
    """Where the cache of dataset ``root`` under backbone ``key`` lives."""
    root = Path(root).resolve()
    dataset = f"{_slug(root.name)}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
    return Path(cache_dir) / dataset / f"{_slug(backbone)}-{_slug(weights)}-{key_hash(key)}.h5"


def _h5py():
    import h5py

    return h5py


class CacheLock:
    """Exclusive, non-blocking lock on ``<cache>.lock``; released by the OS if we die."""

    def __init__(self, cache_path):
        self.path = Path(str(cache_path) + ".lock")
        self._fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise CacheError(
                f"{self.path.with_suffix('')}: another featx process is writing this cache; "
                "wait for it to finish"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _str_dtype():
    return _h5py().string_dtype("utf-8")


def _dtype(kind):
    return _str_dtype() if kind == "str" else kind


def _decode(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _open_h5(path, mode):
    h5py = _h5py()
    try:
        return h5py.File(path, mode, locking=False)
    except OSError as exc:
        raise CacheError(
            f"{path}: not a valid featx cache (cannot be opened as HDF5: {exc}); "
            "move it away or delete it"
        ) from None


def _hold_metadata_until_flush(h5):
    """Stop HDF5 from writing metadata to disk whenever its cache fills up (evictions)."""
    config = h5.id.get_mdc_config()
    config.evictions_enabled = False
    config.incr_mode = config.decr_mode = config.flash_incr_mode = 0  # required with no evictions
    h5.id.set_mdc_config(config)


def validate(h5, path, key: dict | None = None):
    """Raise CacheError unless ``h5`` is a featx cache (of ``key``, when given)."""
    version = h5.attrs.get("featx_cache_version")
    if version is None or "embeddings" not in h5:
        raise CacheError(f"{path}: not a featx cache (no featx_cache_version attribute); "
                         "move it away or delete it")
    if int(version) != CACHE_FORMAT_VERSION:
        raise CacheError(f"{path}: featx cache format {version}, this featx reads "
                         f"{CACHE_FORMAT_VERSION}; delete it to re-extract")
    if key is not None and json.loads(h5.attrs["key"]) != json.loads(json.dumps(key)):
        raise CacheError(f"{path}: cache key does not match the requested backbone settings")


class FeatureCache:
    """Reader/writer of one cache file. Use ``FeatureCache.open_for_write`` to write."""

    def __init__(self, path, h5, writable=False):
        self.path = Path(path)
        self.h5 = h5
        self.writable = writable

    # ----- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "FeatureCache":
        path = Path(path)
        if not path.exists():
            raise CacheError(f"{path}: no such cache file")
        h5 = _open_h5(path, "r")
        validate(h5, path)
        return cls(path, h5)

    @classmethod
    def open_for_write(cls, path, *, key: dict, dim: int | None, attrs: dict) -> "FeatureCache":
        """Open (or create) a cache for appending. The caller must hold its CacheLock."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            h5 = _open_h5(path, "r+")
            validate(h5, path, key)
            _hold_metadata_until_flush(h5)
            cache = cls(path, h5, writable=True)
            cache._truncate_uncommitted()
        else:
            if dim is None:
                raise ValueError("dim is needed to create a cache")
            tmp = path.with_name(path.name + ".tmp")
            h5 = _open_h5(tmp, "w")
            cls._create_layout(h5, key=key, dim=dim, attrs=attrs)
            h5.close()
            os.replace(tmp, path)
            h5 = _open_h5(path, "r+")
            _hold_metadata_until_flush(h5)
            cache = cls(path, h5, writable=True)
        return cache

    @staticmethod
    def _create_layout(h5, *, key, dim, attrs):
        h5.create_dataset("embeddings", shape=(0, dim), maxshape=(None, dim), dtype="float32",
                          chunks=(CHUNK_ROWS, dim))
        for name, (kind, _) in ROW_FIELDS.items():
            h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_dtype(kind),
                              chunks=(1024,))
        failed = h5.create_group("failed")
        for name in FAILED_FIELDS:
            failed.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_str_dtype(),
                                  chunks=(256,))
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        h5.attrs.update({
            "featx_cache_version": CACHE_FORMAT_VERSION,
            "key": json.dumps(key, sort_keys=True),
            "dim": dim,
            "created": now,
            "updated": now,
            "n_committed": 0,
        })
        for name, value in attrs.items():
            h5.attrs[name] = value if isinstance(value, (str, int, float)) else json.dumps(value)

    def _truncate_uncommitted(self):
        n = self.n_rows
        for name in ("embeddings", *ROW_FIELDS):
            if self.h5[name].shape[0] != n:
                self.h5[name].resize(n, axis=0)
        self.h5.flush()

    def close(self):
        if self.h5 is not None:
            if self.writable:
                self.h5.flush()
            self.h5.close()
            self.h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- reading -----------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.h5.attrs["n_committed"])

    @property
    def dim(self) -> int:
        return int(self.h5.attrs["dim"])

    @property
    def key(self) -> dict:
        return json.loads(self.h5.attrs["key"])

    def attr(self, name, default=None):
        value = self.h5.attrs.get(name, default)
        if isinstance(value, bytes):
            value = value.decode()
        return value

    def json_attr(self, name, default=None):
        value = self.attr(name)
        return default if value is None else json.loads(value)

    def rows(self) -> dict[str, np.ndarray]:
        """All committed per-row metadata (not the embeddings), strings decoded."""
        n = self.n_rows
        out = {}
        for name, (kind, _) in ROW_FIELDS.items():
            values = self.h5[name][:n]
            out[name] = _decode(values) if kind == "str" else np.asarray(values)
        return out

    def embeddings(self, indices=None) -> np.ndarray:
        """Embeddings of the given row indices (all committed rows when None)."""
        data = self.h5["embeddings"]
        if indices is None:
            return data[: self.n_rows]
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort(indices)
        out = np.empty((indices.size, self.dim), dtype=np.float32)
        out[order] = data[indices[order]]  # h5py fancy indexing wants increasing indices
        return out

    def failed(self) -> list[tuple[str, str, str]]:
        group = self.h5["failed"]
        columns = [_decode(group[name][:]) for name in FAILED_FIELDS]
        return list(zip(*columns))

    # ----- writing -----------------------------------------------------------------
    def append(self, embeddings: np.ndarray, **columns):
        """Append rows and commit them. ``columns`` are the ROW_FIELDS, equal lengths."""
        n_new = len(embeddings)
        if n_new == 0:
            return
        start = self.n_rows
        stop = start + n_new
        self.h5["embeddings"].resize(stop, axis=0)
        self.h5["embeddings"][start:stop] = np.asarray(embeddings, dtype=np.float32)
        for name in ROW_FIELDS:
            values = columns[name]
            dataset = self.h5[name]
            dataset.resize(stop, axis=0)
            dataset[start:stop] = list(values) if ROW_FIELDS[name][0] == "str" else values
        self.h5.flush()
        self.h5.attrs["n_committed"] = stop  # the commit point
        self.h5.flush()

    def rewrite_column(self, name: str, values):
        """Overwrite a per-row column (labels or split after rediscovery)."""
        kind = ROW_FIELDS[name][0]
        self.h5[name][: self.n_rows] = list(values) if kind == "str" else np.asarray(values)

    def set_failed(self, failed: list[tuple[str, str, str]]):
        group = self.h5["failed"]
        for i, name in enumerate(FAILED_FIELDS):
            group[name].resize(len(failed), axis=0)
            if failed:
                group[name][:] = [row[i] for row in failed]

    def set_attrs(self, **attrs):
        for name, value in attrs.items():
            self.h5.attrs[name] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        self.h5.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.h5.flush()

    def compact(self, keep: np.ndarray) -> "FeatureCache":
        """Keep only rows where ``keep`` is true, by rewriting to a temp file atomically.

        Returns the reopened cache (this object is closed).
        """
        keep = np.asarray(keep, dtype=bool)
        indices = np.flatnonzero(keep)
        tmp = self.path.with_name(self.path.name + ".tmp")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.h5.attrs.items()}
        rows = self.rows()
        with _open_h5(tmp, "w") as out:
            self._create_layout(out, key=json.loads(attrs["key"]), dim=self.dim, attrs={})
            for name, value in attrs.items():
                out.attrs[name] = value
            out.attrs["n_committed"] = 0
            target = FeatureCache(tmp, out, writable=True)
            for start in range(0, len(indices), 4096):
                part = indices[start:start + 4096]
                target.append(self.embeddings(part), **{k: v[part] for k, v in rows.items()})
            target.set_failed(self.failed())
        self.close()
        os.replace(tmp, self.path)
        h5 = _open_h5(self.path, "r+")
        _hold_metadata_until_flush(h5)
        return FeatureCache(self.path, h5, writable=True)


def list_caches(cache_dir) -> list[dict]:
    """Summaries of every cache file under ``cache_dir`` (invalid files are listed as such)."""
    out = []
    for path in sorted(Path(cache_dir).glob("**/*.h5")):
        try:
            with FeatureCache.open(path) as cache:
                out.append(summary(cache))
        except CacheError as exc:
            out.append({"cache": str(path), "error": str(exc)})
    return out


def summary(cache: FeatureCache) -> dict:
    rows = cache.rows()
    views = rows["view"]
    splits = rows["split"][views == 0]
    return {
        "cache": str(cache.path),
        "root": cache.attr("root"),
        "backbone": cache.attr("backbone"),
        "weights": cache.attr("weights"),
        "weights_id": cache.attr("weights_id"),
        "dim": cache.dim,
        "n_images": int((views == 0).sum()),
        "n_augmented": int((views > 0).sum()),
        "n_failed": len(cache.failed()),
        "splits": {name: int((splits == name).sum()) for name in ("train", "val", "test")},
        "class_names": cache.json_attr("class_names", []),
        "key": cache.key,
        "featx_version": cache.attr("featx_version"),
        "created": cache.attr("created"),
        "updated": cache.attr("updated"),
        "size_bytes": cache.path.stat().st_size,
    }
