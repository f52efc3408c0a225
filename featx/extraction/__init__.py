"""The third room of an image's route: decoded images -> a frozen backbone -> embeddings in
the cache, batch by batch: reader -> mapper -> writer, driven by an engine.

``extract()`` is the entry point. Modules, in import order: ``_devices`` (where the Keras
model runs), ``_reader``, ``_writers`` and ``_engine`` (the pipeline's stages and the local
engine), ``_quantize`` and ``_onnx_store`` (ONNX exports of backbones, int8), ``_runtimes``
(the mappers: ONNX Runtime or Keras), ``_int8``, ``_views`` (augmented views),
``_ray_engine`` (the Ray engine), ``_run`` (one run on a locked cache), ``_extract``.
"""

from ._devices import (DEFAULT_BATCH_SIZE, MIXED_POLICY, Device, gpu_present, mixed_precision,
                       setup_device)
from ._engine import PipelineTiming, map_files, run_pipeline
from ._extract import check_backbone, extract
from ._int8 import calibration_images
from ._onnx_store import (OnnxModel, calibration_id, ensure_fp32, ensure_int8, keras_to_onnx,
                          store_for, stored_int8)
from ._quantize import QUANTIZATION, ExportError, cpu_has_vnni, quantize
from ._reader import ImageReader, decoded
from ._run import AGREEMENT_SAMPLE, AGREEMENT_TOLERANCE, check_agreement
from ._runtimes import (FlipAveraging, KerasMapper, OnnxMapper, batch_size_for, choose_runtime,
                        computed_by, create_mapper, describe, open_mapper, plan_device)
from ._writers import ArrayWriter, CacheWriter

__all__ = [
    "AGREEMENT_SAMPLE", "AGREEMENT_TOLERANCE", "ArrayWriter", "CacheWriter",
    "DEFAULT_BATCH_SIZE", "Device", "ExportError", "FlipAveraging", "ImageReader",
    "KerasMapper", "MIXED_POLICY", "OnnxMapper", "OnnxModel", "PipelineTiming", "QUANTIZATION",
    "batch_size_for", "calibration_id", "calibration_images", "check_agreement",
    "check_backbone", "choose_runtime", "computed_by", "cpu_has_vnni", "create_mapper",
    "decoded", "describe", "ensure_fp32", "ensure_int8", "extract", "gpu_present",
    "keras_to_onnx", "map_files", "mixed_precision", "open_mapper", "plan_device", "quantize",
    "run_pipeline", "setup_device", "store_for", "stored_int8",
]
