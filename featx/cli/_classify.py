"""``featx fit``, ``featx compare`` and ``featx predict``: classifiers on cached embeddings."""

from __future__ import annotations

from pathlib import Path

import click

from featx._io import to_json
from featx.options import RUNTIMES

from ._app import cli, handle_errors, printed_json
from ._params import (DEFAULTS, _clf_choice_check, _options, _warn_random, classifier_options,
                      file_name_value, image_options, json_option, trust_pickle_option)


@cli.command()
@click.argument("data", type=click.Path())
@click.option("--clf", default="svm", show_default=True, callback=_clf_choice_check,
              help="Classifier: softmax, logistic, svm, knn or tree.")
@classifier_options
@click.option("--out", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Where the model and its metadata are saved.")
@click.option("--name", default=None, callback=file_name_value,
              help="Model file name [default: CLF-BACKBONE-DATASET].")
@click.option("--use-augmented", is_flag=True,
              help="Train on the cached augmented views too (see extract --augment).")
@image_options()
@json_option
@handle_errors
def fit(data, clf, json_, tune, class_weight, cv, tuning, calibrate, calibration, out, name,
        use_augmented, **kw):
    """Train a classifier on the cached embeddings of DATA and save it.

    Extracts first (through the same cache) if DATA is not cached yet, trains on the train
    split, reports val (and test) metrics, and saves MODEL.skops (scikit-learn's safe
    format: loading it runs no code from the file) with a MODEL.json sidecar.

    Example:

    \b
        featx fit photos/ --clf svm --json
    """
    from featx.api import fit as run_fit

    if "," in clf:  # "all" arrives expanded by _clf_choice_check
        raise click.BadParameter("fit takes one classifier; use `featx compare` for several",
                                 param_hint="--clf")
    outcome = run_fit(data, clf, tune=tune, class_weight=class_weight, out=out, name=name,
                      use_augmented=use_augmented, cv=cv, tuning=tuning,
                      calibrate=calibration if calibrate else None, options=_options(kw))
    _warn_random(outcome.weights)
    if printed_json(outcome, json_):
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
@trust_pickle_option
@json_option
@handle_errors
def predict(model, paths, top_k, batch_size, output, json_, runtime, min_score, trust_pickle):
    """Label images (files or folders) with a saved MODEL.

    MODEL is a .skops model (or its .json sidecar) from `featx fit`, or a .keras model from
    `featx finetune`. Images are preprocessed exactly as at training time; files that are in
    the model's cache reuse their embeddings. Output: CSV (path,label,score, then top-k),
    or JSON with --json. Loading either kind runs no code from the file; a .joblib model
    from featx 0.1 (a pickle, which does) needs --trust-pickle, or `featx convert-model`.

    Example:

    \b
        featx predict models/svm-efficientnet_lite0-photos.skops new_photos/ > labels.csv
    """
    from featx.api import predict as run_predict

    predictions = run_predict(model, paths, top_k=top_k, batch_size=batch_size,
                              runtime=runtime, min_score=min_score, trust_pickle=trust_pickle)
    click.echo(f"featx: embeddings from {', '.join(predictions.sources)}", err=True)
    text = to_json(predictions.rows) if json_ else predictions.to_csv()
    if output:
        Path(output).write_text(text + ("\n" if json_ else ""))
        click.echo(f"wrote {len(predictions)} predictions to {output}", err=True)
    else:
        click.echo(text, nl=json_)
    for path, error in predictions.failed:
        click.echo(f"featx: skipped {path}: {error}", err=True)


@cli.command("convert-model")
@click.argument("model", type=click.Path())
@click.option("--trust-pickle", is_flag=True,
              help="Required: load the .joblib once, which runs whatever code it holds; only "
              "for a file whose source you trust.")
@json_option
@handle_errors
def convert_model(model, trust_pickle, json_):
    """Convert a featx 0.1 MODEL (.joblib, or its .json sidecar) to .skops, once.

    A .joblib model is a pickle: loading it runs whatever code it holds, and its SHA-256
    sidecar does not say who wrote it. If you trust its source, this loads it once (hence
    --trust-pickle, required) and writes MODEL.skops beside it, which loads without running
    code, and points MODEL.json at it. The .joblib is left in place.

    Example:

    \b
        featx convert-model models/svm-efficientnet_lite0-photos.joblib --trust-pickle
    """
    from featx.api import convert_model as run_convert

    converted = run_convert(model, trust_pickle=trust_pickle)
    if not printed_json(converted, json_):
        click.echo(f"wrote {converted.model} ({converted.sidecar} now names it); "
                   f"{converted.converted_from} is no longer needed")


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
@image_options(multiple=True)
@json_option
@handle_errors
def compare(data, clfs, backbone, json_, tune, class_weight, cv, tuning, calibrate, calibration,
            report_dir, eval_split, augmented, repeats, finetune, finetune_epochs,
            finetune_warmup_epochs, **kw):
    """Train every classifier on the same cached features and write a benchmark report.

    With a warm cache no image goes through the model. Writes report.md, report.json, a
    confusion-matrix PNG per classifier and accuracy_vs_fit_time.png to --report-dir.

    Example:

    \b
        featx compare photos/ --report-dir reports/ --json
    """
    from featx.api import compare as run_compare

    finetune_options = None
    if finetune:
        finetune_options = {"epochs": finetune_epochs, "warmup_epochs": finetune_warmup_epochs}
    options = _options(kw)
    outcome = run_compare(data, clfs, backbones=backbone, report_dir=report_dir, tune=tune,
                          class_weight=class_weight, eval_split=eval_split, cv=cv,
                          finetune=finetune_options, augmented=augmented, options=options,
                          tuning=tuning, calibrate=calibration if calibrate else None,
                          repeats=repeats)
    _warn_random(options.weights)
    if printed_json(outcome, json_):
        return
    _print_compare(outcome)


def _print_compare(outcome):
    from featx.reports import backbone_label, extraction_cell, vs_best_text

    results = outcome.results
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
    for r in outcome.repeated or []:
        click.echo(f"{r['clf']:<10} {backbone_label(r):<{width}} x{r['repeats']:<4} "
                   f"{r['mean']['accuracy']:>8.4f} +/- {r['std']['accuracy']:.4f} "
                   f"(interval {r['interval']['accuracy'][0]:.3f}-"
                   f"{r['interval']['accuracy'][1]:.3f})")
    click.echo(f"report: {outcome.report}")
