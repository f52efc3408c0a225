"""The options of extraction, of the split, of augmentation and of the audit: one frozen
object each, listed here once, with the valid values of every choice.

Every entry point (``extract``, ``fit``, ``compare``, ``finetune``) takes an
:class:`ExtractOptions` as ``options=`` or the same names as keyword arguments; the CLI
builds one object per command. A name that is not an option raises at once with the valid
names, so a typo (``batchsize=64``) never goes silently unused.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from featx.errors import UsageError

RUNTIMES = ("auto", "onnx", "keras")
ENGINES = ("local", "ray")  # what drives the pipeline: this process, or a Ray cluster
PRECISIONS = ("fp32", "int8")
CALIBRATIONS = ("minmax", "percentile", "entropy")  # int8: ONNX Runtime's methods
POOLINGS = ("avg", "max", "flatten")
DEVICES = ("auto", "cpu", "gpu")  # where the Keras model runs


@dataclasses.dataclass(frozen=True)
class SplitOptions:
    """How a pool of class folders is split (a train/ val/ layout keeps its own folders)."""

    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 42  # also seeds anything random (random weights, augmentation, CV)
    train_per_class: int | None = None  # few-shot: K training images per class

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class ExtractOptions:
    """Which backbone embeds the images, how, and where the cache lives."""

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"  # "imagenet", a weights file, or "random" (tests only)
    layer: str | None = None  # default: the penultimate layer
    pooling: str | None = None  # default: avg
    input_size: int | None = None
    batch_size: int | None = None  # default: per device (featx.extraction)
    cache_dir: str | Path = "cache"
    workers: int | None = None  # decoding threads; default: the usable cores
    mixed_precision: bool = False  # float16 compute on GPU (Keras' mixed_float16 policy)
    device: str = "auto"  # one of DEVICES
    runtime: str = "auto"  # "auto" | "onnx" | "keras"
    precision: str = "fp32"  # "fp32" | "int8"
    int8_calibration: str = "minmax"  # int8's calibration method, one of CALIBRATIONS
    reduced_decode: bool = False
    flip_average: bool = False  # embed each image and its mirror image; store the mean
    exclude: str | Path | None = None  # a file listing images to leave out (featx audit)
    engine: str = "local"  # "local" | "ray" (featx.extraction, Ray actors)
    ray_address: str | None = None  # a Ray cluster to join; default: start a local one
    progress: bool = True
    split: SplitOptions = SplitOptions()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option name a caller may pass, split options included."""
        own = tuple(f.name for f in dataclasses.fields(cls) if f.name != "split")
        return own + SplitOptions.names()

    @classmethod
    def create(cls, options: ExtractOptions | None = None, **values) -> ExtractOptions:
        """``options`` (default: the defaults) with ``values`` replaced.

        ``values`` use the flat names of :meth:`names` (``seed``, not ``split.seed``);
        an unknown name raises :class:`~featx.errors.UsageError` listing the valid ones.
        """
        reject_unknown(values, cls.names())
        options = options or cls()
        split = {k: v for k, v in values.items() if k in SplitOptions.names()}
        own = {k: v for k, v in values.items() if k not in split}
        if split:
            own["split"] = dataclasses.replace(options.split, **split)
        return dataclasses.replace(options, **own)

    @property
    def seed(self) -> int:
        return self.split.seed

    def backbone_args(self, part: str | None = None) -> dict:
        """``featx.backbones.create_backbone``'s arguments: for :attr:`backbone`, or for
        ``part`` of a combined one."""
        return dict(name=part or self.backbone, weights=self.weights, layer=self.layer,
                    pooling=self.pooling, input_size=self.input_size, seed=self.seed,
                    reduced_decode=self.reduced_decode)

    @property
    def backbone_parts(self) -> tuple[str, ...]:
        """The backbones whose embeddings are concatenated (one for a plain name)."""
        return backbone_parts(self.backbone)


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

    @classmethod
    def or_default(cls, value) -> "AugmentOptions":
        """Like :meth:`coerce`, except that ``None`` gives the defaults (an option not set)."""
        return cls() if value is None else cls.coerce(value)

    @property
    def enabled(self) -> bool:
        """True when at least one transformation is on."""
        return bool(self.zoom or self.rotation or self.brightness or self.flip)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Cosine similarity at which two images count as near-duplicates, and how it was chosen
# (the audit report quotes it). The copies were re-encoded at JPEG quality 60, resized to
# 0.5x and 0.7x, or cropped by 10%; the 40th copy, a 0.5x copy of a 223 px photo, scored
# 0.86; the distinct pair at 0.88 is dog.74/dog.180, one photo stored twice.
DUPLICATE_THRESHOLD = 0.90
THRESHOLD_EVIDENCE = (
    "measured on EfficientNet-Lite0 embeddings of 1399 real photos (dogcat) plus 40 planted "
    "copies: 39 of 40 re-encoded, resized (0.5x, 0.7x) or cropped copies reach 0.90; of "
    "977,901 pairs of distinct photos one reached 0.88, and it is a true duplicate")
AUDIT_MAPS = ("auto", "tsne", "pca")
# Copies confirmed from the images (featx.auditing.CopyVerifier): candidates are each
# image's nearest neighbours from this cosine on, measured with benchmarks/audit_copies.py
# on dogcat copies: crops keeping 20% of the area sit at a median of 0.62, 40% at 0.79
CANDIDATE_COSINE = 0.60
CANDIDATES = 10


@dataclasses.dataclass(frozen=True)
class AuditOptions:
    """How `featx audit` looks for faults (:mod:`featx.auditing`); the CLI's defaults."""

    threshold: float = DUPLICATE_THRESHOLD  # near-duplicates by cosine alone (no images)
    verify: bool = True  # confirm copies from the images: local features, geometric fit
    candidate_cosine: float = CANDIDATE_COSINE  # what the verification is asked about
    candidates: int = CANDIDATES  # nearest neighbours per image asked about
    min_inliers: int = 25  # keypoint matches one similarity transform must explain
    folds: int = 5  # out-of-fold label check
    neighbours: int = 5  # outlier score: mean distance to this many same-class images
    outlier_z: float = 3.5  # robust z-score from which an image is an outlier
    top: int = 20  # longest list per finding type
    map: str = "auto"  # "auto" (t-SNE up to 5000 images, else PCA) | "tsne" | "pca"
    seed: int = 42

    def __post_init__(self):
        for name in ("threshold", "candidate_cosine"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.candidates < 1 or self.min_inliers < 3:
            raise UsageError("candidates must be at least 1 and min_inliers at least 3")
        if self.folds < 2 or self.neighbours < 1 or self.top < 1:
            raise UsageError("folds must be at least 2, neighbours and top at least 1")
        if self.map not in AUDIT_MAPS:
            raise UsageError(f"map must be one of {', '.join(AUDIT_MAPS)}, got {self.map!r}")


COMBINE = "+"  # "efficientnet_lite0+efficientnet_lite2": the parts' embeddings side by side


def backbone_parts(name: str) -> tuple[str, ...]:
    """The parts of a combined backbone name; UsageError for an empty or repeated part."""
    parts = tuple(part.strip() for part in str(name).split(COMBINE))
    if not all(parts):
        raise UsageError(f"backbone {name!r}: an empty part; combine names as A+B[+C]")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise UsageError(f"backbone {name!r}: {', '.join(repeated)} appears twice; a combination "
                         "of a backbone with itself adds no information")
    return parts


def reject_unknown(values: dict, valid, what: str = "option") -> None:
    """Raise UsageError naming every key of ``values`` that is not in ``valid``."""
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise UsageError(f"unknown {what}{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1: the default of
    ``workers`` and of the classifiers' parallel cross-validation."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
