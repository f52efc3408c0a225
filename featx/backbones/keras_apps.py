"""Backbones from ``keras.applications`` (ImageNet weights are downloaded by Keras).

Keras is imported inside the builder only. ImageNet weights: a copy already in
Keras' cache (``$KERAS_HOME/models``, default ``~/.keras/models``) is loaded without
touching the network; otherwise Keras downloads it, unless ``FEATX_OFFLINE=1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featx._backend import set_random_seed

from ._config import BackboneCfg, resize_size_for
from ._registry import register_backbone
from ._weights import OFFLINE_ENV, is_offline, load_keras_weights, offline_error

_MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class _App:
    constructor: str  # attribute of keras.applications
    input_size: int
    num_features: int
    normalization: str
    license: str
    notop_file: str  # Keras' cache file name for include_top=False weights
    min_input_size: int = 32


_APPS = {
    "mobilenet_v2": _App("MobileNetV2", 224, 1280, "tf", "Apache-2.0",
                         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"),
    "resnet50": _App("ResNet50", 224, 2048, "caffe",
                     "MIT (weights converted from the original Caffe release)",
                     "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg16": _App("VGG16", 224, 512, "caffe", "CC-BY-4.0 (VGG weights)",
                  "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "inception_v3": _App("InceptionV3", 299, 2048, "tf", "Apache-2.0",
                         "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         min_input_size=75),
    "efficientnet_b0": _App("EfficientNetB0", 224, 1280, "none", "Apache-2.0",
                            "efficientnetb0_notop.h5"),
}


def _keras_cache_dirs() -> list[Path]:
    """Where Keras' ``get_file`` keeps downloaded weights, in lookup order."""
    if "KERAS_HOME" in os.environ:
        home = Path(os.environ["KERAS_HOME"]).expanduser()
    else:
        user = Path.home()
        home = (user if os.access(user, os.W_OK) else Path("/tmp")) / ".keras"
    dirs = [home / "models"]
    if not os.access(home, os.W_OK):  # also when missing: get_file then uses /tmp/.keras
        dirs.append(Path("/tmp/.keras/models"))
    return dirs


def keras_weights_file(cfg: BackboneCfg, input_size: int) -> tuple[str, Path | None]:
    """(Keras cache file name, cached path or None) of the ImageNet no-top weights."""
    # MobileNetV2 ships one file per input size and falls back to 224.
    rows = input_size if input_size in _MOBILENET_V2_SIZES else 224
    file_name = _APPS[cfg.name].notop_file.format(rows=rows)
    for directory in _keras_cache_dirs():
        if (directory / file_name).is_file():
            return file_name, directory / file_name
    return file_name, None


def _construct(cfg: BackboneCfg, input_size: int, weights):
    import keras

    constructor = getattr(keras.applications, _APPS[cfg.name].constructor)
    return constructor(include_top=False, weights=weights,
                       input_shape=(input_size, input_size, 3))


def _download(cfg: BackboneCfg, input_size: int):
    try:
        return _construct(cfg, input_size, "imagenet")
    except Exception as exc:
        text = " ".join(str(exc).split())
        if "URL fetch failure" in text or isinstance(exc, (ConnectionError, TimeoutError)):
            raise offline_error(cfg, text[:200]) from exc
        raise


def build_base(cfg: BackboneCfg, weights: str, input_size: int, seed: int):
    """Registry builder: ``keras.applications`` model without its top."""
    if weights == "imagenet":
        file_name, cached = keras_weights_file(cfg, input_size)
        if cached is None and is_offline():
            dirs = ", ".join(str(d) for d in _keras_cache_dirs())
            raise offline_error(cfg, f"{OFFLINE_ENV}=1 and no {file_name} in {dirs}")
        if cached is None:
            return _download(cfg, input_size)
        weights = cached
    set_random_seed(seed)
    model = _construct(cfg, input_size, None)
    if weights != "random":
        load_keras_weights(model, weights)
    return model


def _register():
    for name, app in _APPS.items():
        cfg = BackboneCfg(
            name=name,
            family="keras_applications",
            input_size=app.input_size,
            resize_size=resize_size_for(app.input_size),
            interpolation="area",
            normalization=app.normalization,
            num_features=app.num_features,
            default_layer=None,
            default_pooling="avg",
            weights_source=(f"keras.applications.{app.constructor}: downloaded by Keras "
                            "into $KERAS_HOME/models (default ~/.keras/models)"),
            offline=False,
            license=app.license,
            min_input_size=app.min_input_size,
        )
        register_backbone(cfg, build_base, imagenet_file=keras_weights_file)


_register()
