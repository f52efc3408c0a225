"""Writing an export file: the Keras graph as ``.keras`` or ONNX (fp32, or int8 quantised),
or, for an int8 classifier, the stored int8 feature model and the float head merged into
one ONNX graph; each with its metadata inside."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from featx.errors import DataError, UsageError
from featx.extraction import (QUANTIZATION, calibration_id, calibration_images, declined_line,
                              ensure_int8, keras_to_onnx, quantize)
from featx.inference import model_int8, model_store

from ._graph import _head_layers
from ._source import Source

METADATA_KEY = "featx"  # ONNX metadata_props key; the .keras member is "featx.json"
KERAS_MEMBER = "featx.json"


def _write_keras(model, tmp: Path, *, metadata: dict) -> None:
    model.save(str(tmp))
    with zipfile.ZipFile(tmp, "a") as archive:
        archive.writestr(KERAS_MEMBER, json.dumps(metadata, indent=2))


def _write_onnx(model, tmp: Path, *, metadata: dict, calibration) -> None:
    import onnx

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
    """The int8 feature model (featx.extraction's ONNX store) the export builds on: the one the
    classifier's features came from when it was fitted on int8 features, else one
    calibrated now on the model's training images."""
    if source.metadata["cache_key"].get("precision") == "int8":
        return model_int8(source.metadata, source.backbone)
    images, hashes = _calibration(source)
    model = ensure_int8(source.backbone, model_store(source.metadata), images,
                        calibration_id(hashes), held=_calibration(source, held_back=True))
    if model.record.get("use") == "fp32":
        raise UsageError(f"{source.path}: {declined_line(model.record, QUANTIZATION)}; "
                         "export --precision fp32")
    return model


def _write_composed(source: Source, features_onnx: Path, tmp: Path, *, metadata: dict) -> None:
    """uint8 -> Cast -> the stored int8 feature model -> the float head, one ONNX graph."""
    import onnx
    from onnx import TensorProto, compose, helper

    import keras

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


def _calibration(source: Source, held_back: bool = False):
    """A seeded sample of the model's own training images, as the graph takes them, and
    their content hashes (``held_back``: the other sample, a HeldBack)."""
    root = Path(source.metadata.get("data_root", ""))
    if not root.is_dir():
        raise DataError(f"{source.path}: int8 calibrates on the model's training images, "
                        f"but its data folder {root} is not there")
    manifest = source.saved.manifest(root)
    return calibration_images(manifest, source.preprocessing, manifest.split_params["seed"],
                              QUANTIZATION["calibration_images"], held_back=held_back)
