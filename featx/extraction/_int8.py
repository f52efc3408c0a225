"""int8 extraction: the quantised model a cache's rows come from, calibrated on a seeded
sample of the dataset's own training images, measured on another, and kept with the cache
across runs; or fp32, said in one line, where no int8 model keeps the agreement bound."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from featx._io import file_sha256, read_sidecar, sidecar_for
from featx.cache import int8_run_key, reconcile, remove_cache
from featx.errors import DataError

from ._int8_agreement import MAX_CHANGED_DECISIONS, MIN_MEAN_COSINE, agreement_text
from ._int8_search import SEARCH, search_int8
from ._onnx_store import (OnnxModel, calibration_id, ensure_fp32, export_key, int8_path,
                          publish_model, verified)
from ._quantize import ISA_NAMES, QUANTIZATION, isa_mismatch, recipe
from ._reader import ImageReader
from ._runtimes import OnnxMapper

log = logging.getLogger(__name__)


class Int8Declined(Exception):
    """No int8 model keeps the agreement bound while faster than fp32: extract in fp32.
    ``line`` says why, in one line."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


def int8_model(backbone, cache_path, key, root, split, store_dir, calibration):
    """The int8 model for this cache, the full cache key that names it, and the folder's
    manifest when calibrating had to list it (else None).

    A cache keeps the int8 model it was computed with (so adding images costs what was
    added): the recorded model is reused while the store holds it unchanged and it was
    built for this CPU's instruction set. Otherwise a model is calibrated on a seeded sample
    of up to 64 training images and searched for agreement with fp32 on up to 64 others; a
    cache whose rows came from another int8 model is then dropped, never mixed (its split
    is kept: the returned manifest was listed with it). Raises :class:`Int8Declined` when
    the search ends in fp32.
    """
    quantization = recipe(calibration)
    recorded = reconcile.recorded_key(cache_path)
    other_cpu = None
    if recorded and recorded.get("int8_model_sha256"):
        other_cpu = isa_mismatch(recorded.get("quantization"))
        if other_cpu:
            log.warning("%s holds the rows of %s: rebuilding it for this CPU", cache_path,
                        other_cpu)
        elif _base(recorded) == quantization:  # else another recipe: built again below
            found = stored_int8(backbone, store_dir, recorded.get("calibration", ""),
                                recorded["int8_model_sha256"], quantization)
            if found is not None:
                return found, recorded, None
    state = reconcile.read_state(cache_path, recorded) if recorded else None
    manifest = reconcile.discover(root, split, state)
    n = QUANTIZATION["calibration_images"]
    images, hashes = calibration_images(manifest, backbone.preprocessing, split.seed, n)
    held = calibration_images(manifest, backbone.preprocessing, split.seed, n, held_back=True)
    calib = calibration_id(hashes)
    model = ensure_int8(backbone, store_dir, images, calib, held=held,
                        quantization=quantization)
    if model.record.get("use") == "fp32":
        raise Int8Declined(declined_line(model.record, quantization) + "; extracting in fp32")
    log.info("%s", agreement_line(model.record))
    full = int8_run_key(key, quantization, calib, model.sha256, model.record)
    if recorded is not None and json.loads(json.dumps(full)) != recorded:
        if not other_cpu:  # that warning said it already
            log.warning("%s was computed with another int8 model; recomputing its rows",
                        cache_path)
        remove_cache(cache_path)
    return model, full, manifest


def _base(recorded_key: dict) -> dict:
    """A recorded key's quantisation recipe without the search's outcome."""
    return {k: v for k, v in (recorded_key.get("quantization") or {}).items()
            if k != "float_nodes"}


def agreement_line(record: dict) -> str:
    """The int8 model's agreement with fp32 (its search ``record``), in one line."""
    float_nodes = len(record.get("float_nodes", []))
    return ("int8 " + agreement_text({**record["agreement"], "sample": record.get("sample")})
            + (f"; {float_nodes} nodes kept float" if float_nodes else "")
            + (f"; {record['speedup']:.2f}x fp32's speed" if record.get("speedup") else ""))


def declined_line(record: dict, quantization: dict) -> str:
    a = record["agreement"]
    isa = ISA_NAMES.get(quantization["isa"], quantization["isa"])
    return (f"int8 not used: on this CPU ({isa}) the best int8 model "
            f"({len(record.get('float_nodes', []))} nodes kept float) agrees with fp32 at "
            f"cosine {a['mean_cosine']:.3f} and {a['decisions']:.0%} of decisions (bound "
            f"{MIN_MEAN_COSINE} and {1 - MAX_CHANGED_DECISIONS:.0%}) at "
            f"{record['speedup']:.2f}x fp32's speed")


def sample_indices(manifest, seed, n) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded samples of the manifest's training images (all images where none
    is marked train): up to ``n`` to calibrate int8 on, and up to ``n`` held back to measure
    it on. A pool smaller than ``2 n`` is shared half and half, calibration first."""
    train = np.flatnonzero(np.asarray(manifest.splits) == "train")
    pool = train if train.size else np.arange(len(manifest.paths))
    order = np.random.default_rng(seed).permutation(pool)
    n_calibration = min(n, max(1, (len(order) + 1) // 2)) if len(order) < 2 * n else n
    return np.sort(order[:n_calibration]), np.sort(order[n_calibration:n_calibration + n])


def calibration_images(manifest, preprocessing, seed, n, *, held_back=False):
    """A seeded sample of up to ``n`` decodable training images and their content hashes;
    ``held_back=True``: the other sample of :func:`sample_indices` as a :class:`HeldBack`."""
    calibration, held = sample_indices(manifest, seed, n)
    chosen = held if held_back else calibration
    paths = [manifest.paths[i] for i in chosen]
    reader = ImageReader(paths, preprocessing, batch_size=max(1, len(paths)), root=manifest.root)
    images, hashes, labels = [], [], []
    for batch in reader:
        for i, image, error in zip(batch["index"], batch["image"], batch["error"]):
            if not error:
                images.append(image)
                hashes.append(file_sha256(manifest.root / paths[i]))
                labels.append(int(manifest.labels[chosen[i]]))
    if not images and not held_back:
        raise DataError(f"{manifest.root}: no decodable training image to calibrate int8 on")
    if held_back:
        return HeldBack(np.stack(images) if images else None, np.asarray(labels),
                        calibration_id([f"{h} {label}" for h, label in zip(hashes, labels)]))
    return np.stack(images), hashes


@dataclasses.dataclass(frozen=True)
class HeldBack:
    """The held-back training images an int8 model is measured on, their class indices, and
    the sample's identity (its images' content hashes and labels), which joins the key of
    the models measured on it."""

    images: np.ndarray | None
    labels: np.ndarray
    id: str


def int8_key(backbone, calib_id: str, quantization: dict, held_id: str = "") -> dict:
    return {**export_key(backbone), "quantization": quantization, "calibration": calib_id,
            "search": SEARCH, "held_back": held_id}


def stored_int8(backbone, store_dir, calib_id: str, sha256: str,
                quantization: dict) -> OnnxModel | None:
    """The stored int8 model of this calibration if it is intact and has this SHA-256."""
    path = int8_path(backbone, store_dir, calib_id, quantization)
    meta = _sidecar_key(path)
    found = verified(path, int8_key(backbone, calib_id, quantization,
                                    meta.get("held_back", "")))
    return found if found is not None and found.sha256 == sha256 else None


def _sidecar_key(path: Path) -> dict:
    """The key a stored model's sidecar records ({} when there is none to read)."""
    try:
        return read_sidecar(sidecar_for(path)).get("key", {})
    except DataError:
        return {}


def ensure_int8(backbone, store_dir, images: np.ndarray, calib_id: str, *,
                held: HeldBack | None = None, quantization: dict | None = None) -> OnnxModel:
    """The int8 model calibrated on ``images`` (uint8, (n, S, S, 3)), reused when stored.

    A new one comes from the accuracy-aware search, measured on the ``held`` images (a
    :class:`HeldBack`); without them, on the calibration images themselves (the record says
    which). Its :attr:`OnnxModel.record` says whether to use it.
    """
    quantization = quantization or recipe()
    held = held if held is not None and held.images is not None and len(held.images) else None
    path = int8_path(backbone, store_dir, calib_id, quantization)
    key = int8_key(backbone, calib_id, quantization, held.id if held else "")
    found = verified(path, key)
    if found is not None:
        return found
    fp32 = ensure_fp32(backbone, store_dir)
    sample = "held-back" if held is not None else "calibration"
    measured, labels = (held.images, held.labels) if held else (images, np.zeros(len(images)))
    started = time.perf_counter()
    record = {}

    def write(tmp):
        with tempfile.TemporaryDirectory(dir=path.parent) as work:
            record.update(search_int8(
                fp32, images, measured, labels, quantization, tmp, Path(work),
                lambda onnx_path: OnnxMapper(OnnxModel(Path(onnx_path), "", "int8", True))))
        record["sample"] = sample  # filled before the sidecar is written

    model = publish_model(path, write, key, "int8", fp32_sha256=fp32.sha256,
                          n_calibration=int(len(images)), search=record)
    log.info("quantised %s to int8 on %d images in %.1f s", backbone.cfg.name, len(images),
             time.perf_counter() - started)
    return model
