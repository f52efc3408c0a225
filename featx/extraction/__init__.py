"""The third room of an image's route: decoded images -> a frozen backbone -> embeddings in
the cache, batch by batch: reader -> mapper -> writer, driven by an engine.

``extract()`` is the entry point. Modules, in import order: ``_devices`` (where the Keras
model runs), ``_reader``, ``_writers`` and ``_engine`` (the pipeline's stages and the local
engine), ``_quantize`` (int8 recipes and the quantiser), ``_int8_agreement`` (int8 against
fp32), ``_onnx_store`` (ONNX exports of backbones), ``_runtimes`` (the mappers: ONNX Runtime
or Keras), ``_int8_search`` (accuracy-aware int8), ``_int8`` (the int8 model of a cache),
``_views`` (augmented views),
``_ray_engine`` (the Ray engine), ``_run`` (one run on a locked cache), ``_extract``.
"""

from ._devices import (DEFAULT_BATCH_SIZE, MIXED_POLICY, Device, gpu_present, mixed_precision,
                       setup_device)
from ._engine import PipelineTiming, map_files, run_pipeline
from ._extract import check_backbone, extract
from ._int8 import (HeldBack, Int8Declined, agreement_line, calibration_images,
                    declined_line, ensure_int8, sample_indices, stored_int8)
from ._int8_agreement import (MAX_CHANGED_DECISIONS, MIN_MEAN_COSINE, Agreement,
                              agreement_text, measure_agreement)
from ._int8_search import SEARCH, search_int8
from ._onnx_store import OnnxModel, calibration_id, ensure_fp32, keras_to_onnx, store_for
from ._quantize import (CALIBRATION_METHODS, QUANTIZATION, ExportError, Quantizer, cpu_has_vnni,
                        cpu_isa, isa_mismatch, quantize, recipe)
from ._reader import ImageReader, decoded
from ._run import AGREEMENT_SAMPLE, AGREEMENT_TOLERANCE, check_agreement
from ._runtimes import (FlipAveraging, KerasMapper, OnnxMapper, batch_size_for, choose_runtime,
                        computed_by, create_mapper, describe, open_mapper, plan_device)
from ._writers import ArrayWriter, CacheWriter

__all__ = [
    "AGREEMENT_SAMPLE", "AGREEMENT_TOLERANCE", "Agreement", "ArrayWriter", "CALIBRATION_METHODS",
    "CacheWriter", "DEFAULT_BATCH_SIZE", "Device", "ExportError", "FlipAveraging", "HeldBack",
    "ImageReader", "Int8Declined", "KerasMapper", "MAX_CHANGED_DECISIONS", "MIN_MEAN_COSINE",
    "MIXED_POLICY", "OnnxMapper", "OnnxModel", "PipelineTiming", "QUANTIZATION", "Quantizer",
    "SEARCH", "agreement_line", "agreement_text", "batch_size_for", "calibration_id",
    "calibration_images", "check_agreement", "check_backbone", "choose_runtime", "computed_by",
    "cpu_has_vnni", "cpu_isa", "create_mapper", "declined_line", "decoded", "describe",
    "ensure_fp32", "ensure_int8", "extract", "gpu_present", "isa_mismatch", "keras_to_onnx",
    "map_files", "measure_agreement", "mixed_precision", "open_mapper", "plan_device", "quantize",
    "recipe", "run_pipeline", "sample_indices", "search_int8", "setup_device", "store_for",
    "stored_int8",
]
