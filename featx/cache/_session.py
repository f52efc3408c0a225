"""Writing a cache safely: a lock per cache and a session whose changes survive a crash.

Nothing a reader can open is modified in place. A writing session (:class:`CacheSession`)
appends each finished batch as a small part file (written to a temporary name, then
renamed); a commit writes new rows as new shards, then a new index to a temporary file
that atomically replaces the old one. The next session merges the part files a killed one
left. So kill -9 at any moment loses at most the batch in flight, and a reader sees
either the old index or the new one, whose shards all exist. A lock file prevents two
writers on one cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from featx._io import TEMPORARY_GLOB, atomic_path
from featx.errors import CacheError

from ._index import ROW_FIELDS, FeatureCache, _CacheReader, _column, _h5py, _remember_rows, \
    _write_index, validate
from ._key import parts_dir, shard_dir
from ._shards import COLUMNS as SHARD_COLUMNS
from ._shards import DONE_SUFFIX, ShardInfo, read_rows, rows_per_shard, write_shard

log = logging.getLogger(__name__)

MAIN, PART, SHARD = 0, 1, 2  # where a session's row is: the index, a part file, a new shard


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
        with contextlib.suppress(OSError):  # the holder's pid is a courtesy: a full disk
            os.ftruncate(self._fd, 0)  # must not stop a run that writes nothing
            os.write(self._fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
            _discard_parts(self.parts_dir)
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
        with atomic_path(part) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, embeddings=np.asarray(embeddings, np.float32),
                     **{name: values.astype(str) if values.dtype == object else values
                        for name, values in arrays.items()})
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
        # part files a killed writer left half-written (featx 0.1 named them part-*.npz.tmp)
        for pattern in (TEMPORARY_GLOB, "*.tmp"):
            for stray in self.parts_dir.glob(pattern):
                stray.unlink()
        for part in sorted(self.parts_dir.glob("part-*.npz"), key=part_id):
            run, seq = part_id(part)
            if seq <= merged.get(run, -1):
                part.unlink()  # merged by a commit that finished just before a crash
                continue
            arrays = self._part_rows(part)
            if arrays is not None:
                self._add_part_rows(part, arrays)

    def _part_rows(self, part: Path) -> dict | None:
        """A leftover part's per-row columns; None when it is damaged (a zip member fails
        its CRC, or its arrays do not line up): it is deleted and its rows extracted again."""
        try:
            data = _load_part(part)
            embeddings = data["embeddings"]
            arrays = {name: _column(data[name], kind) for name, kind in ROW_FIELDS.items()}
            if embeddings.dtype != np.float32 or embeddings.shape[1:] != (self.dim,) or \
                    any(len(values) != len(embeddings) for values in arrays.values()):
                raise ValueError("its arrays do not line up")
        except Exception as exc:  # noqa: BLE001 - zipfile and numpy raise many kinds
            log.warning("%s: damaged part file (%s); its rows will be extracted again", part,
                        exc)
            _PART_CACHE.clear()
            part.unlink()
            return None
        return arrays


FeatureCache.writer = CacheSession


def _discard_parts(folder: Path):
    """Part files beside a new index are a deleted index's: their rows are extracted again
    with the rest (merged, they would be rows of images counted twice, or gone)."""
    parts = list(folder.glob("part-*")) if folder.exists() else []
    for part in parts:
        part.unlink()
    if parts:
        log.info("%s: %d part files of a deleted index discarded", folder, len(parts))


def _folder_bytes(folder) -> int:
    folder = Path(folder)
    return sum(f.stat().st_size for f in folder.glob("*")) if folder.exists() else 0


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
