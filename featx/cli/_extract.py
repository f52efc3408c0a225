"""``featx extract``, ``featx backbones`` and ``featx augment-preview``."""

from __future__ import annotations

import fnmatch

import click

from featx.options import ENGINES

from ._app import cli, emit_json, handle_errors, printed_json
from ._params import (DEFAULTS, SEED, _augment_dict, _options, _warn_random, augment_options,
                      image_options, json_option)


@cli.command()
@click.argument("data", type=click.Path())
@image_options()
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

    \b
        featx extract photos/ --backbone efficientnet_lite0 --json
    """
    from featx.api import extract as run_extract

    features = run_extract(data, _options(kw), augment=augment,
                           augment_options=_augment_dict(kw))
    _warn_random(features.weights)
    for path, reason in features.stats.failed:
        click.echo(f"featx: skipped {path}: {reason}", err=True)
    if printed_json(features, json_):
        return
    _print_extract(features, features.to_dict())


def _print_extract(features, result):
    stats = features.stats
    if result["cache"]:
        click.echo(f"cache:     {result['cache']}")
    click.echo(f"backbone:  {result['backbone']} (weights: {result['weights_id']}), "
               f"dim {result['dim']}")
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
    if result.get("int8_agreement"):
        from featx.extraction import agreement_text

        click.echo(f"int8:      {agreement_text(result['int8_agreement'])}")
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

    \b
        featx backbones 'efficientnet*'
    """
    from featx.api import describe_backbones

    rows = [r for r in describe_backbones() if fnmatch.fnmatch(r["name"], pattern)]
    if json_:
        emit_json(rows)
        return
    header = f"{'name':<20} {'input':>5} {'dim':>5}  {'imagenet weights':<22} source"
    click.echo(header)
    for r in rows:
        available = "offline" if r["offline_weights"] else "download (online only)"
        click.echo(f"{r['name']:<20} {r['input_size']:>5} {r['dim']:>5}  {available:<22} "
                   f"{r['weights_source']}")


@cli.command("augment-preview")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_png", type=click.Path(dir_okay=False), required=True,
              help="PNG file to write.")
@click.option("--n", type=click.IntRange(2, 64), default=16, show_default=True,
              help="Cells in the grid (the first is the original).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--size", type=click.IntRange(32, 1024), default=224, show_default=True)
@augment_options
@handle_errors
def augment_preview(image, out_png, n, seed, size, **kw):
    """Write a grid of augmented versions of IMAGE, to check augmentation before trusting it.

    Example:

    \b
        featx augment-preview photos/cat/cat.1.jpg --out preview.png
    """
    from featx.api import augment_preview as run_preview

    preview = run_preview(image, out_png, _augment_dict(kw), n=n, seed=seed, size=size)
    click.echo(f"wrote {preview.path}")
