"""``featx audit``: what is wrong with the data, from its cached embeddings."""

from __future__ import annotations

import click

from featx.options import AUDIT_MAPS, AuditOptions

from ._app import cli, handle_errors, printed_json
from ._params import AUDIT_DEFAULTS, _options, _warn_random, image_options, json_option


@cli.command()
@click.argument("data", type=click.Path())
@click.option("--report-dir", type=click.Path(file_okay=False), default="reports/audit",
              show_default=True, help="Where audit.md, audit.json and the PNGs go.")
@click.option("--top", type=click.IntRange(1), default=AUDIT_DEFAULTS.top, show_default=True,
              help="Longest list per finding type.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True),
              default=AUDIT_DEFAULTS.threshold, show_default=True,
              help="Cosine similarity from which two images are near-duplicates when they "
                   "are not checked from the images (--no-verify, or a file that cannot be "
                   "read).")
@click.option("--verify/--no-verify", default=AUDIT_DEFAULTS.verify, show_default=True,
              help="Confirm near-duplicates from the images: local features (ORB) and one "
                   "geometric fit; finds cropped, mirrored and edited copies, and does not "
                   "chain look-alikes into one group.")
@click.option("--candidate-cosine", type=click.FloatRange(0, 1, min_open=True),
              default=AUDIT_DEFAULTS.candidate_cosine, show_default=True,
              help="With --verify: the cosine from which an image's nearest neighbours are "
                   "checked.")
@click.option("--candidates", type=click.IntRange(1), default=AUDIT_DEFAULTS.candidates,
              show_default=True,
              help="With --verify: how many nearest neighbours of each image are checked.")
@click.option("--min-inliers", type=click.IntRange(3), default=AUDIT_DEFAULTS.min_inliers,
              show_default=True,
              help="With --verify: keypoint matches one similarity transform must explain.")
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
@image_options()
@json_option
@handle_errors
def audit(data, json_, report_dir, top, threshold, verify, candidate_cosine, candidates,
          min_inliers, folds, neighbours, map_, write_exclude, **kw):
    """Find near-duplicates, leakage across splits, likely label errors and outliers.

    Works on the cached embeddings (with a warm cache no image goes through the model) and
    writes audit.md, audit.json, a contact sheet per finding type and a map of the
    embeddings to --report-dir.

    Example:

    \b
        featx audit photos/ --write-exclude exclude.txt
        featx compare photos/ --exclude exclude.txt
    """
    from featx.api import audit as run_audit

    options = _options(kw)
    audit_options = AuditOptions(threshold=threshold, verify=verify,
                                 candidate_cosine=candidate_cosine, candidates=candidates,
                                 min_inliers=min_inliers,
                                 folds=folds, neighbours=neighbours, top=top, map=map_,
                                 seed=options.seed)
    outcome = run_audit(data, report_dir=report_dir, write_exclude=write_exclude,
                        audit_options=audit_options, options=options)
    _warn_random(options.weights)
    for line in outcome.skipped:
        click.echo(f"featx: {line}", err=True)
    if printed_json(outcome, json_):
        return
    counts = outcome.counts
    click.echo(f"audited {outcome['n_images']} images ({outcome['n_extracted']} embedded now)")
    click.echo(f"  near-duplicate groups: {counts['duplicates_across_splits']} across splits, "
               f"{counts['duplicates_conflicting_labels']} with conflicting labels, "
               f"{counts['duplicates_same_class']} in one class")
    click.echo(f"  likely label errors:   {counts['label_errors']}")
    click.echo(f"  outliers:              {counts['outliers']}")
    if outcome.exclude_file:
        click.echo(f"exclude list: {outcome.exclude_file} ({outcome.n_exclude} paths)")
    click.echo(f"report: {outcome.report}")
