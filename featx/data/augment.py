"""Data augmentation as Keras preprocessing layers, a preview grid, and the augmenter of
cached views (:class:`ViewAugmenter`). Its options are :class:`featx.options.AugmentOptions`.

The same layers serve two purposes:

* fine-tuning (:mod:`featx.finetuning`) puts them at the front of the training model, so each
  training batch is augmented on the fly and validation/prediction (``training=False``) never is;
* ``extract(..., augment=K)`` stores K augmented embeddings ("views") of every training image
  in the feature cache (:mod:`featx.extraction`, with :class:`ViewAugmenter`), which is the only
  way augmentation can reach classifiers trained on cached features.

Images are float RGB in [0, 255] of the backbone's input size (already resized and cropped as
in ``Backbone.preprocessing``); the augmented output stays in that range.

Importing this module imports Keras (for the serialisable :class:`RandomBrightnessFactor`),
so ``featx.data`` does not import it: ``from featx.data import augment``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import keras
import numpy as np
from keras import ops

from featx.errors import UsageError
from featx.options import AugmentOptions

from ._images import load_for_model

log = logging.getLogger("featx.data")  # one logger for the package


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
    options = AugmentOptions.or_default(options)
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

    if n < 2:
        raise UsageError(f"augment preview needs n >= 2 cells, got {n}")
    options = AugmentOptions.or_default(options)
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


# ----- augmenting cached views ----------------------------------------------------
class ViewAugmenter:
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
        import keras

        layer = build_augmentation(self.options, view_seed(self.seed, view))
        ops = keras.ops

        def augment(images):
            x = layer(ops.cast(images, "float32"), training=True)
            # Back to uint8, as if the augmented image had been saved and read again.
            return ops.cast(ops.clip(ops.round(x), 0.0, 255.0), "uint8")

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            return tf.function(augment, reduce_retracing=True)  # several times eager speed
        return lambda images: ops.convert_to_numpy(augment(images))


def view_seed(seed: int, view: int) -> int:
    """Seed of the augmentation that computes view ``view`` (distinct per view)."""
    return int(np.random.SeedSequence([int(seed), int(view)]).generate_state(1)[0] % (2**31 - 64))
