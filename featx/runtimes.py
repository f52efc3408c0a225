"""Runtimes: the mapper stage of the pipeline, uint8 images -> float32 embeddings.

- ``keras``: the backbone's Keras feature model (one traced ``tf.function`` on TensorFlow);
  the GPU path, with mixed precision.
- ``onnx``: the same network exported once to ONNX (:mod:`featx.onnx_export`) and run by
  ONNX Runtime; about twice TensorFlow's CPU speed here, and the only one with ``int8``.
- ``auto`` (the default): ``onnx`` on CPU when onnxruntime is installed, else ``keras``.

fp32 ONNX embeddings equal the Keras model's to about 1e-5 (tests pin it), so the two
share one cache key; int8 rows get a key of their own.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np

from featx.errors import UsageError
from featx.options import PRECISIONS, RUNTIMES

log = logging.getLogger(__name__)



def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def choose_runtime(runtime: str = "auto", precision: str = "fp32", device: str = "cpu") -> str:
    """The runtime that will run: "onnx" or "keras". Raises UsageError for what cannot."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if precision == "int8" and runtime == "keras":
        raise UsageError("--precision int8 runs on ONNX Runtime only; drop --runtime keras")
    if runtime == "keras":
        return "keras"
    if not onnxruntime_available():
        if runtime == "onnx" or precision == "int8":
            raise UsageError("--runtime onnx / --precision int8 need onnxruntime, which is not "
                             "installed: pip install onnxruntime onnx tf2onnx")
        return "keras"
    if runtime == "auto" and device == "gpu" and precision == "fp32":
        return "keras"  # the installed onnxruntime is a CPU build; the GPU is faster
    return "onnx"


class KerasMapper:
    """The backbone's Keras feature model; on TensorFlow one traced ``tf.function``."""

    runtime = "keras"

    def __init__(self, net, batch_size: int | None = None, precision: str = "fp32"):
        import keras

        model = net.feature_model()
        model.trainable = False
        self.precision = precision
        self.batch_size = batch_size
        self.n_batches = 0
        self.n_images = 0
        if keras.backend.backend() == "tensorflow":
            self._embed = _traced(model, net.input_size)
        else:
            self._embed = lambda images: model(images.astype(np.float32), training=False)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = int(images.shape[0])
        self.n_batches += 1
        self.n_images += n
        if self.batch_size and n < self.batch_size:
            # A short batch would make oneDNN build new kernels for one call (seconds);
            # padding it to the usual shape is far cheaper.
            images = np.concatenate([images, np.zeros(
                (self.batch_size - n, *images.shape[1:]), dtype=images.dtype)])
        return np.asarray(self._embed(images), dtype=np.float32)[:n]


def _traced(model, size):
    import tensorflow as tf

    spec = tf.TensorSpec((None, size, size, 3), tf.uint8)

    @tf.function(input_signature=[spec], reduce_retracing=True)
    def embed(images):
        return tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)

    return lambda images: embed(images).numpy()


class OnnxMapper:
    """An ONNX feature model run by ONNX Runtime on the CPU.

    Intra-op threads default to the cores this process may use; spinning is off by default
    because the decoder threads need those cores between model calls (benchmarks/extract.py
    measures both).
    """

    runtime = "onnx"

    def __init__(self, model, threads: int | None = None, spinning: bool | None = None):
        import onnxruntime as ort

        from featx.options import usable_cores

        self.model = model  # featx.onnx_export.OnnxModel
        self.precision = model.precision
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if spinning is None:
            spinning = _env_flag("FEATX_ORT_SPINNING", False)
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
        self.session = ort.InferenceSession(str(model.path), options,
                                            providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self.n_batches = 0
        self.n_images = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.n_batches += 1
        self.n_images += int(images.shape[0])
        feed = {self._input: np.asarray(images, dtype=np.float32)}
        return self.session.run(None, feed)[0].astype(np.float32, copy=False)


def _env_flag(name: str, default: bool) -> bool:
    import os

    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def create_mapper(net, *, runtime: str = "onnx", store_dir=None, batch_size=None,
                  precision: str = "fp32", int8_model=None):
    """A mapper for ``net`` on a runtime :func:`choose_runtime` picked.

    ``onnx`` exports the feature model into ``store_dir`` once (or reuses it); ``int8``
    takes the quantised model from :func:`featx.onnx_export.ensure_int8` as ``int8_model``.
    """
    if runtime == "keras":
        return KerasMapper(net, batch_size, precision)
    if precision == "int8":
        return OnnxMapper(int8_model)
    from featx.onnx_export import ensure_fp32

    return OnnxMapper(ensure_fp32(net, store_dir))


def describe(mapper) -> str:
    """One line for reports: which runtime and precision computed the embeddings.

    Any mapper works: one without a ``runtime`` attribute is named by its type.
    """
    runtime = getattr(mapper, "runtime", type(mapper).__name__)
    if runtime == "onnx":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} {mapper.precision}"
    if runtime != "keras":
        return f"{runtime} {getattr(mapper, 'precision', '')}".strip()
    import keras

    return f"keras {keras.__version__} ({keras.backend.backend()}) {mapper.precision}"


# ----- devices and choosing a mapper -------------------------------------------------
DEFAULT_BATCH_SIZE = {"cpu": 32, "gpu": 128}


def configure_devices(mixed_precision: bool = False) -> str:
    """Enable GPU memory growth; set mixed precision on GPU. Returns "gpu" or "cpu".

    Imports TensorFlow: call it only when the Keras runtime may run.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass
    if mixed_precision:
        if gpus:
            import keras

            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            log.warning("--mixed-precision ignored: no GPU found (it would be slower on CPU)")
    return "gpu" if gpus else "cpu"


def detect_device(runtime: str = "auto") -> str:
    """"gpu" or "cpu", importing TensorFlow only when a GPU may be there or Keras will run."""
    from pathlib import Path

    if runtime == "keras" or any(Path("/dev").glob("nvidia[0-9]*")):
        return configure_devices()
    return "cpu"


def open_mapper(net, runtime, precision, device, store_dir, batch_size, int8_model=None):
    """The runtime's mapper; under ``auto`` a backbone ONNX cannot export falls back to Keras."""
    from featx.onnx_export import ExportError

    chosen = choose_runtime(runtime, precision, device)
    try:
        return create_mapper(net, runtime=chosen, store_dir=store_dir, batch_size=batch_size,
                             precision=precision, int8_model=int8_model)
    except ExportError as exc:
        if runtime != "auto" or precision != "fp32":
            raise
        log.warning("%s; falling back to the Keras runtime", exc)
        return KerasMapper(net, batch_size)
