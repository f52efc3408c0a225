"""Data augmentation as Keras preprocessing layers, a preview grid, and augmented cache views.

The same layers serve two purposes:

* fine-tuning (:mod:`featx.finetuning`) puts them at the front of the training model, so each
  training batch is augmented on the fly and validation/prediction (``training=False``) never is;
* ``extract(..., augment=K)`` stores K augmented embeddings ("views") of every training image
  in the feature cache (:func:`extract_augmented_views`), which is the only way augmentation can
  reach classifiers trained on cached features.

Images are float RGB in [0, 255] of the backbone's input size (already resized and cropped as
in ``Backbone.preprocessing``); the augmented output stays in that range.

Importing this module imports Keras (for the serialisable :class:`RandomBrightnessFactor`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import keras
import numpy as np
from keras import ops

from featx.errors import UsageError

log = logging.getLogger(__name__)


# ----- options ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """Which random transformations to apply; ``None``, ``0`` or ``False`` disables one.

    The defaults follow the keras-io transfer-learning tutorials.

    Parameters
    ----------
    zoom : float or None, default 0.5
        Maximum zoom-in, as the fraction of the side cropped away: each image keeps a
        centred square of ``1 - zoom`` to 1 times its side, scaled back up (0.5: up to 2x).
        ``keras.layers.RandomZoom(height_factor=(-zoom, 0))``; width follows height.
    rotation : float or None, default 15
        Maximum rotation in degrees, either way (``RandomRotation(rotation / 360)``).
    brightness : float or None, default 0.2
        Pixel values are multiplied by a factor drawn uniformly from
        ``[1 - brightness, 1 + brightness]`` per image, then clipped to [0, 255]
        (:class:`RandomBrightnessFactor`; Keras' ``RandomBrightness`` adds an offset instead).
    flip : bool, default True
        Random horizontal flip.
    """

    zoom: float | None = 0.5
    rotation: float | None = 15.0
    brightness: float | None = 0.2
    flip: bool = True

    def __post_init__(self):
        if self.zoom is not None and not 0.0 <= self.zoom < 1.0:
            raise UsageError(f"augment zoom must be in [0, 1), got {self.zoom}")
        if self.rotation is not None and not 0.0 <= self.rotation <= 180.0:
            raise UsageError(f"augment rotation must be in [0, 180] degrees, got {self.rotation}")
        if self.brightness is not None and not 0.0 <= self.brightness < 1.0:
            raise UsageError(f"augment brightness must be in [0, 1), got {self.brightness}")

    @classmethod
    def none(cls) -> "AugmentOptions":
        """Options with every transformation disabled."""
        return cls(zoom=None, rotation=None, brightness=None, flip=False)

    @classmethod
    def coerce(cls, value) -> "AugmentOptions":
        """Options from ``True``/``None``/``False``, a dict of fields, or options.

        ``True`` and ``{}`` give the defaults; ``False`` and ``None`` disable everything.
        """
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if value is None or value is False:
            return cls.none()
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise UsageError(f"unknown augment option(s): {', '.join(sorted(unknown))}")
            return cls(**value)
        raise UsageError(f"augment must be True, False, a dict or AugmentOptions, got {value!r}")

    @property
    def enabled(self) -> bool:
        """True when at least one transformation is on."""
        return bool(self.zoom or self.rotation or self.brightness or self.flip)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----- layers ----------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="featx")
class RandomBrightnessFactor(keras.layers.Layer):
    """Multiply each image by a random factor in ``[lower, upper]``, then clip.

    Keras' ``RandomBrightness`` adds a random offset (a fraction of ``value_range``); this
    layer scales instead, so ``factor=0.2`` means x0.8 to x1.2 and black stays black.

    Parameters
    ----------
    factor : float or (float, float)
        ``f`` for ``[1 - f, 1 + f]``, or the (lower, upper) multipliers.
    value_range : (float, float)
        Outputs are clipped to this range.
    seed : int, optional

    Notes
    -----
    Identity when called with ``training=False``; like Keras' augmentation layers it
    augments by default when called directly.
    """

    def __init__(self, factor=0.2, value_range=(0.0, 255.0), seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(factor, (tuple, list)):
            self.lower, self.upper = (float(v) for v in factor)
        else:
            self.lower, self.upper = 1.0 - float(factor), 1.0 + float(factor)
        if not 0.0 <= self.lower <= self.upper:
            raise ValueError(f"invalid brightness factor {factor!r}")
        self.value_range = tuple(float(v) for v in value_range)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        images = ops.cast(images, self.compute_dtype)
        shape = (ops.shape(images)[0], 1, 1, 1)
        factors = keras.random.uniform(shape, self.lower, self.upper,
                                       dtype=self.compute_dtype, seed=self.seed_generator)
        return ops.clip(images * factors, *self.value_range)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": (self.lower, self.upper),
                "value_range": self.value_range, "seed": self.seed}


def build_augmentation(options=None, seed: int = 0):
    """The augmentation as a ``keras.Sequential`` named "augmentation".

    Parameters
    ----------
    options : AugmentOptions, dict, bool or None
        See :meth:`AugmentOptions.coerce`; ``None`` means the defaults here.
    seed : int
        Seeds the layers (layer ``i`` gets ``seed + i``), so a fresh Sequential built with
        the same seed draws the same transformations for the same sequence of batches.

    Returns
    -------
    keras.Sequential
        float images in [0, 255], (None, S, S, 3) -> same shape. Random only when called
        with ``training=True`` (or directly, as Keras' layers default to training); an
        identity layer when every option is off.

    Notes
    -----
    Order: flip, rotation, zoom, brightness. Zooming in after rotating crops away part of
    the reflected corners that the rotation fills in.
    """
    options = AugmentOptions() if options is None else AugmentOptions.coerce(options)
    seed = int(seed)
    layers = []
    if options.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, name="flip"))
    if options.rotation:
        layers.append(keras.layers.RandomRotation(
            float(options.rotation) / 360.0, fill_mode="reflect", seed=seed + 1,
            name="rotation"))
    if options.zoom:
        layers.append(keras.layers.RandomZoom(
            height_factor=(-float(options.zoom), 0.0), fill_mode="reflect", seed=seed + 2,
            name="zoom"))
    if options.brightness:
        layers.append(RandomBrightnessFactor(float(options.brightness), seed=seed + 3,
                                             name="brightness"))
    if not layers:
        layers.append(keras.layers.Identity(name="identity"))
    return keras.Sequential(layers, name="augmentation")


# ----- preview ---------------------------------------------------------------------
def augment_preview(image_path, out_png, options=None, n: int = 16, seed: int = 0,
                    size: int = 224, resize_size: int | None = None) -> Path:
    """Write a grid of ``n`` cells: the image as the model sees it, then augmented versions.

    Parameters
    ----------
    image_path : str or Path
        Any image :func:`featx.data.read_image` can decode.
    out_png : str or Path
        Output PNG (parent folders are created).
    options : AugmentOptions, dict, bool or None
        Default: :class:`AugmentOptions` defaults.
    n : int
        Cells in the grid, the original included (at least 2).
    seed : int
    size, resize_size : int
        The image is resized (shorter side ``resize_size``, default ``round(size/0.875)``)
        and centre-cropped to ``size`` first, as a backbone's preprocessing does.

    Returns
    -------
    Path of the PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featx.data import load_for_model

    if n < 2:
        raise UsageError(f"augment preview needs n >= 2 cells, got {n}")
    options = AugmentOptions() if options is None else AugmentOptions.coerce(options)
    resize_size = resize_size or round(size / 0.875)
    image = load_for_model(image_path, size, resize_size)
    batch = np.repeat(image[None].astype(np.float32), n - 1, axis=0)
    augmented = np.asarray(build_augmentation(options, seed)(batch, training=True))
    cells = [image] + [np.clip(np.rint(a), 0, 255).astype(np.uint8) for a in augmented]

    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(cells[i])
            ax.set_title("original" if i == 0 else f"#{i}", fontsize=8)
    fig.suptitle(_describe(options), fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _describe(options: AugmentOptions) -> str:
    parts = []
    if options.zoom:
        parts.append(f"zoom in up to {1 / (1 - options.zoom):.2g}x")
    if options.rotation:
        parts.append(f"rotation ±{options.rotation:g}°")
    if options.brightness:
        parts.append(f"brightness x{1 - options.brightness:g}-{1 + options.brightness:g}")
    if options.flip:
        parts.append("horizontal flip")
    return ", ".join(parts) or "no augmentation"


# ----- augmented views in the feature cache ----------------------------------------
def view_seed(seed: int, view: int) -> int:
    """Seed of the augmentation that computes view ``view`` (distinct per view)."""
    return int(np.random.SeedSequence([int(seed), int(view)]).generate_state(1)[0] % (2**31 - 64))


RECIPE_ATTR = "augment_recipe"


def augment_recipe(options, seed: int) -> dict:
    """What the cached views were drawn with: the options and the seed, normalised.

    A disabled transformation is ``None`` whether it was given as ``0``, ``False`` or
    ``None``, and numbers are floats, so equivalent spellings compare equal.
    """
    options = AugmentOptions() if options is None else AugmentOptions.coerce(options)
    normalised = {name: (float(value) if value else None)
                  for name, value in options.to_dict().items() if name != "flip"}
    normalised["flip"] = bool(options.flip)
    return {"options": normalised, "seed": int(seed)}


def recorded_recipe(cache) -> dict | None:
    """The recipe recorded in ``cache`` (:data:`RECIPE_ATTR`), or None."""
    value = cache.attr(RECIPE_ATTR)
    if value is None:
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def _drop_views_of_other_recipe(cache, recipe: dict):
    """Drop every augmented view unless the cache records ``recipe`` (or holds none).

    Returns the cache to go on with (a new object when rows were dropped).
    """
    recorded = recorded_recipe(cache)
    if recorded == recipe:
        return cache
    views = cache.rows()["view"] if cache.n_rows else np.zeros(0, dtype=np.int16)
    stale = views > 0
    if stale.any():
        if recorded is None:
            reason = "no augmentation recipe was recorded with them"
        else:
            reason = (f"the augmentation recipe changed from {json.dumps(recorded, sort_keys=True)}"
                      f" to {json.dumps(recipe, sort_keys=True)}")
        log.info("recomputing augmented views: dropping %d cached views because %s",
                 int(stale.sum()), reason)
        cache = cache.compact(~stale)
    return cache


def missing_views(rows: dict, k: int) -> dict[int, list[int]]:
    """Training images lacking some of views 1..k: row index of view 0 -> missing views.

    An augmented view counts as present when a row with the same path, content hash and
    view number exists; so views of a changed file are recomputed (the extractor drops
    the old ones), and views of val/test images are never asked for.
    """
    views = rows["view"]
    present = {(p, h, int(v)) for p, h, v in zip(rows["paths"], rows["sha256"], views) if v > 0}
    todo = {}
    for i in np.flatnonzero((views == 0) & (rows["split"] == "train")):
        path, sha = rows["paths"][i], rows["sha256"][i]
        missing = [v for v in range(1, k + 1) if (path, sha, v) not in present]
        if missing:
            todo[int(i)] = missing
    return todo


class _ViewAugmenter:
    """uint8 batch -> augmented uint8 batch, one seeded Sequential per view number."""

    def __init__(self, options: AugmentOptions, seed: int):
        self.options = options
        self.seed = seed
        self._functions = {}

    def __call__(self, images, view: int):
        if view not in self._functions:
            self._functions[view] = self._build(view)
        return self._functions[view](images)

    def _build(self, view):
        import tensorflow as tf

        layer = build_augmentation(self.options, view_seed(self.seed, view))

        @tf.function(reduce_retracing=True)
        def augment(images):
            x = layer(tf.cast(images, tf.float32), training=True)
            # Back to uint8, as if the augmented image had been saved and read again.
            return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

        return augment


def extract_augmented_views(cache, net, root, k: int, options=None, seed: int = 0,
                            batch_size: int = 32, progress: bool = True):
    """Append K augmented views of every training image that does not have them yet.

    The recipe (options and seed, :func:`augment_recipe`) is recorded in the cache
    attribute :data:`RECIPE_ATTR`. When the cache holds views of another recipe, or of an
    unrecorded one, every augmented view is dropped first and recomputed.

    Parameters
    ----------
    cache : featx.cache.FeatureCache
        Open for writing (the caller holds its lock); its view-0 rows are current. Dropping
        views rewrites the file and closes this object: go on with the returned cache.
    net : featx.backbones.Backbone
        The backbone the cache was made with (its model is built only if work remains).
    root : Path
        Data directory the cached paths are relative to.
    k : int
        Views per training image (view numbers 1..k). Rows of views above ``k`` that are
        already cached are kept.
    options : AugmentOptions, dict, bool or None
        The augmentation; ``{}``/``None`` mean the defaults.
    seed : int
        View ``v`` is drawn by a Sequential seeded with ``view_seed(seed, v)``, batch after
        batch in cache row order. Keras draws a batch's transformations from one generator,
        so a view depends on the seed and on which images were computed in the same run,
        not on (path, view) alone; distinct view numbers never share a generator.
    batch_size : int
    progress : bool
        tqdm bar on stderr.

    Returns
    -------
    cache : featx.cache.FeatureCache
        The open cache to go on with: ``cache`` itself, or its reopened replacement when
        views were dropped (then ``cache`` is closed). If this raises, the replacement
        is closed here; ``cache`` is left to the caller, as always.
    done : int
        Number of (image, view) embeddings computed and appended; 0 when nothing was
        missing (then the model is not even built).
    """
    if k <= 0:
        return cache, 0
    options = AugmentOptions() if options is None else AugmentOptions.coerce(options)
    if not options.enabled:
        raise UsageError("augmented views need at least one augmentation option enabled")
    recipe = augment_recipe(options, seed)
    original = cache
    try:
        cache = _drop_views_of_other_recipe(cache, recipe)
        if recorded_recipe(cache) != recipe:
            # recorded before any view is written, so views of a run that dies are kept
            # (and completed) by a rerun with the same recipe, and dropped by another
            cache.set_attrs(**{RECIPE_ATTR: json.dumps(recipe, sort_keys=True)})
        return cache, _append_missing_views(cache, net, root, k, options, seed, batch_size,
                                            progress)
    except BaseException:
        if cache is not original:
            cache.close()  # the caller only knows (and closes) the original object
        raise


def _append_missing_views(cache, net, root, k, options, seed, batch_size, progress) -> int:
    from tqdm.auto import tqdm

    from featx.extraction import EmbeddingMapper, ImageReader

    rows = cache.rows()
    todo = missing_views(rows, k)
    if not todo:
        return 0
    sources = np.fromiter(todo.keys(), dtype=np.int64)  # increasing: cache row order
    reader = ImageReader(root, rows["paths"][sources], net.preprocessing, batch_size)
    # with the batch size, the mapper pads short batches (a view's subset of a batch, the
    # last batch) instead of having oneDNN build kernels for each new shape
    mapper = EmbeddingMapper(net, batch_size)
    augmenter = _ViewAugmenter(options, seed)
    total = sum(len(v) for v in todo.values())
    done = 0
    with tqdm(total=total, unit="view", disable=not progress, desc="augment",
              dynamic_ncols=True) as bar:
        for indices, images, errors in reader.dataset():
            batch_rows = sources[indices.numpy()]
            ok = np.array([not e for e in errors.numpy()], dtype=bool)
            for path, error in zip(rows["paths"][batch_rows[~ok]], errors.numpy()[~ok]):
                log.warning("no augmented views of %s: %s", path, error.decode())
            done += _embed_views(cache, rows, todo, batch_rows, images, ok, k, augmenter,
                                 mapper, bar)
    return done


def _embed_views(cache, rows, todo, batch_rows, images, ok, k, augmenter, mapper, bar) -> int:
    """Augment, embed and append every missing view of one decoded batch."""
    done = 0
    for view in range(1, k + 1):
        select = np.array([ok[j] and view in todo[int(r)] for j, r in enumerate(batch_rows)])
        if not select.any():
            continue
        embeddings = mapper(augmenter(images.numpy()[select], view))
        source = batch_rows[select]
        columns = {name: values[source] for name, values in rows.items()}
        columns["view"] = np.full(len(source), view, dtype=np.int16)
        cache.append(embeddings, **columns)
        done += len(source)
        bar.update(len(source))
    return done
