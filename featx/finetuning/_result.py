"""What a fine-tuning run gives: :class:`FinetuneResult`, its compare row (the comparison
point of ``featx compare --finetune``) and the sidecar metadata of its saved model."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from featx.base import Result
from featx.classifiers import CompareRow, uncertainty_summary
from featx.errors import UsageError

from ._saved import MODEL_FORMAT_VERSION, _versions


@dataclasses.dataclass
class FinetuneResult(Result):
    """What :func:`finetune` did and where it wrote it.

    Attributes
    ----------
    model_path, metadata_path, history_path, plot_path : Path
    backbone, weights, weights_id : str
    class_names : list of str
    val_accuracy, val_macro_f1 : float
        Of the saved (best) model on the validation split. The validation split also
        chose the best epoch, so these are slightly optimistic; use a test split for an
        unbiased number.
    test_accuracy, test_macro_f1 : float or None
        When the data has a test split.
    metrics : dict
        Split name -> :func:`featx.classifiers.classification_metrics` (``n``, ``accuracy``,
        ``balanced_accuracy``, ``macro_f1``, ``per_class``, ``confusion_matrix``) plus
        ``predict_seconds`` and ``predict_ms_per_image``.
    seconds : float
        Wall time of the whole call (data discovery, training, evaluation, plot) up to
        saving the model; the sidecar records the same number.
    train_seconds : float
        Wall time of the two ``fit`` calls (training and per-epoch validation).
    epochs_run : int
        Epochs actually run, both stages together (early stopping may cut each stage).
    stage1_epochs : int
        The stage boundary: epochs 1..stage1_epochs were stage 1.
    best_epoch : int
        1-based epoch whose weights were kept (lowest ``val_loss``); 0 when no epoch ran.
    best_val_loss : float
    trainable_params, trainable_weights : dict
        ``{"stage1": n, "stage2": n}``: trainable scalars / weight tensors in each stage
        (stage 2 is 0 when it did not run).
    split_source : {"cache", "discover"}
        Whether the split came from an existing feature cache or from ``discover``.
    split_counts : dict
        Images per split.
    recipe : dict
        The options that define the run (epochs, unfreeze, learning rates, augmentation...).
    history : dict
        Metric name -> list over epochs, both stages (``stage`` included).
    eval_rows : dict
        Split -> ``paths`` (relative, decodable images only), ``y_true``, ``y_pred`` and
        ``confidence`` (top probability) arrays: what the compare report's intervals and
        paired tests need. Left out of :meth:`to_dict`.
    n_excluded : int
        Images of the folder that ``exclude`` (an exclude list) left out.
    """

    model_path: Path
    metadata_path: Path
    history_path: Path
    plot_path: Path
    backbone: str
    weights: str
    weights_id: str
    class_names: list
    val_accuracy: float
    val_macro_f1: float
    test_accuracy: float | None
    test_macro_f1: float | None
    metrics: dict
    seconds: float
    train_seconds: float
    epochs_run: int
    stage1_epochs: int
    best_epoch: int
    best_val_loss: float
    trainable_params: dict
    trainable_weights: dict
    split_source: str
    split_counts: dict
    recipe: dict
    history: dict
    eval_rows: dict = dataclasses.field(default_factory=dict)
    n_excluded: int = 0  # images of the folder an exclude list left out

    _internal = ("history", "eval_rows")

    def to_dict(self) -> dict:
        """What ``featx finetune --json`` prints: ``model`` (the saved file), then every
        field, paths as strings, history and eval rows left out."""
        return {"model": str(self.model_path), **super().to_dict()}


def finetune_row(result, backbone=None, weights=None, split=None) -> CompareRow:
    """The fine-tuning run's row of the ``compare`` results (:class:`CompareRow`).

    Parameters
    ----------
    result : featx.finetuning.FinetuneResult
        Or anything with its attributes (``metrics``, ``backbone``, ``weights``,
        ``weights_id``, ``split_counts``, ``train_seconds``, ``recipe``, ``epochs_run``,
        ``stage1_epochs``, ``best_epoch``, ``class_names``, ``model_path``).
    backbone, weights : str, optional
        Labels for the row; default the result's backbone name and weights kind.
    split : str, optional
        Split the scores come from; default "test" when the run had one, else "val".
        Note that the val split also chose the best epoch.

    Returns
    -------
    CompareRow
        ``clf="finetune"``, ``backbone``, ``weights``, ``weights_id``, ``split``,
        ``n_train``, ``n_eval``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
        ``fit_seconds`` (wall time of both training stages; images are decoded every
        epoch), ``predict_seconds``, ``predict_ms_per_image`` (end to end from decoded
        images), ``extract_seconds`` (None: nothing is cached), ``tuned`` (False),
        ``cv_splits`` (0), ``cv_score`` (None), ``best_params`` (the recipe, epochs run and
        best epoch), ``class_weight`` (None), ``seed``, ``class_names``, ``per_class``,
        ``confusion_matrix``, ``model_path``; when the result has ``eval_rows``, the
        intervals, calibration and coverage fields of
        :func:`featx.classifiers.uncertainty_summary` and ``eval_rows``. No ``estimator``.
    """
    split = split or ("test" if "test" in result.metrics else "val")
    if split not in result.metrics:
        raise UsageError(f"the fine-tuning run has no {split!r} scores "
                         f"(it has {', '.join(result.metrics)})")
    scores = result.metrics[split]
    row = CompareRow(
        clf="finetune", backbone=backbone or result.backbone, weights=weights or result.weights,
        weights_id=result.weights_id, split=split,
        n_train=result.split_counts.get("train", 0), n_eval=scores["n"],
        accuracy=scores["accuracy"], balanced_accuracy=scores["balanced_accuracy"],
        macro_f1=scores["macro_f1"], fit_seconds=result.train_seconds,
        predict_seconds=scores["predict_seconds"],
        predict_ms_per_image=scores["predict_ms_per_image"], extract_seconds=None,
        tuned=False, cv_splits=0, cv_score=None,
        best_params={**result.recipe, "epochs_run": result.epochs_run,
                     "stage1_epochs": result.stage1_epochs, "best_epoch": result.best_epoch},
        class_weight=None, seed=result.recipe.get("seed"),
        class_names=list(result.class_names), per_class=scores["per_class"],
        confusion_matrix=scores["confusion_matrix"], model_path=str(result.model_path))
    rows = (getattr(result, "eval_rows", None) or {}).get(split)
    if rows is not None:
        row.update(uncertainty_summary(rows["y_true"], rows["y_pred"], rows["confidence"],
                                       len(result.class_names)))
        row.eval_rows = rows
    return row


def model_metadata(result: FinetuneResult, backbone, manifest) -> dict:
    """The sidecar of the saved model (:func:`save_finetuned` adds sha256)."""
    return {
        "featx_model": "finetune",
        "format_version": MODEL_FORMAT_VERSION,
        "model_file": result.model_path.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "class_names": result.class_names,
        "backbone": backbone.cfg.name,
        "weights": backbone.weights,
        "weights_id": backbone.weights_id,
        "random_weights": backbone.weights == "random",
        "preprocessing": backbone.preprocessing,
        "input": {"shape": [None, backbone.input_size, backbone.input_size, 3], "dtype": "float32",
                  "range": [0, 255], "color": "RGB"},
        "data_root": str(manifest.root),
        "split_params": manifest.split_params,
        "split_source": result.split_source,
        "split_counts": result.split_counts,
        "recipe": result.recipe,
        "metrics": result.metrics,
        "epochs_run": result.epochs_run,
        "stage1_epochs": result.stage1_epochs,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "trainable_params": result.trainable_params,
        "train_seconds": result.train_seconds,
        "seconds": result.seconds,
    }
