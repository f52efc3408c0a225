"""The HDF5 embedding cache: one file per (dataset, backbone key).

Crash safety: a cache file is never modified in place. A writing session
(:class:`CacheSession`) appends each finished batch as a small part file (written to a
temporary name, then renamed) and finally writes the whole new cache to a temporary file
that atomically replaces the old one; the next session merges the part files a killed one
left. So kill -9 at any moment loses at most the batch in flight, never the cache. A lock
file prevents two writers on one cache.
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
    # name: dtype of the per-row 1-D datasets stored beside `embeddings`
    "labels": "int64",
    "paths": "str",
    "split": "str",
    "sha256": "str",
    "size": "int64",
    "mtime_ns": "int64",
    "view": "int16",
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


class _CacheReader:
    """What FeatureCache and CacheSession share on top of their ``attr`` and ``close``."""

    def json_attr(self, name, default=None):
        """Attribute ``name`` decoded from JSON; ``default`` when it is absent."""
        value = self.attr(name)
        return default if value is None else json.loads(value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FeatureCache(_CacheReader):
    """Read-only view of one cache file. ``open_for_write`` returns a :class:`CacheSession`."""

    def __init__(self, path, h5):
        self.path = Path(path)
        self.h5 = h5

    @classmethod
    def open(cls, path) -> "FeatureCache":
        path = Path(path)
        if not path.exists():
            raise CacheError(f"{path}: no such cache file")
        h5 = _open_h5(path, "r")
        validate(h5, path)
        return cls(path, h5)

    @classmethod
    def open_for_write(cls, path, *, key: dict, dim: int | None, attrs: dict) -> "CacheSession":
        """Open (or create) a cache for changes. The caller must hold its CacheLock."""
        return CacheSession(path, key=key, dim=dim, attrs=attrs)

    def close(self):
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None

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
        return value.decode() if isinstance(value, bytes) else value

    def rows(self) -> dict[str, np.ndarray]:
        """All committed per-row metadata (not the embeddings), strings decoded."""
        n = self.n_rows
        out = {}
        for name, kind in ROW_FIELDS.items():
            values = self.h5[name][:n]
            out[name] = _decode(values) if kind == "str" else np.asarray(values)
        return out

    def embeddings(self, indices=None) -> np.ndarray:
        """Embeddings of the given row indices (all committed rows when None)."""
        data = self.h5["embeddings"]
        if indices is None:
            return data[: self.n_rows]
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((indices.size, self.dim), dtype=np.float32)
        if indices.size:  # h5py fancy indexing wants increasing, distinct indices
            unique, inverse = np.unique(indices, return_inverse=True)
            first, last = int(unique[0]), int(unique[-1])
            if last - first + 1 <= 2 * unique.size:  # dense: one slice beats a point list
                out[:] = data[first:last + 1][unique - first][inverse]
            else:
                out[:] = data[unique][inverse]
        return out

    def row_range(self, start: int, stop: int) -> tuple[dict, np.ndarray]:
        """Rows ``start:stop``: their per-row columns (strings decoded) and embeddings."""
        stop = min(stop, self.n_rows)
        columns = {name: (_decode(self.h5[name][start:stop]) if kind == "str"
                          else np.asarray(self.h5[name][start:stop]))
                   for name, kind in ROW_FIELDS.items()}
        return columns, np.asarray(self.h5["embeddings"][start:stop], np.float32)

    def failed(self) -> list[tuple[str, str, str]]:
        group = self.h5["failed"]
        columns = [_decode(group[name][:]) for name in FAILED_FIELDS]
        return list(zip(*columns))


class CacheSession(_CacheReader):
    """Changes to one cache, made safe against a crash at any moment.

    The cache file itself is never modified in place: appended rows go to small part
    files, each written to a temporary name and renamed, and :meth:`commit` writes the
    whole new cache to a temporary file that atomically replaces the old one. A process
    killed at any moment therefore leaves the last committed cache intact plus the part
    files of every finished batch, which the next session merges (:meth:`recover`), so at
    most the batch in flight is lost. Reads see the session's current state.
    """

    def __init__(self, path, *, key: dict | None, dim: int | None = None, attrs=None):
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            if dim is None or key is None:
                raise ValueError("key and dim are needed to create a cache")
            self._write_file(self.path, key=key, dim=dim, attrs=attrs or {}, rows=None)
        self._main = FeatureCache.open(self.path)
        if key is not None:
            validate(self._main.h5, self.path, key)
        self.dim = self._main.dim
        self.key = self._main.key
        self._rows = self._main.rows()
        self._origin = np.arange(len(self._rows["paths"]), dtype=np.int64)  # >= 0: main row
        self._parts: list[tuple[Path, int]] = []  # origin -(j+1) -> (part file, row in it)
        self._pending: list[tuple[np.ndarray, dict]] = []  # appended, not yet concatenated
        self._staged_attrs: dict = {}
        self._staged_failed = None
        self._run = f"{os.getpid()}-{time.time_ns()}"
        self._seq = 0
        self.dirty = False
        self._load_leftover_parts()

    @classmethod
    def recover(cls, path) -> int:
        """Merge the part files a killed session left behind; returns the rows recovered."""
        path = Path(path)
        parts_dir = path.with_name(path.name + ".parts")
        if not path.exists() or not parts_dir.exists():
            return 0
        session = cls(path, key=None)
        recovered = len(session._parts)
        session.close()
        return recovered

    # ----- reading (the session's current state) ---------------------------------------
    @property
    def n_rows(self) -> int:
        self._materialize()
        return len(self._origin)

    def _materialize(self):
        """Concatenate appended rows once, not per batch (which would be quadratic)."""
        if self._pending:
            self._origin = np.concatenate([self._origin] + [o for o, _ in self._pending])
            self._rows = {name: np.concatenate([self._rows[name]] +
                                               [rows[name] for _, rows in self._pending])
                          for name in ROW_FIELDS}
            self._pending = []

    def attr(self, name, default=None):
        if name in self._staged_attrs:
            return self._staged_attrs[name]
        return self._main.attr(name, default)

    def rows(self) -> dict[str, np.ndarray]:
        self._materialize()
        return {name: values.copy() for name, values in self._rows.items()}

    def embeddings(self, indices=None) -> np.ndarray:
        self._materialize()
        indices = np.arange(self.n_rows) if indices is None else np.asarray(indices, np.int64)
        origin = self._origin[indices]
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        in_main = origin >= 0
        out[in_main] = self._main.embeddings(origin[in_main])
        for i in np.flatnonzero(~in_main):
            part, row = self._parts[-origin[i] - 1]
            out[i] = _load_part(part)["embeddings"][row]
        return out

    def failed(self):
        return self._main.failed() if self._staged_failed is None else self._staged_failed

    # ----- changes -----------------------------------------------------------------
    def append(self, embeddings: np.ndarray, **columns):
        """Add rows; durable once this returns (a part file is written and renamed)."""
        n_new = len(embeddings)
        if n_new == 0:
            return
        self.parts_dir.mkdir(exist_ok=True)
        part = self.parts_dir / f"part-{self._run}-{self._seq:06d}.npz"
        self._seq += 1
        arrays = {name: _column(columns[name], kind) for name, kind in ROW_FIELDS.items()}
        tmp = part.with_name(part.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, embeddings=np.asarray(embeddings, np.float32),
                     **{name: values.astype(str) if values.dtype == object else values
                        for name, values in arrays.items()})
        os.replace(tmp, part)
        self._add_part_rows(part, arrays)

    def _add_part_rows(self, part: Path, arrays: dict):
        n_new = len(arrays["paths"])
        first = len(self._parts)
        self._parts.extend((part, row) for row in range(n_new))
        origin = -(np.arange(first, first + n_new, dtype=np.int64) + 1)
        self._pending.append((origin, arrays))
        self.dirty = True

    # Changes mark the session dirty only when they change something, so a run that reuses
    # everything does not rewrite the cache file.
    def compact(self, keep: np.ndarray) -> "CacheSession":
        """Keep only the rows where ``keep`` is true (applied at commit)."""
        self._materialize()
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        self._origin = self._origin[keep]
        self._rows = {name: values[keep] for name, values in self._rows.items()}
        self.dirty = True
        return self

    def rewrite_column(self, name: str, values):
        self._materialize()
        values = _column(values, ROW_FIELDS[name])
        if not np.array_equal(values, self._rows[name]):
            self._rows[name] = values
            self.dirty = True

    def set_failed(self, failed: list[tuple[str, str, str]]):
        failed = [tuple(map(str, row)) for row in failed]
        if failed != [tuple(row) for row in self.failed()]:
            self._staged_failed = failed
            self.dirty = True

    def set_attrs(self, **attrs):
        for name, value in attrs.items():
            value = value if isinstance(value, (str, int, float)) else json.dumps(value)
            if value != self.attr(name):
                self._staged_attrs[name] = value
                self.dirty = True

    # ----- committing --------------------------------------------------------------
    def commit(self):
        """Write the session's state as the new cache file (atomically) and drop its parts."""
        self._materialize()
        tmp = self.path.with_name(self.path.name + ".tmp")
        attrs = {k: self._main.attr(k) for k in self._main.h5.attrs}
        attrs.update(self._staged_attrs)
        attrs["merged_parts"] = json.dumps(self._merged_parts(attrs.get("merged_parts")))
        self._write_file(tmp, key=self.key, dim=self.dim, attrs=attrs, rows=self)
        self._main.close()
        os.replace(tmp, self.path)
        for part in {part for part, _ in self._parts}:
            part.unlink(missing_ok=True)
        self._main = FeatureCache.open(self.path)
        self._origin = np.arange(self.n_rows, dtype=np.int64)
        self._parts, self._staged_attrs, self._staged_failed = [], {}, None
        self.dirty = False

    def close(self):
        if self._main is None:
            return
        try:
            if self.dirty:
                self.commit()
        finally:
            self._main.close()
            self._main = None

    def _merged_parts(self, previous) -> dict:
        """Highest part number merged per run, so a rerun never merges a part twice."""
        merged = json.loads(previous) if previous else {}
        for part, _ in self._parts:
            run, seq = part_id(part)
            merged[run] = max(merged.get(run, -1), seq)
        return merged

    def _load_leftover_parts(self):
        if not self.parts_dir.exists():
            return
        merged = json.loads(self._main.attr("merged_parts") or "{}")
        for stray in self.parts_dir.glob("*.tmp"):
            stray.unlink()
        for part in sorted(self.parts_dir.glob("part-*.npz"), key=part_id):
            run, seq = part_id(part)
            if seq <= merged.get(run, -1):
                part.unlink()  # merged by a commit that finished just before a crash
                continue
            data = _load_part(part)
            self._add_part_rows(part, {name: _column(data[name], kind)
                                       for name, kind in ROW_FIELDS.items()})

    @classmethod
    def _write_file(cls, path, *, key, dim, attrs, rows):
        h5 = _open_h5(path, "w")
        try:
            _create_layout(h5, key=key, dim=dim, attrs=attrs)
            if rows is not None:
                n = rows.n_rows
                for name in ("embeddings", *ROW_FIELDS):
                    h5[name].resize(n, axis=0)
                for start in range(0, n, 4096):
                    stop = min(n, start + 4096)
                    h5["embeddings"][start:stop] = rows.embeddings(np.arange(start, stop))
                for name, kind in ROW_FIELDS.items():
                    values = rows._rows[name]
                    h5[name][:] = list(values) if kind == "str" else values
                failed = rows.failed()
                for i, name in enumerate(FAILED_FIELDS):
                    h5["failed"][name].resize(len(failed), axis=0)
                    if failed:
                        h5["failed"][name][:] = [row[i] for row in failed]
                h5.attrs["n_committed"] = n
            h5.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            h5.flush()
            os.fsync(h5.id.get_vfd_handle())
        finally:
            h5.close()


def _create_layout(h5, *, key, dim, attrs):
    h5.create_dataset("embeddings", shape=(0, dim), maxshape=(None, dim), dtype="float32",
                      chunks=(CHUNK_ROWS, dim))
    for name, kind in ROW_FIELDS.items():
        h5.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_dtype(kind),
                          chunks=(1024,))
    failed = h5.create_group("failed")
    for name in FAILED_FIELDS:
        failed.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_str_dtype(),
                              chunks=(256,))
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    h5.attrs.update({"created": now, "updated": now})
    for name, value in attrs.items():
        if value is not None:
            h5.attrs[name] = value if isinstance(value, (str, int, float, np.integer,
                                                         np.floating)) else json.dumps(value)
    h5.attrs.update({
        "featx_cache_version": CACHE_FORMAT_VERSION,
        "key": json.dumps(key, sort_keys=True),
        "dim": dim,
        "n_committed": 0,
    })


def _column(values, kind) -> np.ndarray:
    if kind == "str":
        return np.array([str(v) for v in values], dtype=object)
    return np.asarray(values, dtype=kind)


def part_id(part: Path) -> tuple[str, int]:
    """(run, sequence number) of a part file ``part-<run>-<seq>.npz``.

    A cache's ``merged_parts`` attribute maps each run to the highest sequence number
    merged, so a part is unmerged when its number is above its run's entry (or -1).
    """
    run, _, seq = part.stem.removeprefix("part-").rpartition("-")
    return run, int(seq)


_PART_CACHE: dict = {}


def _load_part(part: Path) -> dict:
    """A part file's arrays (the last one read is kept: rows are read in order)."""
    if part not in _PART_CACHE:
        _PART_CACHE.clear()
        with np.load(part, allow_pickle=False) as data:
            _PART_CACHE[part] = {name: data[name] for name in data.files}
    return _PART_CACHE[part]


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


def key_variant(key: dict) -> str:
    """How a cache's rows differ from plain fp32 embeddings: "", "int8", "flip-averaged"..."""
    return ", ".join(name for name, on in (("int8", key.get("precision") == "int8"),
                                           ("flip-averaged", key.get("flip_average")),
                                           ("float16 compute", key.get("compute_dtype")))
                     if on)


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
        "variant": key_variant(cache.key),
        "featx_version": cache.attr("featx_version"),
        "created": cache.attr("created"),
        "updated": cache.attr("updated"),
        "size_bytes": cache.path.stat().st_size,
    }
