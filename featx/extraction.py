"""Extraction: ImageReader (tf.data) -> EmbeddingMapper (tf.function) -> CacheWriter.

``extract()`` reconciles the data directory with its cache first, so only images that are
new or changed go through the model; everything else is reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np

from featx import data as featx_data
from featx.cache import CacheLock, CacheSession, FeatureCache, cache_path_for
from featx.errors import CacheError, DataError, ImageDecodeError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = {"cpu": 32, "gpu": 128}


# ----- results ---------------------------------------------------------------------
@dataclasses.dataclass
class ExtractStats:
    n_images: int = 0
    n_failed: int = 0
    n_ignored: int = 0
    n_extracted: int = 0  # images that went through the model in this run
    n_copied: int = 0  # rows reused from identical content under another path
    n_augmented: int = 0  # augmented views computed in this run
    seconds: float = 0.0
    model_seconds: float = 0.0  # the reader -> model -> writer pipeline, wall time
    first_batch_seconds: float = 0.0  # of which the first batch (model tracing included)
    first_batch_images: int = 0
    images_per_second: float = 0.0
    reused: bool = False
    failed: list = dataclasses.field(default_factory=list)
    ignored: list = dataclasses.field(default_factory=list)


class Features:
    """Cached embeddings of one dataset under one backbone; embeddings are read lazily."""

    def __init__(self, cache_path, stats: ExtractStats | None = None):
        self.cache_path = Path(cache_path)
        with FeatureCache.open(self.cache_path) as cache:
            rows = cache.rows()
            self.class_names = cache.json_attr("class_names", [])
            self.backbone = cache.attr("backbone")
            self.weights = cache.attr("weights")
            self.weights_id = cache.attr("weights_id")
            self.key = cache.key
            self.dim = cache.dim
            self.root = Path(cache.attr("root"))
            self.split_params = cache.json_attr("split_params", {})
            self.preprocessing = cache.json_attr("preprocessing", {})
            self.extraction_seconds = float(cache.attr("extraction_seconds", 0.0))
            failed = cache.failed()
        self.paths = rows["paths"]
        self.labels = rows["labels"]
        self.split = rows["split"]
        self.view = rows["view"]
        self.sha256 = rows["sha256"]
        self.stats = stats or ExtractStats(
            n_images=int((self.view == 0).sum()), n_failed=len(failed),
            failed=[(p, r) for p, _, r in failed], reused=True)

    @classmethod
    def open(cls, cache_path) -> "Features":
        return cls(cache_path)

    def __len__(self):
        return int((self.view == 0).sum())

    def __repr__(self):
        counts = {s: int(((self.split == s) & (self.view == 0)).sum()) for s in ("train", "val", "test")}
        return (f"Features({self.backbone}, weights={self.weights}, dim={self.dim}, "
                f"classes={len(self.class_names)}, splits={counts})")

    def has_split(self, split: str) -> bool:
        return bool(((self.split == split) & (self.view == 0)).any())

    def indices(self, split: str, views: bool = False) -> np.ndarray:
        """Row indices of ``split``; ``views=True`` adds augmented views of those images."""
        mask = self.split == split
        if not views:
            mask &= self.view == 0
        return np.flatnonzero(mask)

    def arrays(self, split: str, views: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of one split, in cache row order."""
        idx = self.indices(split, views)
        with FeatureCache.open(self.cache_path) as cache:
            X = cache.embeddings(idx)
        return X, self.labels[idx]

    def lookup(self, sha256_values) -> dict[str, int]:
        """Map content hashes to row indices of original (non-augmented) rows."""
        wanted = set(sha256_values)
        return {s: i for i, s in enumerate(self.sha256) if self.view[i] == 0 and s in wanted}


# ----- the three stages ------------------------------------------------------------
class ImageReader:
    """Streams (row index, image, error) batches, decoding and resizing in parallel threads.

    Files that cannot be decoded yield a black image and a non-empty error string, so one
    bad file never stops the pipeline; the writer drops those rows and records the reason.
    """

    def __init__(self, root, relpaths, preprocessing: dict, batch_size: int, workers=None):
        self.root = Path(root)
        self.relpaths = list(relpaths)
        self.size = int(preprocessing["input_size"])
        self.resize_size = int(preprocessing["resize_size"])
        self.interpolation = preprocessing.get("interpolation", "area")
        self.batch_size = batch_size
        self.workers = workers

    def _load(self, index):
        path = self.root / self.relpaths[int(index)]
        try:
            image = featx_data.load_for_model(path, self.size, self.resize_size, self.interpolation)
            return image, b""
        except ImageDecodeError as exc:
            return np.zeros((self.size, self.size, 3), np.uint8), exc.reason.encode()
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file failure
            reason = f"unexpected decoder error: {type(exc).__name__}: {exc}"
            return np.zeros((self.size, self.size, 3), np.uint8), reason.encode()

    def dataset(self):
        import cv2
        import tensorflow as tf

        # tf.data already runs several decoders at once; OpenCV's own thread pool on top
        # of that only oversubscribes the cores the model needs.
        cv2.setNumThreads(1)

        def load(index):
            image, error = tf.numpy_function(self._load, [index], [tf.uint8, tf.string])
            image.set_shape((self.size, self.size, 3))
            error.set_shape(())
            return index, image, error

        parallel = self.workers or tf.data.AUTOTUNE
        ds = tf.data.Dataset.range(len(self.relpaths))
        ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
        return ds.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)


class EmbeddingMapper:
    """The frozen backbone called through one traced ``tf.function`` (training=False)."""

    def __init__(self, backbone, batch_size: int | None = None):
        import tensorflow as tf

        model = backbone.feature_model()
        model.trainable = False
        size = backbone.input_size
        spec = tf.TensorSpec((None, size, size, 3), tf.uint8)

        @tf.function(input_signature=[spec], reduce_retracing=True)
        def embed(images):
            features = model(tf.cast(images, tf.float32), training=False)
            return tf.cast(features, tf.float32)

        self._embed = embed
        self.batch_size = batch_size
        self.n_batches = 0
        self.n_images = 0

    def __call__(self, images) -> np.ndarray:
        n = int(images.shape[0])
        self.n_batches += 1
        self.n_images += n
        if self.batch_size and n < self.batch_size:
            # A short last batch would make oneDNN build new kernels for one call (seconds);
            # padding it to the usual shape is far cheaper.
            images = np.concatenate([np.asarray(images), np.zeros(
                (self.batch_size - n, *images.shape[1:]), dtype=np.uint8)])
        return self._embed(images).numpy()[:n]


class CacheWriter:
    """Appends finished batches to the cache in a background thread (overlaps the model)."""

    def __init__(self, cache: FeatureCache, rows: dict, max_pending: int = 4):
        self.cache = cache
        self.rows = rows  # per-extraction-index metadata columns (labels, paths, ...)
        self.failed: list[tuple[str, str, str]] = []
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="featx-writer", daemon=True)
        self._thread.start()

    def put(self, indices, embeddings, errors):
        if self._error is not None:
            raise self._error
        self._queue.put((indices, embeddings, errors))

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(*item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self._error = exc
                return

    def _write(self, indices, embeddings, errors):
        ok = np.array([not e for e in errors], dtype=bool)
        for i, e in zip(indices[~ok], errors[~ok]):
            self.failed.append((self.rows["paths"][i], self.rows["sha256"][i], e.decode()))
        keep = indices[ok]
        self.cache.append(embeddings[ok], **{k: v[keep] for k, v in self.rows.items()})

    def close(self):
        """Wait for every queued batch to be committed."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


@dataclasses.dataclass
class PipelineTiming:
    seconds: float
    first_batch_images: int = 0
    first_batch_seconds: float = 0.0  # includes tracing the model: a one-off cost


def run_pipeline(reader: ImageReader, mapper: EmbeddingMapper, writer: CacheWriter,
                 progress: bool = True) -> PipelineTiming:
    """Sequential engine: reader batches -> mapper -> writer."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    first_batch = None
    bar = tqdm(total=len(reader.relpaths), unit="img", disable=not progress, desc="extract",
               dynamic_ncols=True, smoothing=0.1)
    try:
        for indices, images, errors in reader.dataset():
            embeddings = mapper(images)
            writer.put(indices.numpy(), embeddings, errors.numpy())
            bar.update(int(indices.shape[0]))
            if first_batch is None:
                first_batch = (int(indices.shape[0]), time.perf_counter() - start)
    finally:
        bar.close()
        writer.close()
    return PipelineTiming(time.perf_counter() - start, *(first_batch or (0, 0.0)))


# ----- orchestration ---------------------------------------------------------------
def configure_devices(mixed_precision: bool = False) -> str:
    """Enable GPU memory growth; set mixed precision on GPU. Returns "gpu" or "cpu"."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass
    if mixed_precision:
        if gpus:
            import keras

            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            log.warning("--mixed-precision ignored: no GPU found (it would be slower on CPU)")
    return "gpu" if gpus else "cpu"


def _file_columns(manifest, hashes, stats) -> dict[str, np.ndarray]:
    return {
        "labels": np.asarray(manifest.labels, dtype=np.int64),
        "paths": np.asarray(manifest.paths, dtype=object),
        "split": np.asarray(manifest.splits, dtype=object),
        "sha256": np.asarray(hashes, dtype=object),
        "size": np.asarray([s[0] for s in stats], dtype=np.int64),
        "mtime_ns": np.asarray([s[1] for s in stats], dtype=np.int64),
        "view": np.zeros(len(manifest.paths), dtype=np.int16),
    }


def _previous_state(cache_path, key):
    """Rows, failed files and split parameters recorded in an existing cache."""
    if not Path(cache_path).exists():
        return None
    with FeatureCache.open(cache_path) as cache:
        if cache.key != json.loads(json.dumps(key)):
            raise CacheError(f"{cache_path}: cache key does not match the requested backbone")
        return {
            "rows": cache.rows(),
            "failed": cache.failed(),
            "split_params": cache.json_attr("split_params"),
        }


def _discover(root, split_options, previous):
    previous_splits = None
    if previous is not None:
        rows = previous["rows"]
        recorded = previous["split_params"] or {}
        wanted = {k: split_options.get(k) for k in recorded}
        if recorded == wanted:
            originals = rows["view"] == 0
            previous_splits = dict(zip(rows["paths"][originals], rows["split"][originals]))
        else:
            log.warning("split options changed (%s -> %s): splitting again", recorded, wanted)
    return featx_data.discover(root, previous_splits=previous_splits, **split_options)


def _hash(manifest, previous):
    known = None
    if previous is not None:
        rows = previous["rows"]
        known = {p: (int(s), int(m), h) for p, s, m, h in
                 zip(rows["paths"], rows["size"], rows["mtime_ns"], rows["sha256"])}
    return featx_data.hash_files(manifest.root, manifest.paths, known=known)


def extract(data_dir, *, backbone="efficientnet_lite0", weights="imagenet", layer=None,
            pooling=None, input_size=None, batch_size=None, cache_dir="cache",
            val_fraction=0.2, test_fraction=0.0, seed=42, train_per_class=None, augment=0,
            augment_options=None, mixed_precision=False, workers=None,
            progress=True) -> Features:
    """Embed every image under ``data_dir`` with a frozen backbone, reusing the cache.

    Returns a :class:`Features` whose ``stats`` say what this run did.
    """
    from featx import __version__
    from featx.backbones import create_backbone

    started = time.perf_counter()
    root = Path(data_dir)
    split_options = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                         train_per_class=train_per_class)
    net = create_backbone(backbone, weights, layer=layer, pooling=pooling,
                          input_size=input_size, seed=seed)
    # float16 compute changes the embeddings, so it is part of the cache key
    device = configure_devices(mixed_precision) if mixed_precision else None
    fp16 = mixed_precision and device == "gpu"
    key = {**net.key(), "compute_dtype": "mixed_float16"} if fp16 else net.key()
    cache_path = cache_path_for(cache_dir, root, net.cfg.name, net.weights, key)
    with CacheLock(cache_path):
        recovered = CacheSession.recover(cache_path)  # batches of a run that was killed
        if recovered:
            log.info("recovered %d rows that a stopped run had computed", recovered)
        previous = _previous_state(cache_path, key)
        manifest = _discover(root, split_options, previous)
        hashes, file_stats = _hash(manifest, previous)
        current = _file_columns(manifest, hashes, file_stats)
        plan = _plan(previous, current)
        stats = ExtractStats(n_ignored=len(manifest.ignored), ignored=list(manifest.ignored))
        attrs = {
            "backbone": net.cfg.name, "weights": net.weights, "weights_id": net.weights_id,
            "layer": net.layer or "", "pooling": net.pooling,
            "preprocessing": net.preprocessing, "root": str(manifest.root),
            "class_names": manifest.class_names, "split_params": manifest.split_params,
            "layout": manifest.layout, "featx_version": __version__,
        }
        if device is None and (plan["extract"].size or previous is None):
            device = configure_devices()  # before the model is built: GPU memory growth
        cache = FeatureCache.open_for_write(
            cache_path, key=key, dim=net.dim if previous is None else None, attrs=attrs)
        try:
            cache = _apply_plan(cache, plan, current, stats)
            new_failed = []
            if plan["extract"].size:
                size = batch_size or DEFAULT_BATCH_SIZE[device]
                stats.model_seconds, new_failed = _extract_new(
                    cache, net, manifest.root, plan["extract"], current, size, workers,
                    progress, stats)
            augment_seconds = 0.0
            if augment:
                from featx.augment import extract_augmented_views

                augment_started = time.perf_counter()
                # returns the cache to go on with: a new object when stale views of
                # another augmentation recipe were dropped (the old one is then closed)
                cache, stats.n_augmented = extract_augmented_views(
                    cache, net, manifest.root, augment, augment_options or {}, seed,
                    batch_size or 32, progress)
                if stats.n_augmented:
                    augment_seconds = time.perf_counter() - augment_started
            failed = plan["known_failed"] + new_failed
            cache.set_failed(failed)
            # what the cached rows cost to compute, summed over runs (for cost comparisons)
            attrs["extraction_seconds"] = float(cache.attr("extraction_seconds", 0.0)) + \
                stats.model_seconds + augment_seconds
            cache.set_attrs(**attrs)
        finally:
            cache.close()
            if fp16:
                import keras

                keras.mixed_precision.set_global_policy("float32")
    stats.failed = [(p, r) for p, _, r in failed]
    stats.n_failed = len(failed)
    stats.n_images = len(manifest.paths) - stats.n_failed
    stats.seconds = time.perf_counter() - started
    stats.reused = stats.n_extracted == 0 and stats.n_augmented == 0
    if stats.model_seconds > 0:
        stats.images_per_second = stats.n_extracted / stats.model_seconds
    return Features(cache_path, stats)


def _plan(previous, current) -> dict:
    """Decide, per file, whether to keep its cached row, copy one, or run the model."""
    n_files = len(current["paths"])
    file_key = list(zip(current["paths"], current["sha256"]))
    if previous is None:
        return {"keep": np.zeros(0, bool), "copy_from": {}, "extract": np.arange(n_files), "known_failed": []}
    rows = previous["rows"]
    split_of = dict(zip(current["paths"], current["split"]))
    index = {k: i for i, k in enumerate(file_key)}
    # an augmented view survives only while its image is still a training image
    keep = np.array([
        (p, h) in index and (v == 0 or split_of.get(p) == "train")
        for p, h, v in zip(rows["paths"], rows["sha256"], rows["view"])
    ], dtype=bool)
    cached = {(p, h) for p, h, v, k in zip(rows["paths"], rows["sha256"], rows["view"], keep)
              if k and v == 0}
    by_hash = {h: i for i, (h, v) in enumerate(zip(rows["sha256"], rows["view"])) if v == 0}
    failed = {(p, h): (p, h, r) for p, h, r in previous["failed"]}
    known_failed, copy_from, extract = [], {}, []
    for i, k in enumerate(file_key):
        if k in cached:
            continue
        if k in failed:
            known_failed.append(failed[k])
        elif k[1] in by_hash:
            copy_from[i] = by_hash[k[1]]
        else:
            extract.append(i)
    return {"keep": keep, "copy_from": copy_from, "extract": np.asarray(extract, dtype=np.int64),
            "known_failed": known_failed}


def _apply_plan(cache, plan, current, stats):
    """Drop rows of removed/changed files, copy rows of moved files, refresh per-file columns.

    Labels and splits follow the current folders and split options; size and mtime are
    refreshed so a touched but unchanged file is not read again to hash it next time.
    """
    if plan["copy_from"]:
        files = np.fromiter(plan["copy_from"].keys(), dtype=np.int64)
        sources = np.fromiter(plan["copy_from"].values(), dtype=np.int64)
        embeddings = cache.embeddings(sources)
        cache.append(embeddings, **{k: v[files] for k, v in current.items()})
        stats.n_copied = len(files)
        plan["keep"] = np.concatenate([plan["keep"], np.ones(len(files), bool)])
    if plan["keep"].size and not plan["keep"].all():
        log.info("removing %d cached rows of files that were removed or changed",
                 int((~plan["keep"]).sum()))
        cache = cache.compact(plan["keep"])
    if cache.n_rows:
        rows = cache.rows()
        where = {p: i for i, p in enumerate(current["paths"])}
        files = np.array([where[p] for p in rows["paths"]], dtype=np.int64)
        for name in ("labels", "split", "size", "mtime_ns"):
            cache.rewrite_column(name, current[name][files])
    return cache


def _extract_new(cache, net, root, todo, current, batch_size, workers, progress, stats):
    columns = {k: v[todo] for k, v in current.items()}
    reader = ImageReader(root, columns["paths"], net.preprocessing, batch_size, workers)
    mapper = EmbeddingMapper(net, batch_size)
    writer = CacheWriter(cache, columns)
    try:
        timing = run_pipeline(reader, mapper, writer, progress)
    finally:
        stats.n_extracted = mapper.n_images
    stats.first_batch_seconds = timing.first_batch_seconds
    stats.first_batch_images = timing.first_batch_images
    for path, _, reason in writer.failed:
        log.warning("skipped %s: %s", path, reason)
    return timing.seconds, writer.failed
