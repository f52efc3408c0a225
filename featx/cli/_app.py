"""The ``featx`` group, and what every command shares: logging on stderr, one line and an
exit code per error, one JSON object as the last line of stdout.

Results go to stdout (with --json, one JSON object as the last line); logs, warnings and
progress bars go to stderr. Exit codes: 0 success (also when some files were skipped),
2 usage or data errors (and a file that cannot be written: a full disk, a read-only folder),
1 internal errors, 128 + the signal's number for an extract stopped by SIGINT or SIGTERM.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import warnings

import click

from featx import TF_LOG_LEVEL_CHOSEN, __version__
from featx._backend import backend_name, require_backend
from featx._native_logs import native_logs_dropped
from featx._io import to_json
from featx.errors import FeatxError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
log = logging.getLogger("featx")


def _configure_logging(verbose: int):
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("featx: %(levelname)s: %(message)s"))
    root = logging.getLogger("featx")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# Loggers of the libraries featx drives, quiet below -v: TensorFlow's Python side, absl
# (which Keras and TensorFlow log through), the ONNX converters, JAX's platform probing, Ray.
LIBRARY_LOGGERS = ("tensorflow", "absl", "tf2onnx", "onnx", "onnxruntime", "keras", "jax",
                   "jax._src.xla_bridge", "ray", "h5py", "matplotlib", "PIL")


def _quiet_libraries(verbose: int):
    """A normal run prints featx's lines and progress bars only; ``-v`` lets the libraries
    speak again (TensorFlow's C++ log included, unless TF_CPP_MIN_LOG_LEVEL was set). The
    native lines that ignore the level are dropped by main() (:mod:`featx._native_logs`).

    TensorFlow reads its C++ log level when it is imported, which no command does before
    this runs."""
    if not TF_LOG_LEVEL_CHOSEN:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3" if verbose == 0 else "0"
    level = logging.ERROR if verbose == 0 else logging.NOTSET
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if verbose == 0:
        warnings.filterwarnings("ignore")


def _print_any_file_name():
    """File names that are not UTF-8 (which Python holds surrogate-escaped) print as their
    bytes, as ls prints them, instead of failing a command once its work is done."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


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
            _storage_error(exc)
            if os.environ.get("FEATX_DEBUG"):
                raise
            click.echo(f"Internal error: {type(exc).__name__}: {exc} "
                       "(set FEATX_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper


# A file that could not be written or read for a reason outside featx (a full disk, a
# read-only or missing folder): one line naming it, exit 2. What was saved before is kept
# (files are replaced whole), so the rerun goes on from there.
STORAGE_ERRORS = {
    errno.ENOSPC: "; free some space and run the command again",
    errno.EDQUOT: "; free some space and run the command again",
    errno.EROFS: "; make it writable, or choose another folder",
    errno.EACCES: "; make it writable, or choose another folder",
}


def _storage_error(exc: Exception):
    """Exit 2 with one line for an OSError about storage: one in STORAGE_ERRORS, or any
    other that names its file (ENOENT, ENOTDIR, EPERM...)."""
    if not isinstance(exc, OSError) or exc.errno is None:
        return
    if exc.errno in STORAGE_ERRORS or exc.filename is not None:
        where = "" if exc.filename is None else f"{exc.filename}: "
        click.echo(f"Error: {where}{os.strerror(exc.errno)}{STORAGE_ERRORS.get(exc.errno, '')}",
                   err=True)
        sys.exit(2)


def _missing_backend(exc: ModuleNotFoundError):
    """Keras' backend failed to import: the one line require_backend gives, exit 2."""
    if exc.name and exc.name.split(".")[0] == backend_name():
        try:
            require_backend()
        except FeatxError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(error.exit_code)


def emit_json(obj):
    """Print ``obj`` as one JSON line, the last line of stdout."""
    click.echo(to_json(obj))


def printed_json(result, json_: bool) -> bool:
    """With ``--json``: print the result's ``to_dict()`` (a list's, row by row); says
    whether it did, so the command stops there."""
    if json_:
        emit_json([r.to_dict() for r in result] if isinstance(result, list)
                  else result.to_dict())
    return json_


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="featx")
@click.option("-v", "--verbose", count=True,
              help="More logging on stderr (-vv for debug); also shows the libraries' own "
                   "log lines and warnings, which a normal run keeps quiet.")
def cli(verbose):
    """featx: transfer learning by feature extraction.

    Embed a folder of labelled images once with a frozen ImageNet ConvNet (cached in HDF5),
    then train and compare classifiers on the cached embeddings in seconds.

    Example:

    \b
        featx extract path/to/images
        featx compare path/to/images --report-dir reports/
    """
    _configure_logging(verbose)
    _quiet_libraries(verbose)
    _print_any_file_name()
    if verbose == 0 and _RUN_AS_PROGRAM:
        click.get_current_context().with_resource(native_logs_dropped())


# Set by main(), the `featx` program; not when a test or a script calls `cli` in-process,
# where stderr's file descriptor is not featx's to replace.
_RUN_AS_PROGRAM = False


def main():
    global _RUN_AS_PROGRAM
    _RUN_AS_PROGRAM = True
    cli(prog_name="featx")
