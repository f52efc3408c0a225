"""The cache index (format 2): the file users open, and how it is read and written.

A cache is a small index file plus immutable shard files (:mod:`._shards`) in the folder
``<index>.shards`` beside it. The index holds the per-row columns (path, label, split,
content hash, ...), where each row's embedding is (shard, row in shard), the shard table
with checksums, and ``embeddings``: an HDF5 virtual dataset over the shards, so
``h5py.File(index)["embeddings"]`` reads every row. Version-1 caches (embeddings inside
the one file) are read as they are; :mod:`._session` writes them as version 2.

An index is sealed (:func:`._shards.seal`): its first 512 bytes, which HDF5 skips, hold the
SHA-256 of the rest, checked before HDF5 reads a byte of it. A damaged index is refused, so
no flipped path, reference or column is ever read. Indexes written before seals are read as
they were (HDF5 finds them from their first byte) and sealed on their next write.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from featx._io import atomic_path
from featx.errors import CacheError

from ._key import shard_dir
from ._shards import (SEAL_BYTES, ShardInfo, is_intact, read_rows, remember_seal, seal,
                      seal_state, stat_key)

CACHE_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

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


def _h5py():
    import h5py

    return h5py


def _str_dtype():
    return _h5py().string_dtype("utf-8")


def _dtype(kind):
    return _str_dtype() if kind == "str" else kind


def _strings(data, stop=None, start=0) -> np.ndarray:
    """A string dataset's values ``start:stop`` as an object array of str."""
    return np.asarray(data.asstr()[start:stop], dtype=object)


def _column(values, kind) -> np.ndarray:
    if kind == "str":
        return np.array([str(v) for v in values], dtype=object)
    return np.asarray(values, dtype=kind)


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
    if int(version) > CACHE_FORMAT_VERSION:
        raise CacheError(f"{path}: written by a newer featx (cache format {version}; this "
                         f"featx reads formats up to {CACHE_FORMAT_VERSION}); upgrade featx")
    if int(version) not in READABLE_VERSIONS:
        raise CacheError(f"{path}: featx cache format {version} is not readable by this "
                         f"featx; delete it to re-extract")
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
    """Read-only view of one cache index. ``open_for_write`` returns a :class:`CacheSession`
    (:mod:`._session`, which registers itself as :attr:`writer`: writing builds on reading).

    A version-2 cache's rows are the index's columns; row ``i``'s embedding is row
    ``shard_row[i]`` of shard file ``shards[shard[i]]``. A version-1 cache (one file that
    holds the embeddings too) is read as it is.
    """

    writer = None  # the class of a writing session: CacheSession, set by ._session

    def __init__(self, path, h5):
        self.path = Path(path)
        self.h5 = h5
        self.version = int(h5.attrs["featx_cache_version"])
        self.shard_dir = shard_dir(self.path)
        self._open_shards: dict[int, object] = {}
        self._shards = None
        self._refs = None

    @classmethod
    def open(cls, path) -> "FeatureCache":
        path = Path(path)
        if not path.exists():
            raise CacheError(f"{path}: no such cache file")
        for _ in range(3):  # a writer may replace the index between the check and the open
            checked = _check_index(path)
            h5 = _open_h5(path, "r")
            if stat_key(os.fstat(h5.id.get_vfd_handle())) == checked:
                break
            h5.close()
        else:
            raise CacheError(f"{path}: replaced again and again while being opened; "
                             "try again when the process writing it is done")
        try:
            validate(h5, path)
        except CacheError:
            h5.close()
            raise
        return cls(path, h5)

    @classmethod
    def open_for_write(cls, path, *, key: dict, dim: int | None, attrs: dict):
        """Open (or create) a cache for changes. The caller must hold its CacheLock."""
        return cls.writer(path, key=key, dim=dim, attrs=attrs)

    def close(self):
        for h5 in self._open_shards.values():
            h5.close()
        self._open_shards = {}
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
        index_id = self.attr("index_id")
        remembered = _LAST_ROWS.get(index_id)
        if remembered is not None:
            return {name: values.copy() for name, values in remembered.items()}
        out = self._columns(0, self.n_rows)
        _remember_rows(index_id, out)
        return {name: values.copy() for name, values in out.items()}

    @property
    def shards(self) -> list[ShardInfo]:
        """The shards the index refers to (none in a version-1 cache)."""
        if self._shards is None:
            self._shards = [] if self.version == 1 else _read_shard_table(self.h5)
        return self._shards

    def refs(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row: its shard's number in :attr:`shards` and its row in that shard."""
        if self._refs is None:
            self._refs = (np.asarray(self.h5["shard"][:], np.int64),
                          np.asarray(self.h5["shard_row"][:], np.int64))
        return self._refs

    def embeddings(self, indices=None) -> np.ndarray:
        """Embeddings of the given row indices (all committed rows when None)."""
        return self._read(np.arange(self.n_rows) if indices is None else indices)

    def _read(self, indices) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        if self.version == 1:
            return read_rows(self.h5["embeddings"], indices)
        shard, row = (ref[indices] for ref in self.refs())
        out = np.empty((indices.size, self.dim), dtype=np.float32)
        for s in np.unique(shard):
            here = np.flatnonzero(shard == s)
            read_rows(self._shard_data(int(s)), row[here], out=out, at=here)
        return out

    def _shard_data(self, number: int):
        if number not in self._open_shards:
            info = self.shards[number]
            path = self.shard_dir / info.name
            if path.exists() and not is_intact(self.shard_dir, info):
                self._raise_if_replaced()  # compact deleted it while we looked
                raise CacheError(f"{path}: shard of {self.path.name} fails its checksum; run "
                                 "`featx extract` again to re-extract its rows")
            try:
                self._open_shards[number] = _h5py().File(path, "r", locking=False)
            except OSError:
                self._raise_if_replaced()
                raise CacheError(f"{path}: shard of {self.path.name} is missing or unreadable; "
                                 "run `featx extract` again to re-extract its rows") from None
        return self._open_shards[number]["embeddings"]

    def _raise_if_replaced(self):
        """A shard this index names is gone because a newer index replaced it (compact)."""
        try:
            now = stat_key(self.path.stat())
        except OSError:
            now = None
        if now != stat_key(os.fstat(self.h5.id.get_vfd_handle())):
            raise CacheError(f"{self.path}: replaced while being read (by `featx cache "
                             "compact` or `featx extract`); read it again") from None

    def row_range(self, start: int, stop: int) -> tuple[dict, np.ndarray]:
        """Rows ``start:stop``: their per-row columns (strings decoded) and embeddings."""
        stop = min(stop, self.n_rows)
        return self._columns(start, stop), self._read(np.arange(start, stop))

    def _columns(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The per-row columns of rows ``start:stop``, strings decoded."""
        return {name: (_strings(self.h5[name], stop, start) if kind == "str"
                       else np.asarray(self.h5[name][start:stop]))
                for name, kind in ROW_FIELDS.items()}

    def failed(self) -> list[tuple[str, str, str]]:
        group = self.h5["failed"]
        columns = [_strings(group[name]) for name in FAILED_FIELDS]
        return list(zip(*columns))

    def damaged_shards(self, full: bool = False) -> list[int]:
        """Numbers of the shards that are missing or fail their checksum (see
        :func:`featx.cache.is_intact`; ``full`` re-hashes every shard)."""
        return [i for i, info in enumerate(self.shards)
                if not is_intact(self.shard_dir, info, full)]

    def size_bytes(self) -> int:
        """The index's size plus its shards'."""
        return self.path.stat().st_size + sum(info.size for info in self.shards)


# The rows of the last index read or written, by the random id every index is written with:
# one run reads them several times (reconcile, the session, Features), and decoding 100k
# strings is not free. An index is never changed after it is written, so its id names its rows.
_LAST_ROWS: dict = {}


def _remember_rows(index_id, rows: dict):
    _LAST_ROWS.clear()
    if index_id:  # format 1 files have none
        _LAST_ROWS[index_id] = rows


def _check_index(path: Path) -> tuple:
    """Refuse an index whose bytes are not what featx wrote, before HDF5 reads any of them;
    returns the stat key of the file checked."""
    try:
        state, key = seal_state(path)
    except OSError as exc:
        raise CacheError(f"{path}: cannot be read ({exc.strerror})") from None
    if state == "damaged":
        raise CacheError(f"{path}: cache index is damaged (its bytes no longer match the "
                         "SHA-256 featx sealed it with); delete it to extract again")
    if state == "foreign":
        raise CacheError(f"{path}: not a valid featx cache (neither an HDF5 file nor sealed "
                         "by featx); move it away or delete it")
    return key


def _read_shard_table(h5) -> list[ShardInfo]:
    table = h5["shards"]
    names = _strings(table["names"])
    checksums = _strings(table["checksum"])
    return [ShardInfo(str(n), int(r), str(c), int(s), int(m)) for n, r, c, s, m in
            zip(names, table["rows"][:], checksums, table["size"][:], table["mtime_ns"][:])]


def _write_index(path, *, key, dim, attrs, rows, refs, shards, failed) -> str:
    """Write a whole index to a temporary file that then replaces ``path`` atomically;
    returns the new index's random id."""
    with atomic_path(path) as tmp:
        with _h5py().File(tmp, "w", locking=False, userblock_size=SEAL_BYTES) as h5:
            _write_attrs(h5, key=key, dim=dim, attrs=attrs)
            n = 0 if rows is None else len(rows["paths"])
            for name, kind in ROW_FIELDS.items():
                values = [] if rows is None else rows[name]
                _put(h5, name, list(values) if kind == "str" else np.asarray(values, kind), kind)
            for name, values in zip(("shard", "shard_row"), refs or ([], [])):
                _put(h5, name, np.asarray(values, np.int64), "int64")
            table = h5.create_group("shards")
            _put(table, "names", [s.name for s in shards], "str")
            _put(table, "checksum", [s.checksum for s in shards], "str")
            for field in ("rows", "size", "mtime_ns"):
                _put(table, field, np.asarray([getattr(s, field) for s in shards], np.int64),
                     "int64")
            group = h5.create_group("failed")
            for i, name in enumerate(FAILED_FIELDS):
                _put(group, name, [row[i] for row in failed], "str")
            _virtual_embeddings(h5, path, dim, refs, shards)
            h5.attrs["n_committed"] = n
            h5.attrs["index_id"] = index_id = uuid.uuid4().hex
        seal(tmp)  # fsyncs
    remember_seal(path)
    return index_id


def _put(group, name, values, kind):
    data = group.create_dataset(name, shape=(len(values),), dtype=_dtype(kind))
    if len(values):
        data[:] = values


def _virtual_embeddings(h5, path, dim, refs, shards):
    """``embeddings`` as an HDF5 virtual dataset over the shards, so that
    ``h5py.File(cache)["embeddings"]`` reads every row; a missing shard reads as NaN."""
    h5py = _h5py()
    n = 0 if refs is None else len(refs[0])
    layout = h5py.VirtualLayout(shape=(n, dim), dtype="float32")
    if n:
        shard, row = refs
        # one mapping per run of rows that are consecutive rows of one shard
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(row) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [n]])
        sources = {}
        for start, stop in zip(starts, stops):
            info = shards[int(shard[start])]
            if info.name not in sources:  # relative: resolved beside the index file
                sources[info.name] = h5py.VirtualSource(
                    f"{shard_dir(path).name}/{info.name}", "embeddings", shape=(info.rows, dim))
            first = int(row[start])
            layout[start:stop] = sources[info.name][first:first + (stop - start)]
    h5.create_virtual_dataset("embeddings", layout, fillvalue=np.nan)


def _write_attrs(h5, *, key, dim, attrs):
    """The index's attributes: ``attrs`` (the old index's, updated), then what featx owns."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    h5.attrs.update({"created": now})
    for name, value in attrs.items():
        if value is not None:
            h5.attrs[name] = value if isinstance(value, (str, int, float, np.integer,
                                                         np.floating)) else json.dumps(value)
    h5.attrs.update({
        "featx_cache_version": CACHE_FORMAT_VERSION,
        "key": json.dumps(key, sort_keys=True),
        "dim": dim,
        "updated": now,
    })
