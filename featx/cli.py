"""The `featx` command: a thin click layer over the Python API.

Results go to stdout (with --json, one JSON object as the last line); logs, warnings and
progress bars go to stderr. Exit codes: 0 success (also when some files were skipped),
2 usage or data errors, 1 internal errors.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

from featx import __version__
from featx._json import json_default
from featx.devices import DEVICES
from featx.errors import FeatxError
from featx.options import (AUDIT_MAPS, ENGINES, POOLINGS, PRECISIONS, RUNTIMES, AuditOptions,
                           ExtractOptions)

DEFAULTS = ExtractOptions()  # the click defaults come from the options objects
AUDIT_DEFAULTS = AuditOptions()

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
log = logging.getLogger("featx")


# ----- plumbing ----------------------------------------------------------------------
def _configure_logging(verbose: int):
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("featx: %(levelname)s: %(message)s"))
    root = logging.getLogger("featx")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def handle_errors(func):
    """Turn featx errors into one line on stderr and their exit code; others into exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FeatxError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the contract is one line and exit 1
            if isinstance(exc, ModuleNotFoundError):
                _missing_backend(exc)
            if os.environ.get("FEATX_DEBUG"):
                raise
            click.echo(f"Internal error: {type(exc).__name__}: {exc} "
                       "(set FEATX_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper


def _missing_backend(exc: ModuleNotFoundError):
    """Keras' backend failed to import: the one line require_backend gives, exit 2."""
    from featx.devices import backend_name, require_backend

    if exc.name and exc.name.split(".")[0] == backend_name():
        try:
            require_backend()
        except FeatxError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(error.exit_code)


def emit_json(obj):
    """Print ``obj`` as one JSON line (the last line of stdout)."""
    click.echo(json.dumps(obj, default=json_default))


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
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
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
    frozen model and how (featx.runtimes, featx.pipeline)."""
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
                          "training images (its own cache key)."),
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


def _warn_random(weights):
    if weights == "random":
        click.echo("featx: WARNING: RANDOM weights: embeddings carry no ImageNet knowledge; "
                   "use them only for tests and throughput benchmarks.", err=True)


def _options(kw):
    """The one options object of a command, from the click parameters that are options."""
    return ExtractOptions.create(**{k: kw.pop(k) for k in ExtractOptions.names() if k in kw})


# ----- commands ----------------------------------------------------------------------
@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="featx")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
def cli(verbose):
    """featx: transfer learning by feature extraction.

    Embed a folder of labelled images once with a frozen ImageNet ConvNet (cached in HDF5),
    then train and compare classifiers on the cached embeddings in seconds.

    Example:

        featx extract path/to/images
        featx compare path/to/images --report-dir reports/
    """
    _configure_logging(verbose)


@cli.command()
@click.argument("data", type=click.Path())
@backbone_options()
@split_options
@cache_options()
@engine_options
@click.option("--engine", type=click.Choice(ENGINES), default=DEFAULTS.engine,
              show_default=True,
              help="local: this process. ray: shards embedded on a Ray cluster "
                   "(pip install 'featx[ray]'); the same rows and embeddings.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --engine ray: the cluster's HOST:PORT (or 'auto', ray://HOST:PORT) "
                   "[default: start a local Ray on --workers cores].")
@click.option("--augment", type=click.IntRange(0), default=0, show_default=True,
              help="Also cache K augmented views of every training image (never val/test).")
@augment_options
@json_option
@handle_errors
def extract(data, json_, augment, **kw):
    """Embed every image under DATA and cache the embeddings.

    DATA holds class folders (one pool, split stratified by --val-fraction/--test-fraction)
    or train/, val/ (or validation/) and optional test/ folders of class folders. Running
    it again reuses the cache: only new or changed images go through the model.

    Example:

        featx extract photos/ --backbone efficientnet_lite0 --json
    """
    from featx.extraction import extract as run_extract

    augmentation = _augment_dict(kw)
    features = run_extract(data, _options(kw), augment=augment, augment_options=augmentation)
    _warn_random(features.weights)
    stats = features.stats
    result = {
        "cache": None if features.cache_path is None else str(features.cache_path),
        "caches": [str(path) for path in features.cache_paths],
        "backbone": features.backbone,
        "weights": features.weights,
        "weights_id": features.weights_id,
        "n_images": stats.n_images,
        "n_failed": stats.n_failed,
        "n_ignored": stats.n_ignored,
        "n_excluded": stats.n_excluded,
        "n_extracted": stats.n_extracted,
        "n_augmented": stats.n_augmented,
        "dim": features.dim,
        "classes": features.class_names,
        "splits": {s: int(len(features.indices(s))) for s in ("train", "val", "test")},
        "seconds": round(stats.seconds, 3),
        "images_per_second": round(stats.images_per_second, 2),
        "runtime": stats.runtime or None,
        "device": stats.device or None,
        "batch_size": stats.batch_size or None,
        "computed_by": features.computed_by,
        "engine": stats.engine,
        "precision": features.precision,
        "reused": stats.reused,
        "flip_average": features.flip_average,
        "failed": [{"path": p, "reason": r} for p, r in stats.failed],
    }
    if len(features.parts) > 1:
        result["parts"] = [{"backbone": p.backbone, "cache": str(p.cache_path), "dim": p.dim,
                            "n_extracted": p.stats.n_extracted,
                            "seconds": round(p.stats.seconds, 3)} for p in features.parts]
    for path, reason in stats.failed:
        click.echo(f"featx: skipped {path}: {reason}", err=True)
    if json_:
        emit_json(result)
        return
    if result["cache"]:
        click.echo(f"cache:     {result['cache']}")
    click.echo(f"backbone:  {result['backbone']} (weights: {result['weights_id']}), dim {result['dim']}")
    click.echo(f"images:    {stats.n_images} in {len(features.class_names)} classes "
               f"({', '.join(f'{k} {v}' for k, v in result['splits'].items() if v)})"
               + (f"; {stats.n_excluded} excluded" if stats.n_excluded else ""))
    for part in result.get("parts", []):
        click.echo(f"  part:    {part['backbone']}, dim {part['dim']}: {part['n_extracted']} "
                   f"extracted in {part['seconds']:.1f} s; {part['cache']}")
    if stats.runtime:
        click.echo(f"runtime:   {stats.runtime}" + (" on Ray" if stats.engine == "ray" else ""))
        if stats.engine != "ray":
            click.echo(f"device:    {stats.device}")
    if stats.n_shards_reused:
        click.echo(f"resumed:   {stats.n_shards_reused} shard(s) a stopped run had finished")
    what = f"{stats.n_extracted} embeddings ({len(features.parts)} parts)" if \
        len(features.parts) > 1 else str(stats.n_extracted)
    click.echo(f"extracted: {what} in {stats.seconds:.1f} s"
               + (f" ({stats.images_per_second:.1f} images/s)" if stats.n_extracted else
                  " (everything reused from the cache)"))
    if stats.n_failed:
        click.echo(f"failed:    {stats.n_failed} file(s) skipped (listed on stderr)")


@cli.command()
@click.argument("pattern", default="*")
@json_option
@handle_errors
def backbones(pattern, json_):
    """List the available backbones (PATTERN is an fnmatch filter).

    Example:

        featx backbones 'efficientnet*'
    """
    from featx.backbones import describe_backbones

    rows = [r for r in describe_backbones() if _fnmatch(r["name"], pattern)]
    if json_:
        emit_json(rows)
        return
    header = f"{'name':<20} {'input':>5} {'dim':>5}  {'imagenet weights':<22} source"
    click.echo(header)
    for r in rows:
        available = "offline" if r["offline_weights"] else "download (online only)"
        click.echo(f"{r['name']:<20} {r['input_size']:>5} {r['dim']:>5}  {available:<22} "
                   f"{r['weights_source']}")


def _fnmatch(name, pattern):
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


@cli.group()
def cache():
    """Inspect, export, verify and compact embedding caches."""


@cache.command("ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=DEFAULTS.cache_dir,
              show_default=True, envvar="FEATX_CACHE_DIR")
@json_option
@handle_errors
def cache_ls(cache_dir, json_):
    """List the caches under --cache-dir.

    Example:

        featx cache ls --cache-dir cache/
    """
    from featx.cache import list_caches

    rows = list_caches(cache_dir)
    if json_:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no caches under {cache_dir}")
    for r in rows:
        if "error" in r:
            click.echo(f"{r['cache']}  INVALID: {r['error']}")
            continue
        variant = f", {r['variant']}" if r.get("variant") else ""
        click.echo(f"{r['cache']}\n    {r['root']}  {r['backbone']} ({r['weights']}{variant})  "
                   f"{r['n_images']} images x {r['dim']}  failed {r['n_failed']}  "
                   f"{r['size_bytes'] / 1e6:.1f} MB  updated {r['updated']}")


@cache.command("info")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@json_option
@handle_errors
def cache_info(path, json_):
    """Show what one cache file holds.

    Example:

        featx cache info cache/photos-1a2b3c4d/efficientnet_lite0-imagenet-0123456789ab.h5
    """
    from featx.cache import FeatureCache, summary

    with FeatureCache.open(path) as c:
        info = summary(c)
        info["failed"] = [{"path": p, "reason": r} for p, _, r in c.failed()]
        info["split_params"] = c.json_attr("split_params")
        info["preprocessing"] = c.json_attr("preprocessing")
    if json_:
        emit_json(info)
        return
    for name in ("cache", "root", "backbone", "weights_id", "variant", "dim", "n_images",
                 "n_augmented",
                 "splits", "class_names", "split_params", "preprocessing", "featx_version",
                 "created", "updated"):
        click.echo(f"{name + ':':<15} {info[name] if info[name] != '' else '-'}")
    click.echo(f"{'failed:':<15} {len(info['failed'])}")
    for row in info["failed"]:
        click.echo(f"    {row['path']}: {row['reason']}")


@cache.command("compact")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@json_option
@handle_errors
def cache_compact(path, json_):
    """Rewrite a cache's rows into full shards and delete what no row uses any more.

    Updates never rewrite cached embeddings: removed rows keep their bytes and many small
    updates leave many small shards until this runs. Do not run it while another process
    is reading the cache.

    Example:

        featx cache compact cache/photos-1a2b3c4d/efficientnet_lite0-imagenet-0123456789ab.h5
    """
    from featx.cache import compact_cache

    outcome = compact_cache(path)
    if json_:
        emit_json(outcome)
        return
    click.echo(f"{outcome['cache']}: {outcome['rows']} rows; {outcome['shards_before']} -> "
               f"{outcome['shards_after']} shards, {outcome['bytes_before'] / 1e6:.1f} -> "
               f"{outcome['bytes_after'] / 1e6:.1f} MB")
    if outcome["rows_dropped_damaged"]:
        click.echo(f"dropped {outcome['rows_dropped_damaged']} rows of damaged shards; "
                   "`featx extract` computes them again", err=True)


@cache.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@json_option
@handle_errors
def cache_verify(path, json_):
    """Re-hash every shard of a cache against the checksum its index records.

    `featx extract` checks each shard's size and time on every run and re-hashes the
    changed ones; this checks every byte. Exit code 2 when a shard is damaged: `featx cache
    compact` then drops its rows, and the next `featx extract` extracts them again.

    Example:

        featx cache verify cache/photos-1a2b3c4d/efficientnet_lite0-imagenet-0123456789ab.h5
    """
    from featx.cache import verify_cache
    from featx.errors import CacheError

    outcome = verify_cache(path)
    if json_:
        emit_json(outcome)
    if outcome["damaged"]:
        raise CacheError(f"{path}: {len(outcome['damaged'])} of {outcome['shards']} shards "
                         f"damaged ({', '.join(outcome['damaged'])}); `featx cache compact` "
                         "drops their rows, then `featx extract` extracts them again")
    if not json_:
        click.echo(f"{path}: {outcome['shards']} shards, {outcome['rows']} rows: all intact")


@cache.command("export")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "format_", type=click.Choice(["npy", "parquet", "csv"]),
              default="npy", show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True,
              help="Folder to write into.")
@click.option("--views", is_flag=True, help="Also the augmented views' rows (a view column).")
@json_option
@handle_errors
def cache_export(path, format_, output, views, json_):
    """Write a cache's embeddings and their metadata (path, label, split, sha256), row for
    row, as npy (+ metadata.csv), csv or parquet (needs pyarrow: featx[parquet]).

    Example:

        featx cache export cache/photos-1a2b3c4d/efficientnet_lite0-imagenet-0123456789ab.h5 \\
            --format parquet -o embeddings/
    """
    from featx.cache_export import export_embeddings

    record = export_embeddings(path, format_, output, views=views)
    if json_:
        emit_json(record)
        return
    click.echo(f"wrote {record['n_rows']} rows x {record['dim']} ({record['backbone']}, "
               f"{record['precision']}) to {output}: {', '.join(record['files'])}, export.json")


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


@cli.command()
@click.argument("data", type=click.Path())
@click.option("--clf", default="svm", show_default=True, callback=_clf_choice_check,
              help="Classifier: softmax, logistic, svm, knn or tree.")
@classifier_options
@click.option("--out", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Where the model and its metadata are saved.")
@click.option("--name", default=None, help="Model file name [default: CLF-BACKBONE-DATASET].")
@click.option("--use-augmented", is_flag=True,
              help="Train on the cached augmented views too (see extract --augment).")
@backbone_options()
@split_options
@cache_options()
@engine_options
@json_option
@handle_errors
def fit(data, clf, json_, tune, class_weight, cv, tuning, calibrate, calibration, out, name,
        use_augmented, **kw):
    """Train a classifier on the cached embeddings of DATA and save it.

    Extracts first (through the same cache) if DATA is not cached yet, trains on the train
    split, reports val (and test) metrics, and saves MODEL.joblib with a MODEL.json sidecar.

    Example:

        featx fit photos/ --clf svm --json
    """
    from featx.api import fit as run_fit

    if "," in clf:  # "all" arrives expanded by _clf_choice_check
        raise click.BadParameter("fit takes one classifier; use `featx compare` for several",
                                 param_hint="--clf")
    outcome = run_fit(data, clf, tune=tune, class_weight=class_weight, out=out, name=name,
                      use_augmented=use_augmented, cv=cv, tuning=tuning,
                      calibrate=calibration if calibrate else None, options=_options(kw))
    _warn_random(outcome["weights"])
    if json_:
        emit_json(outcome)
        return
    click.echo(f"model:        {outcome['model']}")
    click.echo(f"classifier:   {clf} on {outcome['backbone']} ({outcome['weights']}) features")
    if outcome["val_accuracy"] is not None:
        click.echo(f"val accuracy: {outcome['val_accuracy']:.4f}   "
                   f"val macro-F1: {outcome['val_macro_f1']:.4f}")
    if "test_accuracy" in outcome:
        click.echo(f"test accuracy: {outcome['test_accuracy']:.4f}")
    click.echo(f"fit:          {outcome['fit_seconds']:.2f} s, best params {outcome['best_params']}"
               + (f", {outcome['calibration']}-calibrated" if outcome["calibration"] else ""))
    click.echo(f"features:     {outcome['runtime']}")


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write to this file instead of stdout.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=DEFAULTS.runtime,
              show_default=True, help="What embeds files that are not cached.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=None, metavar="P",
              help="Label images whose top probability is below P as 'unknown' (the best "
              "guess goes to a best_guess column); compare's report shows what each P costs.")
@json_option
@handle_errors
def predict(model, paths, top_k, batch_size, output, json_, runtime, min_score):
    """Label images (files or folders) with a saved MODEL.

    MODEL is a .joblib (or its .json sidecar) from `featx fit`, or a .keras model from
    `featx finetune`. Images are preprocessed exactly as at training time; files that are in
    the model's cache reuse their embeddings. Output: CSV (path,label,score, then top-k),
    or JSON with --json. Note: joblib files execute code when loaded; only load models you
    trust (featx checks the SHA-256 recorded in the metadata).

    Example:

        featx predict models/svm-efficientnet_lite0-photos.joblib new_photos/ > labels.csv
    """
    from featx.api import predict as run_predict

    rows = run_predict(model, paths, top_k=top_k, batch_size=batch_size, runtime=runtime,
                       min_score=min_score)
    sources = sorted({row.get("embedded_by", "") for row in rows} - {""})
    click.echo(f"featx: embeddings from {', '.join(sources)}", err=True)
    text = json.dumps(rows, default=json_default) if json_ else \
        _rows_to_csv(rows, top_k, best_guess=min_score is not None)
    if output:
        from pathlib import Path

        Path(output).write_text(text + ("\n" if json_ else ""))
        click.echo(f"wrote {len(rows)} predictions to {output}", err=True)
    else:
        click.echo(text, nl=json_)
    for row in rows:
        if row["error"]:
            click.echo(f"featx: skipped {row['path']}: {row['error']}", err=True)


@cli.command("export")
@click.argument("model", type=click.Path())
@click.option("--format", "format_", type=click.Choice(["onnx", "keras"]), default="onnx",
              show_default=True, help="onnx: needs only onnxruntime; keras: a .keras file.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32",
              show_default=True, help="int8: static quantisation (onnx only), calibrated on "
              "the model's own training images.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="The file to write [default: beside MODEL: MODEL-export.onnx, "
              "MODEL-int8-export.onnx or MODEL-export.keras].")
@click.option("--check", "check", type=click.Path(file_okay=False), default=None,
              metavar="DATA", help="Then run the exported file alone on DATA's validation "
              "images and compare with `featx predict` (exit 1 when it is off its bound).")
@json_option
@handle_errors
def export_cmd(model, format_, precision, output, check, json_):
    """Write MODEL as one deployable file: uint8 RGB images in, class scores out.

    MODEL is a softmax, logistic or svm model from `featx fit` (its scaler and linear head
    are folded into one dense layer after the backbone) or a .keras model from `featx
    finetune`. The file carries its class names, preprocessing recipe, backbone identity
    and featx version; it runs without featx (see the README's example).

    Example:

        featx export models/svm-efficientnet_lite0-photos.joblib --check photos/
    """
    from featx.api import export as run_export

    outcome = run_export(model, format_, precision=precision, out=output, check=check)
    parity = outcome.get("parity")
    if json_:
        emit_json(outcome)
    else:
        click.echo(f"wrote {outcome['path']} ({outcome['format']}, {outcome['precision']}, "
                   f"{outcome['size_bytes'] / 1e6:.1f} MB): uint8 images -> "
                   f"{outcome['output']} over {len(outcome['classes'])} classes, "
                   f"in {outcome['seconds']:.1f} s")
        if parity:
            from featx.deploy import Parity

            click.echo(Parity(**parity).line())
    if parity and not parity["passed"]:
        sys.exit(1)


def _rows_to_csv(rows, top_k, best_guess=False) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["path", "label", "score"] + (["best_guess"] if best_guess else [])
    for k in range(1, top_k + 1):
        header += [f"top{k}_label", f"top{k}_score"]
    writer.writerow(header + ["error"])
    for row in rows:
        cells = [row["path"], row["label"], "" if row["score"] is None else f"{row['score']:.6f}"]
        if best_guess:
            cells.append(row.get("best_guess", ""))
        top = row.get("top", [])
        for k in range(top_k):
            cells += [top[k]["label"], f"{top[k]['score']:.6f}"] if k < len(top) else ["", ""]
        writer.writerow(cells + [row["error"]])
    return buffer.getvalue()


@cli.command()
@click.argument("data", type=click.Path())
@click.option("--clf", "clfs", multiple=True, default=("all",), show_default=True,
              callback=_clf_choice_check,
              help="Classifiers to compare (repeat or comma-separate); 'all' for every one.")
@classifier_options
@click.option("--report-dir", type=click.Path(file_okay=False), default="reports",
              show_default=True, help="Where report.md, report.json and the PNGs go.")
@click.option("--eval-split", type=click.Choice(["val", "test"]), default="val",
              show_default=True, help="Split the numbers are computed on.")
@click.option("--augmented", type=click.Choice(["no", "yes", "both"]), default="no",
              show_default=True,
              help="Train on cached augmented views (extract --augment K): no, yes, or both rows.")
@click.option("--repeats", type=click.IntRange(2), default=None, metavar="R",
              help="Also evaluate R times on re-drawn splits of the cached rows (repeated "
              "stratified k-fold for given train/val folders): mean +/- std and interval.")
@click.option("--finetune", is_flag=True, help="Add a fine-tuning row (slow: trains the network).")
@click.option("--finetune-epochs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--finetune-warmup-epochs", type=click.IntRange(1), default=3, show_default=True)
@backbone_options(multiple=True)
@split_options
@cache_options()
@engine_options
@json_option
@handle_errors
def compare(data, clfs, backbone, json_, tune, class_weight, cv, tuning, calibrate, calibration,
            report_dir, eval_split, augmented, repeats, finetune, finetune_epochs,
            finetune_warmup_epochs, **kw):
    """Train every classifier on the same cached features and write a benchmark report.

    With a warm cache no image goes through the model. Writes report.md, report.json, a
    confusion-matrix PNG per classifier and accuracy_vs_fit_time.png to --report-dir.

    Example:

        featx compare photos/ --report-dir reports/ --json
    """
    from featx.api import compare as run_compare
    from featx.reports import backbone_label, extraction_cell, vs_best_text

    finetune_options = None
    if finetune:
        finetune_options = {"epochs": finetune_epochs, "warmup_epochs": finetune_warmup_epochs}
    options = _options(kw)
    outcome = run_compare(data, clfs, backbones=backbone, report_dir=report_dir, tune=tune,
                          class_weight=class_weight, eval_split=eval_split, cv=cv,
                          finetune=finetune_options, augmented=augmented, options=options,
                          tuning=tuning, calibrate=calibration if calibrate else None,
                          repeats=repeats)
    results = outcome["results"]
    _warn_random(options.weights)
    if json_:
        keys = ("clf", "backbone", "weights", "split", "accuracy", "balanced_accuracy",
                "macro_f1", "intervals", "vs_best", "ece", "calibration", "fit_seconds",
                "predict_seconds", "extract_seconds", "extract_parts", "flip_average",
                "augmented_views", "best_params", "runtime", "precision")
        emit_json({"report": outcome["report"],
                   "results": [{k: r.get(k) for k in keys} for r in results],
                   "repeated": outcome["repeated"]})
        return
    width = max([20] + [len(backbone_label(r)) for r in results])
    click.echo(f"{'classifier':<10} {'backbone':<{width}} {'split':<5} {'accuracy':>8} "
               f"{'95% interval':>15} {'vs best':>16} {'macro-F1':>8} {'extract s':>13} "
               f"{'fit s':>7}")
    for r in sorted(results, key=lambda r: -r["accuracy"]):
        low, high = (r.get("intervals") or {}).get("accuracy", (None, None))
        interval = f"{low:.3f}-{high:.3f}" if low is not None else "-"
        click.echo(f"{r['clf']:<10} {backbone_label(r):<{width}} {r['split']:<5} "
                   f"{r['accuracy']:>8.4f} {interval:>15} {vs_best_text(r):>16} "
                   f"{r['macro_f1']:>8.4f} {extraction_cell(r):>13} {r['fit_seconds']:>7.2f}")
    for r in outcome["repeated"] or []:
        click.echo(f"{r['clf']:<10} {backbone_label(r):<{width}} x{r['repeats']:<4} "
                   f"{r['mean']['accuracy']:>8.4f} +/- {r['std']['accuracy']:.4f} "
                   f"(interval {r['interval']['accuracy'][0]:.3f}-"
                   f"{r['interval']['accuracy'][1]:.3f})")
    click.echo(f"report: {outcome['report']}")



@cli.command()
@click.argument("data", type=click.Path())
@click.option("--report-dir", type=click.Path(file_okay=False), default="reports/audit",
              show_default=True, help="Where audit.md, audit.json and the PNGs go.")
@click.option("--top", type=click.IntRange(1), default=AUDIT_DEFAULTS.top, show_default=True,
              help="Longest list per finding type.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True),
              default=AUDIT_DEFAULTS.threshold, show_default=True,
              help="Cosine similarity from which two images are near-duplicates.")
@click.option("--folds", type=click.IntRange(2), default=AUDIT_DEFAULTS.folds,
              show_default=True,
              help="Folds of the out-of-fold label check.")
@click.option("--neighbours", type=click.IntRange(1), default=AUDIT_DEFAULTS.neighbours,
              show_default=True,
              help="Same-class neighbours of the outlier score.")
@click.option("--map", "map_", type=click.Choice(AUDIT_MAPS), default=AUDIT_DEFAULTS.map,
              show_default=True, help="2-D map: auto = t-SNE up to 5000 images, else PCA.")
@click.option("--write-exclude", type=click.Path(dir_okay=False), default=None,
              metavar="FILE", help="Write the flagged paths to FILE (reason as a comment), "
                                   "for --exclude FILE on extract, fit, compare, finetune.")
@backbone_options()
@split_options
@cache_options()
@engine_options
@json_option
@handle_errors
def audit(data, json_, report_dir, top, threshold, folds, neighbours, map_, write_exclude,
          **kw):
    """Find near-duplicates, leakage across splits, likely label errors and outliers.

    Works on the cached embeddings (with a warm cache no image goes through the model) and
    writes audit.md, audit.json, a contact sheet per finding type and a map of the
    embeddings to --report-dir.

    Example:

        featx audit photos/ --write-exclude exclude.txt
        featx compare photos/ --exclude exclude.txt
    """
    from featx.api import audit as run_audit

    options = _options(kw)
    audit_options = AuditOptions(threshold=threshold, folds=folds, neighbours=neighbours,
                                 top=top, map=map_, seed=options.seed)
    outcome = run_audit(data, report_dir=report_dir, write_exclude=write_exclude,
                        audit_options=audit_options, options=options)
    _warn_random(options.weights)
    for line in outcome["skipped"]:
        click.echo(f"featx: {line}", err=True)
    if json_:
        emit_json({k: outcome.get(k) for k in ("report", "counts", "n_images", "n_extracted",
                                               "exclude_file", "n_exclude", "skipped",
                                               "seconds")})
        return
    counts = outcome["counts"]
    click.echo(f"audited {outcome['n_images']} images ({outcome['n_extracted']} embedded now)")
    click.echo(f"  near-duplicate groups: {counts['duplicates_across_splits']} across splits, "
               f"{counts['duplicates_conflicting_labels']} with conflicting labels, "
               f"{counts['duplicates_same_class']} in one class")
    click.echo(f"  likely label errors:   {counts['label_errors']}")
    click.echo(f"  outliers:              {counts['outliers']}")
    if "exclude_file" in outcome:
        click.echo(f"exclude list: {outcome['exclude_file']} ({outcome['n_exclude']} paths)")
    click.echo(f"report: {outcome['report']}")


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


@cli.command()
@click.argument("data", type=click.Path())
@click.option("--warmup-epochs", type=click.IntRange(1), default=5, show_default=True,
              help="Stage 1 (frozen base, new head) epochs at most.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True,
              help="Stage 2 (top of the base unfrozen) epochs at most.")
@click.option("--unfreeze", default="20", show_default=True, callback=_unfreeze_value,
              help="Top N layers of the base to unfreeze in stage 2, or 'all'.")
@click.option("--lr-head", type=float, default=1e-3, show_default=True)
@click.option("--lr-base", type=float, default=1e-5, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.2,
              show_default=True)
@click.option("--patience", type=click.IntRange(1), default=3, show_default=True,
              help="Early stopping patience on val loss (best weights restored).")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Augment training batches on the fly.")
@augment_options
@click.option("--out", type=click.Path(file_okay=False), default="models", show_default=True)
@click.option("--name", default=None, help="Model name [default: finetune-BACKBONE].")
@backbone_options(feature_layer=False)
@split_options
@cache_options(batch_default=32)
@json_option
@handle_errors
def finetune(data, json_, augment, **kw):
    """Fine-tune the backbone on DATA: head warm-up, then the top layers unfrozen.

    Stage 1 trains a new dropout + softmax head on the frozen base (run in inference mode);
    stage 2 unfreezes the top --unfreeze layers (BatchNormalization stays frozen) and
    continues with the small --lr-base. Early stopping on val loss restores the best
    weights; the best model is saved as a .keras file (usable by `featx predict`) with
    its history as CSV and PNG. Uses the same split as the cache.

    Example:

        featx finetune photos/ --warmup-epochs 3 --epochs 5 --unfreeze 20 --json
    """
    from featx.finetuning import finetune as run_finetune

    augmentation = _augment_dict(kw)
    batch_size = kw.pop("batch_size")
    options = _options(kw)
    result = run_finetune(data, augment=augmentation if augment else False,
                          batch_size=batch_size, options=options, **kw)
    summary = result.to_dict()
    _warn_random(result.weights)
    if json_:
        emit_json({"model": str(result.model_path), "val_accuracy": result.val_accuracy,
                   "val_macro_f1": result.val_macro_f1, "seconds": result.seconds,
                   "epochs_run": result.epochs_run, **summary})
        return
    click.echo(f"model:        {result.model_path}")
    click.echo(f"val accuracy: {result.val_accuracy:.4f}   val macro-F1: {result.val_macro_f1:.4f}")
    click.echo(f"epochs:       {result.epochs_run} (stage 1: {result.stage1_epochs}), "
               f"best epoch {result.best_epoch}, {result.seconds:.1f} s")
    click.echo(f"history:      {result.history_path}, {result.plot_path}")


@cli.command("augment-preview")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_png", type=click.Path(dir_okay=False), required=True,
              help="PNG file to write.")
@click.option("--n", type=click.IntRange(2, 64), default=16, show_default=True,
              help="Cells in the grid (the first is the original).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(32, 1024), default=224, show_default=True)
@augment_options
@handle_errors
def augment_preview(image, out_png, n, seed, size, **kw):
    """Write a grid of augmented versions of IMAGE, to check augmentation before trusting it.

    Example:

        featx augment-preview photos/cat/cat.1.jpg --out preview.png
    """
    from featx.augment import augment_preview as run_preview

    path = run_preview(image, out_png, _augment_dict(kw), n=n, seed=seed, size=size)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("data", type=click.Path(), required=False)
@click.option("--report-dir", type=click.Path(file_okay=False), default="reports",
              show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=DEFAULTS.cache_dir,
              show_default=True, envvar="FEATX_CACHE_DIR")
@click.option("--backbone", "-b", default=DEFAULTS.backbone, show_default=True)
@handle_errors
def demo(data, report_dir, cache_dir, backbone):
    """The main job end to end: extract, then compare every classifier.

    Without DATA it first writes scikit-learn's bundled digits (1797 images, 10 classes)
    as PNG class folders under examples/digits.

    Example:

        featx demo            # on the digits
        featx demo photos/    # on your own folder
    """
    from featx.api import compare as run_compare
    from featx.extraction import extract as run_extract

    if data is None:
        from featx.sample_data import write_digits

        data = write_digits("examples/digits")
        click.echo(f"wrote scikit-learn's digits as image folders under {data}", err=True)
    features = run_extract(data, backbone=backbone, cache_dir=cache_dir)
    stats = features.stats
    click.echo(f"extract: {stats.n_images} images, {stats.n_extracted} through "
               f"{features.backbone} ({features.weights_id}) in {stats.seconds:.1f} s, "
               f"{stats.n_failed} failed; cache {' + '.join(map(str, features.cache_paths))}")
    click.echo(f"runtime: {features.provenance()}")
    outcome = run_compare(data, ("all",), backbones=(backbone,), report_dir=report_dir,
                          cache_dir=cache_dir, progress=False)
    for r in sorted(outcome["results"], key=lambda r: -r["accuracy"]):
        low, high = r["intervals"]["accuracy"]
        click.echo(f"  {r['clf']:<9} val accuracy {r['accuracy']:.4f} (95% {low:.3f}-"
                   f"{high:.3f})  macro-F1 {r['macro_f1']:.4f}  fit {r['fit_seconds']:.2f} s")
    click.echo(f"report: {outcome['report']}")


def main():
    cli(prog_name="featx")


if __name__ == "__main__":
    main()
