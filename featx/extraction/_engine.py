"""The local engine: reader -> mapper -> writer, batch after batch, in this process.

Every place that turns image files into embeddings (or scores) goes through here:
extraction and its augmented views, ``predict`` on files that are not cached, fine-tuned
models' predictions and an export's parity check (:func:`map_files`), and each Ray actor
on its shard. Each stage is an object passed in, so another runtime or engine plugs in
without touching the others, and tests inject fakes.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time

import numpy as np

from featx.base import Mapper, Writer

from ._reader import ImageReader, decoded
from ._writers import ArrayWriter


@dataclasses.dataclass
class PipelineTiming:
    seconds: float
    n_images: int = 0  # images that went through the mapper
    first_batch_images: int = 0
    first_batch_seconds: float = 0.0  # includes one-off costs (tracing, session start)


class SignalStop:
    """While entered (in the main thread), SIGINT and SIGTERM ask the pipeline to stop at
    the next batch boundary instead of stopping the process: ``signum`` is then the signal.
    A second signal acts as it would have without this (the handlers are put back at the
    first), so a user who insists stops at once; a cache survives both."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._stop) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()

    def __bool__(self):
        return self.signum is not None

    def _stop(self, signum, frame):
        self.signum = signum
        self._restore()

    def _restore(self):
        for number, handler in self._previous.items():
            # None: a handler installed from C, which Python cannot put back
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


def run_pipeline(reader: ImageReader, mapper: Mapper, writer: Writer, *,
                 progress: bool = True, desc: str = "extract", stop=None) -> PipelineTiming:
    """The local engine: each reader batch through the mapper, then to the writer.

    Rows whose file could not be decoded skip the mapper (their embedding is zeros and
    their ``error`` says why); the writer decides what to do with them. The writer is
    closed (flushed) even when a stage raises. ``stop`` (a :class:`SignalStop`, or anything
    that turns true) ends the run after the batch in hand.
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
            if stop:
                break
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


def map_files(paths, preprocessing: dict, mapper: Mapper, width: int, *,
              batch_size: int = 32, root=None, workers: int | None = None,
              progress: bool = False, desc: str = "embed") -> tuple[np.ndarray, list[str]]:
    """Files through reader -> ``mapper`` -> an :class:`ArrayWriter`: the outputs
    (float32, ``(len(paths), width)``; zeros where a file could not be read) and each
    file's error (``""`` when it was read)."""
    reader = ImageReader(paths, preprocessing, batch_size, root=root, workers=workers)
    writer = ArrayWriter(len(reader), width)
    run_pipeline(reader, mapper, writer, progress=progress, desc=desc)
    return writer.embeddings, writer.errors
