"""A store of ONNX exports of backbones' feature models, and their int8 quantisation.

The frozen feature model (normalisation + base + pooling) of a backbone is exported once
to ``<store>/<backbone>-<keyhash>.onnx`` next to a JSON sidecar that records the
backbone's full key and the file's SHA-256; every later run, on any dataset, reuses it. A
file whose hash or key does not match its sidecar is rebuilt, never used.

``--precision int8`` adds ``<stem>-int8-<calibration id>.onnx``: static post-training
quantisation (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration) of
that export on a sample of the dataset's own training images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from featx import data as featx_data
from featx.cache import key_hash
from featx.errors import DataError, FeatxError
from featx.persist import read_sidecar, save_artifact, sha256_matches, sidecar_for

log = logging.getLogger(__name__)

# Bump when the export changes in a way that changes its output.
EXPORT_VERSION = 1
QUANTIZATION = {
    "method": "onnxruntime.quantize_static", "format": "QDQ", "per_channel": True,
    "weights": "QInt8", "activations": "QUInt8", "calibration": "MinMax",
    "calibration_images": 64,
}

exports_built = 0  # how many exports this process wrote (tests count them)
sha256_file = featx_data.file_sha256  # the hash the sidecars record (tests check with it)


class ExportError(FeatxError):
    """A backbone cannot be exported to ONNX (or quantised); ``reason`` says why."""

    exit_code = 2


@dataclasses.dataclass(frozen=True)
class OnnxModel:
    path: Path
    sha256: str
    precision: str  # "fp32" | "int8"
    built: bool  # written by this call (False: reused from the store)


def store_for(cache_dir) -> Path:
    """Where exports live: ``$FEATX_ONNX_STORE``, else ``<cache_dir>/onnx``."""
    return Path(os.environ.get("FEATX_ONNX_STORE") or Path(cache_dir) / "onnx")


def export_key(net) -> dict:
    return {**net.key(), "export": {"format": "onnx", "version": EXPORT_VERSION}}


def fp32_path(net, store_dir) -> Path:
    return Path(store_dir) / f"{net.cfg.name}-{key_hash(export_key(net))}.onnx"


def int8_path(net, store_dir, calibration_id: str) -> Path:
    base = fp32_path(net, store_dir)
    return base.with_name(f"{base.stem}-int8-{calibration_id[:12]}.onnx")


def verified(path: Path, key: dict) -> OnnxModel | None:
    """The stored model at ``path`` if its sidecar vouches for it (hash and key), else None."""
    sidecar = sidecar_for(path)
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        meta = read_sidecar(sidecar)
    except DataError:
        meta = {}
    if meta.get("key") != json.loads(json.dumps(key)):
        log.warning("%s: the export's recorded key does not match; rebuilding it", path)
        return None
    if not sha256_matches(path, meta.get("sha256")):
        log.warning("%s: SHA-256 differs from its sidecar (corrupt or changed); rebuilding it",
                    path)
        return None
    return OnnxModel(path, meta["sha256"], meta.get("precision", "fp32"), built=False)


def _publish(path: Path, write, key: dict, precision: str, **extra) -> OnnxModel:
    """Write a model into place through ``write(tmp)``, then its sidecar (which vouches)."""
    global exports_built
    from featx import __version__

    record = save_artifact(path, write, {
        "key": key, "precision": precision, "featx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})
    exports_built += 1
    return OnnxModel(path, record["sha256"], precision, built=True)


def ensure_fp32(net, store_dir) -> OnnxModel:
    """The backbone's fp32 feature model as ONNX: reused from the store, else exported."""
    path = fp32_path(net, store_dir)
    key = export_key(net)
    found = verified(path, key)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = _publish(path, lambda tmp: _export_keras(net, tmp), key, "fp32",
                     exporter=_exporter_versions())
    log.info("exported %s to %s in %.1f s", net.cfg.name, path, time.perf_counter() - started)
    return model


def _export_keras(net, out: Path) -> None:
    model = net.feature_model()
    size = net.input_size
    model(np.zeros((1, size, size, 3), np.float32))  # Keras exports only called models
    try:
        model.export(str(out), format="onnx", verbose=False)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs {exc.name or 'tf2onnx'}: "
                          "pip install onnx tf2onnx") from exc
    except Exception as exc:  # noqa: BLE001 - any converter failure means "not exportable"
        raise ExportError(f"{net.cfg.name}: ONNX export failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _exporter_versions() -> dict:
    import keras

    versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
    try:
        import tf2onnx

        versions["tf2onnx"] = tf2onnx.__version__
    except ImportError:
        pass
    return versions


def calibration_id(sha256s) -> str:
    """Identity of a calibration sample: the hash of its images' content hashes, sorted."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(sha256s)).encode()).hexdigest()


def int8_key(net, calib_id: str) -> dict:
    return {**export_key(net), "quantization": QUANTIZATION, "calibration": calib_id}


def stored_int8(net, store_dir, calib_id: str, sha256: str) -> OnnxModel | None:
    """The stored int8 model of this calibration if it is intact and has this SHA-256."""
    found = verified(int8_path(net, store_dir, calib_id), int8_key(net, calib_id))
    return found if found is not None and found.sha256 == sha256 else None


def ensure_int8(net, store_dir, images: np.ndarray, calib_id: str) -> OnnxModel:
    """The int8 model calibrated on ``images`` (uint8, (n, S, S, 3)), reused when stored."""
    path = int8_path(net, store_dir, calib_id)
    key = int8_key(net, calib_id)
    found = verified(path, key)
    if found is not None:
        return found
    fp32 = ensure_fp32(net, store_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        pre = Path(work) / "preprocessed.onnx"  # quant_pre_process output, then quantised
        model = _publish(path, lambda tmp: _quantize(fp32.path, pre, tmp, images), key,
                         "int8", fp32_sha256=fp32.sha256, n_calibration=int(len(images)))
    log.info("quantised %s to int8 on %d images in %.1f s", net.cfg.name, len(images),
             time.perf_counter() - started)
    return model


def _quantize(fp32: Path, pre: Path, out: Path, images: np.ndarray) -> None:
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                              QuantFormat, QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ExportError(f"int8 needs onnxruntime's quantisation tools ({exc})") from exc

    class Batches(CalibrationDataReader):
        def __init__(self, name):
            self.batches = iter([{name: images[i:i + 16].astype(np.float32)}
                                 for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    import onnx

    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
        quantize_static(str(pre), str(out), Batches(input_name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    except Exception as exc:  # noqa: BLE001 - any quantiser failure means "no int8 here"
        raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc
