"""A runtime whose embeddings are exact, for tests that compare rows bit for bit across
runs, batches and processes (a damaged cache, a stopped run, a full disk): the sums of an
image's pixels in eight blocks, integers below 2**24, repeated to ``dim`` columns.

``use_everywhere(patch, dim)`` makes it the runtime every extract builds (the CLI's too)."""

import time

import numpy as np

BLOCKS = 8


class SumMapper:
    runtime = "fake-sums"
    precision = "fp32"

    def __init__(self, dim: int = BLOCKS, delay: float = 0.0):
        self.dim, self.delay = dim, delay
        self.n_images = 0

    def __call__(self, images):
        time.sleep(self.delay)  # a slow model: a signal finds the run mid-way
        self.n_images += len(images)
        sums = images.reshape(len(images), BLOCKS, -1).sum(axis=2, dtype=np.int64)
        return np.tile(sums.astype(np.float32), self.dim // BLOCKS)


def use_everywhere(patch, dim: int, delay: float = 0.0) -> None:
    """Every runtime an extract opens is a SumMapper of ``dim`` columns."""
    patch.setattr("featx.extraction._run.open_mapper",
                  lambda *args, **kwargs: SumMapper(dim, delay))

