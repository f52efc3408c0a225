"""The ONNX store: each backbone's frozen feature model exported to ONNX once, and its int8
quantisations, reused by every later run on any dataset.

The feature model (normalisation + base + pooling) of a backbone is exported to
``<store>/<backbone>-<keyhash>.onnx`` next to a JSON sidecar that records the backbone's
full key and the file's SHA-256. A file whose hash or key does not match its sidecar is
rebuilt, never used. ``--precision int8`` adds
``<stem>-int8-<instruction set>-<calibration method>-<calibration id>.onnx``: static
post-training quantisation (:mod:`._quantize`) of that export on a sample of the dataset's
own training images, searched for agreement with fp32 (:mod:`._int8_search`); its sidecar
records the agreement, the nodes kept float, and whether int8 is used at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from featx._backend import backend_name
from featx._io import (featx_version, read_sidecar, save_artifact, sha256_matches, sidecar_for,
                       text_sha256)
from featx.cache import key_hash
from featx.errors import DataError

from ._quantize import ExportError

log = logging.getLogger(__name__)

# Bump when the export changes in a way that changes its output.
EXPORT_VERSION = 1
exports_built = 0  # how many exports this process wrote (tests count them)


@dataclasses.dataclass(frozen=True)
class OnnxModel:
    path: Path
    sha256: str
    precision: str  # "fp32" | "int8"
    built: bool  # written by this call (False: reused from the store)
    # an int8 model's search record (agreement, float_nodes, speedup, use): its sidecar's
    record: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def store_for(cache_dir) -> Path:
    """Where exports live: ``$FEATX_ONNX_STORE``, else ``<cache_dir>/onnx``."""
    return Path(os.environ.get("FEATX_ONNX_STORE") or Path(cache_dir) / "onnx")


def export_key(backbone) -> dict:
    return {**backbone.key(), "export": {"format": "onnx", "version": EXPORT_VERSION}}


def fp32_path(backbone, store_dir) -> Path:
    return Path(store_dir) / f"{backbone.cfg.name}-{key_hash(export_key(backbone))}.onnx"


def int8_path(backbone, store_dir, calibration_id: str, quantization: dict) -> Path:
    """The int8 model's file: its name says the instruction set it was built for."""
    base = fp32_path(backbone, store_dir)
    return base.with_name(f"{base.stem}-int8-{quantization['isa']}-"
                          f"{quantization['calibration'].lower()}-{calibration_id[:12]}.onnx")


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
    return OnnxModel(path, meta["sha256"], meta.get("precision", "fp32"), built=False,
                     record=meta.get("search", {}))


def publish_model(path: Path, write, key: dict, precision: str, **extra) -> OnnxModel:
    """Write a model into place through ``write(tmp)``, then its sidecar (which vouches)."""
    global exports_built

    record = save_artifact(path, write, {
        "key": key, "precision": precision, "featx_version": featx_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})
    exports_built += 1
    return OnnxModel(path, record["sha256"], precision, built=True,
                     record=record.get("search", {}))


def ensure_fp32(backbone, store_dir) -> OnnxModel:
    """The backbone's fp32 feature model as ONNX: reused from the store, else exported."""
    path = fp32_path(backbone, store_dir)
    key = export_key(backbone)
    found = verified(path, key)
    if found is not None:
        return found
    require_tensorflow_backend(backbone.cfg.name)  # before _exporter_versions imports tf2onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = publish_model(path, lambda tmp: _export_keras(backbone, tmp), key, "fp32",
                     exporter=_exporter_versions())
    log.info("exported %s to %s in %.1f s", backbone.cfg.name, path, time.perf_counter() - started)
    return model


def _export_keras(backbone, out: Path) -> None:
    keras_to_onnx(backbone.feature_model(), out, backbone.cfg.name)


def require_tensorflow_backend(name: str) -> None:
    """The export goes through tf2onnx: on another Keras backend, one line instead of
    loading TensorFlow beside it."""
    if backend_name() != "tensorflow":
        raise ExportError(f"{name}: the ONNX export runs on Keras' TensorFlow backend "
                          f"(KERAS_BACKEND={backend_name()} here): use --runtime keras, or "
                          "export once with KERAS_BACKEND=tensorflow (the export is stored)")


def keras_to_onnx(model, out: Path, name: str) -> None:
    """Convert a Keras model with one batched input (images, or embeddings) to ONNX."""
    require_tensorflow_backend(name)
    shape = (1, *model.inputs[0].shape[1:])
    model(np.zeros(shape, model.inputs[0].dtype))  # Keras exports only called models
    try:
        model.export(str(out), format="onnx", verbose=False)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs {exc.name or 'tf2onnx'}: "
                          "pip install onnx tf2onnx") from exc
    except Exception as exc:  # noqa: BLE001 - any converter failure means "not exportable"
        raise ExportError(f"{name}: ONNX export failed: {type(exc).__name__}: "
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
    return text_sha256("\n".join(sorted(sha256s)))
