"""Training both stages (head warm-up, then the top of the base) with early stopping and one
checkpoint across them, and scoring the result on a split."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import keras
import numpy as np

from featx.classifiers import classification_metrics
from featx.errors import DataError

from ._model import _compile, _count, freeze_base, unfreeze_top

log = logging.getLogger(__name__)


class _StageColumn(keras.callbacks.Callback):
    """Adds ``stage`` to the epoch logs (so CSVLogger and History record it)."""

    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["stage"] = self.stage


class _Progress(keras.callbacks.Callback):
    """A tqdm bar per epoch on stderr, and one summary line per epoch."""

    def __init__(self, stage: int, enabled: bool):
        super().__init__()
        self.stage = stage
        self.enabled = enabled
        self.bar = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.params.get("steps"), unit="batch", leave=False,
                            desc=f"stage {self.stage} epoch {epoch + 1}", dynamic_ncols=True)

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, epoch, logs=None):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        logs = logs or {}
        line = (f"stage {self.stage} epoch {epoch + 1}: "
                + " ".join(f"{k}={logs[k]:.4f}" for k in
                           ("loss", "accuracy", "val_loss", "val_accuracy") if k in logs))
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            log.info(line)


def _callbacks(stage, checkpoint, history_path, patience, progress):
    callbacks = [_StageColumn(stage)]
    if patience is not None:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=patience, restore_best_weights=True))
    callbacks += [checkpoint, keras.callbacks.CSVLogger(str(history_path), append=stage == 2),
                  _Progress(stage, progress)]
    return callbacks


def _train_stages(train_model, base, train_ds, val_ds, *, warmup_epochs, epochs, unfreeze,
                  lr_head, lr_base, patience, checkpoint_path, history_path, progress):
    """Run both stages; leave the best weights (lowest val_loss) in ``train_model``."""
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(checkpoint_path), monitor="val_loss", save_best_only=True, save_weights_only=True)
    history = {}
    counts = {"stage1": 0, "stage2": 0}
    n_weights = {"stage1": 0, "stage2": 0}
    stage1_epochs = 0
    stages = [(1, warmup_epochs, lr_head), (2, epochs, lr_base)]
    for stage, n_epochs, learning_rate in stages:
        if n_epochs <= 0:
            continue
        if stage == 1:
            freeze_base(base)
        else:
            unfreeze_top(base, unfreeze)
        _compile(train_model, learning_rate)  # after changing `trainable`, or it is ignored
        key = f"stage{stage}"
        counts[key] = _count(train_model.trainable_weights)
        n_weights[key] = len(train_model.trainable_weights)
        log.info("stage %d: %d trainable weights (%d parameters), lr %g", stage,
                 n_weights[key], counts[key], learning_rate)
        start = stage1_epochs if stage == 2 else 0
        fit = train_model.fit(
            train_ds, validation_data=val_ds, initial_epoch=start, epochs=start + n_epochs,
            callbacks=_callbacks(stage, checkpoint, history_path, patience, progress),
            shuffle=False, verbose=0)  # the dataset shuffles itself (seeded)
        for name, values in fit.history.items():
            cast = int if name == "stage" else float
            history.setdefault(name, []).extend(cast(v) for v in values)
        if stage == 1:
            stage1_epochs = len(fit.epoch)
    if Path(checkpoint_path).exists():
        with warnings.catch_warnings():
            # The file also holds the optimizer of the stage that saved it; only the model
            # weights matter here.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            train_model.load_weights(str(checkpoint_path))
    else:
        log.warning("no epoch had a finite val_loss: keeping the last weights")
    return history, stage1_epochs, counts, n_weights


def _predict(model, ds):
    """Probabilities and labels of the decodable images of ``ds``, and which images of its
    sequence those are (a boolean mask)."""
    probs, labels, kept = [], [], []
    for images, y, weights in ds.as_numpy_iterator():  # numpy: what every backend takes
        keep = weights > 0
        probs.append(np.asarray(model.predict_on_batch(images))[keep])
        labels.append(y[keep])
        kept.append(keep)
    if not probs:
        return (np.zeros((0, model.output_shape[-1]), np.float32), np.zeros(0, np.int64),
                np.zeros(0, bool))
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(kept)


def _evaluate(model, ds, class_names, paths) -> tuple[dict, dict]:
    """Scores of one (unshuffled) split and its rows: (metrics, eval rows)."""
    start = time.perf_counter()
    probs, labels, kept = _predict(model, ds)
    seconds = time.perf_counter() - start
    if len(labels) == 0:
        raise DataError("no decodable image to evaluate on")
    predicted = probs.argmax(axis=1)
    result = classification_metrics(labels, predicted, class_names)
    result["predict_seconds"] = seconds
    result["predict_ms_per_image"] = 1000.0 * seconds / len(labels)
    rows = {"paths": np.asarray(paths)[kept], "y_true": labels, "y_pred": predicted,
            "confidence": probs.max(axis=1)}
    return result, rows
