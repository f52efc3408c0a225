"""Extraction: reconcile a data folder with its cache, then run what is new through the
pipeline (:mod:`featx.pipeline`) on a runtime (:mod:`featx.runtimes`).

``extract()`` reconciles the data directory with its cache first, so only images that are
new or changed go through the model; everything else is reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from featx import data as featx_data
from featx.cache import CacheLock, CacheSession, FeatureCache, cache_path_for
from featx.errors import CacheError, DataError
from featx.pipeline import CacheWriter, ImageReader, run_pipeline

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
    runtime: str = ""  # which runtime computed this run's rows ("" when none did)
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
            self.runtimes = cache.json_attr("runtimes", [])
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

    @property
    def precision(self) -> str:
        return self.key.get("precision", "fp32")

    def provenance(self) -> str:
        """Which runtime(s) and precision computed the cached rows, for reports."""
        ran = self.stats.runtime or ", ".join(self.runtimes) or "unrecorded runtime"
        return f"{ran}; cached rows {self.precision}"

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


# ----- orchestration ---------------------------------------------------------------
def configure_devices(mixed_precision: bool = False) -> str:
    """Enable GPU memory growth; set mixed precision on GPU. Returns "gpu" or "cpu".

    Imports TensorFlow: call it only when the Keras runtime may run.
    """
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


def detect_device(runtime: str = "auto") -> str:
    """"gpu" or "cpu", importing TensorFlow only when a GPU may be there or Keras will run."""
    if runtime == "keras" or any(Path("/dev").glob("nvidia[0-9]*")):
        return configure_devices()
    return "cpu"


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
            augment_options=None, mixed_precision=False, workers=None, runtime="auto",
            precision="fp32", reduced_decode=False, mapper=None, progress=True) -> Features:
    """Embed every image under ``data_dir`` with a frozen backbone, reusing the cache.

    ``runtime`` is "auto", "onnx" or "keras" (:mod:`featx.runtimes`); ``precision`` "fp32"
    or "int8" (ONNX Runtime, calibrated on the dataset's training images; its own cache
    key). ``mapper`` replaces the runtime with a ready mapper (tests, custom runtimes).
    Returns a :class:`Features` whose ``stats`` say what this run did.
    """
    from featx import __version__
    from featx.backbones import create_backbone
    from featx.runtimes import choose_runtime, describe

    started = time.perf_counter()
    root = Path(data_dir)
    split_options = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                         train_per_class=train_per_class)
    net = create_backbone(backbone, weights, layer=layer, pooling=pooling,
                          input_size=input_size, seed=seed, reduced_decode=reduced_decode)
    choose_runtime(runtime, precision)  # bad combinations fail before any work
    # float16 compute changes the embeddings, so it is part of the cache key
    device = configure_devices(mixed_precision) if mixed_precision else None
    fp16 = mixed_precision and device == "gpu" and precision == "fp32" and runtime != "onnx"
    key = {**net.key(), "compute_dtype": "mixed_float16"} if fp16 else net.key()
    if precision == "int8":
        key = {**key, **INT8_KEY}
    cache_path = cache_path_for(cache_dir, root, net.cfg.name, net.weights, key)
    with CacheLock(cache_path):
        recovered = CacheSession.recover(cache_path)  # batches of a run that was killed
        if recovered:
            log.info("recovered %d rows that a stopped run had computed", recovered)
        int8_model = None
        if precision == "int8":
            from featx.onnx_export import store_for

            int8_model, key = _int8_model(net, cache_path, key, root, split_options,
                                          store_for(cache_dir), seed)
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
        cache = FeatureCache.open_for_write(
            cache_path, key=key, attrs=attrs,
            dim=None if previous is not None else getattr(mapper, "dim", None) or net.dim)
        try:
            cache = _apply_plan(cache, plan, current, stats)
            new_failed = []
            if device is None and plan["extract"].size:
                device = detect_device(runtime)
            size = batch_size or DEFAULT_BATCH_SIZE[device or "cpu"]
            runtime_mapper = _OnDemand(mapper, lambda: _open_mapper(
                net, runtime, precision, device or detect_device(runtime), cache_dir, size,
                int8_model))
            if plan["extract"].size:
                stats.model_seconds, new_failed = _extract_new(
                    cache, runtime_mapper(), net, manifest.root, plan["extract"], current, size,
                    workers, progress, stats)
            augment_seconds = 0.0
            if augment:
                from featx.views import extract_augmented_views

                augment_started = time.perf_counter()
                # returns the cache to go on with: a new object when stale views of
                # another augmentation recipe were dropped (the old one is then closed)
                cache, stats.n_augmented = extract_augmented_views(
                    cache, net, manifest.root, augment, augment_options or {}, seed,
                    batch_size or 32, progress, mapper=runtime_mapper)
                if stats.n_augmented:
                    augment_seconds = time.perf_counter() - augment_started
            failed = plan["known_failed"] + new_failed
            cache.set_failed(failed)
            # what the cached rows cost to compute, summed over runs (for cost comparisons)
            attrs["extraction_seconds"] = float(cache.attr("extraction_seconds", 0.0)) + \
                stats.model_seconds + augment_seconds
            if runtime_mapper.built is not None and (stats.n_extracted or stats.n_augmented):
                stats.runtime = describe(runtime_mapper.built)
                attrs["runtimes"] = sorted({*cache.json_attr("runtimes", []), stats.runtime})
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


class _OnDemand:
    """Builds the runtime the first time it is needed (a warm cache never builds one)."""

    def __init__(self, given, build):
        self.built = given
        self._build = build

    def __call__(self):
        if self.built is None:
            self.built = self._build()
        return self.built


def _open_mapper(net, runtime, precision, device, cache_dir, batch_size, int8_model):
    """The runtime's mapper; under ``auto`` a backbone ONNX cannot export falls back to Keras."""
    from featx.onnx_export import ExportError, store_for
    from featx.runtimes import KerasMapper, choose_runtime, create_mapper

    chosen = choose_runtime(runtime, precision, device)
    try:
        return create_mapper(net, runtime=chosen, store_dir=store_for(cache_dir),
                             batch_size=batch_size, precision=precision, int8_model=int8_model)
    except ExportError as exc:
        if runtime != "auto" or precision != "fp32":
            raise
        log.warning("%s; falling back to the Keras runtime", exc)
        return KerasMapper(net, batch_size)


# key fields that say how the rows were computed rather than which backbone computed them
RUN_KEY_FIELDS = ("compute_dtype", "precision", "quantization", "calibration",
                  "int8_model_sha256")
# int8 rows never share a cache with fp32 rows: this joins the key (and names the file);
# the int8 model's SHA-256 and the calibration sample's identity join it too, once known.
INT8_KEY = {"precision": "int8"}


def _int8_model(net, cache_path, key, root, split_options, store_dir, seed):
    """The int8 model for this cache and the full cache key that names it.

    A cache keeps the int8 model it was computed with (so adding images costs what was
    added): the recorded model is reused while the store holds it unchanged. Otherwise the
    model is calibrated again on a seeded sample of up to 64 training images; a cache whose
    rows came from another int8 model is then dropped, never mixed.
    """
    from featx.onnx_export import QUANTIZATION, calibration_id, ensure_int8, stored_int8

    key = {**key, "quantization": QUANTIZATION}
    recorded = _recorded_key(cache_path)
    if recorded and recorded.get("int8_model_sha256"):
        found = stored_int8(net, store_dir, recorded.get("calibration", ""),
                            recorded["int8_model_sha256"])
        if found is not None:
            return found, recorded
    previous = _previous_state(cache_path, recorded) if recorded else None
    manifest = _discover(root, split_options, previous)
    images, hashes = _calibration_images(manifest, net.preprocessing, seed,
                                         QUANTIZATION["calibration_images"])
    calib = calibration_id(hashes)
    model = ensure_int8(net, store_dir, images, calib)
    full = {**key, "calibration": calib, "int8_model_sha256": model.sha256}
    if recorded is not None and json.loads(json.dumps(full)) != recorded:
        log.warning("%s was computed with another int8 model; recomputing its rows", cache_path)
        Path(cache_path).unlink()
    return model, full


def _recorded_key(cache_path) -> dict | None:
    if not Path(cache_path).exists():
        return None
    with FeatureCache.open(cache_path) as cache:
        return cache.key


def _calibration_images(manifest, preprocessing, seed, n):
    """A seeded sample of up to ``n`` decodable training images and their content hashes."""
    train = np.flatnonzero(np.asarray(manifest.splits) == "train")
    pool = train if train.size else np.arange(len(manifest.paths))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(pool)[:n])
    paths = [manifest.paths[i] for i in chosen]
    reader = ImageReader(paths, preprocessing, batch_size=max(1, len(paths)), root=manifest.root)
    images, hashes = [], []
    for batch in reader:
        for i, image, error in zip(batch["index"], batch["image"], batch["error"]):
            if not error:
                images.append(image)
                hashes.append(featx_data.file_sha256(manifest.root / paths[i]))
    if not images:
        raise DataError(f"{manifest.root}: no decodable training image to calibrate int8 on")
    return np.stack(images), hashes


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


def _extract_new(cache, mapper, net, root, todo, current, batch_size, workers, progress,
                 stats):
    columns = {k: v[todo] for k, v in current.items()}
    reader = ImageReader(columns["paths"], net.preprocessing, batch_size, root=root,
                         workers=workers)
    writer = CacheWriter(cache, columns)
    timing = run_pipeline(reader, mapper, writer, progress=progress)
    stats.n_extracted = timing.n_images
    stats.first_batch_seconds = timing.first_batch_seconds
    stats.first_batch_images = timing.first_batch_images
    for path, _, reason in writer.failed:
        log.warning("skipped %s: %s", path, reason)
    return timing.seconds, writer.failed
