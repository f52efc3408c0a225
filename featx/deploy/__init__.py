"""A fitted or fine-tuned model as one deployable file: uint8 images in, class scores out,
stock layers only (``featx export``), and proof that it matches ``featx predict``.

Modules, in import order: ``_head`` (a linear classifier as one dense layer), ``_source``
(what is exported), ``_graph`` (the Keras graph), ``_write`` (the .keras or ONNX file),
``_export`` (:func:`export_model`), ``_parity`` (:func:`check_export`).
"""

from ._export import (EXPORT_FORMAT_VERSION, EXPORT_PRECISIONS, FORMATS, Exported,
                      default_output, export_metadata, export_model, resize_recipe)
from ._graph import deploy_model
from ._head import Head, linear_head
from ._parity import (FP32_SCORE_TOLERANCE, INT8_MAX_MEAN_SCORE_DIFF, INT8_MIN_AGREEMENT,
                      ExportedRunner, Parity, check_export, parity_bound, read_export_metadata)
from ._source import Source, load_source
from ._write import KERAS_MEMBER, METADATA_KEY

__all__ = [
    "EXPORT_FORMAT_VERSION", "EXPORT_PRECISIONS", "Exported", "ExportedRunner",
    "FORMATS", "FP32_SCORE_TOLERANCE", "Head", "INT8_MAX_MEAN_SCORE_DIFF",
    "INT8_MIN_AGREEMENT", "KERAS_MEMBER", "METADATA_KEY", "Parity", "Source",
    "check_export", "default_output", "deploy_model", "export_metadata", "export_model",
    "linear_head", "load_source", "parity_bound", "read_export_metadata", "resize_recipe",
]
