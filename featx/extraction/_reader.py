"""The reader stage of the pipeline: image files decoded, resized and cropped by a pool of
threads, in batches, in order (the batch is described in :mod:`featx.base`)."""

from __future__ import annotations

import collections
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featx.data import load_for_model, max_image_pixels
from featx.errors import ImageDecodeError
from featx.options import usable_cores


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
        max_image_pixels()  # a bad FEATX_MAX_IMAGE_PIXELS stops the run here, not each file

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[np.ndarray, str]:
        """One image and its error ("" for success); never raises for a bad file."""
        path = self.paths[index] if self.root is None else self.root / self.paths[index]
        try:
            image = load_for_model(path, self.size, self.resize_size, self.interpolation,
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
