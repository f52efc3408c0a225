"""Shard files: the immutable HDF5 files that hold a cache's embeddings.

A shard is written once, under a temporary name that is renamed when the file is complete
and on disk, and never changed after: its rows' embeddings (``embeddings``, float32) and,
so that a shard can be told apart on its own, their ``paths``, ``sha256`` and ``view``.
What a cache knows of each shard (:class:`ShardInfo`) includes a SHA-256 of the embedding
bytes: a shard whose content no longer matches is never read as embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from featx._io import atomic_path

SHARD_BYTES = 32 * 2**20  # a shard's embeddings: big enough for few files, small for RAM
COLUMNS = ("paths", "sha256", "view")
DONE_SUFFIX = ".done"  # marker beside a shard an engine finished but no index lists yet
# A sealed file begins with an HDF5 user block (which HDF5 skips) holding the SHA-256 of
# every byte after it: checked before HDF5 parses anything, since HDF5 can loop forever on a
# damaged file (a flipped size in the heap of variable-length strings does).
SEAL_BYTES = 512
SEAL_MAGIC = b"featx-sha256:"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One shard as a cache index records it."""

    name: str  # file name inside the cache's shard folder
    rows: int
    checksum: str  # sha256 of the embeddings' bytes (float32, C order)
    size: int  # file size and mtime: a shard whose stat is unchanged is not re-hashed
    mtime_ns: int


def rows_per_shard(dim: int) -> int:
    return max(256, SHARD_BYTES // (4 * max(1, dim)))


def _h5py():
    import h5py

    return h5py


def write_shard(path, dim: int, blocks, columns: dict) -> ShardInfo:
    """Write ``blocks`` (float32 arrays of ``dim`` columns, in row order) as shard ``path``.

    ``columns`` holds the rows' ``paths``, ``sha256`` and ``view``. Blocks are written as
    they come, so memory holds one block; the file appears under its name only complete.
    """
    h5py = _h5py()
    path = Path(path)
    n = len(columns["paths"])
    digest = hashlib.sha256()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", locking=False, userblock_size=SEAL_BYTES) as h5:
            data = h5.create_dataset("embeddings", shape=(n, dim), dtype="float32")
            start = 0
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=np.float32)
                data[start:start + len(block)] = block
                digest.update(block)  # the buffer itself: no copy
                start += len(block)
            if start != n:
                raise ValueError(f"{path.name}: {start} embeddings for {n} rows")
            strings = h5py.string_dtype("utf-8")
            h5.create_dataset("paths", data=[str(p) for p in columns["paths"]], dtype=strings)
            h5.create_dataset("sha256", data=[str(s) for s in columns["sha256"]], dtype=strings)
            h5.create_dataset("view", data=np.asarray(columns["view"], dtype=np.int16))
            h5.attrs["checksum"] = digest.hexdigest()
        seal(tmp)  # fsyncs
    stat = path.stat()
    return ShardInfo(path.name, n, digest.hexdigest(), stat.st_size, stat.st_mtime_ns)


def seal(path) -> None:
    """Write the SHA-256 of a closed HDF5 file (made with ``userblock_size=SEAL_BYTES``)
    into its user block."""
    with open(path, "r+b") as handle:
        digest = _digest_after(handle, SEAL_BYTES)
        handle.seek(0)
        handle.write(SEAL_MAGIC + digest.encode())
        handle.flush()
        os.fsync(handle.fileno())


def check_seal(path) -> tuple[str, os.stat_result]:
    """(the state of the file at ``path``, its stat). The state is "intact" (sealed, every
    byte as sealed), "damaged" (sealed, but not as sealed), "unsealed" (an HDF5 file from
    its first byte: written before seals) or "foreign" (neither). Raises OSError."""
    with open(path, "rb") as handle:
        head = handle.read(len(SEAL_MAGIC) + 64)
        stat = os.fstat(handle.fileno())
        if head.startswith(HDF5_SIGNATURE):
            return "unsealed", stat
        if not head.startswith(SEAL_MAGIC):
            return "foreign", stat
        intact = _digest_after(handle, SEAL_BYTES).encode() == head[len(SEAL_MAGIC):]
        return ("intact" if intact else "damaged"), stat


def _digest_after(handle, offset: int, block: int = 1 << 20) -> str:
    handle.seek(offset)
    digest = hashlib.sha256()
    while chunk := handle.read(block):
        digest.update(chunk)
    return digest.hexdigest()


def checksum(path, block_rows: int = 8192) -> str:
    """SHA-256 of a shard's embedding bytes, read in blocks."""
    digest = hashlib.sha256()
    with _h5py().File(path, "r", locking=False) as h5:
        data = h5["embeddings"]
        for start in range(0, data.shape[0], block_rows):
            digest.update(np.ascontiguousarray(data[start:start + block_rows]))
    return digest.hexdigest()


# Files whose seal held, by path: the (inode, size, mtime) of the file checked. Sealed
# files are never changed in place, so while these are unchanged they hold the checked bytes.
SEALS_HELD: dict[str, tuple] = {}


def stat_key(stat) -> tuple:
    """What tells one version of a file from another: (inode, size, mtime)."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def seal_state(path, stat=None) -> tuple[str, tuple]:
    """(:func:`check_seal`'s state, the stat key of the file checked); a file whose seal
    held is hashed again only when its stat changed. Raises OSError."""
    key = stat_key(stat or os.stat(path))
    if SEALS_HELD.get(str(path)) == key:
        return "intact", key
    state, stat = check_seal(path)
    key = stat_key(stat)
    if state == "intact":
        SEALS_HELD[str(path)] = key
    return state, key


def remember_seal(path) -> None:
    """Record a file just sealed (its bytes were hashed to seal it) as checked."""
    SEALS_HELD[str(path)] = stat_key(os.stat(path))


def is_intact(folder, info: ShardInfo, full: bool = False) -> bool:
    """Whether shard ``info`` in ``folder`` holds what was written. Unless ``full``, a file
    whose size and mtime are as recorded needs only its seal to hold (checked once per
    process: bytes that rot under an unchanged mtime are caught too); with ``full``, its
    embeddings are hashed against the index's checksum as well."""
    path = Path(folder) / info.name
    try:
        stat = path.stat()
        state = check_seal(path)[0] if full else seal_state(path, stat)[0]
        if state not in ("intact", "unsealed"):
            return False
        if not full and (stat.st_size, stat.st_mtime_ns) == (info.size, info.mtime_ns):
            return True
        return checksum(path) == info.checksum
    except Exception:  # noqa: BLE001 - h5py raises many kinds on a damaged unsealed file
        return False


def read_rows(data, rows, block_rows: int = 4096, out=None, at=None) -> np.ndarray:
    """``data[rows]`` for an HDF5 dataset, ``rows`` in any order, repeats allowed; with
    ``out``, written into ``out[at]`` instead (``at``: one position per row).

    Reads in blocks of ``block_rows``, so memory holds the result plus one block: a span
    of rows that are mostly wanted is read as slices (one read beats a point list), sparse
    rows as point selections (which h5py wants increasing and distinct).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((rows.size,) + data.shape[1:], dtype=data.dtype)
        at = np.arange(rows.size)
    if not rows.size:
        return out
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    first, last = int(ordered[0]), int(ordered[-1])
    if last - first + 1 <= 2 * np.unique(ordered).size:  # dense
        for start in range(first, last + 1, block_rows):
            lo, hi = np.searchsorted(ordered, [start, start + block_rows])
            if lo < hi:
                block = data[start:int(ordered[hi - 1]) + 1]
                out[at[order[lo:hi]]] = block[ordered[lo:hi] - start]
        return out
    for lo in range(0, rows.size, block_rows):
        unique, inverse = np.unique(ordered[lo:lo + block_rows], return_inverse=True)
        out[at[order[lo:lo + block_rows]]] = data[unique][inverse]
    return out
