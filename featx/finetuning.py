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
(:mod:`featx.augment`) sits at the front of the training model and is active on training
batches only.

Outputs in ``out`` (``NAME`` defaults to ``finetune-<backbone>``):

``NAME.keras``
    The end-to-end inference model (images -> class probabilities; no augmentation layers).
    Input: float32 RGB in [0, 255] of shape (None, S, S, 3), resized and centre-cropped as in
    ``metadata["preprocessing"]``. Normalisation happens inside the model.
``NAME.json``
    Sidecar metadata: class names, backbone, weights id, preprocessing, split, recipe,
    metrics, versions and the sha256 of ``NAME.keras`` (written and checked by
    :mod:`featx.persist`); see :func:`load_finetuned`.
``NAME-history.csv``
    Keras' ``CSVLogger`` rows of both stages (``epoch`` is Keras' 0-based index) plus a
    ``stage`` column (1 or 2).
``NAME-history.png``
    Train/val accuracy and loss per epoch, the stage boundary as a vertical line
    (:func:`featx.reports.plot_history`).

Scores come from :func:`featx.classifiers.classification_metrics`, the compare row and its
notes from :func:`featx.reports.finetune_row` and :func:`featx.reports.finetune_notes`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path

import keras
import numpy as np

from featx.classifiers import classification_metrics
from featx.devices import set_random_seed
from featx.errors import DataError, ImageDecodeError, UsageError
from featx.options import ExtractOptions, SplitOptions, reject_unknown
from featx.persist import load_keras_model, save_keras_model, sidecar_for
from featx.reports import plot_history

log = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
HEAD_LAYERS = ("top_dropout", "pred")
# Validation images are cached decoded in memory when they take less than this.
VAL_CACHE_BYTES = 256 * 2**20


# ----- result ----------------------------------------------------------------------
@dataclasses.dataclass
class FinetuneResult:
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

    def to_dict(self) -> dict:
        """JSON-serialisable summary (paths as strings, history and eval rows left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("history", "eval_rows")}
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


# ----- input pipeline --------------------------------------------------------------
def image_dataset(root, paths, labels, preprocessing: dict, batch_size: int, *,
                  training: bool = False, seed: int = 0, cache: bool | None = None):
    """A ``tf.data.Dataset`` of (images, labels, sample weights) batches.

    Images are decoded, resized and centre-cropped by :meth:`featx.pipeline.ImageReader.load`
    in parallel (``tf.numpy_function``), exactly as extraction does, and come out as float32
    RGB in [0, 255]. A file that cannot be decoded yields a black image with sample weight 0
    (and one warning), so it counts for nothing while the dataset keeps a known length.
    Nothing here is random except, when ``training``, the order (a seeded shuffle,
    reshuffled every epoch); augmentation lives in the model, not in this pipeline.

    Parameters
    ----------
    root : str or Path
        Folder the ``paths`` are relative to (absolute paths are used as they are).
    paths : sequence of str
    labels : sequence of int
    preprocessing : dict
        ``input_size``, ``resize_size``, ``interpolation`` and optionally
        ``reduced_decode`` (``Backbone.preprocessing``).
    batch_size : int
    training : bool
        Shuffle (seeded by ``seed``).
    seed : int
    cache : bool, optional
        Keep decoded images in memory after the first pass; default: when not training
        and they take less than 256 MiB.
    """
    import tensorflow as tf

    from featx.pipeline import ImageReader

    reader = ImageReader(paths, preprocessing, root=Path(root))
    paths, size = reader.paths, reader.size
    warned = set()

    def load(index):
        image, error = reader.load(int(index))  # black where the file cannot be decoded
        if not error:
            return image, np.float32(1)
        path = paths[int(index)]
        if path not in warned:
            warned.add(path)
            log.warning("skipped %s: %s", path, error)
        return image, np.float32(0)

    label_table = tf.constant(np.asarray(labels, dtype=np.int64))

    def decode(index):
        image, weight = tf.numpy_function(load, [index], [tf.uint8, tf.float32])
        image.set_shape((size, size, 3))
        weight.set_shape(())
        return image, tf.gather(label_table, index), weight

    def to_float(images, labels, weights):
        return tf.cast(images, tf.float32), labels, weights

    ds = tf.data.Dataset.range(len(paths))
    if training:
        ds = ds.shuffle(max(len(paths), 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is None:
        cache = not training and len(paths) * size * size * 3 <= VAL_CACHE_BYTES
    if cache:
        ds = ds.cache()  # uint8, before batching: a quarter of the float32 size
    ds = ds.batch(batch_size).map(to_float)
    return ds.prefetch(tf.data.AUTOTUNE)


# ----- model -----------------------------------------------------------------------
def build_model(net, n_classes: int, *, dropout: float = 0.2, augmentation=None):
    """The training model and the inference model it wraps (they share weights).

    ``inference``: image -> ``net.feature_model()`` (featx Normalization, the nested
    ``base``, pooling), called with ``training=False`` -> Dropout ``top_dropout`` -> Dense
    ``pred`` (softmax, float32). ``train``: image -> ``augmentation`` (if any) ->
    ``inference``. Augmentation and dropout act only when the model runs with
    ``training=True`` (``fit``); the base always runs in inference mode.

    Returns
    -------
    train_model, inference_model : keras.Model
    """
    size = net.input_size
    features = net.feature_model()
    image = keras.Input((size, size, 3), dtype="float32", name="image")
    # training=False: BatchNormalization keeps its ImageNet statistics in both stages.
    x = features(image, training=False)
    x = keras.layers.Dropout(dropout, name="top_dropout")(x)
    probs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="pred")(x)
    inference = keras.Model(image, probs, name=f"finetuned_{net.cfg.name}")

    train_input = keras.Input((size, size, 3), dtype="float32", name="image")
    x = train_input if augmentation is None else augmentation(train_input)
    train = keras.Model(train_input, inference(x), name=f"finetune_{net.cfg.name}")
    return train, inference


def freeze_base(base) -> None:
    """Stage 1: nothing in the conv base is trainable."""
    base.trainable = False


def _sublayers(layer):
    """``layer`` and every layer nested in it (nested models/Sequentials)."""
    yield layer
    for sub in getattr(layer, "layers", ()):
        yield from _sublayers(sub)


def unfreeze_top(base, unfreeze) -> list[str]:
    """Stage 2: make the top ``unfreeze`` layers of ``base`` trainable, BN layers excepted.

    Parameters
    ----------
    base : keras.Model
        The conv base (``Backbone.base_model()``).
    unfreeze : int or "all"
        How many of the base's last layers (input layer not counted; layers without
        weights count, as in the keras-io recipe) become trainable, or all of them.
        A string of digits is read as a number.

    Returns
    -------
    list of str
        Names of the layers made trainable.
    """
    n_top = _check_unfreeze(unfreeze)
    layers = [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]
    top = layers if n_top is None else layers[max(len(layers) - n_top, 0):]
    chosen = {id(layer) for layer in top}
    base.trainable = True
    names = []
    for layer in layers:
        layer.trainable = id(layer) in chosen
        for sub in _sublayers(layer):
            if isinstance(sub, keras.layers.BatchNormalization):
                sub.trainable = False
        if layer.trainable and not isinstance(layer, keras.layers.BatchNormalization):
            names.append(layer.name)
    return names


def _check_unfreeze(unfreeze) -> int | None:
    """Number of layers to unfreeze; None for "all"."""
    if isinstance(unfreeze, str):
        if unfreeze.strip().lower() == "all":
            return None
        if unfreeze.strip().isdigit():  # "20" from a command line
            unfreeze = int(unfreeze)
    if isinstance(unfreeze, bool) or not isinstance(unfreeze, (int, np.integer)) or unfreeze < 1:
        raise UsageError(f"unfreeze must be a positive number of layers or 'all', got "
                         f"{unfreeze!r} (train the head only with epochs=0)")
    return int(unfreeze)


def _compile(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


# ----- callbacks -------------------------------------------------------------------
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


# ----- training --------------------------------------------------------------------
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


# ----- evaluation ------------------------------------------------------------------
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


# ----- saving and loading ----------------------------------------------------------
def _versions() -> dict:
    import importlib

    import tensorflow as tf

    from featx import __version__

    backend = keras.backend.backend()
    return {"featx": __version__, "keras": keras.__version__, "backend": backend,
            "tensorflow": tf.__version__,  # tf.data reads the images on every backend
            backend: importlib.import_module(backend).__version__}


def require_tf_data() -> None:
    """Fine-tuning reads images through tf.data, which Keras' JAX and PyTorch trainers take
    as they are; it needs TensorFlow installed, whichever backend trains."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        raise UsageError(f"featx finetune reads its images through tf.data, which needs "
                         f"TensorFlow installed (Keras then trains on "
                         f"{keras.backend.backend()}): pip install tensorflow")


def load_finetuned(path):
    """Load a model saved by :func:`finetune` and its sidecar metadata.

    Parameters
    ----------
    path : str or Path
        The ``.keras`` file; its sidecar ``.json`` must lie beside it.

    Returns
    -------
    model : keras.Model
        Images (float32 RGB in [0, 255], (None, S, S, 3), preprocessed as in
        ``metadata["preprocessing"]``) -> class probabilities.
    metadata : dict
        The sidecar: ``class_names``, ``backbone``, ``weights``, ``weights_id``,
        ``preprocessing``, ``split_params``, ``recipe``, ``metrics``, ``versions``,
        ``sha256``...

    Raises
    ------
    DataError
        The file or its sidecar is missing, or the file's sha256 differs from the one
        recorded (the model was replaced or damaged); see
        :func:`featx.persist.load_keras_model`.
    """
    return load_keras_model(path)


def predict_images(model, metadata, paths, batch_size: int = 32, *, on_error="raise"):
    """Class probabilities of image files under a model from :func:`load_finetuned`.

    Parameters
    ----------
    model : keras.Model
    metadata : dict
        Its sidecar; ``preprocessing`` says how files are resized and cropped.
    paths : sequence of str or Path
    batch_size : int
    on_error : {"raise", "nan"}
        For a file that cannot be decoded: raise :class:`ImageDecodeError`, or log a
        warning and return a row of NaN.

    Returns
    -------
    ndarray of float32, shape (len(paths), len(metadata["class_names"]))
    """
    if on_error not in ("raise", "nan"):
        raise UsageError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
    paths = [str(p) for p in paths]
    out, errors = probabilities_and_errors(model, metadata, paths, batch_size)
    for i, error in enumerate(errors):
        if error:
            if on_error == "raise":
                raise ImageDecodeError(paths[i], error)
            log.warning("cannot predict %s: %s", paths[i], error)
            out[i] = np.nan
    return out


def probabilities_and_errors(model, metadata, paths, batch_size: int = 32):
    """(probabilities, errors) of image files through the pipeline: an error row's
    probabilities are zeros and its error says why the file could not be read ("" else)."""
    from featx.pipeline import ArrayWriter, ImageReader, run_pipeline

    n_classes = len(metadata["class_names"])
    if not paths:
        return np.zeros((0, n_classes), np.float32), []
    reader = ImageReader(paths, metadata["preprocessing"], batch_size)
    writer = ArrayWriter(len(paths), n_classes)
    run_pipeline(reader, lambda images: model.predict_on_batch(images.astype(np.float32)),
                 writer, progress=False, desc="predict")
    return writer.embeddings, writer.errors


# ----- the recipe ------------------------------------------------------------------
def _augment_options(augment):
    from featx.augment import AugmentOptions

    options = AugmentOptions.coerce(augment)
    return options if options.enabled else None


def _split_indices(manifest, split):
    index = np.flatnonzero(manifest.splits == split)
    return [manifest.paths[i] for i in index], manifest.labels[index]


# The options of :class:`featx.options.ExtractOptions` fine-tuning uses: it trains on decoded
# images, so layer, pooling, runtime and the other extraction options do not apply.
FINETUNE_OPTIONS = ("backbone", "weights", "input_size", "cache_dir", "progress", "exclude",
                    *SplitOptions.names())


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
        :func:`featx.reconcile.resolve_split`), so fine-tuning and the classifiers on
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
        Training-batch augmentation (:class:`featx.augment.AugmentOptions`); ``True``:
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
    from featx.augment import build_augmentation
    from featx.backbones import create_backbone
    from featx.data import excluded_paths
    from featx.reconcile import resolve_split

    started = time.perf_counter()
    reject_unknown(values, FINETUNE_OPTIONS, "fine-tuning option")
    require_tf_data()
    run = ExtractOptions.create(options, **values)
    seed = run.seed
    unfreeze = _check_recipe(warmup_epochs, epochs, unfreeze, dropout)
    augmenting = _augment_options(augment)
    if len(run.backbone_parts) > 1:
        raise UsageError(f"fine-tuning trains one backbone; {run.backbone!r} combines "
                         f"{len(run.backbone_parts)} (pick one of them)")
    net = create_backbone(run.backbone, run.weights, input_size=run.input_size, seed=seed)
    if net.weights == "random":
        log.warning("RANDOM backbone weights: fine-tuning from scratch-initialised weights "
                    "is for tests only")
    manifest, split_source = resolve_split(data_dir, net, cache_dir=run.cache_dir,
                                           split=run.split)
    n_files = len(manifest)
    if run.exclude:
        manifest = manifest.without(excluded_paths(run.exclude, manifest))
    if not (manifest.splits == "val").any():
        raise UsageError("fine-tuning needs a validation split (val_fraction > 0 or a val/ "
                         "folder): it chooses the epoch to keep")
    paths = _output_paths(out, name or f"finetune-{net.cfg.name}")

    set_random_seed(seed)
    augmentation = build_augmentation(augmenting, seed) if augmenting else None
    train_model, inference_model = build_model(net, len(manifest.class_names), dropout=dropout,
                                               augmentation=augmentation)
    datasets = {split: image_dataset(manifest.root, *_split_indices(manifest, split),
                                     net.preprocessing, batch_size, training=split == "train",
                                     seed=seed)
                for split in ("train", "val", "test") if (manifest.splits == split).any()}

    train_start = time.perf_counter()
    history, stage1_epochs, counts, n_weights = _train_stages(
        train_model, net.base_model(), datasets["train"], datasets["val"],
        warmup_epochs=warmup_epochs, epochs=epochs, unfreeze=unfreeze, lr_head=lr_head,
        lr_base=lr_base, patience=patience, checkpoint_path=paths["checkpoint"],
        history_path=paths["history"], progress=run.progress)
    train_seconds = time.perf_counter() - train_start

    evaluated = {split: _evaluate(inference_model, datasets[split], manifest.class_names,
                                  _split_indices(manifest, split)[0])
                 for split in ("val", "test") if split in datasets}
    metrics = {split: scores for split, (scores, _) in evaluated.items()}
    val_losses = history.get("val_loss", [])
    best_epoch = _best_epoch(val_losses)
    recipe = {"warmup_epochs": warmup_epochs, "epochs": epochs, "unfreeze": unfreeze,
              "lr_head": lr_head, "lr_base": lr_base, "batch_size": batch_size,
              "dropout": dropout, "augment": augmenting.to_dict() if augmenting else None,
              "patience": patience, "seed": seed}
    label = " (RANDOM weights: test only)" if net.weights == "random" else ""
    plot_history(history, paths["plot"], stage1_epochs=stage1_epochs, best_epoch=best_epoch,
                 title=f"fine-tuning {net.cfg.name}{label}: val acc "
                       f"{metrics['val']['accuracy']:.3f}")

    result = FinetuneResult(
        model_path=paths["model"], metadata_path=sidecar_for(paths["model"]),
        history_path=paths["history"], plot_path=paths["plot"], backbone=net.cfg.name,
        weights=net.weights, weights_id=net.weights_id,
        class_names=list(manifest.class_names),
        val_accuracy=metrics["val"]["accuracy"], val_macro_f1=metrics["val"]["macro_f1"],
        test_accuracy=metrics.get("test", {}).get("accuracy"),
        test_macro_f1=metrics.get("test", {}).get("macro_f1"),
        metrics=metrics, seconds=0.0, train_seconds=train_seconds,
        epochs_run=len(val_losses), stage1_epochs=stage1_epochs, best_epoch=best_epoch,
        best_val_loss=float(val_losses[best_epoch - 1]) if best_epoch else float("nan"),
        trainable_params=counts, trainable_weights=n_weights, split_source=split_source,
        split_counts={s: int((manifest.splits == s).sum()) for s in ("train", "val", "test")},
        recipe=recipe, history=history,
        eval_rows={split: rows for split, (_, rows) in evaluated.items()},
        n_excluded=n_files - len(manifest))
    result.seconds = time.perf_counter() - started
    save_keras_model(inference_model, result.model_path, _metadata(result, net, manifest))
    paths["checkpoint"].unlink(missing_ok=True)
    return result


def _check_recipe(warmup_epochs, epochs, unfreeze, dropout):
    """Validate the options before anything is built; return ``unfreeze`` normalised."""
    if warmup_epochs < 0 or epochs < 0 or warmup_epochs + epochs == 0:
        raise UsageError("warmup_epochs and epochs must be >= 0 and not both 0")
    if not 0.0 <= dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {dropout}")
    if epochs == 0:
        return unfreeze
    n_top = _check_unfreeze(unfreeze)
    return "all" if n_top is None else n_top


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


def _metadata(result: FinetuneResult, net, manifest) -> dict:
    """The sidecar of the saved model (:func:`featx.persist.save_keras_model` adds sha256)."""
    return {
        "featx_model": "finetune",
        "format_version": MODEL_FORMAT_VERSION,
        "model_file": result.model_path.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "class_names": result.class_names,
        "backbone": net.cfg.name,
        "weights": net.weights,
        "weights_id": net.weights_id,
        "random_weights": net.weights == "random",
        "preprocessing": net.preprocessing,
        "input": {"shape": [None, net.input_size, net.input_size, 3], "dtype": "float32",
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

