"""The HDF5 embedding cache: one per (dataset, backbone key).

A cache (format version 2) is a small index file, the one users open, plus immutable shard
files (:mod:`featx.shards`) in the folder ``<index>.shards`` beside it. The index holds the
per-row columns (path, label, split, content hash, ...), where each row's embedding is
(shard, row in shard), the shard table with checksums, and ``embeddings``: an HDF5 virtual
dataset over the shards, so ``h5py.File(index)["embeddings"]`` reads every row.

Crash safety: nothing a reader can open is modified in place. A writing session
(:class:`CacheSession`) appends each finished batch as a small part file (written to a
temporary name, then renamed); a commit writes new rows as new shards, then a new index to
a temporary file that atomically replaces the old one. The next session merges the part
files a killed one left. So kill -9 at any moment loses at most the batch in flight, and a
reader sees either the old index or the new one, whose shards all exist. A lock file
prevents two writers on one cache. Version-1 caches (embeddings inside the one file) are
read as they are and become version 2 on their next write.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import logging
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from featx.errors import CacheError
from featx.shards import ShardInfo, is_intact, read_rows, rows_per_shard, write_shard
from featx.shards import COLUMNS as SHARD_COLUMNS
from featx.shards import DONE_SUFFIX

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
NAME_FORMAT = 1  # the format in the key hash of file names: caches keep their names
MAIN, PART, SHARD = 0, 1, 2  # where a session's row is: the index, a part file, a new shard
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
    payload = json.dumps({**key, "cache_format": NAME_FORMAT}, sort_keys=True)
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


def _strings(data, stop=None, start=0) -> np.ndarray:
    """A string dataset's values ``start:stop`` as an object array of str."""
    return np.asarray(data.asstr()[start:stop], dtype=object)


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
    """Read-only view of one cache index. ``open_for_write`` returns a :class:`CacheSession`.

    A version-2 cache's rows are the index's columns; row ``i``'s embedding is row
    ``shard_row[i]`` of shard file ``shards[shard[i]]``. A version-1 cache (one file that
    holds the embeddings too) is read as it is.
    """

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
        h5 = _open_h5(path, "r")
        try:
            validate(h5, path)
        except CacheError:
            h5.close()
            raise
        return cls(path, h5)

    @classmethod
    def open_for_write(cls, path, *, key: dict, dim: int | None, attrs: dict) -> "CacheSession":
        """Open (or create) a cache for changes. The caller must hold its CacheLock."""
        return CacheSession(path, key=key, dim=dim, attrs=attrs)

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
                raise CacheError(f"{path}: shard of {self.path.name} fails its checksum; run "
                                 "`featx extract` again to re-extract its rows")
            try:
                self._open_shards[number] = _h5py().File(path, "r", locking=False)
            except OSError:
                raise CacheError(f"{path}: shard of {self.path.name} is missing or unreadable; "
                                 "run `featx extract` again to re-extract its rows") from None
        return self._open_shards[number]["embeddings"]

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
        :func:`featx.shards.is_intact`; ``full`` re-hashes every shard)."""
        return [i for i, info in enumerate(self.shards)
                if not is_intact(self.shard_dir, info, full)]

    def size_bytes(self) -> int:
        """The index's size plus its shards'."""
        return self.path.stat().st_size + sum(info.size for info in self.shards)


class CacheSession(_CacheReader):
    """Changes to one cache, made safe against a crash at any moment.

    Nothing a reader can open is modified in place. Appended rows go to small part files,
    each written to a temporary name and renamed; :meth:`commit` writes the new rows as
    shard files (complete before they are named) and then a new index that replaces the
    old one atomically. A commit costs the rows that changed plus the index's per-row
    columns, never a copy of the cached embeddings. A process killed at any moment leaves
    the last committed index intact plus the part files of every finished batch, which the
    next session merges (:meth:`recover`), so at most the batch in flight is lost. Once
    parts of a shard's worth of rows are pending, they are committed, so parts never pile
    up. Reads see the session's current state.
    """

    def __init__(self, path, *, key: dict | None, dim: int | None = None, attrs=None):
        self.path = Path(path)
        self.parts_dir = parts_dir(self.path)
        self.shard_dir = shard_dir(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            if dim is None or key is None:
                raise ValueError("key and dim are needed to create a cache")
            _write_index(self.path, key=key, dim=dim, attrs=attrs or {}, rows=None,
                         refs=None, shards=[], failed=[])
        self._main = FeatureCache.open(self.path)
        if key is not None:
            validate(self._main.h5, self.path, key)
        self.dim = self._main.dim
        self.key = self._main.key
        self._start_from_main()
        self._run = f"{os.getpid()}-{time.time_ns()}"
        self._seq = 0
        self._shard_seq = 0
        self._load_leftover_parts()

    def _start_from_main(self):
        self._rows = self._main.rows()
        # where each row's embedding is: kind MAIN (row pos of the index), PART (pos into
        # _parts) or SHARD (pos into _adopted_refs: an engine's shard, adopted)
        n = len(self._rows["paths"])
        self._kind = np.full(n, MAIN, np.int8)
        self._pos = np.arange(n, dtype=np.int64)
        self._parts: list[tuple[Path, int]] = []  # (part file, row in it)
        self._adopted: list[ShardInfo] = []
        self._adopted_refs = np.zeros((0, 2), np.int64)  # (adopted shard, row in it)
        self._markers: list[Path] = []  # done markers removed once their shards are listed
        self._pending: list[tuple[int, np.ndarray, dict]] = []  # (kind, pos, rows) to add
        self._staged_attrs: dict = {}
        self._staged_failed = None
        self.dirty = False

    @classmethod
    def recover(cls, path) -> int:
        """Make a cache whole before a run reads it; returns the rows recovered.

        Merges the part files a killed session left, and drops the rows of shards that are
        missing or fail their checksum (they are then re-extracted, never used).
        """
        path = Path(path)
        if not path.exists():
            return 0
        with FeatureCache.open(path) as cache:
            damaged = cache.damaged_shards()
        if not damaged and not any(parts_dir(path).glob("part-*")):
            return 0
        session = cls(path, key=None)
        recovered = len(session._parts)
        if damaged:
            session.drop_shards(damaged)
        session.close()
        return recovered

    # ----- reading (the session's current state) ---------------------------------------
    @property
    def n_rows(self) -> int:
        self._materialize()
        return len(self._kind)

    def _materialize(self):
        """Concatenate appended rows once, not per batch (which would be quadratic)."""
        if self._pending:
            self._kind = np.concatenate([self._kind] + [np.full(len(pos), kind, np.int8)
                                                        for kind, pos, _ in self._pending])
            self._pos = np.concatenate([self._pos] + [pos for _, pos, _ in self._pending])
            self._rows = {name: np.concatenate([self._rows[name]] +
                                               [rows[name] for _, _, rows in self._pending])
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
        kind, pos = self._kind[indices], self._pos[indices]
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        in_main = kind == MAIN
        out[in_main] = self._main.embeddings(pos[in_main])
        for i in np.flatnonzero(kind == PART):
            part, row = self._parts[pos[i]]
            out[i] = _load_part(part)["embeddings"][row]
        adopted = np.flatnonzero(kind == SHARD)
        shard, row = self._adopted_refs[pos[adopted]].T
        for s in np.unique(shard):
            with _h5py().File(self.shard_dir / self._adopted[s].name, "r", locking=False) as h5:
                out[adopted[shard == s]] = read_rows(h5["embeddings"], row[shard == s])
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
        if len(self._parts) >= rows_per_shard(self.dim):
            self.commit()  # a shard's worth: parts do not pile up, readers see progress

    def _add_part_rows(self, part: Path, arrays: dict):
        n_new = len(arrays["paths"])
        first = len(self._parts)
        self._parts.extend((part, row) for row in range(n_new))
        self._pending.append((PART, np.arange(first, first + n_new, dtype=np.int64), arrays))
        self.dirty = True

    def adopt_shard(self, info: ShardInfo, columns: dict, marker: Path | None = None):
        """Add the rows of a shard an engine wrote in :attr:`shard_dir` (``columns``: their
        per-row columns, in the shard's row order); ``marker``, its done marker, is
        removed once an index lists the shard."""
        arrays = {name: _column(columns[name], kind) for name, kind in ROW_FIELDS.items()}
        if len(arrays["paths"]) != info.rows:
            raise ValueError(f"{info.name}: {info.rows} rows, {len(arrays['paths'])} given")
        first = len(self._adopted_refs)
        refs = np.stack([np.full(info.rows, len(self._adopted)), np.arange(info.rows)], 1)
        self._adopted.append(info)
        self._adopted_refs = np.concatenate([self._adopted_refs, refs.astype(np.int64)])
        self._pending.append((SHARD, np.arange(first, first + info.rows, dtype=np.int64),
                              arrays))
        if marker is not None:
            self._markers.append(Path(marker))
        self.dirty = True

    def remove_after_commit(self, marker: Path):
        """Delete an engine's done marker once the next index is written."""
        self._markers.append(Path(marker))
        self.dirty = True

    # Changes mark the session dirty only when they change something, so a run that reuses
    # everything does not rewrite the index.
    def keep_rows(self, keep: np.ndarray) -> "CacheSession":
        """Keep only the rows where ``keep`` is true. Only the index changes: the shards
        keep the bytes until :meth:`compact`."""
        self._materialize()
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        self._kind, self._pos = self._kind[keep], self._pos[keep]
        self._rows = {name: values[keep] for name, values in self._rows.items()}
        self.dirty = True
        return self

    def drop_shards(self, numbers) -> int:
        """Drop the rows stored in the committed shards ``numbers``; returns how many."""
        self._materialize()
        if self._main.version == 1 or not len(numbers):
            return 0
        shard = self._main.refs()[0]
        in_main = self._kind == MAIN
        dropped = np.zeros(len(self._kind), bool)
        dropped[in_main] = np.isin(shard[self._pos[in_main]], list(numbers))
        for number in numbers:
            log.warning("%s: shard %s is missing or fails its checksum; its rows will be "
                        "extracted again", self.path, self._main.shards[number].name)
        self.keep_rows(~dropped)
        return int(dropped.sum())

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
    def commit(self, rewrite: bool = False):
        """Write the session's state: rows not yet in a shard become new shards, then a new
        index replaces the old one atomically and the merged parts are removed.

        ``rewrite`` puts every row in new shards (compaction; migrates a version-1 cache,
        which any commit does anyway).
        """
        self._materialize()
        new = self._kind == PART
        if rewrite:
            new[:] = True
        elif self._main.version == 1:
            new |= self._kind == MAIN
        shards, shard, shard_row = self._kept_shards(new)
        for info, rows in self._write_shards(np.flatnonzero(new)):
            shard[rows] = len(shards)
            shard_row[rows] = np.arange(len(rows))
            shards.append(info)
        attrs = {k: self._main.attr(k) for k in self._main.h5.attrs}
        attrs.update(self._staged_attrs)
        attrs["merged_parts"] = json.dumps(self._merged_parts(attrs.get("merged_parts")))
        index_id = _write_index(self.path, key=self.key, dim=self.dim, attrs=attrs,
                                rows=self._rows, refs=(shard, shard_row), shards=shards,
                                failed=self.failed())
        _remember_rows(index_id, {name: values.copy() for name, values in self._rows.items()})
        self._main.close()
        for done in {part for part, _ in self._parts} | set(self._markers):
            done.unlink(missing_ok=True)
        self._main = FeatureCache.open(self.path)
        self._start_from_main()

    def _kept_shards(self, new):
        """The shards that rows not in ``new`` still use (the index's and adopted ones),
        renumbered, and every row's (shard, row in shard); -1 for the ``new`` rows."""
        n_main = len(self._main.shards)
        shard = np.full(len(self._kind), -1, np.int64)
        shard_row = np.full(len(self._kind), -1, np.int64)
        main, adopted = ~new & (self._kind == MAIN), ~new & (self._kind == SHARD)
        if main.any():
            main_shard, main_row = self._main.refs()
            shard[main], shard_row[main] = main_shard[self._pos[main]], main_row[self._pos[main]]
        if adopted.any():
            refs = self._adopted_refs[self._pos[adopted]]
            shard[adopted], shard_row[adopted] = refs[:, 0] + n_main, refs[:, 1]
        if not (main | adopted).any():
            return [], shard, shard_row
        used, shard[~new] = np.unique(shard[~new], return_inverse=True)
        candidates = [*self._main.shards, *self._adopted]
        return [candidates[i] for i in used], shard, shard_row

    def _write_shards(self, rows: np.ndarray):
        """Write session rows ``rows`` as new shards; yields (ShardInfo, rows) per shard."""
        if not rows.size:
            return
        self.shard_dir.mkdir(exist_ok=True)
        size = rows_per_shard(self.dim)
        block = 1024  # rows read (from parts) and written at a time: memory stays flat
        # shards of size to 2 x size rows (fewer only when fewer rows are new)
        for chunk in np.array_split(rows, max(1, rows.size // size)):
            name = f"{self._run}-{self._shard_seq:06d}.h5"
            self._shard_seq += 1
            blocks = (self.embeddings(chunk[i:i + block]) for i in range(0, chunk.size, block))
            info = write_shard(self.shard_dir / name, self.dim, blocks,
                               {c: self._rows[c][chunk] for c in SHARD_COLUMNS})
            yield info, chunk

    def compact(self) -> dict:
        """Rewrite every row into new, full shards and delete the shard files no longer
        used (rows removed since, the small shards of many small updates). Every shard is
        re-hashed first: rows of a damaged one are dropped (a later extract redoes them).
        Returns what changed."""
        before = _folder_bytes(self.shard_dir)
        n_shards = len(self._main.shards)
        n_dropped = self.drop_shards(self._main.damaged_shards(full=True))
        self.commit(rewrite=True)
        kept = {info.name for info in self._main.shards}
        files = {f.name for f in self.shard_dir.glob("*")} if self.shard_dir.exists() else set()
        for name in files:
            shard = name.removesuffix(DONE_SUFFIX)
            # a stopped engine's finished shard (marked, not listed) is work a rerun adopts
            pending = shard not in kept and shard in files and shard + DONE_SUFFIX in files
            if name not in kept and not pending:
                (self.shard_dir / name).unlink()
        return {"cache": str(self.path), "rows": self._main.n_rows,
                "shards_before": n_shards, "shards_after": len(self._main.shards),
                "bytes_before": before, "bytes_after": _folder_bytes(self.shard_dir),
                "rows_dropped_damaged": n_dropped}

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


def compact_cache(path) -> dict:
    """``featx cache compact``: a cache's rows rewritten into full shards, space freed."""
    path = Path(path)
    with CacheLock(path):
        CacheSession.recover(path)
        session = CacheSession(path, key=None)
        try:
            return session.compact()
        finally:
            session.close()


def verify_cache(path) -> dict:
    """``featx cache verify``: every shard re-hashed against the checksum the index holds."""
    with FeatureCache.open(path) as cache:
        damaged = cache.damaged_shards(full=True)
        return {"cache": str(path), "format": cache.version, "rows": cache.n_rows,
                "shards": len(cache.shards),
                "damaged": [cache.shards[i].name for i in damaged]}


# The rows of the last index read or written, by the random id every index is written with:
# one run reads them several times (reconcile, the session, Features), and decoding 100k
# strings is not free. An index is never changed after it is written, so its id names its rows.
_LAST_ROWS: dict = {}


def _remember_rows(index_id, rows: dict):
    _LAST_ROWS.clear()
    if index_id:  # format 1 files have none
        _LAST_ROWS[index_id] = rows


def shard_dir(cache_path) -> Path:
    """The folder beside a cache index that holds its shard files."""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".shards")


def parts_dir(cache_path) -> Path:
    """The folder beside a cache index that holds a run's part files until they commit."""
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".parts")


def remove_cache(cache_path):
    """Delete a cache: its index, shards and part files."""
    cache_path = Path(cache_path)
    cache_path.unlink(missing_ok=True)
    for folder in (shard_dir(cache_path), parts_dir(cache_path)):
        shutil.rmtree(folder, ignore_errors=True)


def _read_shard_table(h5) -> list[ShardInfo]:
    table = h5["shards"]
    names = _strings(table["names"])
    checksums = _strings(table["checksum"])
    return [ShardInfo(str(n), int(r), str(c), int(s), int(m)) for n, r, c, s, m in
            zip(names, table["rows"][:], checksums, table["size"][:], table["mtime_ns"][:])]


def _write_index(path, *, key, dim, attrs, rows, refs, shards, failed) -> str:
    """Write a whole index to a temporary file that then replaces ``path`` atomically;
    returns the new index's random id."""
    tmp = path.with_name(path.name + ".tmp")
    h5 = _open_h5(tmp, "w")
    try:
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
        h5.flush()
        os.fsync(h5.id.get_vfd_handle())
    finally:
        h5.close()
    os.replace(tmp, path)
    return index_id


def _put(group, name, values, kind):
    data = group.create_dataset(name, shape=(len(values),), dtype=_dtype(kind))
    if len(values):
        data[:] = values


def _folder_bytes(folder) -> int:
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.glob("*")) if folder.exists() else 0


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
        if path.parent.name.endswith(".shards"):
            continue
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
        "size_bytes": cache.size_bytes(),
        "format": cache.version,
        "n_shards": len(cache.shards),
    }
