"""Runtimes: the mapper stage of the pipeline, uint8 images -> float32 embeddings.

- ``keras``: the backbone's Keras feature model on the Keras backend in use (TensorFlow, JAX
  or PyTorch; :mod:`featx._backend`), compiled once per backend; the GPU path, with mixed
  precision.
- ``onnx``: the same network exported once to ONNX (:mod:`._onnx_store`) and run by ONNX
  Runtime; about twice TensorFlow's CPU speed here, and the only one with ``int8``.
- ``auto`` (the default): ``onnx`` on CPU when onnxruntime is installed and Keras runs on
  TensorFlow (the export goes through it), else ``keras``.

fp32 embeddings of every runtime, backend and device agree to about 1e-5 (tests pin it), so
they share one cache key; extraction checks that agreement on cached images before a new
runtime adds rows to a cache (:func:`computed_by` names what computed them). int8 and
mixed-precision rows get keys of their own. :class:`FlipAveraging` wraps any runtime.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np

from featx._backend import backend_name
from featx.errors import UsageError
from featx.options import PRECISIONS, RUNTIMES, usable_cores

from ._devices import DEFAULT_BATCH_SIZE, MIXED_POLICY, Device, gpu_present, setup_device
from ._onnx_store import ExportError, ensure_fp32

log = logging.getLogger(__name__)


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def choose_runtime(runtime: str = "auto", precision: str = "fp32", device: str = "cpu") -> str:
    """The runtime that will run: "onnx" or "keras". Raises UsageError for what cannot.

    ``device`` is the device's kind, "cpu" or "gpu".
    """
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    if precision == "int8" and runtime == "keras":
        raise UsageError("--precision int8 runs on ONNX Runtime only; drop --runtime keras")
    if runtime == "keras":
        return "keras"
    if runtime == "auto" and precision == "fp32" and backend_name() != "tensorflow":
        return "keras"  # the ONNX export runs on TensorFlow, which this process must not load
    if not onnxruntime_available():
        if runtime == "onnx" or precision == "int8":
            raise UsageError("--runtime onnx / --precision int8 need onnxruntime, which is not "
                             "installed: pip install onnxruntime onnx tf2onnx")
        return "keras"
    if runtime == "auto" and device == "gpu" and precision == "fp32":
        return "keras"  # the installed onnxruntime is a CPU build; the GPU is faster
    return "onnx"


class KerasMapper:
    """The backbone's Keras feature model, compiled once for the backend in use.

    Each batch goes to the device once, as uint8 (a quarter of float32's bytes), and is
    cast there; the embeddings come back once as float32. ``precision`` is "fp32", or
    "mixed_float16" when Keras' global policy was mixed when the model was built.
    """

    runtime = "keras"

    def __init__(self, backbone, batch_size: int | None = None, precision: str = "fp32",
                 device: Device | None = None):
        import keras

        self.device = device or setup_device()
        self.backend = keras.backend.backend()
        self.batch_size = batch_size
        self.n_batches = 0
        self.n_images = 0
        model = backbone.feature_model()  # on the device setup_device left as the default
        model.trainable = False
        self.precision = MIXED_POLICY if keras.mixed_precision.global_policy().name == \
            MIXED_POLICY else precision
        self._embed = _COMPILE[self.backend](model, backbone.input_size, self.device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = int(images.shape[0])
        self.n_batches += 1
        self.n_images += n
        if self.batch_size and n < self.batch_size:
            # A short batch would make oneDNN or XLA build new kernels for one call
            # (seconds); padding it to the usual shape is far cheaper.
            images = np.concatenate([images, np.zeros(
                (self.batch_size - n, *images.shape[1:]), dtype=images.dtype)])
        return np.asarray(self._embed(np.ascontiguousarray(images)), dtype=np.float32)[:n]


def _tensorflow_embed(model, size, device):
    import tensorflow as tf

    spec = tf.TensorSpec((None, size, size, 3), tf.uint8)

    @tf.function(input_signature=[spec], reduce_retracing=True)
    def embed(images):
        return tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)

    return lambda images: embed(images).numpy()


def _jax_embed(model, size, device):
    import jax
    import jax.numpy as jnp

    target = jax.devices(device.kind)[0] if device.kind == "cpu" else \
        [d for d in jax.devices() if d.platform == "gpu"][0]
    # passed as arguments, not closed over: XLA would fold closed-over weights into the
    # program as constants (slow to compile, twice the memory)
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def embed(trainable, frozen, images):
        out, _ = model.stateless_call(trainable, frozen, images.astype(jnp.float32),
                                      training=False)
        return out.astype(jnp.float32)

    return lambda images: embed(trainable, frozen, jax.device_put(images, target))


def _torch_embed(model, size, device):
    import torch

    target = model.weights[0].value.device  # where Keras put the weights
    if (target.type == "cuda") != (device.kind == "gpu"):
        # Keras' torch backend chose its device when it was imported, before this
        raise UsageError(f"--device {device.kind}: Keras' torch backend put the model on "
                         f"{target.type} (it chooses when imported); set KERAS_TORCH_DEVICE "
                         "before importing Keras")

    def embed(images):
        with torch.inference_mode():
            batch = torch.from_numpy(images).to(target, non_blocking=True).float()
            return model(batch, training=False).float().cpu().numpy()

    return embed


_COMPILE = {"tensorflow": _tensorflow_embed, "jax": _jax_embed, "torch": _torch_embed}


class OnnxMapper:
    """An ONNX feature model run by ONNX Runtime on the CPU.

    Intra-op threads default to the cores this process may use; spinning is off by default
    because the decoder threads need those cores between model calls (benchmarks/extract.py
    measures both).
    """

    runtime = "onnx"

    def __init__(self, model, threads: int | None = None, spinning: bool | None = None):
        import onnxruntime as ort

        self.model = model  # an OnnxModel of the ONNX store
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
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


class FlipAveraging:
    """A mapper whose embedding of an image is the mean of ``mapper``'s embeddings of the
    image and of its horizontal mirror image (twice the model calls, one batch shape)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, images: np.ndarray) -> np.ndarray:
        plain = np.asarray(self.mapper(images), dtype=np.float32)
        mirrored = np.asarray(self.mapper(np.ascontiguousarray(images[:, :, ::-1])),
                              dtype=np.float32)
        return (plain + mirrored) / np.float32(2)

    def __getattr__(self, name):  # runtime, precision, dim...: the wrapped mapper's
        if name == "mapper":
            raise AttributeError(name)
        return getattr(self.mapper, name)


def create_mapper(backbone, *, runtime: str = "onnx", store_dir=None, batch_size=None,
                  precision: str = "fp32", int8_model=None, device=None):
    """A mapper for ``backbone`` on a runtime :func:`choose_runtime` picked.

    ``onnx`` exports the feature model into ``store_dir`` once (or reuses it); ``int8``
    takes the quantised model from :func:`featx.extraction.ensure_int8` as ``int8_model``.
    """
    if runtime == "keras":
        return KerasMapper(backbone, batch_size, precision, device)
    if precision == "int8":
        return OnnxMapper(int8_model)
    return OnnxMapper(ensure_fp32(backbone, store_dir))


def describe(mapper) -> str:
    """One line for reports: which runtime, backend, device and precision computed the
    embeddings. Any mapper works: one without a ``runtime`` attribute is named by its type.
    """
    runtime = getattr(mapper, "runtime", type(mapper).__name__)
    if runtime == "onnx":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} {mapper.precision}"
    if runtime != "keras":
        return f"{runtime} {getattr(mapper, 'precision', '')}".strip()
    import keras

    return (f"keras {keras.__version__} ({mapper.backend}, {mapper.device.name}) "
            f"{mapper.precision}")


def computed_by(mapper) -> str:
    """What computed a mapper's embeddings, for the cache's record of who wrote its rows:
    "onnxruntime/cpu", "keras/jax/gpu"; versions left out (a cache outlives them)."""
    runtime = getattr(mapper, "runtime", type(mapper).__name__)
    if runtime == "onnx":
        return "onnxruntime/cpu"
    if runtime == "keras":
        return f"keras/{mapper.backend}/{mapper.device.kind}"
    return str(runtime)


def plan_device(runtime: str = "auto", precision: str = "fp32", device: str = "auto",
                mixed_precision: bool = False) -> tuple[str, Device | None]:
    """(runtime, device) for a run: the device is set up (importing the backend) only when
    the Keras model may run, so ONNX Runtime on a CPU-only machine never loads a framework.
    ``device`` None means the CPU, with no framework loaded."""
    chosen = choose_runtime(runtime, precision, "cpu")  # bad combinations fail here
    if not (chosen == "keras" or device == "gpu" or mixed_precision
            or (device == "auto" and gpu_present())):
        return chosen, None
    found = setup_device(device)
    chosen = choose_runtime(runtime, precision, found.kind)
    if chosen == "keras":
        return chosen, found
    if device == "gpu":
        raise UsageError("--device gpu runs the Keras runtime; ONNX Runtime (--runtime onnx, "
                         "--precision int8) runs on the CPU here")
    return chosen, None  # ONNX Runtime: the CPU


def batch_size_for(device: Device | None, given: int | None = None) -> int:
    return given or DEFAULT_BATCH_SIZE["cpu" if device is None else device.kind]


def open_mapper(backbone, runtime, precision, device, store_dir, batch_size, int8_model=None):
    """The runtime's mapper; under ``auto`` a backbone ONNX cannot export falls back to
    Keras. ``device``: a :class:`~featx.extraction.Device`, or None for the CPU."""
    chosen = choose_runtime(runtime, precision, "cpu" if device is None else device.kind)
    try:
        return create_mapper(backbone, runtime=chosen, store_dir=store_dir, batch_size=batch_size,
                             precision=precision, int8_model=int8_model, device=device)
    except ExportError as exc:
        if runtime != "auto" or precision != "fp32":
            raise
        log.warning("%s; falling back to the Keras runtime", exc)
        # None here means ONNX Runtime was to run on the CPU: so does the fallback
        return KerasMapper(backbone, batch_size, device=device or setup_device("cpu"))
