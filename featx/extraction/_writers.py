"""The writer stage of the pipeline (:class:`featx.base.Writer`): embeddings kept in memory,
or appended to a feature cache on a background thread."""

from __future__ import annotations

import queue
import threading

import numpy as np

from ._reader import decoded


class ArrayWriter:
    """Collects embeddings in memory: ``embeddings`` (n, dim) and ``errors`` (n,)."""

    def __init__(self, n: int, dim: int):
        self.embeddings = np.zeros((n, dim), np.float32)
        self.errors = [""] * n

    def put(self, batch: dict) -> None:
        index, errors = batch["index"], batch["error"]
        ok = decoded(batch)
        if ok.any():
            self.embeddings[index[ok]] = batch["embedding"][ok]
        for i, error in zip(index, errors):
            self.errors[int(i)] = error

    def close(self) -> None:
        pass


class CacheWriter:
    """Appends finished batches to a feature cache in a background thread.

    ``rows`` holds per-file metadata columns (labels, paths, sha256, ...) indexed like the
    reader's paths; rows of files that failed are not written but collected in ``failed``
    as ``(path, sha256, reason)``.
    """

    def __init__(self, cache, rows: dict, max_pending: int = 4):
        self.cache = cache
        self.rows = rows
        self.failed: list[tuple[str, str, str]] = []
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="featx-writer", daemon=True)
        self._thread.start()

    def put(self, batch: dict) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(batch)

    def _loop(self):
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self._write(batch)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self._error = exc
                return

    def _write(self, batch):
        index, errors = batch["index"], batch["error"]
        ok = decoded(batch)
        for i, error in zip(index[~ok], errors[~ok]):
            self.failed.append((self.rows["paths"][i], self.rows["sha256"][i], error))
        keep = index[ok]
        if not keep.size:
            return
        self.cache.append(batch["embedding"][ok], **{k: v[keep] for k, v in self.rows.items()})

    def close(self) -> None:
        """Wait until every queued batch is in the cache."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
