"""Using a saved model on new images: :class:`SavedModel` loads either kind (a classifier
from ``featx fit``, a network from ``featx finetune``) and scores files exactly as the model
was trained (cached rows where the content is cached, else its own backbone,
preprocessing and runtime); :func:`label_rows` turns scores into ``predict``'s rows.

Modules, in import order: ``_labels``, ``_features`` (a classifier's features for new
files), ``_saved_model``.
"""

from ._features import (content_hash, embed_files, embeddings_for, model_backbone, model_int8,
                        model_mapper, model_parts, model_store, part_embeddings)
from ._labels import UNKNOWN, Predictions, check_unknown_free, label_rows
from ._saved_model import SavedModel

__all__ = [
    "Predictions", "SavedModel", "UNKNOWN", "check_unknown_free", "content_hash",
    "embed_files", "embeddings_for", "label_rows", "model_backbone", "model_int8",
    "model_mapper", "model_parts", "model_store", "part_embeddings",
]
