"""The Keras backend featx runs on, found without importing a framework.

Keras 3 runs on TensorFlow, JAX or PyTorch, chosen by ``KERAS_BACKEND`` (or keras.json).
featx's backbones, Keras runtime and augmentation are plain Keras, so they run on any of
the three; :func:`require_backend` says in one line when the chosen one cannot run, and
:func:`set_random_seed` seeds Keras without loading TensorFlow beside another backend.
Which device runs the model is :mod:`featx.extraction`'s concern.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from featx.errors import UsageError

BACKENDS = ("tensorflow", "jax", "torch")
_INSTALL = {"tensorflow": "pip install tensorflow", "jax": "pip install jax",
            "torch": "pip install torch"}


def backend_name() -> str:
    """The backend Keras runs (or will run) on, without importing Keras."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    return os.environ.get("KERAS_BACKEND") or _configured_backend() or "tensorflow"


def _configured_backend() -> str | None:
    """The backend keras.json names, read as Keras reads it."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        return json.loads(Path(home, "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


def require_backend() -> str:
    """The backend's name; a UsageError (one line) when featx cannot run on it."""
    name = backend_name()
    if name not in BACKENDS:
        raise UsageError(f"KERAS_BACKEND={name}: featx runs on {', '.join(BACKENDS)}")
    if "keras" not in sys.modules and importlib.util.find_spec(name) is None:
        installed = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
        instead = (f"or set KERAS_BACKEND={installed[0]}" if installed
                   else "no Keras backend is installed")
        raise UsageError(f"KERAS_BACKEND={name}, but {name} is not installed: "
                         f"{_INSTALL[name]} ({instead})")
    return name


def set_random_seed(seed: int) -> None:
    """``keras.utils.set_random_seed`` without loading TensorFlow on the other backends.

    Keras also seeds TensorFlow whenever it is installed (for tf.data pipelines); featx has
    none outside the TensorFlow backend, and loading TensorFlow there would cost seconds and
    hundreds of MB. Keras' lazy handle on TensorFlow is marked unavailable for that call.
    """
    import keras

    if backend_name() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    from keras.src.utils import module_utils

    lazy = module_utils.tensorflow
    known, lazy._available = lazy._available, False
    try:
        keras.utils.set_random_seed(seed)
    finally:
        lazy._available = known
