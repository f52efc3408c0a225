"""Extraction: reconcile a data folder with its cache, then run what is new through the
pipeline (:mod:`featx.pipeline`) on a runtime (:mod:`featx.runtimes`).

``extract()`` reconciles the data directory with its cache first, so only images that are
new or changed go through the model; everything else is reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from featx import data as featx_data
from featx import reconcile
from featx.cache import (CacheLock, CacheSession, FeatureCache, cache_path_for, key_hash,
                         remove_cache)
from featx.devices import mixed_precision
from featx.errors import CacheError, DataError, FeatxError, UsageError
from featx.features import CombinedFeatures, ExtractStats, Features
from featx.options import ENGINES, ExtractOptions
from featx.pipeline import CacheWriter, FlipAveraging, ImageReader, decoded, run_pipeline

log = logging.getLogger(__name__)

# ----- orchestration ---------------------------------------------------------------
# key fields that say how the rows were computed rather than which backbone computed them
RUN_KEY_FIELDS = ("compute_dtype", "precision", "quantization", "calibration",
                  "int8_model_sha256", "flip_average")
# flip-averaged rows (the mean of an image's and its mirror image's embeddings) are other
# rows: this joins their key
FLIP_KEY = {"flip_average": True}
# int8 rows never share a cache with fp32 rows: this joins the key (and names the file);
# the int8 model's SHA-256 and the calibration sample's identity join it too, once known.
INT8_KEY = {"precision": "int8"}


def extract(data_dir, options: ExtractOptions | None = None, *, augment=0,
            augment_options=None, mapper=None, **values) -> Features:
    """Embed every image under ``data_dir`` with a frozen backbone, reusing the cache.

    ``options`` (:class:`~featx.options.ExtractOptions`) or the same names as keyword
    arguments say which backbone, runtime ("auto", "onnx", "keras"; :mod:`featx.runtimes`),
    precision ("fp32", or "int8": ONNX Runtime calibrated on the dataset's training images,
    its own cache key), split and cache folder. ``augment`` caches that many augmented views
    of every training image. ``mapper`` replaces the runtime with a ready mapper (tests,
    custom runtimes). Returns a :class:`Features` whose ``stats`` say what this run did.

    A combined backbone name (``"efficientnet_lite0+efficientnet_lite2"``) extracts each
    part into its own cache (reusing what is cached) and returns their
    :class:`~featx.features.CombinedFeatures`. ``flip_average=True`` caches the mean of the
    embeddings of each image (or augmented view) and of its mirror image, under its own key.
    """
    options = ExtractOptions.create(options, **values)
    _check_engine(options, mapper)
    if len(options.backbone_parts) > 1:
        return _extract_combined(data_dir, options, augment, augment_options, mapper)
    return _extract_one(data_dir, options, augment, augment_options, mapper)


def _extract_combined(data_dir, options, augment, augment_options, mapper):
    """Each part of a combined backbone extracted on its own, then aligned side by side."""
    name, parts = options.backbone, options.backbone_parts
    if mapper is not None:
        raise UsageError(f"{name}: a ready mapper embeds for one backbone; extract the parts "
                         "one at a time")
    check_backbone(options)
    extracted = []
    for part in parts:
        with _naming_part(name, part):
            extracted.append(_extract_one(data_dir, dataclasses.replace(options, backbone=part),
                                          augment, augment_options, None))
    return CombinedFeatures(extracted)


def _check_engine(options, mapper):
    if options.engine not in ENGINES:
        raise UsageError(f"unknown engine {options.engine!r}; one of {', '.join(ENGINES)}")
    if options.engine == "local":
        if options.ray_address:
            raise UsageError("--ray-address needs --engine ray")
        return
    from featx.ray_engine import check_address, require_ray

    require_ray()
    check_address(options.ray_address)  # before any file is hashed
    if mapper is not None:
        raise UsageError("a ready mapper runs in this process: use the local engine")
    if options.mixed_precision:
        raise UsageError("--mixed-precision runs on the local engine only (Ray actors run "
                         "the CPU runtimes)")


def backbone_args(options: ExtractOptions, name: str | None = None) -> dict:
    """``create_backbone``'s arguments for ``options`` (its backbone, or part ``name``)."""
    return dict(name=name or options.backbone, weights=options.weights, layer=options.layer,
                pooling=options.pooling, input_size=options.input_size, seed=options.seed,
                reduced_decode=options.reduced_decode)


def check_backbone(options: ExtractOptions) -> None:
    """Create every part's backbone (cheap: nothing is built), so that an unknown name,
    weights known to be unavailable offline, or an option a combination cannot take fail
    before any image is embedded; an error names its part."""
    from featx.backbones import create_backbone

    name, parts = options.backbone, options.backbone_parts
    if len(parts) > 1 and options.layer:
        raise UsageError(f"{name}: --layer names a layer of one backbone; combine the parts' "
                         "default (penultimate) layers, or extract one backbone")
    if len(parts) > 1 and options.weights not in ("imagenet", "random"):
        raise UsageError(f"{name}: a weights file belongs to one backbone; combined backbones "
                         "take --weights imagenet or random")
    for part in parts:
        with _naming_part(name, part) if len(parts) > 1 else contextlib.nullcontext():
            create_backbone(**backbone_args(options, part))


@contextlib.contextmanager
def _naming_part(name, part):
    """Re-raises a featx error with the combined name and the part it came from."""
    try:
        yield
    except FeatxError as error:
        error.args = (f"{name}: part {part}: {error}",) + error.args[1:]
        raise


def _extract_one(data_dir, options, augment, augment_options, mapper) -> Features:
    from featx.backbones import create_backbone
    from featx.runtimes import choose_runtime, plan_device

    started = time.perf_counter()
    net = create_backbone(**backbone_args(options))
    runtime = choose_runtime(options.runtime, options.precision)  # bad combinations fail here
    device, planned = None, False
    if mapper is None and (options.mixed_precision or options.device == "gpu"):
        # the key depends on the device (mixed precision), and a missing GPU fails here
        runtime, device = plan_device(options.runtime, options.precision, options.device,
                                      options.mixed_precision)
        planned = True
    fp16 = (options.mixed_precision and device is not None and device.kind == "gpu"
            and options.precision == "fp32" and runtime == "keras")
    if options.mixed_precision and not fp16:
        log.warning("--mixed-precision ignored: it needs the Keras runtime on a GPU (float16 "
                    "is slower on a CPU)")
    key = net.key()
    if fp16:
        # float16 compute changes the embeddings, and each backend's float16 kernels differ
        # by about 1e-3: mixed-precision rows are keyed by their backend too
        key = {**key, "compute_dtype": "mixed_float16", "compute_backend": device.backend}
    if options.precision == "int8":
        key = {**key, **INT8_KEY}
    if options.flip_average:
        key = {**key, **FLIP_KEY}
    cache_path = cache_path_for(options.cache_dir, data_dir, net.cfg.name, net.weights, key)
    run = _Run(net, options, Path(data_dir), cache_path, device, mapper, planned)
    with mixed_precision(fp16), CacheLock(cache_path):
        recovered = CacheSession.recover(cache_path)  # batches of a run that was killed
        if recovered:
            log.info("recovered %d rows that a stopped run had computed", recovered)
        run.update_cache(key, augment, augment_options)
    run.stats.seconds = time.perf_counter() - started
    return Features(cache_path, run.stats, exclude=run.excluded)


class _Run:
    """One extraction run on a locked cache: reconcile, embed what is new, commit."""

    def __init__(self, net, options, root, cache_path, device, mapper, planned=False):
        from featx.runtimes import open_mapper

        self.net, self.options, self.root, self.cache_path = net, options, root, cache_path
        self._planned = planned
        self.device = device  # featx.devices.Device, or None: the CPU, no framework loaded
        self.int8_model = None
        self.ray_computed_by = []  # what the Ray actors say computed their shards
        self.stats = ExtractStats()
        self.excluded = frozenset()  # relative paths the exclude list names
        self.mapper = _OnDemand(mapper, lambda: open_mapper(
            net, options.runtime, options.precision, self._device(), self._store(),
            self._batch_size(), self.int8_model), flip_average=options.flip_average,
            check=lambda cache, built: check_agreement(cache, built, root, net.preprocessing))

    def _store(self):
        from featx.onnx_export import store_for

        return store_for(self.options.cache_dir)

    def _device(self):
        """The device, set up the first time a model is needed: a warm cache loads no
        framework and touches no GPU."""
        if not self._planned:
            from featx.runtimes import plan_device

            options = self.options
            _, self.device = plan_device(options.runtime, options.precision, options.device)
            self._planned = True
        self.stats.device = "CPU" if self.device is None else str(self.device)
        return self.device

    def _batch_size(self) -> int:
        from featx.runtimes import batch_size_for

        return batch_size_for(self._device(), self.options.batch_size)

    def update_cache(self, key, augment, augment_options):
        from featx import __version__

        manifest = None
        if self.options.precision == "int8":
            self.int8_model, key, manifest = _int8_model(
                self.net, self.cache_path, key, self.root, self.options.split, self._store())
        state = reconcile.read_state(self.cache_path, key)
        if manifest is None:  # not listed yet for a calibration
            manifest = reconcile.discover(self.root, self.options.split, state)
        current = reconcile.file_columns(manifest, state)
        plan = reconcile.plan(state, current)
        if self.options.exclude:
            self.excluded, plan = _excluding(self.options.exclude, manifest, plan)
        stats = self.stats
        stats.n_ignored, stats.ignored = len(manifest.ignored), list(manifest.ignored)
        net = self.net
        attrs = {
            "backbone": net.cfg.name, "weights": net.weights, "weights_id": net.weights_id,
            "layer": net.layer or "", "pooling": net.pooling,
            "preprocessing": net.preprocessing, "root": str(manifest.root),
            "class_names": manifest.class_names, "split_params": manifest.split_params,
            "layout": manifest.layout, "featx_version": __version__,
        }
        given_dim = getattr(self.mapper.built, "dim", None)
        cache = FeatureCache.open_for_write(
            self.cache_path, key=key, attrs=attrs,
            dim=None if state is not None else given_dim or net.dim)
        try:
            cache, stats.n_copied = reconcile.apply_plan(cache, plan, current)
            new_failed = self._embed_new(cache, plan.extract, current, key) \
                if plan.extract.size else []
            cache, augment_seconds = self._augment(cache, augment, augment_options)
            failed = plan.known_failed + new_failed
            cache.set_failed(failed)
            # what the cached rows cost to compute, summed over runs (for cost comparisons)
            attrs["extraction_seconds"] = float(cache.attr("extraction_seconds", 0.0)) + \
                stats.model_seconds + augment_seconds
            who = set()
            if self.mapper.built is not None and (stats.n_extracted or stats.n_augmented):
                from featx.runtimes import computed_by, describe

                stats.runtime = describe(self.mapper.built)
                who.add(computed_by(self.mapper.built))
            who.update(self.ray_computed_by)
            if who:
                attrs["computed_by"] = sorted({*cache.json_attr("computed_by", []), *who})
            if stats.runtime:
                attrs["runtimes"] = sorted({*cache.json_attr("runtimes", []), stats.runtime})
            cache.set_attrs(**attrs)
        finally:
            cache.close()
        stats.failed = [(p, r) for p, _, r in failed if p not in self.excluded]
        stats.n_failed = len(stats.failed)
        stats.n_excluded = len(self.excluded)  # images of the folder, by construction
        stats.n_images = len(manifest.paths) - stats.n_failed - stats.n_excluded
        stats.reused = stats.n_extracted == 0 and stats.n_augmented == 0
        if stats.model_seconds > 0:
            stats.images_per_second = stats.n_extracted / stats.model_seconds

    def _embed_new(self, cache, todo, current, key) -> list:
        """Run the files ``todo`` through the pipeline into the cache; return the failures."""
        columns = {k: v[todo] for k, v in current.items()}
        if self.options.engine == "ray":
            return self._embed_on_ray(cache, columns, key)
        reader = ImageReader(columns["paths"], self.net.preprocessing, self._batch_size(),
                             root=self.root, workers=self.options.workers)
        writer = CacheWriter(cache, columns)
        timing = run_pipeline(reader, self.mapper(cache), writer,
                              progress=self.options.progress)
        self.stats.n_extracted = timing.n_images
        self.stats.batch_size = self._batch_size()
        self.stats.first_batch_seconds = timing.first_batch_seconds
        self.stats.first_batch_images = timing.first_batch_images
        self.stats.model_seconds = timing.seconds
        for path, _, reason in writer.failed:
            log.warning("skipped %s: %s", path, reason)
        return writer.failed

    def _embed_on_ray(self, cache, columns, key) -> list:
        """The files in ``columns`` embedded on a Ray cluster (featx.ray_engine)."""
        from featx import ray_engine
        from featx.runtimes import choose_runtime

        options, net = self.options, self.net
        # the actors run on CPU, so the runtime is chosen for the CPU here too
        if choose_runtime(options.runtime, options.precision, "cpu") == "onnx" \
                and options.precision == "fp32":
            from featx.onnx_export import ensure_fp32

            ensure_fp32(net, self._store())  # once here, not raced by every actor
        weights = options.weights
        if weights not in ("imagenet", "random"):  # a file: the actors' path to it
            weights = str(Path(weights).resolve())
        spec = ray_engine.WorkerSpec(
            backbone={**backbone_args(options), "weights": weights},
            runtime=options.runtime, precision=options.precision,
            batch_size=self._batch_size(), store_dir=str(Path(self._store()).resolve()),
            int8_model=self.int8_model, flip_average=options.flip_average,
            root=str(self.root.resolve()), shard_dir=str(cache.shard_dir.resolve()),
            decode_workers=options.workers)
        outcome = ray_engine.run(cache, columns, spec, key_digest=key_hash(key),
                                 address=options.ray_address, num_cpus=options.workers,
                                 progress=options.progress)
        stats = self.stats
        stats.engine, stats.n_shards_reused = "ray", outcome["n_reused_shards"]
        stats.n_extracted = outcome["n_extracted"]
        stats.runtime = outcome["runtime"]
        # no agreement check here: the driver builds no model
        self.ray_computed_by = outcome["computed_by"]
        stats.model_seconds = outcome["seconds"]
        for path, _, reason in outcome["failed"]:
            log.warning("skipped %s: %s", path, reason)
        return outcome["failed"]

    def _augment(self, cache, k, augment_options):
        """Cache ``k`` augmented views per training image; returns (cache, seconds)."""
        if not k:
            return cache, 0.0
        from featx.views import extract_augmented_views

        started = time.perf_counter()
        # returns the cache to go on with: a new object when stale views of another
        # augmentation recipe were dropped (the old one is then closed)
        cache, self.stats.n_augmented = extract_augmented_views(
            cache, self.net, self.root, k, augment_options, self.options.seed,
            self._batch_size(), self.options.progress, mapper=self.mapper)
        return cache, (time.perf_counter() - started) if self.stats.n_augmented else 0.0


# A runtime, backend or device new to a cache adds rows to it only where its embeddings of
# up to AGREEMENT_SAMPLE cached images agree with the cached ones: the largest difference,
# relative to the largest cached value, at most AGREEMENT_TOLERANCE. Measured on CPU:
# about 1e-6 between TensorFlow, JAX, PyTorch and ONNX Runtime (tests/test_backends.py).
AGREEMENT_SAMPLE = 8
AGREEMENT_TOLERANCE = 1e-4


def check_agreement(cache, mapper, root, preprocessing, sample: int = AGREEMENT_SAMPLE):
    """Raise CacheError when ``mapper`` is new to ``cache`` and disagrees with its rows."""
    from featx.runtimes import computed_by

    who, recorded = computed_by(mapper), cache.json_attr("computed_by", [])
    if who in recorded:
        return
    rows = cache.rows()
    chosen = np.flatnonzero(rows["view"] == 0)[:sample]
    if not chosen.size:
        return
    batch = next(iter(ImageReader(rows["paths"][chosen], preprocessing, len(chosen),
                                  root=root)))
    ok = decoded(batch)
    if not ok.any():
        return
    ours = np.asarray(mapper(batch["image"][ok]), np.float32)
    cached = cache.embeddings(chosen[ok])
    gap = float(np.max(np.abs(ours - cached)) / max(float(np.max(np.abs(cached))), 1e-12))
    log.info("%s vs the cached rows (%s) on %d images: relative difference %.2g",
             who, ", ".join(recorded) or "not recorded", int(ok.sum()), gap)
    if gap > AGREEMENT_TOLERANCE:
        raise CacheError(
            f"{cache.path}: its rows were computed by {', '.join(recorded) or 'another runtime'}; "
            f"{who} differs on {int(ok.sum())} cached images by {gap:.2g} (relative; "
            f"tolerance {AGREEMENT_TOLERANCE:g}), so they cannot share it: use another "
            "--cache-dir, or the runtime and backend that wrote it")


def _excluding(exclude_file, manifest, plan):
    """The listed paths, and the plan without them: an excluded file is never embedded,
    while its cached row stays (a run without the list reuses it)."""
    excluded = featx_data.excluded_paths(exclude_file, manifest)
    dropped = np.array([path in excluded for path in manifest.paths], dtype=bool)
    # a moved file's row is still copied (free), so a run without the list need not embed it
    return excluded, dataclasses.replace(plan, extract=plan.extract[~dropped[plan.extract]])


class _OnDemand:
    """Builds the runtime the first time it is needed (a warm cache never builds one).

    ``mapper(cache)`` returns it, after ``check(cache, mapper)`` ran once (the agreement
    check: before the first row this runtime computes goes into ``cache``).
    """

    def __init__(self, given, build, flip_average=False, check=None):
        self.flip_average = flip_average
        self._build, self._check = build, check
        self.built = None if given is None else self._wrap(given)

    def _wrap(self, mapper):
        return FlipAveraging(mapper) if self.flip_average else mapper

    def __call__(self, cache):
        if self.built is None:
            self.built = self._wrap(self._build())
        if self._check is not None:
            check, self._check = self._check, None
            check(cache, self.built)
        return self.built


def _int8_model(net, cache_path, key, root, split, store_dir):
    """The int8 model for this cache, the full cache key that names it, and the folder's
    manifest when calibrating had to list it (else None).

    A cache keeps the int8 model it was computed with (so adding images costs what was
    added): the recorded model is reused while the store holds it unchanged. Otherwise the
    model is calibrated again on a seeded sample of up to 64 training images; a cache whose
    rows came from another int8 model is then dropped, never mixed (its split is kept: the
    returned manifest was listed with it).
    """
    from featx.onnx_export import QUANTIZATION, calibration_id, ensure_int8, stored_int8

    key = {**key, "quantization": QUANTIZATION}
    recorded = reconcile.recorded_key(cache_path)
    if recorded and recorded.get("int8_model_sha256"):
        found = stored_int8(net, store_dir, recorded.get("calibration", ""),
                            recorded["int8_model_sha256"])
        if found is not None:
            return found, recorded, None
    state = reconcile.read_state(cache_path, recorded) if recorded else None
    manifest = reconcile.discover(root, split, state)
    images, hashes = calibration_images(manifest, net.preprocessing, split.seed,
                                         QUANTIZATION["calibration_images"])
    calib = calibration_id(hashes)
    model = ensure_int8(net, store_dir, images, calib)
    full = {**key, "calibration": calib, "int8_model_sha256": model.sha256}
    if recorded is not None and json.loads(json.dumps(full)) != recorded:
        log.warning("%s was computed with another int8 model; recomputing its rows", cache_path)
        remove_cache(cache_path)
    return model, full, manifest


def calibration_images(manifest, preprocessing, seed, n):
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
