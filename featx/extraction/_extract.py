"""``extract()``: a data folder's embeddings under a frozen backbone, reusing its cache.

The folder is reconciled with its cache first, so only images that are new or changed go
through the model; everything else is reused. A combined backbone extracts each part into
its own cache and lines the parts up (:class:`featx.cache.CombinedFeatures`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

from featx.backbones import create_backbone
from featx.cache import (CacheLock, CacheSession, CombinedFeatures, Features, cache_path_for,
                         run_key)
from featx.errors import FeatxError, UsageError
from featx.options import ENGINES, ExtractOptions

from ._devices import mixed_precision
from ._int8 import Int8Declined
from ._ray_engine import check_address, require_ray
from ._run import Run
from ._runtimes import choose_runtime, plan_device

log = logging.getLogger(__name__)


def extract(data_dir, options: ExtractOptions | None = None, *, augment=0,
            augment_options=None, mapper=None, **values) -> Features | CombinedFeatures:
    """Embed every image under ``data_dir`` with a frozen backbone, reusing the cache.

    ``options`` (:class:`~featx.options.ExtractOptions`) or the same names as keyword
    arguments say which backbone, runtime ("auto", "onnx", "keras"), precision ("fp32", or
    "int8": ONNX Runtime calibrated on the dataset's training images, its own cache key),
    split and cache folder. ``augment`` caches that many augmented views of every training
    image. ``mapper`` replaces the runtime with a ready mapper (:class:`featx.base.Mapper`:
    tests, custom runtimes). Returns a :class:`~featx.cache.Features` whose ``stats`` say
    what this run did, and whose ``to_dict()`` is what ``featx extract --json`` prints.

    A combined backbone name (``"efficientnet_lite0+efficientnet_lite2"``) extracts each
    part into its own cache (reusing what is cached) and returns their
    :class:`~featx.cache.CombinedFeatures`. ``flip_average=True`` caches the mean of the
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
    check_address(require_ray(), options.ray_address)  # before any file is hashed
    if mapper is not None:
        raise UsageError("a ready mapper runs in this process: use the local engine")
    if options.mixed_precision:
        raise UsageError("--mixed-precision runs on the local engine only (Ray actors run "
                         "the CPU runtimes)")


def check_backbone(options: ExtractOptions) -> None:
    """Create every part's backbone (cheap: nothing is built), so that an unknown name,
    weights known to be unavailable offline, or an option a combination cannot take fail
    before any image is embedded; an error names its part."""
    name, parts = options.backbone, options.backbone_parts
    if len(parts) > 1 and options.layer:
        raise UsageError(f"{name}: --layer names a layer of one backbone; combine the parts' "
                         "default (penultimate) layers, or extract one backbone")
    if len(parts) > 1 and options.weights not in ("imagenet", "random"):
        raise UsageError(f"{name}: a weights file belongs to one backbone; combined backbones "
                         "take --weights imagenet or random")
    for part in parts:
        with _naming_part(name, part) if len(parts) > 1 else contextlib.nullcontext():
            create_backbone(**options.backbone_args(part))


@contextlib.contextmanager
def _naming_part(name, part):
    """Re-raises a featx error with the combined name and the part it came from."""
    try:
        yield
    except FeatxError as error:
        error.args = (f"{name}: part {part}: {error}",) + error.args[1:]
        raise


def _extract_one(data_dir, options, augment, augment_options, mapper) -> Features:
    started = time.perf_counter()
    backbone = create_backbone(**options.backbone_args())
    planned = _planned(options, mapper)
    fp16, device = _mixed_precision_device(options, planned)
    key = run_key(backbone.key(), compute_backend=device.backend if fp16 else None,
                  int8=options.precision == "int8", flip_average=options.flip_average)
    cache_path = cache_path_for(options.cache_dir, data_dir, backbone.cfg.name,
                                backbone.weights, key)
    run = Run(backbone, options, Path(data_dir), cache_path, device, mapper,
              planned=planned)
    try:
        with mixed_precision(fp16), CacheLock(cache_path):
            recovered = CacheSession.recover(cache_path)  # batches of a run that was killed
            if recovered:
                log.info("recovered %d rows that a stopped run had computed", recovered)
            run.update_cache(key, augment, augment_options)
    except Int8Declined as declined:
        log.warning("%s", declined.line)
        return _extract_one(data_dir, dataclasses.replace(options, precision="fp32"), augment,
                            augment_options, mapper)
    run.stats.seconds = time.perf_counter() - started
    return Features(cache_path, run.stats, exclude=run.excluded)


def _planned(options, mapper) -> bool:
    """Whether the device is chosen before the run (its key, or a missing GPU, depend on
    it); otherwise it is set up when a model is first needed."""
    return mapper is None and (options.mixed_precision or options.device == "gpu")


def _mixed_precision_device(options, planned: bool):
    """(float16 compute on, the device when it had to be planned before the run, else None).

    Float16 compute needs the Keras runtime on a GPU: elsewhere --mixed-precision is ignored
    with a warning (it is slower on a CPU)."""
    runtime = choose_runtime(options.runtime, options.precision)  # bad combinations fail here
    device = None
    if planned:
        runtime, device = plan_device(options.runtime, options.precision, options.device,
                                      options.mixed_precision)
    fp16 = (options.mixed_precision and device is not None and device.kind == "gpu"
            and options.precision == "fp32" and runtime == "keras")
    if options.mixed_precision and not fp16:
        log.warning("--mixed-precision ignored: it needs the Keras runtime on a GPU (float16 "
                    "is slower on a CPU)")
    return fp16, device
