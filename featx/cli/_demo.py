"""``featx demo``: the main job end to end."""

from __future__ import annotations

import click

from ._app import cli, handle_errors
from ._params import DEFAULTS


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

    \b
        featx demo            # on the digits
        featx demo photos/    # on your own folder
    """
    from featx.api import DIGITS_FOLDER, write_digits
    from featx.api import demo as run_demo

    if data is None:
        data = write_digits(DIGITS_FOLDER)
        click.echo(f"wrote scikit-learn's digits as image folders under {data}", err=True)
    done = run_demo(data, report_dir=report_dir, cache_dir=cache_dir, backbone=backbone)
    features, outcome = done.features, done.compared
    stats = features.stats
    click.echo(f"extract: {stats.n_images} images, {stats.n_extracted} through "
               f"{features.backbone} ({features.weights_id}) in {stats.seconds:.1f} s, "
               f"{stats.n_failed} failed; cache {' + '.join(map(str, features.cache_paths))}")
    click.echo(f"runtime: {features.provenance()}")
    for r in sorted(outcome.results, key=lambda r: -r["accuracy"]):
        low, high = r["intervals"]["accuracy"]
        click.echo(f"  {r['clf']:<9} val accuracy {r['accuracy']:.4f} (95% {low:.3f}-"
                   f"{high:.3f})  macro-F1 {r['macro_f1']:.4f}  fit {r['fit_seconds']:.2f} s")
    click.echo(f"report: {outcome.report}")
