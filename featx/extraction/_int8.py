"""int8 extraction: the quantised model a cache's rows come from, calibrated on a seeded
sample of the dataset's own training images, and kept with the cache across runs."""

from __future__ import annotations

import json
import logging

import numpy as np

from featx._io import file_sha256
from featx.cache import int8_run_key, reconcile, remove_cache
from featx.errors import DataError

from ._onnx_store import calibration_id, ensure_int8, stored_int8
from ._quantize import QUANTIZATION
from ._reader import ImageReader

log = logging.getLogger(__name__)


def int8_model(backbone, cache_path, key, root, split, store_dir):
    """The int8 model for this cache, the full cache key that names it, and the folder's
    manifest when calibrating had to list it (else None).

    A cache keeps the int8 model it was computed with (so adding images costs what was
    added): the recorded model is reused while the store holds it unchanged. Otherwise the
    model is calibrated again on a seeded sample of up to 64 training images; a cache whose
    rows came from another int8 model is then dropped, never mixed (its split is kept: the
    returned manifest was listed with it).
    """
    recorded = reconcile.recorded_key(cache_path)
    if recorded and recorded.get("int8_model_sha256"):
        found = stored_int8(backbone, store_dir, recorded.get("calibration", ""),
                            recorded["int8_model_sha256"])
        if found is not None:
            return found, recorded, None
    state = reconcile.read_state(cache_path, recorded) if recorded else None
    manifest = reconcile.discover(root, split, state)
    images, hashes = calibration_images(manifest, backbone.preprocessing, split.seed,
                                        QUANTIZATION["calibration_images"])
    calib = calibration_id(hashes)
    model = ensure_int8(backbone, store_dir, images, calib)
    full = int8_run_key(key, QUANTIZATION, calib, model.sha256)
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
                hashes.append(file_sha256(manifest.root / paths[i]))
    if not images:
        raise DataError(f"{manifest.root}: no decodable training image to calibrate int8 on")
    return np.stack(images), hashes
