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


def cpu_has_vnni(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI); True on other machines.

    Without VNNI, ONNX Runtime's uint8 x int8 kernels sum pairs of products in int16, which
    saturates: on an AVX2-only EPYC the int8 Lite0 embeddings of two photos fell to cosine
    0.93-0.95 against fp32 (0.997 with VNNI); 7-bit weights (``reduce_range``) gave
    0.985-0.988 at the same speed, uint8 weights 0.995-0.997 at a thirteenth of it.
    """
    import platform

    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False  # unknown: assume the worst, reduced range is safe everywhere
    return "avx512_vnni" in cpuinfo or "avx_vnni" in cpuinfo


QUANTIZATION = {
    "method": "onnxruntime.quantize_static", "format": "QDQ", "per_channel": True,
    "weights": "QInt8", "activations": "QUInt8", "calibration": "MinMax",
    "calibration_images": 64,
}
if not cpu_has_vnni():
    # 7-bit weights where int8 products would saturate; only then in the key (and the file
    # name), so the caches and models of machines with VNNI keep theirs
    QUANTIZATION["reduce_range"] = True

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
    tag = "-rr" if QUANTIZATION.get("reduce_range") else ""
    return base.with_name(f"{base.stem}-int8{tag}-{calibration_id[:12]}.onnx")


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
    require_tensorflow_backend(net.cfg.name)  # before _exporter_versions imports tf2onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = _publish(path, lambda tmp: _export_keras(net, tmp), key, "fp32",
                     exporter=_exporter_versions())
    log.info("exported %s to %s in %.1f s", net.cfg.name, path, time.perf_counter() - started)
    return model


def _export_keras(net, out: Path) -> None:
    keras_to_onnx(net.feature_model(), out, net.cfg.name)


def require_tensorflow_backend(name: str) -> None:
    """The export goes through tf2onnx: on another Keras backend, one line instead of
    loading TensorFlow beside it."""
    from featx.devices import backend_name

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
    model = _publish(path, lambda tmp: quantize(fp32.path, tmp, images), key,
                     "int8", fp32_sha256=fp32.sha256, n_calibration=int(len(images)))
    log.info("quantised %s to int8 on %d images in %.1f s", net.cfg.name, len(images),
             time.perf_counter() - started)
    return model


POOLING_OPS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


def quantize(fp32: Path, out: Path, images: np.ndarray, *, float_head: bool = False) -> None:
    """Write the static int8 quantisation (:data:`QUANTIZATION`) of ``fp32`` to ``out``,
    calibrated on ``images`` (fed in the model input's own dtype).

    ``float_head``: keep the last pooling node and everything after it in float (see
    :func:`head_nodes`).
    """
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as work:
        pre = Path(work) / "preprocessed.onnx"  # quant_pre_process output, then quantised
        _quantize(Path(fp32), pre, Path(out), images, float_head)


def head_nodes(graph) -> list[str]:
    """Names of the graph's last pooling node and every node downstream of it.

    Keeping them float spares the pooled embedding and the head one more uint8 rounding.
    Measured on an int8 export of a digits softmax model fitted on fp32 features: labels
    agreeing with fp32 rose from 11% to 28%; the quantised convolutions cost the rest.
    """
    pools = [node for node in graph.node if node.op_type in POOLING_OPS]
    if not pools:
        return []
    names, produced = [pools[-1].name], set(pools[-1].output)
    for node in graph.node:
        if produced.intersection(node.input):
            names.append(node.name)
            produced.update(node.output)
    return names


def _quantize(fp32: Path, pre: Path, out: Path, images: np.ndarray,
              float_head: bool = False) -> None:
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                              QuantFormat, QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ExportError(f"int8 needs onnxruntime's quantisation tools ({exc})") from exc

    import onnx

    graph_input = onnx.load(str(fp32), load_external_data=False).graph.input[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)

    class Batches(CalibrationDataReader):
        def __init__(self, name):
            self.batches = iter([{name: images[i:i + 16].astype(dtype)}
                                 for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    input_name = graph_input.name
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)
        exclude = head_nodes(onnx.load(str(pre)).graph) if float_head else []
        quantize_static(str(pre), str(out), Batches(input_name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=QUANTIZATION.get("reduce_range", False),
                        nodes_to_exclude=exclude)
    except Exception as exc:  # noqa: BLE001 - any quantiser failure means "no int8 here"
        raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc
