"""Fine-tuning's input: a ``tf.data`` pipeline of decoded images, the same decoding and
resizing as extraction's reader."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from featx.extraction import ImageReader

log = logging.getLogger(__name__)

# Validation images are cached decoded in memory when they take less than this.
VAL_CACHE_BYTES = 256 * 2**20


def image_dataset(root, paths, labels, preprocessing: dict, batch_size: int, *,
                  training: bool = False, seed: int = 0, cache: bool | None = None):
    """A ``tf.data.Dataset`` of (images, labels, sample weights) batches.

    Images are decoded, resized and centre-cropped by :meth:`featx.extraction.ImageReader.load`
    in parallel (``tf.numpy_function``), exactly as extraction does, and come out as float32
    RGB in [0, 255]. A file that cannot be decoded yields a black image with sample weight 0
    (and one warning), so it counts for nothing while the dataset keeps a known length.
    Nothing here is random except, when ``training``, the order (a seeded shuffle,
    reshuffled every epoch); augmentation lives in the model, not in this pipeline.

    Parameters
    ----------
    root : str or Path
        Folder the ``paths`` are relative to (absolute paths are used as they are).
    paths : sequence of str
    labels : sequence of int
    preprocessing : dict
        ``input_size``, ``resize_size``, ``interpolation`` and optionally
        ``reduced_decode`` (``Backbone.preprocessing``).
    batch_size : int
    training : bool
        Shuffle (seeded by ``seed``).
    seed : int
    cache : bool, optional
        Keep decoded images in memory after the first pass; default: when not training
        and they take less than 256 MiB.
    """
    import tensorflow as tf

    reader = ImageReader(paths, preprocessing, root=Path(root))
    paths, size = reader.paths, reader.size
    warned = set()

    def load(index):
        image, error = reader.load(int(index))  # black where the file cannot be decoded
        if not error:
            return image, np.float32(1)
        path = paths[int(index)]
        if path not in warned:
            warned.add(path)
            log.warning("skipped %s: %s", path, error)
        return image, np.float32(0)

    label_table = tf.constant(np.asarray(labels, dtype=np.int64))

    def decode(index):
        image, weight = tf.numpy_function(load, [index], [tf.uint8, tf.float32])
        image.set_shape((size, size, 3))
        weight.set_shape(())
        return image, tf.gather(label_table, index), weight

    def to_float(images, labels, weights):
        return tf.cast(images, tf.float32), labels, weights

    ds = tf.data.Dataset.range(len(paths))
    if training:
        ds = ds.shuffle(max(len(paths), 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is None:
        cache = not training and len(paths) * size * size * 3 <= VAL_CACHE_BYTES
    if cache:
        ds = ds.cache()  # uint8, before batching: a quarter of the float32 size
    ds = ds.batch(batch_size).map(to_float)
    return ds.prefetch(tf.data.AUTOTUNE)
