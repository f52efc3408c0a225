"""The extraction pipeline: reader -> mapper -> writer, run by an engine.

Every place that turns image files into embeddings goes through here: ``extract`` and its
augmented views, ``predict`` on new files, and fine-tuned models' predictions. Each stage
is a small object passed in, so another runtime (:mod:`featx.runtimes`) or another engine
plugs in without touching the others, and tests inject fakes.

A *batch* is a dict of numpy arrays with named keys:

- ``index``: int64 (n,), positions in the reader's list of paths;
- ``image``: uint8 (n, S, S, 3) RGB, resized and cropped (a black image where decoding failed);
- ``error``: object (n,), ``""`` for success, else why the file could not be read;
- ``embedding``: float32 (n, D), added by :func:`run_pipeline` (zeros on error rows).

A *mapper* is a callable ``uint8 images -> float32 embeddings`` (see :mod:`featx.runtimes`);
a *writer* has ``put(batch)`` and ``close()``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featx import data as featx_data
from featx.errors import ImageDecodeError
from featx.options import usable_cores

log = logging.getLogger(__name__)


# ----- reader ----------------------------------------------------------------------
class ImageReader:
    """Decodes and resizes image files in a pool of threads; yields batches in order.

    Parameters
    ----------
    paths : sequence of str or Path
        Files to read, relative to ``root`` (or absolute, with ``root=None``).
    preprocessing : dict
        A backbone's ``preprocessing`` (``input_size``, ``resize_size``, ``interpolation``,
        and optionally ``reduced_decode``).
    batch_size : int
    root : path, optional
    workers : int, optional
        Decoding threads; default: the usable cores. OpenCV releases the GIL while it
        decodes and resizes, so threads decode in parallel.
    prefetch : int
        Batches decoded ahead of the consumer.
    """

    def __init__(self, paths, preprocessing: dict, batch_size: int = 32, *, root=None,
                 workers: int | None = None, prefetch: int = 2):
        self.paths = [str(p) for p in paths]
        self.root = Path(root) if root is not None else None
        self.size = int(preprocessing["input_size"])
        self.resize_size = int(preprocessing["resize_size"])
        self.interpolation = preprocessing.get("interpolation", "area")
        self.reduced_decode = bool(preprocessing.get("reduced_decode", False))
        self.batch_size = int(batch_size)
        self.workers = workers or usable_cores()
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, str]:
        """One image and its error ("" for success); never raises for a bad file."""
        path = self.paths[index] if self.root is None else self.root / self.paths[index]
        try:
            image = featx_data.load_for_model(path, self.size, self.resize_size,
                                              self.interpolation,
                                              reduced_decode=self.reduced_decode)
            return image, ""
        except ImageDecodeError as exc:
            return self._blank(), exc.reason
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file failure
            return self._blank(), f"unexpected decoder error: {type(exc).__name__}: {exc}"

    def _blank(self):
        return np.zeros((self.size, self.size, 3), np.uint8)

    def _batch(self, start: int) -> dict:
        indices = np.arange(start, min(start + self.batch_size, len(self.paths)), dtype=np.int64)
        loaded = [self.load(int(i)) for i in indices]
        return {
            "index": indices,
            "image": np.stack([image for image, _ in loaded]),
            "error": np.array([error for _, error in loaded], dtype=object),
        }

    def __iter__(self):
        import cv2

        # the pool already runs one decoder per core; OpenCV's own threads on top of it
        # would only take cores from the model
        cv2.setNumThreads(1)
        starts = iter(range(0, len(self.paths), self.batch_size))
        with ThreadPoolExecutor(self.workers, thread_name_prefix="featx-decode") as pool:
            # islice, not zip: zip would draw (and lose) one start more than it submits
            first = itertools.islice(starts, self.workers + self.prefetch)
            pending = collections.deque(pool.submit(self._batch, s) for s in first)
            while pending:
                batch = pending.popleft().result()
                start = next(starts, None)
                if start is not None:
                    pending.append(pool.submit(self._batch, start))
                yield batch


def decoded(batch: dict) -> np.ndarray:
    """Boolean mask of the batch's rows whose file was read (``error`` is empty)."""
    return np.array([not e for e in batch["error"]], dtype=bool)


# ----- mappers ---------------------------------------------------------------------
class FlipAveraging:
    """A mapper whose embedding of an image is the mean of ``mapper``'s embeddings of the
    image and of its horizontal mirror image (twice the model calls, one batch shape)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, images: np.ndarray) -> np.ndarray:
        plain = np.asarray(self.mapper(images), dtype=np.float32)
        mirrored = np.asarray(self.mapper(np.ascontiguousarray(images[:, :, ::-1])),
                              dtype=np.float32)
        return (plain + mirrored) / np.float32(2)

    def __getattr__(self, name):  # runtime, precision, dim...: the wrapped mapper's
        if name == "mapper":
            raise AttributeError(name)
        return getattr(self.mapper, name)


# ----- writers ---------------------------------------------------------------------
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


# ----- engine ----------------------------------------------------------------------
@dataclasses.dataclass
class PipelineTiming:
    seconds: float
    n_images: int = 0  # images that went through the mapper
    first_batch_images: int = 0
    first_batch_seconds: float = 0.0  # includes one-off costs (tracing, session start)


def run_pipeline(reader, mapper, writer, *, progress: bool = True,
                 desc: str = "extract") -> PipelineTiming:
    """The local engine: each reader batch through the mapper, then to the writer.

    Rows whose file could not be decoded skip the mapper (their embedding is zeros and
    their ``error`` says why); the writer decides what to do with them. The writer is
    closed (flushed) even when a stage raises.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    timing = PipelineTiming(0.0)
    bar = tqdm(total=len(reader), unit="img", disable=not progress, desc=desc,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in reader:
            ok = decoded(batch)
            batch["embedding"] = _map_rows(mapper, batch["image"], ok)
            writer.put(batch)
            n = len(batch["index"])
            timing.n_images += int(ok.sum())
            bar.update(n)
            if not timing.first_batch_images:
                timing.first_batch_images = n
                timing.first_batch_seconds = time.perf_counter() - start
    finally:
        bar.close()
        writer.close()
    timing.seconds = time.perf_counter() - start
    return timing


def _map_rows(mapper, images, ok) -> np.ndarray:
    """Embeddings of the ``ok`` rows; zeros elsewhere (no columns when no row is ok)."""
    if ok.all():
        return np.asarray(mapper(images), dtype=np.float32)
    if not ok.any():
        return np.zeros((len(ok), 0), np.float32)
    mapped = np.asarray(mapper(images[ok]), dtype=np.float32)
    embeddings = np.zeros((len(ok), mapped.shape[1]), np.float32)
    embeddings[ok] = mapped
    return embeddings
