"""Export a fitted or fine-tuned model as one deployable file: images in, scores out.

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

:func:`check_export` proves parity: it runs the exported file alone (onnxruntime, or Keras)
on the validation images and compares with what ``featx predict`` gives for them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np

from featx.errors import DataError, UsageError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "keras")
EXPORT_PRECISIONS = ("fp32", "int8")
EXPORT_FORMAT_VERSION = 1
METADATA_KEY = "featx"  # ONNX metadata_props key; the .keras member is "featx.json"
KERAS_MEMBER = "featx.json"
FP32_SCORE_TOLERANCE = 1e-4
# Parity bounds against `featx predict`. An export of the precision the model was fitted
# on runs the same computation (the int8 export of a model fitted on int8 features reuses
# its very int8 feature model), so it must match like fp32. An export of another precision
# is bounded by what was measured on photos (benchmarks/export.py, README "Export"): the
# same label for this share of images at least, and scores no further apart on average
# than this, per output kind (single borderline images move much more, so the maximum is
# printed, not bounded).
INT8_MIN_AGREEMENT = 0.97
INT8_MAX_MEAN_SCORE_DIFF = {"probabilities": 0.03, "decision_values": 0.3}
_LINEAR = ("softmax", "logistic", "svm")


@dataclasses.dataclass(frozen=True)
class Head:
    """A linear classifier folded into one dense layer: ``activation(W x + b)``.

    ``activation``: "softmax"; "ovr" (one-vs-rest sigmoids renormalised to sum to one,
    computed as softmax(log_sigmoid(z))); or "linear" (decision values). ``l2_normalize``:
    divide each feature row by its L2 norm first (scikit-learn's ``Normalizer``).
    """

    kernel: np.ndarray  # (dim, n_outputs)
    bias: np.ndarray  # (n_outputs,)
    activation: str
    l2_normalize: bool = False

    @property
    def output(self) -> str:
        return "decision_values" if self.activation == "linear" else "probabilities"


@dataclasses.dataclass(frozen=True)
class Source:
    """What is exported: the trained model's feature model, head and record."""

    path: Path
    kind: str  # "classifier" | "finetune"
    features: object  # keras.Model: float32 images in [0, 255] -> embeddings
    head: object  # Head, or the fine-tuned model's Dense layer
    classes: list
    output: str
    metadata: dict
    net: object = None  # the Backbone of a classifier's features (None when fine-tuned)

    @property
    def preprocessing(self) -> dict:
        return self.metadata["preprocessing"]


@dataclasses.dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    precision: str
    size_bytes: int
    sha256: str
    seconds: float
    metadata: dict


# ----- the head ---------------------------------------------------------------------
def linear_head(estimator, clf: str) -> Head:
    """The fitted pipeline's scaler and linear classifier as one :class:`Head`.

    Raises UsageError for a classifier that is not one linear layer (knn, tree).
    """
    if clf not in _LINEAR:
        raise UsageError(
            f"a {clf} model cannot be exported as one graph: "
            + ("it looks up its training rows at prediction time"
               if clf == "knn" else "its decision rules are not a neural-network layer")
            + f"; export a {', '.join(_LINEAR)} model, or use `featx predict`")
    if hasattr(estimator, "calibrated_classifiers_"):
        raise UsageError(f"a calibrated {clf} model cannot be exported as one graph: its "
                         "probabilities average cross-validated copies, each with its own "
                         "calibration map; export the model fitted without --calibrate, or "
                         "use `featx predict`")
    steps = dict(estimator.steps)
    final = steps["clf"]
    weights, bias = _coefficients(final)
    binary = weights.shape[0] == 1
    if clf == "svm":
        if binary:  # class_scores gives binary decision values as [-s, s]
            weights, bias = np.vstack([-weights, weights]), np.concatenate([-bias, bias])
        return Head(weights.T.astype(np.float32), bias.astype(np.float32), "linear",
                    l2_normalize="normalize" in steps)
    if binary:  # [1 - sigmoid(z), sigmoid(z)] == softmax([0, z])
        weights = np.vstack([np.zeros_like(weights), weights])
        bias = np.concatenate([[0.0], bias])
    activation = "softmax" if binary or clf == "softmax" else "ovr"
    weights, bias = _fold_scaler(steps.get("scale"), weights, bias)
    return Head(weights.T.astype(np.float32), bias.astype(np.float32), activation)


def _coefficients(final):
    """(W, b) of a linear model, or of a one-vs-rest set of them (one row per class)."""
    if hasattr(final, "estimators_"):
        for est in final.estimators_:
            if not hasattr(est, "coef_"):
                raise UsageError("this one-vs-rest model has a class that was constant in "
                                 "training; it is not one linear layer")
        weights = np.vstack([est.coef_ for est in final.estimators_])
        bias = np.concatenate([np.ravel(est.intercept_) for est in final.estimators_])
        return weights.astype(np.float64), bias.astype(np.float64)
    return np.asarray(final.coef_, np.float64), np.ravel(final.intercept_).astype(np.float64)


def _fold_scaler(scaler, weights, bias):
    """W((x - m) / s) + b == (W / s) x + (b - (W / s) m)."""
    if scaler is None:
        return weights, bias
    with_mean = getattr(scaler, "with_mean", True) and getattr(scaler, "mean_", None) is not None
    with_std = getattr(scaler, "with_std", True) and getattr(scaler, "scale_", None) is not None
    mean = scaler.mean_ if with_mean else 0.0
    scale = scaler.scale_ if with_std else 1.0
    folded = weights / scale
    return folded, bias - folded @ np.broadcast_to(mean, weights.shape[1:])


# ----- loading what is exported ------------------------------------------------------
def load_source(model_path) -> Source:
    """A saved model (``.joblib``/``.json`` from fit, ``.keras`` from finetune), checked.

    Refuses (DataError) a file whose SHA-256 differs from its sidecar's, and a classifier
    whose recorded cache key is not what this featx's backbone gives.
    """
    path = Path(model_path)
    if path.suffix == ".keras":
        from featx.finetuning import load_finetuned

        model, metadata = load_finetuned(path)
        features = next((layer for layer in model.layers
                         if isinstance(layer, _keras().Model)), None)
        if features is None:
            raise DataError(f"{path}: no feature model inside; not a featx fine-tuned model")
        return Source(path, "finetune", features, model.get_layer("pred"),
                      list(metadata["class_names"]), "probabilities", metadata)
    from featx.inference import model_backbone
    from featx.persist import load_model

    estimator, metadata = load_model(path)
    _check_exportable(path, metadata)
    head = linear_head(estimator, metadata.get("clf") or "unnamed")
    net = model_backbone(metadata)
    classes = [metadata["classes"][int(c)] for c in estimator.classes_]
    return Source(path, "classifier", net.feature_model(), head, classes, head.output,
                  metadata, net)


def _check_exportable(path, metadata) -> None:
    """UsageError for features one graph of stock layers does not reproduce yet."""
    if metadata.get("parts"):
        raise UsageError(f"{path}: a model on combined backbones ({metadata['backbone']}) "
                         "cannot be exported yet (each part has its own input size); use "
                         "`featx predict`, or export a model fitted on one backbone")
    if metadata["cache_key"].get("flip_average"):
        raise UsageError(f"{path}: a model on flip-averaged features cannot be exported yet; "
                         "use `featx predict`, or fit without --flip-average to export")


def _keras():
    import keras

    return keras


# ----- the deployable Keras model ----------------------------------------------------
def deploy_model(source: Source):
    """keras.Model: uint8 RGB images (None, S, S, 3) -> scores, stock Keras layers only."""
    from featx.backbones.layers import Normalization

    keras = _keras()
    size = int(source.preprocessing["input_size"])
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = image
    for layer in source.features.layers:  # Input -> Normalization -> base -> pooling
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, Normalization):
            for stock in _stock_normalization(layer.mode):
                x = stock(x)
            continue
        x = layer(x)
    if source.kind == "finetune":
        return keras.Model(image, source.head(x), name="featx_export")
    return keras.Model(image, _head_layers(source.head, x, keras), name="featx_export")


def _stock_normalization(mode: str) -> list:
    """featx's Normalization as stock Keras layers; Rescaling casts the uint8 input."""
    keras = _keras()
    from featx.backbones.layers import CAFFE_MEAN_BGR, TORCH_MEAN, TORCH_STD

    if mode == "lite":  # (x - 127) / 128, exactly (both constants are dyadic)
        return [keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")]
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")]
    if mode == "torch":
        scale = [1 / (255 * s) for s in TORCH_STD]
        offset = [-m / s for m, s in zip(TORCH_MEAN, TORCH_STD)]
        return [keras.layers.Rescaling(scale, offset=offset, name="normalize")]
    if mode == "caffe":  # RGB -> BGR minus the mean: a fixed 1x1 convolution
        flip = np.zeros((1, 1, 3, 3), np.float32)
        flip[0, 0, [2, 1, 0], [0, 1, 2]] = 1.0
        conv = keras.layers.Conv2D(3, 1, name="rgb_to_bgr_minus_mean", trainable=False)
        conv.build((None, None, None, 3))
        conv.set_weights([flip, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
        return [keras.layers.Rescaling(1.0, name="to_float"), conv]
    return [keras.layers.Rescaling(1.0, name="to_float")]


def _head_layers(head: Head, x, keras):
    if head.l2_normalize:
        x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize")(x)
    dense = keras.layers.Dense(head.kernel.shape[1], name="head", dtype="float32")
    x = dense(x)
    dense.set_weights([head.kernel, head.bias])
    if head.activation == "ovr":
        x = keras.layers.Activation("log_sigmoid", name="log_sigmoid")(x)
    if head.activation in ("ovr", "softmax"):
        x = keras.layers.Softmax(name="probabilities")(x)
    return x


# ----- writing the file --------------------------------------------------------------
def default_output(model_path, format: str, precision: str) -> Path:
    path = Path(model_path)
    stem = path.stem
    suffix = ".onnx" if format == "onnx" else ".keras"
    tag = "-int8" if precision == "int8" else ""
    return path.with_name(f"{stem}{tag}-export{suffix}")


def export_model(model_path, format: str = "onnx", *, precision: str = "fp32",
                 out=None) -> Exported:
    """Write ``model_path``'s deployable file (see the module docstring) to ``out``
    (default :func:`default_output`).

    ``precision="int8"`` (ONNX only): see the module docstring; calibrating needs the
    model's recorded data folder unless its int8 feature model is already stored.
    """
    from featx.persist import save_artifact

    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; one of {', '.join(FORMATS)}")
    if precision not in EXPORT_PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; one of "
                         f"{', '.join(EXPORT_PRECISIONS)}")
    if precision == "int8" and format != "onnx":
        raise UsageError("int8 is an ONNX Runtime quantisation: use --format onnx")
    started = time.perf_counter()
    out = _output_path(model_path, out, format, precision)
    source = load_source(model_path)
    metadata = export_metadata(source, format, precision)
    _warn_precision(source, metadata)
    if format == "keras":
        write = functools.partial(_write_keras, deploy_model(source), metadata=metadata)
    elif precision == "int8" and source.kind == "classifier":
        features = _int8_features(source)
        metadata["int8_feature_model_sha256"] = features.sha256
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
    from featx.persist import sidecar_for

    out = Path(out) if out else default_output(model_path, format, precision)
    if out.suffix != f".{format}":
        raise UsageError(f"{out}: a {format} export needs a .{format} file name")
    model, model_sidecar = Path(model_path).resolve(), sidecar_for(model_path).resolve()
    taken = {model, model_sidecar, model.with_suffix(".joblib")}
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
    from featx.persist import featx_version

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
    if precision == "int8":
        from featx.onnx_export import QUANTIZATION

        out["quantization"] = QUANTIZATION
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


def _write_keras(model, tmp: Path, *, metadata: dict) -> None:
    model.save(str(tmp))
    with zipfile.ZipFile(tmp, "a") as archive:
        archive.writestr(KERAS_MEMBER, json.dumps(metadata, indent=2))


def _write_onnx(model, tmp: Path, *, metadata: dict, calibration) -> None:
    import onnx

    from featx.onnx_export import keras_to_onnx, quantize

    fp32 = tmp.with_name(tmp.name + ".fp32.onnx")
    try:
        keras_to_onnx(model, fp32, "export")
        graph = onnx.load(str(fp32))
        _name_output(graph, metadata["output"])
        onnx.save(graph, str(fp32))
        if calibration is not None:
            quantize(fp32, tmp, calibration, float_head=True)
            graph = onnx.load(str(tmp))
        onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps(metadata)})
        onnx.save(graph, str(tmp))
    finally:
        fp32.unlink(missing_ok=True)


def _int8_features(source: Source):
    """The int8 feature model (onnx_export store) the export builds on: the one the
    classifier's features came from when it was fitted on int8 features, else one
    calibrated now on the model's training images."""
    from featx.inference import model_int8, model_store
    from featx.onnx_export import calibration_id, ensure_int8

    if source.metadata["cache_key"].get("precision") == "int8":
        return model_int8(source.metadata, source.net)
    images, hashes = _calibration(source)
    return ensure_int8(source.net, model_store(source.metadata), images,
                       calibration_id(hashes))


def _write_composed(source: Source, features_onnx: Path, tmp: Path, *, metadata: dict) -> None:
    """uint8 -> Cast -> the stored int8 feature model -> the float head, one ONNX graph."""
    import onnx
    from onnx import TensorProto, compose, helper

    from featx.onnx_export import keras_to_onnx

    keras = _keras()
    features = onnx.load(str(features_onnx))
    head_file = tmp.with_name(tmp.name + ".head.onnx")
    try:
        embedding = keras.Input((source.features.output.shape[-1],), name="embedding")
        keras_to_onnx(keras.Model(embedding, _head_layers(source.head, embedding, keras)),
                      head_file, "head")
        head = onnx.load(str(head_file))
    finally:
        head_file.unlink(missing_ok=True)
    size = int(source.preprocessing["input_size"])
    cast = helper.make_model(
        helper.make_graph(
            [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT)], "cast",
            [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
            [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", size, size, 3])]),
        opset_imports=list(features.opset_import), ir_version=features.ir_version)
    head = _same_opsets(head, features)
    graph = compose.merge_models(cast, features, [("pixels", features.graph.input[0].name)],
                                 prefix2="features/")
    graph = compose.merge_models(graph, head, [(graph.graph.output[0].name,
                                                head.graph.input[0].name)], prefix2="head/")
    _name_output(graph, metadata["output"])
    onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps(metadata)})
    onnx.checker.check_model(graph)
    onnx.save(graph, str(tmp))


def _same_opsets(model, like):
    """``model`` converted to ``like``'s default-domain opset and IR version (merge_models
    needs them equal)."""
    import onnx

    target = next(o.version for o in like.opset_import if o.domain in ("", "ai.onnx"))
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) != target:
        model = onnx.version_converter.convert_version(model, target)
    model.ir_version = like.ir_version
    return model


def _name_output(graph, name: str) -> None:
    """Rename the graph's only output to ``name`` (Keras calls it ``output_0``)."""
    old = graph.graph.output[0].name
    for node in graph.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    graph.graph.output[0].name = name


def _calibration(source: Source):
    """A seeded sample of the model's own training images, as the graph takes them, and
    their content hashes."""
    from featx.extraction import calibration_images
    from featx.onnx_export import QUANTIZATION

    root = Path(source.metadata.get("data_root", ""))
    if not root.is_dir():
        raise DataError(f"{source.path}: int8 calibrates on the model's training images, "
                        f"but its data folder {root} is not there")
    manifest = model_manifest(root, source.metadata)
    return calibration_images(manifest, source.preprocessing, manifest.split_params["seed"],
                              QUANTIZATION["calibration_images"])


# ----- reading an exported file ------------------------------------------------------
def read_export_metadata(path) -> dict:
    """The metadata an exported ``.onnx`` or ``.keras`` file carries."""
    path = Path(path)
    try:
        if path.suffix == ".onnx":
            import onnx

            props = {p.key: p.value for p in
                     onnx.load(str(path), load_external_data=False).metadata_props}
            return json.loads(props[METADATA_KEY])
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(KERAS_MEMBER))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a featx export ({type(exc).__name__}: {exc})") from None


class ExportedRunner:
    """Runs an exported file with its own runtime alone: ``runner(images) -> scores``."""

    def __init__(self, path):
        self.path = Path(path)
        self.metadata = read_export_metadata(self.path)
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            self._session = ort.InferenceSession(str(self.path),
                                                 providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        else:
            self._model = _keras().saving.load_model(str(self.path), compile=False)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.path.suffix == ".onnx":
            return self._session.run(None, {self._input: images})[0]
        return np.asarray(self._model.predict_on_batch(images))  # compiled once, then reused


# ----- parity --------------------------------------------------------------------------
@dataclasses.dataclass
class Parity:
    n_images: int
    split: str
    agreement: float
    n_disagree: int
    max_score_diff: float
    mean_score_diff: float
    precision: str
    fitted_on: str  # the precision of the features the model was fitted on
    bound: dict
    passed: bool
    disagreements: list
    n_unreadable: int = 0  # files featx could not decode: checked by neither side

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        bound = [f"agreement >= {self.bound['min_agreement']:.0%}"]
        if "max_score_diff" in self.bound:
            bound.append(f"max difference <= {self.bound['max_score_diff']:g}")
        if "max_mean_score_diff" in self.bound:
            bound.append(f"mean difference <= {self.bound['max_mean_score_diff']:g}")
        what = (self.precision if self.precision == self.fitted_on
                else f"{self.precision} export of a model fitted on {self.fitted_on} features")
        skipped = f", {self.n_unreadable} unreadable skipped" if self.n_unreadable else ""
        return (f"parity {verdict} on {self.n_images} {self.split} images ({what}{skipped}): "
                f"same label for {self.agreement:.2%} ({self.n_disagree} differ), score "
                f"difference max {self.max_score_diff:.2e} mean {self.mean_score_diff:.2e} "
                f"(bound: {', '.join(bound)})")


def parity_bound(precision: str, fitted_on: str, output: str) -> dict:
    """What an export of ``precision``, of a model fitted on ``fitted_on`` features, must
    meet against ``featx predict``."""
    if precision == fitted_on:
        return {"min_agreement": 1.0, "max_score_diff": FP32_SCORE_TOLERANCE}
    return {"min_agreement": INT8_MIN_AGREEMENT,
            "max_mean_score_diff": INT8_MAX_MEAN_SCORE_DIFF[output]}


def check_export(exported_path, model_path, data_dir, *, batch_size: int = 32,
                 runtime: str = "auto") -> Parity:
    """Run the exported file alone on ``data_dir``'s validation images (the model's
    recorded split; test, else every image, when there is no val split) and compare with
    ``featx predict``'s scores and labels for the same files."""
    from featx.persist import read_sidecar, sidecar_for

    runner = ExportedRunner(exported_path)
    model_meta = read_sidecar(sidecar_for(model_path))
    if runner.metadata.get("source_model", {}).get("sha256") != model_meta.get("sha256"):
        raise DataError(f"{exported_path} was not exported from {model_path} (its recorded "
                        "source model has another SHA-256)")
    split, files = _check_files(data_dir, model_meta)
    ref, ref_errors = _reference_scores(model_path, files, runtime, batch_size)
    got, got_errors = _exported_scores(runner, files, batch_size)
    ok = np.array([not a and not b for a, b in zip(ref_errors, got_errors)], dtype=bool)
    if not ok.any():
        raise DataError(f"{data_dir}: no image could be read to check the export on")
    parity = _compare(ref[ok], got[ok], [f for f, k in zip(files, ok) if k], split,
                      runner.metadata)
    parity.n_unreadable = int((~ok).sum())
    return parity


def _compare(ref, got, files, split, metadata) -> Parity:
    """Labels and scores of the export (``got``) against predict's (``ref``), same rows."""
    same = ref.argmax(axis=1) == got.argmax(axis=1)
    diff = np.abs(ref - got)
    precision = metadata.get("precision", "fp32")
    fitted_on = metadata.get("fitted_on", "fp32")
    bound = parity_bound(precision, fitted_on, metadata["output"])
    agreement = float(same.mean())
    passed = (agreement >= bound["min_agreement"]
              and float(diff.max()) <= bound.get("max_score_diff", np.inf)
              and float(diff.mean()) <= bound.get("max_mean_score_diff", np.inf))
    classes = metadata["classes"]
    disagreements = [{"path": str(files[i]), "predict": classes[int(ref[i].argmax())],
                      "export": classes[int(got[i].argmax())]}
                     for i in np.flatnonzero(~same)[:20]]
    return Parity(len(files), split, agreement, int((~same).sum()), float(diff.max()),
                  float(diff.mean()), precision, fitted_on, bound, passed, disagreements)


def model_manifest(data_dir, meta: dict):
    """The folder's manifest under the model's split: the split its cache recorded when
    ``data_dir`` is the model's data folder, else its split parameters applied afresh."""
    from featx import reconcile
    from featx.options import SplitOptions

    root = Path(data_dir)
    split = SplitOptions(**(meta.get("split_params") or {}))
    state = None
    if meta.get("cache") and root.resolve() == Path(meta.get("data_root", "")).resolve():
        state = reconcile.read_state(meta["cache"], meta["cache_key"])
    return reconcile.discover(root, split, state)


def _check_files(data_dir, meta: dict):
    """(split, files): the folder's images of the first non-empty of val and test under the
    model's split (:func:`model_manifest`), else ("all", every image)."""
    manifest = model_manifest(data_dir, meta)
    splits = np.asarray(manifest.splits)
    for split in ("val", "test"):
        if (splits == split).any():
            return split, [manifest.root / p for p, s in zip(manifest.paths, splits)
                           if s == split]
    return "all", [manifest.root / p for p in manifest.paths]


def _reference_scores(model_path, files, runtime, batch_size):
    """``featx predict``'s scores, one row per file (zeros where its error is set), and the
    per-file errors ("" when read)."""
    path = Path(model_path)
    if path.suffix == ".keras":
        from featx.finetuning import load_finetuned, probabilities_and_errors

        model, metadata = load_finetuned(path)
        return probabilities_and_errors(model, metadata, files, batch_size)
    from featx.inference import classifier_scores
    from featx.persist import load_model

    estimator, metadata = load_model(path)
    scores, _, errors, _ = classifier_scores(estimator, metadata, files, runtime, batch_size)
    full = np.zeros((len(files), len(estimator.classes_)))  # float64, as predict computes
    full[[not e for e in errors]] = scores
    return full, errors


def _exported_scores(runner: ExportedRunner, files, batch_size):
    """The exported file's scores and per-file errors, the files decoded by featx's reader
    (the same pipeline as predict's, the exported file as the mapper)."""
    from featx.pipeline import ArrayWriter, ImageReader, run_pipeline

    reader = ImageReader(files, runner.metadata["preprocessing"], batch_size)
    writer = ArrayWriter(len(files), len(runner.metadata["classes"]))
    run_pipeline(reader, runner, writer, progress=False, desc="check")
    return writer.embeddings, writer.errors
