"""``featx export``: a saved model as one deployable file, checked against predict."""

from __future__ import annotations

import sys

import click

from ._app import cli, handle_errors, printed_json
from ._params import json_option, trust_pickle_option


@cli.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
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
@trust_pickle_option
@json_option
@handle_errors
def export_cmd(model, format_, precision, output, check, json_, trust_pickle):
    """Write MODEL as one deployable file: uint8 RGB images in, class scores out.

    MODEL is a softmax, logistic or svm model from `featx fit` (its scaler and linear head
    are folded into one dense layer after the backbone) or a .keras model from `featx
    finetune`. The file carries its class names, preprocessing recipe, backbone identity
    and featx version; it runs without featx (see the README's example).

    Example:

    \b
        featx export models/svm-efficientnet_lite0-photos.skops --check photos/
    """
    from featx.api import export as run_export

    exported = run_export(model, format_, precision=precision, out=output, check=check,
                          trust_pickle=trust_pickle)
    parity = exported.parity
    if not printed_json(exported, json_):
        click.echo(f"wrote {exported.path} ({exported.format}, {exported.precision}, "
                   f"{exported.size_bytes / 1e6:.1f} MB): uint8 images -> "
                   f"{exported.metadata['output']} over {len(exported.metadata['classes'])} "
                   f"classes, in {exported.seconds:.1f} s")
        if parity:
            click.echo(parity.line())
    if parity and not parity.passed:
        sys.exit(1)
