"""The two-stage fine-tuning recipe, end to end: the split the cache records, the model, both
stages, scores on val (and test), the history plot and the saved model."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from featx._backend import set_random_seed
from featx._io import sidecar_for
from featx.backbones import create_backbone
from featx.cache.reconcile import resolve_split
from featx.data import excluded_paths
from featx.errors import UsageError
from featx.options import AugmentOptions, ExtractOptions, SplitOptions, reject_unknown
from featx.reports import plot_history

from ._inputs import image_dataset
from ._model import _check_unfreeze, build_model
from ._result import FinetuneResult, model_metadata
from ._saved import require_tf_data, save_finetuned
from ._train import _evaluate, _train_stages

log = logging.getLogger(__name__)

# The options of :class:`featx.options.ExtractOptions` fine-tuning uses: it trains on decoded
# images, so layer, pooling, runtime and the other extraction options do not apply.
FINETUNE_OPTIONS = ("backbone", "weights", "input_size", "cache_dir", "progress", "exclude",
                    *SplitOptions.names())


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How the network is trained (:func:`finetune`'s parameters of the same names);
    checked when made, before anything is built. ``unfreeze`` is a number or "all";
    ``augment``: the options, or None for no augmentation."""

    warmup_epochs: int = 5
    epochs: int = 10
    unfreeze: int | str = 20
    lr_head: float = 1e-3
    lr_base: float = 1e-5
    batch_size: int = 32
    dropout: float = 0.2
    augment: AugmentOptions | None = AugmentOptions()
    patience: int | None = 3
    seed: int = 42

    def __post_init__(self):
        if self.warmup_epochs < 0 or self.epochs < 0 or self.warmup_epochs + self.epochs == 0:
            raise UsageError("warmup_epochs and epochs must be >= 0 and not both 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.epochs:
            n_top = _check_unfreeze(self.unfreeze)
            object.__setattr__(self, "unfreeze", "all" if n_top is None else n_top)
        augment = AugmentOptions.coerce(self.augment)
        object.__setattr__(self, "augment", augment if augment.enabled else None)

    def to_dict(self) -> dict:
        """The recipe as the model's sidecar and the compare row record it."""
        out = dataclasses.asdict(self)
        out["augment"] = self.augment.to_dict() if self.augment else None
        return out


def finetune(data_dir, *, warmup_epochs=5, epochs=10, unfreeze=20, lr_head=1e-3, lr_base=1e-5,
             batch_size=32, dropout=0.2, augment=True, patience=3, out="models", name=None,
             options=None, **values) -> FinetuneResult:
    """Fine-tune an ImageNet backbone on an image folder in two stages; save the best model.

    Parameters
    ----------
    data_dir : str or Path
        Class folders, or train/ val/ [test/] folders (see :func:`featx.data.discover`).
    options : featx.options.ExtractOptions, optional
        Or the names of :data:`FINETUNE_OPTIONS` as keyword arguments (another name
        raises). ``backbone``, ``weights``, ``input_size``: as in
        :func:`featx.backbones.create_backbone` (``weights="random"`` is for tests only;
        the metadata and the plot say so). The split options: as in
        :func:`featx.extract`; an existing cache in ``cache_dir`` fixes the split (see
        :func:`featx.cache.reconcile.resolve_split`), so fine-tuning and the classifiers on
        cached features see the same images; nothing is extracted. A validation split is
        required (it drives early stopping and the checkpoint). ``seed`` also seeds
        weights init, shuffling and augmentation (``keras.utils.set_random_seed``, which
        seeds Python, NumPy and TF globally). ``progress``: tqdm bars and one line per
        epoch on stderr.
    warmup_epochs : int
        Maximum epochs of stage 1 (head only, ``lr_head``); 0 skips it.
    epochs : int
        Maximum epochs of stage 2 (top layers unfrozen, ``lr_base``); 0 skips it.
    unfreeze : int or "all"
        Layers of the base unfrozen in stage 2, counted from the top (BN excepted).
    lr_head, lr_base : float
        Adam learning rates of stages 1 and 2.
    batch_size : int
    dropout : float
        Rate of the ``top_dropout`` layer before the classifier.
    augment : bool, dict or AugmentOptions
        Training-batch augmentation (:class:`featx.options.AugmentOptions`); ``True``:
        the defaults, ``False``: none.
    patience : int or None
        Early stopping patience (epochs without a lower val_loss) in each stage; None
        disables early stopping (the best epoch is still the one saved).
    out : str or Path
        Output folder (created).
    name : str, optional
        Base name of the outputs; default ``finetune-<backbone>``.

    Returns
    -------
    FinetuneResult
    """
    started = time.perf_counter()
    reject_unknown(values, FINETUNE_OPTIONS, "fine-tuning option")
    require_tf_data()
    run = ExtractOptions.create(options, **values)
    recipe = Recipe(warmup_epochs, epochs, unfreeze, lr_head, lr_base, batch_size, dropout,
                    augment, patience, run.seed)
    backbone, manifest, split_source, n_files = _training_data(data_dir, run)
    paths = _output_paths(out, name or f"finetune-{backbone.cfg.name}")
    set_random_seed(run.seed)
    train_model, inference_model = build_model(
        backbone, len(manifest.class_names), dropout=recipe.dropout,
        augmentation=_augmentation(recipe))
    datasets = {split: image_dataset(manifest.root, *_split_indices(manifest, split),
                                     backbone.preprocessing, recipe.batch_size,
                                     training=split == "train", seed=run.seed)
                for split in ("train", "val", "test") if (manifest.splits == split).any()}
    train_start = time.perf_counter()
    history, stage1_epochs, counts, n_weights = _train_stages(
        train_model, backbone.base_model(), datasets["train"], datasets["val"],
        warmup_epochs=recipe.warmup_epochs, epochs=recipe.epochs, unfreeze=recipe.unfreeze,
        lr_head=recipe.lr_head, lr_base=recipe.lr_base, patience=recipe.patience,
        checkpoint_path=paths["checkpoint"], history_path=paths["history"],
        progress=run.progress)
    trained = dict(history=history, stage1_epochs=stage1_epochs, trainable_params=counts,
                   trainable_weights=n_weights, train_seconds=time.perf_counter() - train_start)
    evaluated = {split: _evaluate(inference_model, datasets[split], manifest.class_names,
                                  _split_indices(manifest, split)[0])
                 for split in ("val", "test") if split in datasets}
    result = _result(backbone, manifest, paths, recipe, trained, evaluated, split_source,
                     n_excluded=n_files - len(manifest))
    _plot(result, backbone)
    result.seconds = time.perf_counter() - started
    save_finetuned(inference_model, result.model_path,
                   model_metadata(result, backbone, manifest))
    paths["checkpoint"].unlink(missing_ok=True)
    return result


def _training_data(data_dir, run: ExtractOptions):
    """The backbone, the manifest it trains on (the split an existing cache recorded, less
    the exclude list), where the split came from, and the folder's image count."""
    if len(run.backbone_parts) > 1:
        raise UsageError(f"fine-tuning trains one backbone; {run.backbone!r} combines "
                         f"{len(run.backbone_parts)} (pick one of them)")
    backbone = create_backbone(run.backbone, run.weights, input_size=run.input_size,
                               seed=run.seed)
    if backbone.weights == "random":
        log.warning("RANDOM backbone weights: fine-tuning from scratch-initialised weights "
                    "is for tests only")
    manifest, split_source = resolve_split(data_dir, backbone, cache_dir=run.cache_dir,
                                           split=run.split)
    n_files = len(manifest)
    if run.exclude:
        manifest = manifest.without(excluded_paths(run.exclude, manifest))
    if not (manifest.splits == "val").any():
        raise UsageError("fine-tuning needs a validation split (val_fraction > 0 or a val/ "
                         "folder): it chooses the epoch to keep")
    return backbone, manifest, split_source, n_files


def _augmentation(recipe: Recipe):
    if recipe.augment is None:
        return None
    from featx.data.augment import build_augmentation  # imports Keras

    return build_augmentation(recipe.augment, recipe.seed)


def _result(backbone, manifest, paths, recipe, trained, evaluated, split_source, *,
            n_excluded) -> FinetuneResult:
    metrics = {split: scores for split, (scores, _) in evaluated.items()}
    val_losses = trained["history"].get("val_loss", [])
    best_epoch = _best_epoch(val_losses)
    return FinetuneResult(
        model_path=paths["model"], metadata_path=sidecar_for(paths["model"]),
        history_path=paths["history"], plot_path=paths["plot"], backbone=backbone.cfg.name,
        weights=backbone.weights, weights_id=backbone.weights_id,
        class_names=list(manifest.class_names),
        val_accuracy=metrics["val"]["accuracy"], val_macro_f1=metrics["val"]["macro_f1"],
        test_accuracy=metrics.get("test", {}).get("accuracy"),
        test_macro_f1=metrics.get("test", {}).get("macro_f1"),
        metrics=metrics, seconds=0.0, epochs_run=len(val_losses), best_epoch=best_epoch,
        best_val_loss=float(val_losses[best_epoch - 1]) if best_epoch else float("nan"),
        split_source=split_source,
        split_counts={s: int((manifest.splits == s).sum()) for s in ("train", "val", "test")},
        recipe=recipe.to_dict(), **trained,
        eval_rows={split: rows for split, (_, rows) in evaluated.items()},
        n_excluded=n_excluded)


def _plot(result: FinetuneResult, backbone) -> None:
    label = " (RANDOM weights: test only)" if backbone.weights == "random" else ""
    plot_history(result.history, result.plot_path, stage1_epochs=result.stage1_epochs,
                 best_epoch=result.best_epoch,
                 title=f"fine-tuning {backbone.cfg.name}{label}: val acc "
                       f"{result.val_accuracy:.3f}")


def _split_indices(manifest, split):
    index = np.flatnonzero(manifest.splits == split)
    return [manifest.paths[i] for i in index], manifest.labels[index]


def _output_paths(out, name: str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / f"{name}.keras", "history": out / f"{name}-history.csv",
             "plot": out / f"{name}-history.png",
             "checkpoint": out / f".{name}.best.weights.h5"}
    for stale in ("history", "checkpoint"):  # CSVLogger appends in stage 2
        paths[stale].unlink(missing_ok=True)
    return paths


def _best_epoch(val_losses) -> int:
    """1-based epoch of the lowest finite val_loss (the first of ties, as the checkpoint)."""
    finite = [v if np.isfinite(v) else np.inf for v in val_losses]
    if not finite or not np.isfinite(min(finite)):
        return 0
    return int(np.argmin(finite)) + 1
