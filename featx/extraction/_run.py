"""One extraction run on a locked cache: reconcile the folder with it, embed what is new (on
this process or on Ray), add augmented views, commit, and say what was done."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path

import numpy as np

from featx._io import featx_version
from featx.cache import CacheSession, ExtractStats, key_hash, reconcile
from featx.data import excluded_paths
from featx.errors import CacheError, Interrupted

from . import _ray_engine
from ._engine import SignalStop, run_pipeline
from ._int8 import int8_model
from ._onnx_store import ensure_fp32, store_for
from ._reader import ImageReader, decoded
from ._runtimes import (FlipAveraging, batch_size_for, choose_runtime, computed_by, describe,
                        open_mapper, plan_device)
from ._views import extract_augmented_views
from ._writers import CacheWriter

log = logging.getLogger(__name__)

# A runtime, backend or device new to a cache adds rows to it only where its embeddings of
# up to AGREEMENT_SAMPLE cached images agree with the cached ones: the largest difference,
# relative to the largest cached value, at most AGREEMENT_TOLERANCE. Measured on CPU:
# about 1e-6 between TensorFlow, JAX, PyTorch and ONNX Runtime (tests/test_backends.py).
AGREEMENT_SAMPLE = 8
AGREEMENT_TOLERANCE = 1e-4


class Run:
    """One extraction run on a locked cache: reconcile, embed what is new, commit.

    ``backbone``: the :class:`featx.backbones.Backbone`; ``device``: a planned
    :class:`~featx.extraction.Device` (``planned``), else set up when a model is first
    needed; ``mapper``: a ready mapper instead of the runtime (tests, custom runtimes).
    """

    def __init__(self, backbone, options, root, cache_path, device, mapper, planned=False):
        self.backbone, self.options, self.root = backbone, options, Path(root)
        self.cache_path = cache_path
        self._planned = planned
        self.device = device  # an extraction Device, or None: the CPU, no framework loaded
        self.int8_model = None
        self.ray_computed_by = []  # what the Ray actors say computed their shards
        self.stats = ExtractStats()
        self.excluded = frozenset()  # relative paths the exclude list names
        self.stopped = None  # an Interrupted, raised once what was embedded is committed
        self.mapper = _OnDemand(mapper, lambda: open_mapper(
            backbone, options.runtime, options.precision, self._device(), self._store(),
            self._batch_size(), self.int8_model), flip_average=options.flip_average,
            check=lambda cache, built: check_agreement(cache, built, self.root,
                                                       backbone.preprocessing))

    def _store(self):
        return store_for(self.options.cache_dir)

    def _device(self):
        """The device, set up the first time a model is needed: a warm cache loads no
        framework and touches no GPU."""
        if not self._planned:
            options = self.options
            _, self.device = plan_device(options.runtime, options.precision, options.device)
            self._planned = True
        self.stats.device = "CPU" if self.device is None else str(self.device)
        return self.device

    def _batch_size(self) -> int:
        return batch_size_for(self._device(), self.options.batch_size)

    # ----- the run ------------------------------------------------------------------------
    def update_cache(self, key, augment, augment_options) -> None:
        """Bring the cache up to date with the folder under ``key``; fills :attr:`stats`."""
        key, manifest, state = self._reconciled(key)
        current = reconcile.file_columns(manifest, state)
        plan = reconcile.plan(state, current)
        if self.options.exclude:
            self.excluded, plan = _excluding(self.options.exclude, manifest, plan)
        self.stats.n_ignored, self.stats.ignored = len(manifest.ignored), list(manifest.ignored)
        attrs = self._attrs(manifest)
        given_dim = getattr(self.mapper.built, "dim", None)
        cache = CacheSession(self.cache_path, key=key, attrs=attrs,
                             dim=None if state is not None else given_dim or self.backbone.dim)
        try:
            cache, failed, augment_seconds = self._write(cache, plan, current, key, augment,
                                                         augment_options)
            cache.set_attrs(**self._provenance(cache, attrs, augment_seconds))
        finally:
            cache.close()
        self._count(manifest, failed)
        if self.stopped is not None:
            raise self.stopped

    def _reconciled(self, key):
        """The full key (int8 adds its model's identity), the folder's manifest (the
        recorded split kept) and the cache's state."""
        manifest = None
        if self.options.precision == "int8":
            self.int8_model, key, manifest = int8_model(
                self.backbone, self.cache_path, key, self.root, self.options.split,
                self._store(), self.options.int8_calibration)
        state = reconcile.read_state(self.cache_path, key)
        if manifest is None:  # not listed yet for a calibration
            manifest = reconcile.discover(self.root, self.options.split, state)
        return key, manifest, state

    def _attrs(self, manifest) -> dict:
        backbone = self.backbone
        return {
            "backbone": backbone.cfg.name, "weights": backbone.weights,
            "weights_id": backbone.weights_id, "layer": backbone.layer or "",
            "pooling": backbone.pooling, "preprocessing": backbone.preprocessing,
            "root": str(manifest.root), "class_names": manifest.class_names,
            "split_params": manifest.split_params, "layout": manifest.layout,
            "featx_version": featx_version(),
        }

    def _write(self, cache, plan, current, key, augment, augment_options):
        """Apply the plan, embed the new files and the missing views: (the session to go
        on with, every failed file as (path, sha256, reason), the views' seconds)."""
        cache, self.stats.n_copied = reconcile.apply_plan(cache, plan, current)
        new_failed = self._embed_new(cache, plan.extract, current, key) \
            if plan.extract.size else []
        cache, augment_seconds = self._augment(cache, 0 if self.stopped else augment,
                                               augment_options)
        failed = plan.known_failed + new_failed
        cache.set_failed(failed)
        return cache, failed, augment_seconds

    def _provenance(self, cache, attrs, augment_seconds) -> dict:
        """``attrs`` plus what the cached rows cost (summed over runs, for cost comparisons)
        and what computed them."""
        stats = self.stats
        attrs["extraction_seconds"] = float(cache.attr("extraction_seconds", 0.0)) + \
            stats.model_seconds + augment_seconds
        who = set(self.ray_computed_by)
        if self.mapper.built is not None and (stats.n_extracted or stats.n_augmented):
            stats.runtime = describe(self.mapper.built)
            who.add(computed_by(self.mapper.built))
        if who:
            attrs["computed_by"] = sorted({*cache.json_attr("computed_by", []), *who})
        if stats.runtime:
            attrs["runtimes"] = sorted({*cache.json_attr("runtimes", []), stats.runtime})
        return attrs

    def _count(self, manifest, failed) -> None:
        stats = self.stats
        stats.failed = [(p, r) for p, _, r in failed if p not in self.excluded]
        stats.n_failed = len(stats.failed)
        stats.n_excluded = len(self.excluded)  # images of the folder, by construction
        stats.n_images = len(manifest.paths) - stats.n_failed - stats.n_excluded
        stats.reused = stats.n_extracted == 0 and stats.n_augmented == 0
        if stats.model_seconds > 0:
            stats.images_per_second = stats.n_extracted / stats.model_seconds

    # ----- embedding ----------------------------------------------------------------------
    def _embed_new(self, cache, todo, current, key) -> list:
        """Run the files ``todo`` through the pipeline into the cache; return the failures."""
        columns = {k: v[todo] for k, v in current.items()}
        if self.options.engine == "ray":
            return self._embed_on_ray(cache, columns, key)
        reader = ImageReader(columns["paths"], self.backbone.preprocessing, self._batch_size(),
                             root=self.root, workers=self.options.workers)
        writer = CacheWriter(cache, columns)
        mapper = self.mapper(cache)
        with SignalStop() as stop:
            timing = run_pipeline(reader, mapper, writer, progress=self.options.progress,
                                  stop=stop)
        if stop:
            self.stopped = _interrupted(stop.signum, timing.n_images, len(todo), cache.path)
        self.stats.n_extracted = timing.n_images
        self.stats.batch_size = self._batch_size()
        self.stats.first_batch_seconds = timing.first_batch_seconds
        self.stats.first_batch_images = timing.first_batch_images
        self.stats.model_seconds = timing.seconds
        for path, _, reason in writer.failed:
            log.warning("skipped %s: %s", path, reason)
        return writer.failed

    def _embed_on_ray(self, cache, columns, key) -> list:
        """The files in ``columns`` embedded on a Ray cluster (:mod:`._ray_engine`)."""
        options = self.options
        # the actors run on CPU, so the runtime is chosen for the CPU here too
        if choose_runtime(options.runtime, options.precision, "cpu") == "onnx" \
                and options.precision == "fp32":
            ensure_fp32(self.backbone, self._store())  # once here, not raced by every actor
        weights = options.weights
        if weights not in ("imagenet", "random"):  # a file: the actors' path to it
            weights = str(Path(weights).resolve())
        spec = _ray_engine.WorkerSpec(
            backbone={**options.backbone_args(), "weights": weights},
            runtime=options.runtime, precision=options.precision,
            batch_size=self._batch_size(), store_dir=str(Path(self._store()).resolve()),
            int8_model=self.int8_model, flip_average=options.flip_average,
            int8_isa=key.get("quantization", {}).get("isa") if self.int8_model else None,
            root=str(self.root.resolve()), shard_dir=str(cache.shard_dir.resolve()),
            decode_workers=options.workers)
        outcome = _ray_engine.run(cache, columns, spec, key_digest=key_hash(key),
                                  address=options.ray_address, num_cpus=options.workers,
                                  progress=options.progress)
        return self._ray_done(outcome)

    def _ray_done(self, outcome: dict) -> list:
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
        started = time.perf_counter()
        # returns the cache to go on with: a new object when stale views of another
        # augmentation recipe were dropped (the old one is then closed)
        cache, self.stats.n_augmented = extract_augmented_views(
            cache, self.backbone, self.root, k, augment_options, self.options.seed,
            self._batch_size(), self.options.progress, mapper=self.mapper)
        return cache, (time.perf_counter() - started) if self.stats.n_augmented else 0.0


def _interrupted(signum, done: int, todo: int, cache_path) -> Interrupted:
    return Interrupted(
        f"stopped by {signal.Signals(signum).name} at a batch boundary: {done} of {todo} "
        f"new images embedded and kept in {cache_path}; run the same command again to embed "
        "the rest", signum)


def check_agreement(cache, mapper, root, preprocessing, sample: int = AGREEMENT_SAMPLE):
    """Raise CacheError when ``mapper`` is new to ``cache`` and disagrees with its rows."""
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
    excluded = excluded_paths(exclude_file, manifest)
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
