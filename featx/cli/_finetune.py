"""``featx finetune``: the two-stage fine-tuning recipe, the comparison point."""

from __future__ import annotations

import click

from ._app import cli, handle_errors, printed_json
from ._params import (_augment_dict, _options, _unfreeze_value, _warn_random, augment_options,
                      backbone_options, cache_options, file_name_value, json_option,
                      split_options)


@cli.command()
@click.argument("data", type=click.Path())
@click.option("--warmup-epochs", type=click.IntRange(1), default=5, show_default=True,
              help="Stage 1 (frozen base, new head) epochs at most.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True,
              help="Stage 2 (top of the base unfrozen) epochs at most.")
@click.option("--unfreeze", default="20", show_default=True, callback=_unfreeze_value,
              help="Top N layers of the base to unfreeze in stage 2, or 'all'.")
@click.option("--lr-head", type=click.FloatRange(0, min_open=True), default=1e-3,
              show_default=True)
@click.option("--lr-base", type=click.FloatRange(0, min_open=True), default=1e-5,
              show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.2,
              show_default=True)
@click.option("--patience", type=click.IntRange(1), default=3, show_default=True,
              help="Early stopping patience on val loss (best weights restored).")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Augment training batches on the fly.")
@augment_options
@click.option("--out", type=click.Path(file_okay=False), default="models", show_default=True)
@click.option("--name", default=None, callback=file_name_value,
              help="Model name [default: finetune-BACKBONE].")
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

    \b
        featx finetune photos/ --warmup-epochs 3 --epochs 5 --unfreeze 20 --json
    """
    from featx.api import finetune as run_finetune

    augmentation = _augment_dict(kw)
    batch_size = kw.pop("batch_size")
    options = _options(kw)
    result = run_finetune(data, augment=augmentation if augment else False,
                          batch_size=batch_size, options=options, **kw)
    _warn_random(result.weights)
    if printed_json(result, json_):
        return
    click.echo(f"model:        {result.model_path}")
    click.echo(f"val accuracy: {result.val_accuracy:.4f}   val macro-F1: {result.val_macro_f1:.4f}")
    click.echo(f"epochs:       {result.epochs_run} (stage 1: {result.stage1_epochs}), "
               f"best epoch {result.best_epoch}, {result.seconds:.1f} s")
    click.echo(f"history:      {result.history_path}, {result.plot_path}")
