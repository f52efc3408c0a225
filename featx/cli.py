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
from featx.errors import FeatxError

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
            if os.environ.get("FEATX_DEBUG"):
                raise
            click.echo(f"Internal error: {type(exc).__name__}: {exc} "
                       "(set FEATX_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper


def emit_json(obj):
    """Print ``obj`` as one JSON line (the last line of stdout)."""
    click.echo(json.dumps(obj, default=_json_default))


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def backbone_options(multiple: bool = False):
    """--backbone/--weights/--layer/--pooling/--input-size, shared by every command."""

    def decorator(func):
        for option in reversed([
            click.option("-b", "--backbone", "backbone", multiple=multiple,
                         default=("efficientnet_lite0",) if multiple else "efficientnet_lite0",
                         show_default=True, envvar="FEATX_BACKBONE",
                         help="Backbone name (see `featx backbones`)."
                         + (" Repeat to compare several." if multiple else "")),
            click.option("--weights", default="imagenet", show_default=True,
                         help="'imagenet', a local weights file, or 'random' "
                              "(tests and throughput benchmarks only)."),
            click.option("--layer", default=None,
                         help="Layer whose output is the embedding [default: penultimate]."),
            click.option("--pooling", type=click.Choice(["avg", "max", "flatten"]), default=None,
                         help="How a feature map becomes a vector [default: avg]."),
            click.option("--input-size", type=click.IntRange(32, 1024), default=None,
                         help="Override the backbone's input size (changes the cache key)."),
        ]):
            func = option(func)
        return func

    return decorator


def split_options(func):
    for option in reversed([
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2,
                     show_default=True, help="Share of each class for validation (pool layout)."),
        click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True, help="Share of each class held out for test."),
        click.option("--seed", type=int, default=42, show_default=True,
                     help="Seed of the split (and of anything random)."),
        click.option("--train-per-class", type=click.IntRange(1), default=None,
                     help="Few-shot protocol: K training images per class, the rest for val."),
    ]):
        func = option(func)
    return func


def runtime_options(func):
    for option in reversed([
        click.option("--cache-dir", type=click.Path(file_okay=False), default="cache",
                     show_default=True, envvar="FEATX_CACHE_DIR",
                     help="Where embedding caches live."),
        click.option("--batch-size", type=click.IntRange(1), default=None,
                     help="Images per model call [default: 32 on CPU, 128 on GPU]."),
        click.option("--workers", type=click.IntRange(1), default=None,
                     help="Parallel decoding threads [default: tf.data AUTOTUNE]."),
        click.option("--mixed-precision", is_flag=True,
                     help="float16 compute on GPU (ignored on CPU)."),
        click.option("--progress/--no-progress", default=True, show_default=True,
                     help="Progress bar on stderr."),
    ]):
        func = option(func)
    return func


def json_option(func):
    return click.option("--json", "json_", is_flag=True,
                        help="Print one JSON object as the last line of stdout.")(func)


def _warn_random(weights):
    if weights == "random":
        click.echo("featx: WARNING: RANDOM weights: embeddings carry no ImageNet knowledge; "
                   "use them only for tests and throughput benchmarks.", err=True)


def _extract_kwargs(kw) -> dict:
    keys = ("weights", "layer", "pooling", "input_size", "batch_size", "cache_dir",
            "val_fraction", "test_fraction", "seed", "train_per_class", "mixed_precision",
            "workers", "progress")
    return {k: kw[k] for k in keys if k in kw}


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
@runtime_options
@click.option("--augment", type=click.IntRange(0), default=0, show_default=True,
              help="Also cache K augmented views of every training image.")
@json_option
@handle_errors
def extract(data, backbone, json_, augment, **kw):
    """Embed every image under DATA and cache the embeddings.

    DATA holds class folders (one pool, split stratified by --val-fraction/--test-fraction)
    or train/, val/ (or validation/) and optional test/ folders of class folders. Running
    it again reuses the cache: only new or changed images go through the model.

    Example:

        featx extract photos/ --backbone efficientnet_lite0 --json
    """
    from featx.extraction import extract as run_extract

    features = run_extract(data, backbone=backbone, augment=augment, **_extract_kwargs(kw))
    _warn_random(features.weights)
    stats = features.stats
    result = {
        "cache": str(features.cache_path),
        "backbone": features.backbone,
        "weights": features.weights,
        "weights_id": features.weights_id,
        "n_images": stats.n_images,
        "n_failed": stats.n_failed,
        "n_ignored": stats.n_ignored,
        "n_extracted": stats.n_extracted,
        "n_augmented": stats.n_augmented,
        "dim": features.dim,
        "classes": features.class_names,
        "splits": {s: int(len(features.indices(s))) for s in ("train", "val", "test")},
        "seconds": round(stats.seconds, 3),
        "images_per_second": round(stats.images_per_second, 2),
        "reused": stats.reused,
        "failed": [{"path": p, "reason": r} for p, r in stats.failed],
    }
    for path, reason in stats.failed:
        click.echo(f"featx: skipped {path}: {reason}", err=True)
    if json_:
        emit_json(result)
        return
    click.echo(f"cache:     {result['cache']}")
    click.echo(f"backbone:  {result['backbone']} (weights: {result['weights_id']}), dim {result['dim']}")
    click.echo(f"images:    {stats.n_images} in {len(features.class_names)} classes "
               f"({', '.join(f'{k} {v}' for k, v in result['splits'].items() if v)})")
    click.echo(f"extracted: {stats.n_extracted} in {stats.seconds:.1f} s"
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
    """Inspect embedding caches."""


@cache.command("ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True,
              envvar="FEATX_CACHE_DIR")
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
        click.echo(f"{r['cache']}\n    {r['root']}  {r['backbone']} ({r['weights']})  "
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
    for name in ("cache", "root", "backbone", "weights_id", "dim", "n_images", "n_augmented",
                 "splits", "class_names", "split_params", "preprocessing", "featx_version",
                 "created", "updated"):
        click.echo(f"{name + ':':<15} {info[name]}")
    click.echo(f"{'failed:':<15} {len(info['failed'])}")
    for row in info["failed"]:
        click.echo(f"    {row['path']}: {row['reason']}")


def main():
    cli(prog_name="featx")


if __name__ == "__main__":
    main()
