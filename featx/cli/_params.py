"""The options several commands share, as decorators, with their defaults and valid values
taken from :mod:`featx.options`; and the one options object a command builds from them."""

from __future__ import annotations

import math
import os

import click

from featx.options import (CALIBRATIONS, DEVICES, POOLINGS, PRECISIONS, RUNTIMES, AuditOptions,
                           ExtractOptions)

DEFAULTS = ExtractOptions()  # the click defaults come from the options objects
AUDIT_DEFAULTS = AuditOptions()
SEED = click.IntRange(0, 2 ** 32 - 1)  # what numpy and scikit-learn take as a seed


def backbone_options(multiple: bool = False, feature_layer: bool = True):
    """--backbone/--weights/--input-size, and --layer/--pooling where embeddings are cached."""

    def decorator(func):
        options = [
            click.option("-b", "--backbone", "backbone", multiple=multiple,
                         default=(DEFAULTS.backbone,) if multiple else DEFAULTS.backbone,
                         show_default=True, envvar="FEATX_BACKBONE",
                         help="Backbone name (see `featx backbones`)."
                         + (" A+B[+C] puts several backbones' embeddings side by side."
                            if feature_layer else "")
                         + (" Repeat to compare several." if multiple else "")),
            click.option("--weights", default=DEFAULTS.weights, show_default=True,
                         help="'imagenet', a local weights file, or 'random' "
                              "(tests and throughput benchmarks only)."),
        ]
        if feature_layer:
            options += [
                click.option("--layer", default=None,
                             help="Layer whose output is the embedding [default: penultimate]."),
                click.option("--pooling", type=click.Choice(POOLINGS), default=None,
                             help="How a feature map becomes a vector [default: avg]."),
                click.option("--flip-average", is_flag=True, default=DEFAULTS.flip_average,
                             help="Embed each image and its mirror image and cache the mean "
                                  "(twice the extraction time, its own cache key)."),
            ]
        options.append(click.option(
            "--input-size", type=click.IntRange(32, 1024), default=None,
            help="Override the backbone's input size (changes the cache key)."))
        for option in reversed(options):
            func = option(func)
        return func

    return decorator


def split_options(func):
    for option in reversed([
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
                     default=DEFAULTS.split.val_fraction, show_default=True,
                     help="Share of each class for validation (pool layout)."),
        click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True),
                     default=DEFAULTS.split.test_fraction, show_default=True,
                     help="Share of each class held out for test."),
        click.option("--seed", type=SEED, default=DEFAULTS.seed, show_default=True,
                     help="Seed of the split (and of anything random)."),
        click.option("--train-per-class", type=click.IntRange(1), default=None,
                     help="Few-shot protocol: K training images per class, the rest for val."),
        click.option("--exclude", type=click.Path(dir_okay=False), default=None,
                     metavar="FILE",
                     help="Leave out the images FILE lists (one path per line, relative to "
                          "DATA; `featx audit --write-exclude` writes one). Other images "
                          "keep their split; cached rows are kept."),
    ]):
        func = option(func)
    return func


def cache_options(batch_default: int | None = None):
    """--cache-dir/--batch-size/--progress: every command that runs images through a model.

    ``batch_default``: a fixed batch size (fine-tuning) instead of one per device.
    """
    batch_help = ("Images per model call [default: 32 on CPU, 128 on GPU]."
                  if batch_default is None else "Images per training step.")

    def decorator(func):
        for option in reversed([
            click.option("--cache-dir", type=click.Path(file_okay=False),
                         default=DEFAULTS.cache_dir, show_default=True,
                         envvar="FEATX_CACHE_DIR", help="Where embedding caches live."),
            click.option("--batch-size", type=click.IntRange(1), default=batch_default,
                         show_default=batch_default is not None, help=batch_help),
            click.option("--progress/--no-progress", default=DEFAULTS.progress,
                         show_default=True,
                         help="Progress bar on stderr."),
        ]):
            func = option(func)
        return func

    return decorator


def engine_options(func):
    """--workers/--mixed-precision/--runtime/--precision/--reduced-decode: what runs the
    frozen model and how (featx.extraction)."""
    for option in reversed([
        click.option("--workers", type=click.IntRange(1), default=None,
                     help="Parallel decoding threads [default: the usable cores]."),
        click.option("--mixed-precision", is_flag=True, default=DEFAULTS.mixed_precision,
                     help="float16 compute on GPU, Keras' mixed_float16 policy (its own "
                          "cache key; ignored on CPU)."),
        click.option("--device", type=click.Choice(DEVICES), default=DEFAULTS.device,
                     show_default=True,
                     help="Where the Keras model runs: auto takes a GPU when the backend "
                          "(KERAS_BACKEND: tensorflow, jax, torch) sees one."),
        click.option("--runtime", type=click.Choice(RUNTIMES), default=DEFAULTS.runtime,
                     show_default=True,
                     help="auto: ONNX Runtime when installed (CPU), else the Keras model."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS.precision,
                     show_default=True,
                     help="int8: ONNX Runtime static quantisation calibrated on up to 64 "
                          "training images and checked against fp32 on 64 others; fp32 "
                          "where it would lose accuracy (its own cache key)."),
        click.option("--int8-calibration", type=click.Choice(CALIBRATIONS),
                     default=DEFAULTS.int8_calibration, show_default=True,
                     help="int8's calibration method (ONNX Runtime's MinMax, Percentile or "
                          "Entropy)."),
        click.option("--reduced-decode", is_flag=True, default=DEFAULTS.reduced_decode,
                     help="Decode large JPEGs at 1/2-1/8 scale (faster on big photos; "
                          "slightly different pixels, its own cache key)."),
    ]):
        func = option(func)
    return func


def augment_options(func):
    """--zoom/--rotation/--brightness/--flip: the tutorials' augmentation, each switchable."""
    for option in reversed([
        click.option("--zoom", type=click.FloatRange(0, 0.9), default=0.5, show_default=True,
                     help="Zoom in by up to this share of the side (0 = off)."),
        click.option("--rotation", type=click.FloatRange(0, 180), default=15.0,
                     show_default=True, help="Rotate by up to this many degrees (0 = off)."),
        click.option("--brightness", type=click.FloatRange(0, 1), default=0.2,
                     show_default=True, help="Scale brightness by 1 +/- this (0 = off)."),
        click.option("--flip/--no-flip", default=True, show_default=True,
                     help="Random horizontal flips."),
    ]):
        func = option(func)
    return func


def _augment_dict(kw) -> dict:
    return {k: kw.pop(k) for k in ("zoom", "rotation", "brightness", "flip")}


def json_option(func):
    return click.option("--json", "json_", is_flag=True,
                        help="Print one JSON object as the last line of stdout.")(func)


def trust_pickle_option(func):
    """Every command that loads a classifier model: a featx 0.1 .joblib loads only with it."""
    return click.option("--trust-pickle", is_flag=True,
                        help="Also load a .joblib model (featx 0.1), a pickle that runs code "
                        "when loaded: only for a file whose source you trust. `featx "
                        "convert-model` converts it to .skops once.")(func)


def _warn_random(weights):
    if weights == "random":
        click.echo("featx: WARNING: RANDOM weights: embeddings carry no ImageNet knowledge; "
                   "use them only for tests and throughput benchmarks.", err=True)


def _options(kw):
    """The one options object of a command, from the click parameters that are options."""
    return ExtractOptions.create(**{k: kw.pop(k) for k in ExtractOptions.names() if k in kw})


def _clf_choice_check(ctx, param, value):
    from featx.classifiers import check_names
    from featx.errors import UsageError

    try:
        names = check_names(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None
    return tuple(names) if isinstance(value, tuple) else ",".join(names)


def classifier_options(func):
    for option in reversed([
        click.option("--tune/--no-tune", default=True, show_default=True,
                     help="Tune hyperparameters by stratified CV on the train split."),
        click.option("--class-weight", type=click.Choice(["balanced"]), default=None,
                     help="Reweight classes for imbalanced data."),
        click.option("--cv", type=click.IntRange(2), default=5, show_default=True,
                     help="Cross-validation folds for tuning (at most 2 from 2000 training "
                     "images with --tuning fast)."),
        click.option("--tuning", type=click.Choice(["fast", "exhaustive"]), default="fast",
                     show_default=True, help="fast: fewer folds on large data, trees tuned by "
                     "depth truncation; exhaustive: every candidate on --cv folds."),
        click.option("--calibrate", is_flag=True,
                     help="Cross-validated probability calibration, so that scores are "
                     "probabilities (the svm's too)."),
        click.option("--calibration", type=click.Choice(["sigmoid", "isotonic"]),
                     default="sigmoid", show_default=True,
                     help="The calibration map of --calibrate (isotonic wants large data)."),
    ]):
        func = option(func)
    return func


def _unfreeze_value(ctx, param, value):
    if value == "all":
        return value
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter("expected a number of layers or 'all'") from None
    if number < 1:
        raise click.BadParameter("must be at least 1 (or 'all')")
    return number


def image_options(multiple: bool = False):
    """Every option of a command that embeds images: the backbone, the split, the cache
    and what runs the model (``multiple``: --backbone may be repeated)."""

    def decorator(func):
        for option in reversed([backbone_options(multiple=multiple), split_options,
                                cache_options(), engine_options]):
            func = option(func)
        return func

    return decorator


# ----- values no command can use -----------------------------------------------------------
def _shown(value: str) -> str:
    """A value as one short line: repr() escapes line breaks, NUL and other bytes."""
    return repr(value) if len(value) <= 60 else f"{value[:40]!r}... ({len(value):,} characters)"


def path_problem(value: str) -> str | None:
    """What makes ``value`` unusable as a path (empty, a NUL byte or a line break in it, or
    refused by the file system: too long, under a file...), or None."""
    if not value:
        return "an empty path"
    if any(c in value for c in "\0\n\r"):
        return f"{_shown(value)}: a path cannot hold a NUL byte or a line break"
    try:
        os.stat(value)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"{_shown(value)}: {exc.strerror}"
    return None


class _CheckedPath(click.Path):
    """click.Path, refusing in one line what :func:`path_problem` finds."""

    def convert(self, value, param, ctx):
        problem = path_problem(value) if isinstance(value, str) else None
        if problem:
            self.fail(problem, param, ctx)
        return super().convert(value, param, ctx)


class _FiniteFloatRange(click.FloatRange):
    """click.FloatRange, refusing nan and infinities (nan passes every range check)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def check_values(group: click.Group) -> None:
    """Give every path and float parameter of every command under ``group`` the checks
    above: one place, so that the options added later get them too."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            check_values(command)
            continue
        for param in command.params:
            param.type = _checked(param.type)


def _checked(kind: click.ParamType) -> click.ParamType:
    if type(kind) is click.Path:
        return _CheckedPath(exists=kind.exists, file_okay=kind.file_okay,
                            dir_okay=kind.dir_okay, writable=kind.writable,
                            readable=kind.readable, resolve_path=kind.resolve_path,
                            allow_dash=kind.allow_dash, path_type=kind.type,
                            executable=kind.executable)
    if type(kind) is click.FloatRange:
        return _FiniteFloatRange(kind.min, kind.max, min_open=kind.min_open,
                                 max_open=kind.max_open, clamp=kind.clamp)
    return kind


def file_name_value(ctx, param, value):
    """A callback for an option that names a file in a folder (``--name``): one name, no
    folders."""
    if value is None:
        return value
    problem = path_problem(value)
    if problem is None and ("/" in value or value in (".", "..")):
        problem = f"{_shown(value)}: a file name, without '/'"
    if problem is None and len(value.encode("utf-8", "surrogateescape")) > 200:
        problem = f"{_shown(value)}: longer than 200 bytes"
    if problem:
        raise click.BadParameter(problem)
    return value
