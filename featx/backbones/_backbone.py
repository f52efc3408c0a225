"""The Backbone object: a configured backbone whose Keras models are built on demand."""

from __future__ import annotations

from featx.errors import DataError, UsageError

from ._config import POOLINGS, BackboneCfg, resize_size_for
from ._registry import _entry
from ._weights import resolve

# Bump when a port changes in a way that changes embeddings (part of key()).
IMPL_VERSION = 1
_POOLING_LAYERS = {  # (pooling, rank of the feature map) -> (keras layer class, name)
    ("avg", 4): ("GlobalAveragePooling2D", "avg_pool"),
    ("max", 4): ("GlobalMaxPooling2D", "max_pool"),
    ("avg", 3): ("GlobalAveragePooling1D", "avg_pool"),
    ("max", 3): ("GlobalMaxPooling1D", "max_pool"),
}


class Backbone:
    """A registered backbone with chosen weights, layer, pooling and input size.

    Use :func:`create_backbone` rather than this constructor. Nothing is built
    until :meth:`feature_model`, :meth:`base_model` or :meth:`classifier_model` is
    called; models are then cached on the object.

    Attributes
    ----------
    cfg : BackboneCfg
    weights : {"imagenet", "random", "file"}
    weights_id : str
        Identity of the weights for cache keys and reports.
    layer : str or None
        Name of the base layer whose output is pooled; None for the base output.
    pooling : {"avg", "max", "flatten"}
    input_size : int
    preprocessing : dict
        ``input_size``, ``resize_size``, ``interpolation``, ``normalization``, ``color``.
    """

    def __init__(self, entry, weights, weights_arg, weights_id, *, layer, pooling,
                 input_size, seed):
        self.cfg: BackboneCfg = entry.cfg
        self._entry = entry
        self.weights = weights
        self.weights_id = weights_id
        self._weights_arg = weights_arg
        self.layer = layer
        self.pooling = pooling
        self.input_size = input_size
        self.seed = seed
        resize = (self.cfg.resize_size if input_size == self.cfg.input_size
                  else resize_size_for(input_size))
        self.preprocessing = {
            "input_size": input_size,
            "resize_size": resize,
            "interpolation": self.cfg.interpolation,
            "normalization": self.cfg.normalization,
            "color": "RGB",
        }
        self._full_base = None
        self._base = None
        self._features = None
        self._classifier = None

    def __repr__(self):
        return (f"Backbone({self.cfg.name!r}, weights={self.weights_id!r}, layer={self.layer!r}, "
                f"pooling={self.pooling!r}, input_size={self.input_size})")

    @property
    def dim(self) -> int:
        """Embedding dimension; builds the feature model unless it is the cfg's."""
        if self._features is None and self.layer is None and self.pooling in ("avg", "max"):
            return self.cfg.num_features
        return int(self.feature_model().output.shape[-1])

    def key(self) -> dict:
        """Everything that changes the embeddings, JSON-serialisable."""
        return {
            "backbone": self.cfg.name,
            "family": self.cfg.family,
            "impl": IMPL_VERSION,
            "weights": self.weights,
            "weights_id": self.weights_id,
            "layer": self.layer,
            "pooling": self.pooling,
            "preprocessing": dict(self.preprocessing),
        }

    # ------------------------------------------------------------ models

    def _full(self):
        """The builder's conv base (always the complete one)."""
        if self._full_base is None:
            self._full_base = self._entry.builder(
                self.cfg, self._weights_arg, self.input_size, self.seed)
        return self._full_base

    def base_model(self):
        """The conv base nested in :meth:`feature_model`, a keras.Model named "base".

        Cut at :attr:`layer` when one was chosen; it shares its layers (and weights)
        with the complete base used by :meth:`classifier_model`.
        """
        if self._base is None:
            import keras

            full = self._full()
            output = full.outputs[0] if self.layer is None else self._layer_output(full)
            if output is full.outputs[0] and full.name == "base":
                self._base = full
            else:
                self._base = keras.Model(full.inputs, output, name="base")
        return self._base

    def _layer_output(self, full):
        try:
            return full.get_layer(self.layer).output
        except ValueError:
            names = [layer.name for layer in full.layers]
            raise UsageError(
                f"{self.cfg.name} has no layer {self.layer!r}; its last layers are "
                f"{', '.join(names[-6:])} ({len(names)} layers; "
                f"see Backbone.base_model().summary())") from None

    def _image_input(self):
        import keras

        from .layers import Normalization

        image = keras.Input((self.input_size, self.input_size, 3), dtype="float32",
                            name="image")
        return image, Normalization(self.cfg.normalization, name="normalization")(image)

    def feature_model(self):
        """keras.Model: float32 RGB images in [0, 255], (None, S, S, 3) -> (None, dim)."""
        if self._features is None:
            import keras

            image, x = self._image_input()
            x = self.base_model()(x)
            x = _pool(x, self.pooling, keras)
            self._features = keras.Model(image, x, name=f"{self.cfg.name}_features")
        return self._features

    def classifier_model(self):
        """keras.Model image -> class probabilities, or None without an ImageNet head."""
        if self._classifier is None:
            head = None
            if self._entry.head_builder is not None:
                head = self._entry.head_builder(self.cfg, self._weights_arg, self.seed)
            if head is None:
                return None
            import keras

            full = self._full()
            if self.layer is None:
                base = self.base_model()
            else:
                base = full if full.name == "base" else keras.Model(full.inputs, full.outputs,
                                                                    name="base")
            image, x = self._image_input()
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base(x))
            self._classifier = keras.Model(image, head(x), name=f"{self.cfg.name}_classifier")
        return self._classifier


def _pool(x, pooling, keras):
    """Pool a feature map to (None, dim); float32 output even under mixed precision."""
    rank = len(x.shape)
    if rank == 2:
        if x.dtype == "float32":
            return x
        return keras.layers.Activation("linear", dtype="float32", name="to_float32")(x)
    if pooling == "flatten":
        return keras.layers.Flatten(name="flatten", dtype="float32")(x)
    layer_cls, name = _POOLING_LAYERS[(pooling, rank)]
    return getattr(keras.layers, layer_cls)(name=name, dtype="float32")(x)


def create_backbone(name: str, weights="imagenet", *, layer: str | None = None,
                    pooling: str | None = None, input_size: int | None = None,
                    seed: int = 0, reduced_decode: bool = False) -> Backbone:
    """Configure a registered backbone; builds nothing yet.

    Parameters
    ----------
    name : str
        A name from :func:`list_backbones`.
    weights : str or path-like, default "imagenet"
        ``"imagenet"``, ``"random"`` (seeded by ``seed``) or a local weights file
        (``.pth`` for EfficientNet-Lite, ``.weights.h5``/``.h5`` for Keras models).
    layer : str, optional
        Name of a base layer to take features from (default: the base output).
    pooling : {"avg", "max", "flatten"}, optional
        Default ``cfg.default_pooling``; ignored when the layer output is 2-D.
    input_size : int, optional
        Square input size; the resize size scales with it (``round(size / 0.875)``).
    seed : int, default 0
    reduced_decode : bool, default False
        Decode JPEGs at 1/2, 1/4 or 1/8 scale when they are that much larger than the
        resize size (faster on large photos; slightly different pixels, so it joins the
        preprocessing and the cache key).

    Raises
    ------
    UnknownBackboneError, UsageError, WeightsUnavailableError
    """
    entry = _entry(name)
    cfg = entry.cfg
    pooling = cfg.default_pooling if pooling is None else pooling
    if pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r}; one of {', '.join(POOLINGS)}")
    size = cfg.input_size if input_size is None else int(input_size)
    if size < cfg.min_input_size:
        raise UsageError(f"{name}: input size {size} is below its minimum {cfg.min_input_size}")
    layer = layer if layer is not None else cfg.default_layer
    imagenet_file = entry.imagenet_file(cfg, size) if entry.imagenet_file else None
    kind, arg, weights_id = resolve(cfg, weights, seed, imagenet_file)
    backbone = Backbone(entry, kind, arg, weights_id, layer=layer, pooling=pooling,
                        input_size=size, seed=int(seed))
    if reduced_decode:
        backbone.preprocessing["reduced_decode"] = True
    return backbone


def load_keras_model(path, *, featx_layers: bool = True, **kwargs):
    """``keras.saving.load_model`` in safe mode, with featx's custom layers registered.

    Keras only finds ``featx>Normalization`` once :mod:`featx.backbones.layers` has
    been imported; this does that first (unless ``featx_layers`` is False: a file that
    must load without featx). ``kwargs`` go to ``load_model``. Safe mode is always on, so
    a file holding Python code (a ``Lambda`` layer's function) is refused, with a
    DataError, instead of running that code.
    """
    import keras

    if featx_layers:
        from . import layers  # noqa: F401  (registers the featx layers)
    try:
        return keras.saving.load_model(str(path), safe_mode=True, **kwargs)
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise
        raise DataError(f"refusing to load {path}: it holds Python code (a Lambda layer or "
                        "a function) that would run when loaded, and featx loads Keras "
                        "models in safe mode only") from None
