"""Keras layers featx puts into its models (importing this module imports Keras).

Registered under the ``featx`` package so ``.keras`` files holding them load back
with ``keras.saving.load_model`` (Keras imports this module by name when needed).
"""

from __future__ import annotations

import keras
from keras import ops

from ._config import NORMALIZATIONS

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="featx")
class Normalization(keras.layers.Layer):
    """Map RGB pixel values in [0, 255] to what a backbone's weights expect.

    Parameters
    ----------
    mode : {"lite", "tf", "caffe", "torch", "none"}
        ``lite``: (x - 127) / 128; ``tf``: x / 127.5 - 1; ``caffe``: RGB to BGR, minus
        the ImageNet BGR mean; ``torch``: x / 255, minus ImageNet mean, over std;
        ``none``: unchanged (the model rescales itself).
    """

    def __init__(self, mode="none", **kwargs):
        super().__init__(**kwargs)
        if mode not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization mode {mode!r}; one of {NORMALIZATIONS}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "lite":
            return (x - 127.0) / 128.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, x.dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN, x.dtype)
            std = ops.convert_to_tensor(TORCH_STD, x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
