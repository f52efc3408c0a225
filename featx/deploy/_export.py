"""``featx export``: a saved model as one deployable file, uint8 image -> scores.

The exported graph is the whole route ``featx predict`` takes, minus decoding: uint8 RGB
images (N, S, S, 3), already resized and centre-cropped by the recipe in its metadata ->
normalisation -> the frozen backbone -> pooling -> the classifier. For ``featx fit``
models the head is one dense layer: the scaler is folded into it (softmax, logistic); the
SVM keeps its L2 row normalisation in front of it. Every layer is a stock Keras layer, so
the ``.keras`` file loads without featx and the ``.onnx`` file needs only onnxruntime.

``--precision int8`` (ONNX): for a classifier, the graph is a Cast, the int8 feature model
of featx's ONNX store and the float head, merged into one. A model fitted on int8 features
reuses the very int8 model its features came from, so its export matches ``predict`` like
fp32 does; for a model fitted on fp32 features one is calibrated on its training images. A
fine-tuned model is quantised whole (its pooling and head kept float).

Both files carry their metadata (class names, output meaning, preprocessing recipe, backbone
identity, featx version): the ONNX model in ``metadata_props["featx"]``, the ``.keras`` zip in
its member ``featx.json``. Each also gets featx's usual JSON sidecar with its SHA-256.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

from featx._io import featx_version, save_artifact, sidecar_for
from featx.base import Result
from featx.errors import UsageError
from featx.extraction import QUANTIZATION, recipe

from ._graph import deploy_model
from ._source import Source, load_source
from ._write import _calibration, _int8_features, _write_composed, _write_keras, _write_onnx

log = logging.getLogger(__name__)

FORMATS = ("onnx", "keras")


EXPORT_PRECISIONS = ("fp32", "int8")


EXPORT_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Exported(Result):
    """What ``featx export`` wrote; ``parity`` is set when the export was checked."""

    path: Path
    format: str
    precision: str
    size_bytes: int
    sha256: str
    seconds: float
    metadata: dict  # what the file carries about itself (export_metadata)
    parity: object = None  # a Parity, from check_export

    def to_dict(self) -> dict:
        out = {"path": str(self.path), "format": self.format, "precision": self.precision,
               "output": self.metadata["output"], "classes": self.metadata["classes"],
               "size_bytes": self.size_bytes, "sha256": self.sha256, "seconds": self.seconds}
        if self.parity is not None:
            out["parity"] = self.parity.as_dict()
        return out

    def __getitem__(self, key):  # reads like the dict it prints
        return self.to_dict()[key]

    def _keys(self) -> list[str]:
        return list(self.to_dict())


def default_output(model_path, format: str, precision: str) -> Path:
    path = Path(model_path)
    stem = path.stem
    suffix = ".onnx" if format == "onnx" else ".keras"
    tag = "-int8" if precision == "int8" else ""
    return path.with_name(f"{stem}{tag}-export{suffix}")


def export_model(model_path, format: str = "onnx", *, precision: str = "fp32",
                 out=None, trust_pickle: bool = False) -> Exported:
    """Write ``model_path``'s deployable file (see the module docstring) to ``out``
    (default :func:`default_output`).

    ``precision="int8"`` (ONNX only): see the module docstring; calibrating needs the
    model's recorded data folder unless its int8 feature model is already stored.
    ``trust_pickle``: also load a featx 0.1 ``.joblib`` model, a pickle that runs code
    when loaded (:func:`featx.classifiers.load_model`).
    """
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; one of {', '.join(FORMATS)}")
    if precision not in EXPORT_PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; one of "
                         f"{', '.join(EXPORT_PRECISIONS)}")
    if precision == "int8" and format != "onnx":
        raise UsageError("int8 is an ONNX Runtime quantisation: use --format onnx")
    started = time.perf_counter()
    out = _output_path(model_path, out, format, precision)
    source = load_source(model_path, trust_pickle=trust_pickle)
    metadata = export_metadata(source, format, precision)
    _warn_precision(source, metadata)
    if format == "keras":
        write = functools.partial(_write_keras, deploy_model(source), metadata=metadata)
    elif precision == "int8" and source.kind == "classifier":
        features = _int8_features(source)
        metadata["int8_feature_model_sha256"] = features.sha256
        if features.record.get("float_nodes"):
            metadata["quantization"]["float_nodes"] = features.record["float_nodes"]
        metadata["int8_agreement"] = (source.metadata["cache_key"].get("int8_agreement")
                                      or features.record.get("agreement"))
        write = functools.partial(_write_composed, source, features.path, metadata=metadata)
    else:
        images = _calibration(source)[0] if precision == "int8" else None
        write = functools.partial(_write_onnx, deploy_model(source), metadata=metadata,
                                  calibration=images)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = save_artifact(out, write, {"kind": "featx-export", **metadata},
                           keep_suffix=format == "keras")
    return Exported(out, format, precision, out.stat().st_size, record["sha256"],
                    time.perf_counter() - started, metadata)


def _output_path(model_path, out, format: str, precision: str) -> Path:
    """Where the export goes; refuses a name that would overwrite the model or its sidecar,
    or whose suffix is not the format's."""
    out = Path(out) if out else default_output(model_path, format, precision)
    if out.suffix != f".{format}":
        raise UsageError(f"{out}: a {format} export needs a .{format} file name")
    model, model_sidecar = Path(model_path).resolve(), sidecar_for(model_path).resolve()
    taken = {model, model_sidecar, model.with_suffix(".skops"), model.with_suffix(".joblib")}
    if out.resolve() in taken or sidecar_for(out).resolve() in taken:
        raise UsageError(f"{out}: the export (and its sidecar {sidecar_for(out).name}) would "
                         f"overwrite the model {Path(model_path).name}; choose another name")
    return out


def _warn_precision(source: Source, metadata: dict) -> None:
    fitted_on, precision = metadata["fitted_on"], metadata["precision"]
    if fitted_on == precision:
        return
    if source.kind == "classifier":
        trained = f"was fitted on {fitted_on} features"
        remedy = f"fit on {precision} features (featx fit DATA --precision {precision})"
    else:
        trained, remedy = f"was trained in {fitted_on}", f"export --precision {fitted_on}"
    log.warning("%s %s: its %s export will not match `featx predict` exactly (--check "
                "measures by how much); for parity, %s", source.path.name, trained,
                precision, remedy)


def export_metadata(source: Source, format: str, precision: str) -> dict:
    """What the exported file carries about itself."""
    meta = source.metadata
    size = int(source.preprocessing["input_size"])
    out = {
        "format_version": EXPORT_FORMAT_VERSION,
        "featx_version": featx_version(),
        "source": source.kind,
        "source_model": {"file": source.path.name, "sha256": meta.get("sha256")},
        "clf": meta.get("clf", "finetune"),
        "classes": source.classes,
        "output": source.output,
        "input": {"name": "image", "dtype": "uint8", "shape": [None, size, size, 3],
                  "color": "RGB", "layout": "NHWC"},
        "preprocessing": dict(source.preprocessing),
        "resize_recipe": resize_recipe(source.preprocessing),
        "backbone": {"name": meta.get("backbone"), "weights": meta.get("weights"),
                     "weights_id": meta.get("weights_id"),
                     "cache_key": meta.get("cache_key")},
        "format": format,
        "precision": precision,
        "fitted_on": (meta.get("cache_key") or {}).get("precision", "fp32"),
    }
    if precision == "int8":  # the recipe of the int8 model inside, with its instruction set
        fitted_int8 = out["fitted_on"] == "int8"
        out["quantization"] = dict(meta["cache_key"]["quantization"] if fitted_int8
                                   else recipe() if source.kind == "classifier"
                                   else QUANTIZATION)
    return out


def resize_recipe(preprocessing: dict) -> str:
    """In words, how featx turns a file into the graph's input (featx.data.load_for_model)."""
    how = preprocessing.get("interpolation", "area")
    how = ("cv2.INTER_AREA when shrinking, INTER_CUBIC when enlarging" if how == "area"
           else f"{how} interpolation")
    reduced = ("; large JPEGs decoded at 1/2, 1/4 or 1/8 scale, never below resize_size"
               if preprocessing.get("reduced_decode") else "")
    return (f"decode as RGB (alpha composited onto white){reduced}; resize the shorter side "
            f"to {preprocessing['resize_size']} keeping the aspect ({how}; sides longer than "
            f"4x the shorter are centre-cut to 4:1 first); centre-crop "
            f"{preprocessing['input_size']} x {preprocessing['input_size']}")
