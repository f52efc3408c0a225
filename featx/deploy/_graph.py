"""The deployable Keras graph: uint8 images -> normalisation as stock layers -> the backbone's
own layers -> the head; no featx layer left, so the file loads without featx. Keras is
imported when a graph is built."""

from __future__ import annotations

import numpy as np

from ._head import Head
from ._source import Source


def deploy_model(source: Source):
    """keras.Model: uint8 RGB images (None, S, S, 3) -> scores, stock Keras layers only."""
    import keras

    from featx.backbones.layers import Normalization

    size = int(source.preprocessing["input_size"])
    image = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = image
    for layer in source.features.layers:  # Input -> Normalization -> base -> pooling
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, Normalization):
            for stock in _stock_normalization(layer.mode):
                x = stock(x)
            continue
        x = layer(x)
    if source.kind == "finetune":
        return keras.Model(image, source.head(x), name="featx_export")
    return keras.Model(image, _head_layers(source.head, x, keras), name="featx_export")


def _stock_normalization(mode: str) -> list:
    """featx's Normalization as stock Keras layers; Rescaling casts the uint8 input."""
    import keras

    from featx.backbones.layers import CAFFE_MEAN_BGR, TORCH_MEAN, TORCH_STD

    if mode == "lite":  # (x - 127) / 128, exactly (both constants are dyadic)
        return [keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")]
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")]
    if mode == "torch":
        scale = [1 / (255 * s) for s in TORCH_STD]
        offset = [-m / s for m, s in zip(TORCH_MEAN, TORCH_STD)]
        return [keras.layers.Rescaling(scale, offset=offset, name="normalize")]
    if mode == "caffe":  # RGB -> BGR minus the mean: a fixed 1x1 convolution
        flip = np.zeros((1, 1, 3, 3), np.float32)
        flip[0, 0, [2, 1, 0], [0, 1, 2]] = 1.0
        conv = keras.layers.Conv2D(3, 1, name="rgb_to_bgr_minus_mean", trainable=False)
        conv.build((None, None, None, 3))
        conv.set_weights([flip, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
        return [keras.layers.Rescaling(1.0, name="to_float"), conv]
    return [keras.layers.Rescaling(1.0, name="to_float")]


def _head_layers(head: Head, x, keras):
    if head.l2_normalize:
        x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize")(x)
    dense = keras.layers.Dense(head.kernel.shape[1], name="head", dtype="float32")
    x = dense(x)
    dense.set_weights([head.kernel, head.bias])
    if head.activation == "ovr":
        x = keras.layers.Activation("log_sigmoid", name="log_sigmoid")(x)
    if head.activation in ("ovr", "softmax"):
        x = keras.layers.Softmax(name="probabilities")(x)
    return x
