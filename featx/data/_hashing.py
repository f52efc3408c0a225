"""Content hashes of a folder's files, reusing the hashes of files whose size and mtime are
unchanged."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from featx._io import file_sha256

log = logging.getLogger("featx.data")  # one logger for the package

HASH_SLICE = 1024


def hash_files(root, relpaths, *, known=None, workers: int = 8):
    """SHA-256, size and mtime of many files, reusing known hashes of unchanged files.

    Parameters
    ----------
    root : str or Path
        Directory the paths are relative to.
    relpaths : sequence of str
        Files to hash.
    known : dict, optional
        Relative path -> ``(size, mtime_ns, sha256)`` recorded earlier. A file whose size
        and ``st_mtime_ns`` are unchanged is not read again.
    workers : int
        Threads reading and hashing (hashlib releases the GIL on large buffers).

    Returns
    -------
    hashes : list of str
        Hex SHA-256 per path, in the order of ``relpaths``; ``""`` for a file that cannot
        be read (missing, permission denied, a folder), which the caller will then fail
        to decode as well.
    stats : list of (int, int)
        ``(size, mtime_ns)`` per path, ``(-1, -1)`` when the file cannot be read; store
        them with the hashes to pass as ``known`` next time.
    """
    root = Path(root)
    base = str(root) + os.sep  # plain strings: a Path per file is slow on 100k files
    known = known or {}
    hashes = [""] * len(relpaths)
    stats = [(-1, -1)] * len(relpaths)
    todo = []
    for i, rel in enumerate(relpaths):
        try:
            st = os.stat(base + rel)
        except OSError as exc:
            log.debug("cannot stat %s: %s", rel, exc)
            continue
        stats[i] = stat = (st.st_size, st.st_mtime_ns)
        previous = known.get(rel)
        if previous is not None and tuple(previous[:2]) == stat and previous[2]:
            hashes[i] = previous[2]
        else:
            todo.append(i)

    def work(i):
        try:
            return i, file_sha256(root / relpaths[i])
        except OSError as exc:
            log.debug("cannot hash %s: %s", relpaths[i], exc)
            return i, None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        # in slices: pool.map submits every task at once, a future per file (100 MB at 50k)
        for start in range(0, len(todo), HASH_SLICE):
            for i, digest in pool.map(work, todo[start:start + HASH_SLICE]):
                if digest is None:
                    stats[i] = (-1, -1)
                else:
                    hashes[i] = digest
    return hashes, stats
