"""The fine-tuned model: the backbone's feature model under a new dropout + softmax head,
and which of its layers train in each stage."""

from __future__ import annotations

import keras
import numpy as np

from featx.errors import UsageError

HEAD_LAYERS = ("top_dropout", "pred")


def build_model(backbone, n_classes: int, *, dropout: float = 0.2, augmentation=None):
    """The training model and the inference model it wraps (they share weights).

    ``inference``: image -> ``backbone.feature_model()`` (featx Normalization, the nested
    ``base``, pooling), called with ``training=False`` -> Dropout ``top_dropout`` -> Dense
    ``pred`` (softmax, float32). ``train``: image -> ``augmentation`` (if any) ->
    ``inference``. Augmentation and dropout act only when the model runs with
    ``training=True`` (``fit``); the base always runs in inference mode.

    Returns
    -------
    train_model, inference_model : keras.Model
    """
    size = backbone.input_size
    features = backbone.feature_model()
    image = keras.Input((size, size, 3), dtype="float32", name="image")
    # training=False: BatchNormalization keeps its ImageNet statistics in both stages.
    x = features(image, training=False)
    x = keras.layers.Dropout(dropout, name="top_dropout")(x)
    probs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="pred")(x)
    inference = keras.Model(image, probs, name=f"finetuned_{backbone.cfg.name}")

    train_input = keras.Input((size, size, 3), dtype="float32", name="image")
    x = train_input if augmentation is None else augmentation(train_input)
    train = keras.Model(train_input, inference(x), name=f"finetune_{backbone.cfg.name}")
    return train, inference


def freeze_base(base) -> None:
    """Stage 1: nothing in the conv base is trainable."""
    base.trainable = False


def _sublayers(layer):
    """``layer`` and every layer nested in it (nested models/Sequentials)."""
    yield layer
    for sub in getattr(layer, "layers", ()):
        yield from _sublayers(sub)


def unfreeze_top(base, unfreeze) -> list[str]:
    """Stage 2: make the top ``unfreeze`` layers of ``base`` trainable, BN layers excepted.

    Parameters
    ----------
    base : keras.Model
        The conv base (``Backbone.base_model()``).
    unfreeze : int or "all"
        How many of the base's last layers (input layer not counted; layers without
        weights count, as in the keras-io recipe) become trainable, or all of them.
        A string of digits is read as a number.

    Returns
    -------
    list of str
        Names of the layers made trainable.
    """
    n_top = _check_unfreeze(unfreeze)
    layers = [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]
    top = layers if n_top is None else layers[max(len(layers) - n_top, 0):]
    chosen = {id(layer) for layer in top}
    base.trainable = True
    names = []
    for layer in layers:
        layer.trainable = id(layer) in chosen
        for sub in _sublayers(layer):
            if isinstance(sub, keras.layers.BatchNormalization):
                sub.trainable = False
        if layer.trainable and not isinstance(layer, keras.layers.BatchNormalization):
            names.append(layer.name)
    return names


def _check_unfreeze(unfreeze) -> int | None:
    """Number of layers to unfreeze; None for "all"."""
    if isinstance(unfreeze, str):
        if unfreeze.strip().lower() == "all":
            return None
        if unfreeze.strip().isdigit():  # "20" from a command line
            unfreeze = int(unfreeze)
    if isinstance(unfreeze, bool) or not isinstance(unfreeze, (int, np.integer)) or unfreeze < 1:
        raise UsageError(f"unfreeze must be a positive number of layers or 'all', got "
                         f"{unfreeze!r} (train the head only with epochs=0)")
    return int(unfreeze)


def _compile(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))
