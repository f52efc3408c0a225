"""The ``featx`` command: a thin click layer over :mod:`featx.api`. Each command parses its
options, calls one API function and prints the typed result it returns (``--json``: its
``to_dict()``).

Modules: ``_app`` (the group, errors, JSON output), ``_params`` (shared options), then one
module per command group: ``_extract`` (extract, backbones, augment-preview),
``_classify`` (fit, compare, predict, convert-model), ``_finetune``, ``_deploy`` (export),
``_audit``, ``_cache`` (cache ls/info/verify/compact/export), ``_demo``.
"""

from . import _audit, _cache, _classify, _demo, _deploy, _extract, _finetune  # noqa: F401
from ._app import cli, main
from ._params import check_values

check_values(cli)  # every command's paths and floats, checked in one place

__all__ = ["cli", "main"]
