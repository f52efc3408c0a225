"""A fine-tuned model on disk: ``NAME.keras`` and its JSON sidecar (class names,
preprocessing, recipe, metrics, versions, SHA-256), saved, checked and loaded; and its
predictions on image files."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from featx._io import check_artifact, featx_version, read_sidecar, save_artifact, sidecar_for
from featx.backbones import load_keras_model
from featx.errors import DataError, ImageDecodeError, UsageError
from featx.extraction import map_files

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1


def save_finetuned(model, path, metadata: dict) -> dict:
    """Write a Keras model to ``path`` (a ``.keras`` file) and its sidecar.

    Returns the sidecar's content: ``metadata`` plus ``sha256``.
    """
    return save_artifact(Path(path), lambda tmp: model.save(str(tmp)), metadata,
                         keep_suffix=True)  # model.save checks the suffix


def _versions() -> dict:
    import importlib

    import tensorflow as tf

    backend = keras.backend.backend()
    return {"featx": featx_version(), "keras": keras.__version__, "backend": backend,
            "tensorflow": tf.__version__,  # tf.data reads the images on every backend
            backend: importlib.import_module(backend).__version__}


def require_tf_data() -> None:
    """Fine-tuning reads images through tf.data, which Keras' JAX and PyTorch trainers take
    as they are; it needs TensorFlow installed, whichever backend trains."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        raise UsageError(f"featx finetune reads its images through tf.data, which needs "
                         f"TensorFlow installed (Keras then trains on "
                         f"{keras.backend.backend()}): pip install tensorflow")


def load_finetuned(path):
    """Load a model saved by :func:`finetune` and its sidecar metadata.

    Parameters
    ----------
    path : str or Path
        The ``.keras`` file; its sidecar ``.json`` must lie beside it.

    Returns
    -------
    model : keras.Model
        Images (float32 RGB in [0, 255], (None, S, S, 3), preprocessed as in
        ``metadata["preprocessing"]``) -> class probabilities.
    metadata : dict
        The sidecar: ``class_names``, ``backbone``, ``weights``, ``weights_id``,
        ``preprocessing``, ``split_params``, ``recipe``, ``metrics``, ``versions``,
        ``sha256``...

    Raises
    ------
    DataError
        The file or its sidecar is missing, the sidecar is not a fine-tuned model's, the
        file's SHA-256 differs from the recorded one (the model was replaced or damaged;
        it is then never loaded), or it holds Python code that Keras' safe mode refuses
        (a ``Lambda`` layer).
    """
    import featx.data.augment  # noqa: F401 - registers its layers for deserialisation

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    sidecar = sidecar_for(path)
    if not sidecar.is_file():
        raise DataError(f"{path}: its metadata file {sidecar.name} is missing; a fine-tuned "
                        "model needs it (class names, preprocessing)")
    metadata = read_sidecar(sidecar)
    if metadata.get("featx_model") != "finetune":
        raise DataError(f"{sidecar}: not the metadata of a featx fine-tuned model")
    check_artifact(path, metadata.get("sha256"), sidecar.name)
    return load_keras_model(path, compile=False), metadata


def predict_images(model, metadata, paths, batch_size: int = 32, *, on_error="raise"):
    """Class probabilities of image files under a model from :func:`load_finetuned`.

    Parameters
    ----------
    model : keras.Model
    metadata : dict
        Its sidecar; ``preprocessing`` says how files are resized and cropped.
    paths : sequence of str or Path
    batch_size : int
    on_error : {"raise", "nan"}
        For a file that cannot be decoded: raise :class:`ImageDecodeError`, or log a
        warning and return a row of NaN.

    Returns
    -------
    ndarray of float32, shape (len(paths), len(metadata["class_names"]))
    """
    if on_error not in ("raise", "nan"):
        raise UsageError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
    paths = [str(p) for p in paths]
    out, errors = probabilities_and_errors(model, metadata, paths, batch_size)
    for i, error in enumerate(errors):
        if error:
            if on_error == "raise":
                raise ImageDecodeError(paths[i], error)
            log.warning("cannot predict %s: %s", paths[i], error)
            out[i] = np.nan
    return out


def probabilities_and_errors(model, metadata, paths, batch_size: int = 32):
    """(probabilities, errors) of image files through the pipeline: an error row's
    probabilities are zeros and its error says why the file could not be read ("" else)."""
    n_classes = len(metadata["class_names"])
    if not paths:
        return np.zeros((0, n_classes), np.float32), []
    return map_files(paths, metadata["preprocessing"],
                     lambda images: model.predict_on_batch(images.astype(np.float32)),
                     n_classes, batch_size=batch_size, desc="predict")
