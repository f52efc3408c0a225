"""The device the Keras runtime runs on, set up once per process and backend.

- TensorFlow: GPU memory growth; JAX: no preallocation of GPU memory. Both leave the GPU to
  share with other processes.
- fp32 means fp32 on every backend: TF32 (the GPUs' 10-bit-mantissa matmul and convolution
  mode, which JAX and PyTorch use by default) is off, so that GPU and CPU embeddings agree
  and may share a cache. ``mixed_precision`` is the fast path, with its own cache key.
- ``--device cpu`` hides the GPUs from a framework not yet imported.

Which backend Keras runs on is :mod:`featx._backend`'s concern.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

from featx._backend import require_backend
from featx.errors import UsageError
from featx.options import DEVICES

log = logging.getLogger(__name__)

# images per model call when --batch-size is not given
DEFAULT_BATCH_SIZE = {"cpu": 32, "gpu": 128}


MIXED_POLICY = "mixed_float16"


@dataclasses.dataclass(frozen=True)
class Device:
    """Where the Keras model runs: ``kind`` "cpu" or "gpu", ``name`` as the backend calls it
    ("NVIDIA H100 80GB HBM3"), and the backend."""

    kind: str
    name: str
    backend: str

    def __str__(self) -> str:
        return f"{self.name} ({self.backend})" if self.kind == "gpu" else f"CPU ({self.backend})"


_FOUND: dict[tuple[str, str], Device] = {}  # (backend, requested) -> the device set up


def setup_device(requested: str = "auto") -> Device:
    """Set the backend up for ``requested`` ("auto", "cpu" or "gpu") and return the device
    the model will run on. ``"gpu"`` where none is visible is a UsageError."""
    if requested not in DEVICES:
        raise UsageError(f"unknown device {requested!r}; one of {', '.join(DEVICES)}")
    backend = require_backend()
    if (backend, requested) not in _FOUND:
        _FOUND[backend, requested] = _SETUP_BY_BACKEND[backend](requested)
    device = _FOUND[backend, requested]
    if requested == "gpu" and device.kind != "gpu":
        raise UsageError(f"--device gpu: {backend} sees no GPU on this machine "
                         f"({_no_gpu_hint(backend)}); drop --device or use --device cpu")
    return device


def _no_gpu_hint(backend) -> str:
    return {"tensorflow": "TensorFlow's GPU build is pip install 'tensorflow[and-cuda]'",
            "jax": "JAX's CUDA build is pip install 'jax[cuda12]'",
            "torch": "a CUDA build of PyTorch is needed"}[backend]


def _tensorflow(requested) -> Device:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if requested == "cpu" and gpus:
        try:
            tf.config.set_visible_devices([], "GPU")
            gpus = []
        except RuntimeError:  # initialised already: the GPU stays visible
            log.warning("--device cpu: TensorFlow had already set up its GPUs in this process")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # initialised already
            pass
    if not gpus:
        return Device("cpu", "cpu", "tensorflow")
    tf.config.experimental.enable_tensor_float_32_execution(False)
    details = tf.config.experimental.get_device_details(gpus[0])
    return Device("gpu", details.get("device_name", gpus[0].name), "tensorflow")


def _jax(requested) -> Device:
    if "jax" not in sys.modules:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if requested == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32
    try:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:  # JAX_PLATFORMS names a platform that is not there
        gpus = []
    if requested == "cpu" and gpus:
        jax.config.update("jax_default_device", jax.devices("cpu")[0])
        gpus = []
    elif jax.config.values.get("jax_default_device") is not None:  # an earlier --device cpu
        jax.config.update("jax_default_device", None)
    if not gpus:
        return Device("cpu", "cpu", "jax")
    return Device("gpu", gpus[0].device_kind, "jax")


def _torch(requested) -> Device:
    if requested == "cpu" and "keras" not in sys.modules:
        os.environ["KERAS_TORCH_DEVICE"] = "cpu"  # read when Keras loads its torch backend
    import torch

    if requested == "cpu" or not torch.cuda.is_available():
        return Device("cpu", "cpu", "torch")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return Device("gpu", torch.cuda.get_device_name(0), "torch")


_SETUP_BY_BACKEND = {"tensorflow": _tensorflow, "jax": _jax, "torch": _torch}


@contextlib.contextmanager
def mixed_precision(enabled: bool = True):
    """Keras' global dtype policy mixed_float16 (float16 compute, float32 weights) for the
    models built inside, then the caller's own policy again. Backend-neutral."""
    if not enabled:
        yield
        return
    import keras

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(MIXED_POLICY)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def gpu_present() -> bool:
    """An NVIDIA device node is there (cheap; imports no framework)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))
