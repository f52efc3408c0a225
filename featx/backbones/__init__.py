"""Backbone registry: ``list_backbones``, ``get_backbone_cfg``, ``create_backbone``.

Importing this package registers the built-in backbones without importing
TensorFlow or Keras; models are built when a :class:`Backbone` is asked for one.
"""

from ._backbone import Backbone, create_backbone, load_keras_model
from ._config import BackboneCfg
from ._registry import (
    describe_backbones,
    get_backbone_cfg,
    list_backbones,
    register_backbone,
)
from ._weights import OFFLINE_ENV, is_offline
from . import efficientnet_lite, keras_apps  # noqa: F401,E402  (registration)

DEFAULT_BACKBONE = "efficientnet_lite0"

__all__ = [
    "Backbone",
    "BackboneCfg",
    "DEFAULT_BACKBONE",
    "OFFLINE_ENV",
    "create_backbone",
    "describe_backbones",
    "get_backbone_cfg",
    "is_offline",
    "list_backbones",
    "load_keras_model",
    "register_backbone",
]
