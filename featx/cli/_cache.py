"""``featx cache``: list, describe, verify, compact and export embedding caches."""

from __future__ import annotations

import click

from ._app import cli, handle_errors, printed_json
from ._params import DEFAULTS, json_option


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

    \b
        featx cache ls --cache-dir cache/
    """
    from featx.api import list_caches

    rows = list_caches(cache_dir)
    if printed_json(rows, json_):
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

    \b
        featx cache info cache/photos-1a2b3c4d/efficientnet_lite0-imagenet-0123456789ab.h5
    """
    from featx.api import cache_info as read_info

    info = read_info(path)
    if printed_json(info, json_):
        return
    for name in ("cache", "root", "backbone", "weights_id", "variant", "dim", "n_images",
                 "n_augmented",
                 "splits", "class_names", "split_params", "preprocessing", "featx_version",
                 "created", "updated"):
        click.echo(f"{name + ':':<15} {'-' if info.get(name) == '' else info.get(name)}")
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

    \b
        featx cache compact cache/photos-1a2b3c4d/efficientnet_lite0-imagenet-0123456789ab.h5
    """
    from featx.api import compact_cache

    outcome = compact_cache(path)
    if printed_json(outcome, json_):
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

    \b
        featx cache verify cache/photos-1a2b3c4d/efficientnet_lite0-imagenet-0123456789ab.h5
    """
    from featx.api import verify_cache

    outcome = verify_cache(path)
    printed = printed_json(outcome, json_)
    outcome.raise_if_damaged()
    if not printed:
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

    \b
        featx cache export cache/photos-1a2b3c4d/efficientnet_lite0-imagenet-0123456789ab.h5 \\
            --format parquet -o embeddings/
    """
    from featx.api import export_embeddings

    record = export_embeddings(path, format_, output, views=views)
    if printed_json(record, json_):
        return
    click.echo(f"wrote {record['n_rows']} rows x {record['dim']} ({record['backbone']}, "
               f"{record['precision']}) to {output}: {', '.join(record['files'])}, export.json")
