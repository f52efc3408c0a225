"""Fine-tuning: the comparison point for classifiers trained on frozen, cached embeddings.

The recipe follows the keras-io transfer-learning guide and its EfficientNet example:

1. **Stage 1 (warm-up)**: the conv base is frozen (``base.trainable = False``) and called in
   inference mode; only the new head (``top_dropout`` + ``pred``) learns, with
   ``Adam(lr_head)``.
2. **Stage 2 (fine-tuning)**: the top ``unfreeze`` layers of the base (or all of them) become
   trainable, except every ``BatchNormalization`` layer, which stays frozen and so keeps
   running in inference mode (Keras 3: a non-trainable BN uses its moving statistics, and
   the base is also called with ``training=False``). Recompiled with ``Adam(lr_base)``,
   training continues from the epoch where stage 1 stopped.

Both stages early-stop on ``val_loss`` (restoring the stage's best weights). One
``ModelCheckpoint`` (``save_best_only``, weights only, ``out/.NAME.best.weights.h5``) spans
both stages and is loaded back at the end, so the weights kept and saved are those of the
epoch with the lowest ``val_loss`` overall, even when stage 2 never beats stage 1. The
saved ``.keras`` is then the inference part of that model, without the augmentation
layers (nor optimizer state), and the checkpoint file is removed. Augmentation
(:mod:`featx.data.augment`) sits at the front of the training model and is active on training
batches only.

Outputs in ``out`` (``NAME`` defaults to ``finetune-<backbone>``):

``NAME.keras``
    The end-to-end inference model (images -> class probabilities; no augmentation layers).
    Input: float32 RGB in [0, 255] of shape (None, S, S, 3), resized and centre-cropped as in
    ``metadata["preprocessing"]``. Normalisation happens inside the model.
``NAME.json``
    Sidecar metadata: class names, backbone, weights id, preprocessing, split, recipe,
    metrics, versions and the sha256 of ``NAME.keras`` (written by :func:`save_finetuned`,
    checked by :func:`load_finetuned`).
``NAME-history.csv``
    Keras' ``CSVLogger`` rows of both stages (``epoch`` is Keras' 0-based index) plus a
    ``stage`` column (1 or 2).
``NAME-history.png``
    Train/val accuracy and loss per epoch, the stage boundary as a vertical line
    (:func:`featx.reports.plot_history`).

Scores come from :func:`featx.classifiers.classification_metrics`, the compare row from
:func:`finetune_row` and its notes from :func:`featx.reports.finetune_notes`.

Modules, in import order: ``_inputs`` (tf.data), ``_model``, ``_train`` (both stages),
``_saved`` (the .keras file and its sidecar), ``_result``, ``_recipe`` (:func:`finetune`).
"""

from ._inputs import image_dataset
from ._model import HEAD_LAYERS, build_model, freeze_base, unfreeze_top
from ._recipe import FINETUNE_OPTIONS, Recipe, finetune
from ._result import FinetuneResult, finetune_row
from ._saved import (MODEL_FORMAT_VERSION, load_finetuned, predict_images,
                     probabilities_and_errors, require_tf_data, save_finetuned)

__all__ = [
    "FINETUNE_OPTIONS", "FinetuneResult", "HEAD_LAYERS", "MODEL_FORMAT_VERSION", "Recipe",
    "build_model", "finetune", "finetune_row", "freeze_base", "image_dataset",
    "load_finetuned", "predict_images", "probabilities_and_errors", "require_tf_data",
    "save_finetuned", "unfreeze_top",
]
