"""What an export is made of: a saved model's feature network, its head and its record."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from featx.errors import DataError, UsageError
from featx.inference import SavedModel

from ._head import linear_head


@dataclasses.dataclass(frozen=True)
class Source:
    """What is exported: a saved model's feature network and head."""

    saved: SavedModel
    features: object  # keras.Model: float32 images in [0, 255] -> embeddings
    head: object  # Head, or the fine-tuned model's Dense layer
    output: str  # "probabilities" | "decision_values"
    backbone: object = None  # the Backbone of a classifier's features (None: fine-tuned)

    @property
    def path(self) -> Path:
        return self.saved.path

    @property
    def kind(self) -> str:  # "classifier" | "finetune"
        return self.saved.kind

    @property
    def classes(self) -> list:
        return self.saved.classes

    @property
    def metadata(self) -> dict:
        return self.saved.metadata

    @property
    def preprocessing(self) -> dict:
        return self.saved.preprocessing


def load_source(model_path, *, trust_pickle: bool = False) -> Source:
    """A saved model (``.skops``/``.json`` from fit, ``.keras`` from finetune), checked.

    Refuses (DataError) a file whose SHA-256 differs from its sidecar's, and a classifier
    whose recorded cache key is not what this featx's backbone gives; a featx 0.1
    ``.joblib`` pickle (UsageError) unless ``trust_pickle``.
    """
    model = SavedModel.load(model_path, trust_pickle=trust_pickle)
    if model.kind == "finetune":
        import keras

        features = next((layer for layer in model.model.layers
                         if isinstance(layer, keras.Model)), None)
        if features is None:
            raise DataError(f"{model.path}: no feature model inside; not a featx fine-tuned "
                            "model")
        return Source(model, features, model.model.get_layer("pred"), "probabilities")
    _check_exportable(model.path, model.metadata)
    head = linear_head(model.model, model.metadata.get("clf") or "unnamed")
    backbone = model.backbone()
    return Source(model, backbone.feature_model(), head, head.output, backbone)


def _check_exportable(path, metadata) -> None:
    """UsageError for features one graph of stock layers does not reproduce yet."""
    if metadata.get("parts"):
        raise UsageError(f"{path}: a model on combined backbones ({metadata['backbone']}) "
                         "cannot be exported yet (each part has its own input size); use "
                         "`featx predict`, or export a model fitted on one backbone")
    if metadata["cache_key"].get("flip_average"):
        raise UsageError(f"{path}: a model on flip-averaged features cannot be exported yet; "
                         "use `featx predict`, or fit without --flip-average to export")
