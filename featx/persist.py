"""Save and load fitted classifiers: ``<name>.joblib`` plus a ``<name>.json`` sidecar.

The sidecar holds what is needed to use the model safely later: class names, the backbone
and cache key the embeddings came from, preprocessing, metrics, best parameters (all passed
by the caller), plus featx and scikit-learn versions, the creation time and the SHA-256 of
the joblib file (added here). :func:`load_model` refuses an artifact whose hash does not
match its sidecar.

joblib files are pickles: loading one runs code chosen by whoever wrote it. Only load
models you trust.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from featx._json import json_default
from featx.errors import DataError, UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TRUST_WARNING = "joblib model files execute code when loaded; only load models you trust"
_warned = False


def featx_version() -> str:
    """``featx.__version__``, else the installed distribution's version, else "0+unknown"."""
    try:
        import featx

        version = getattr(featx, "__version__", None)
        if version:
            return str(version)
    except ImportError:
        pass
    try:
        from importlib.metadata import version as dist_version

        return dist_version("featx")
    except Exception:  # PackageNotFoundError, or a broken install
        return "0+unknown"


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def _sha256(path: Path) -> str:
    from featx.data import file_sha256

    return file_sha256(path)


def _check_name(name: str):
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise UsageError(f"model name must be a plain file name, not {name!r}")


def write_atomic(path: Path, write):
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_model(estimator, out_dir, name: str, metadata: dict) -> Path:
    """Write ``out_dir/<name>.joblib`` and its ``out_dir/<name>.json`` sidecar.

    Parameters
    ----------
    estimator : fitted estimator
    out_dir : str or Path
        Created if missing.
    name : str
        File stem; no path separators.
    metadata : dict
        JSON-serialisable description from the caller. Expected keys (not enforced):
        ``classifier``, ``class_names``, ``backbone``, ``weights``, ``weights_id``,
        ``cache_key``, ``preprocessing``, ``metrics``, ``best_params``.

    Returns
    -------
    Path
        The ``.joblib`` file. Its sidecar gets the caller's metadata plus ``format``,
        ``artifact`` (the joblib file name), ``featx_version``, ``sklearn_version``,
        ``created`` (UTC, ISO 8601) and ``sha256``.
    """
    import joblib

    _check_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / f"{name}.joblib"
    sidecar = out_dir / f"{name}.json"

    write_atomic(artifact, lambda tmp: joblib.dump(estimator, tmp))
    record = {
        **metadata,
        "format": FORMAT_VERSION,
        "artifact": artifact.name,
        "featx_version": featx_version(),
        "sklearn_version": _sklearn_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": _sha256(artifact),
    }
    text = json.dumps(record, indent=2, default=json_default) + "\n"
    write_atomic(sidecar, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return artifact


def _paths(path: Path) -> tuple[Path, Path]:
    """(artifact, sidecar) for a path naming either one."""
    if path.suffix == ".json":
        return path.with_suffix(".joblib"), path
    if path.suffix == ".joblib":
        return path, path.with_suffix(".json")
    raise UsageError(f"{path}: expected a .joblib model file or its .json sidecar")


def read_metadata(path) -> dict:
    """The sidecar of a saved model (``path``: the .joblib or the .json), without loading it."""
    _, sidecar = _paths(Path(path))
    if not sidecar.is_file():
        raise DataError(f"{sidecar}: model metadata file not found")
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{sidecar}: unreadable model metadata ({exc})") from None


def _warn_once():
    global _warned
    if not _warned:
        log.warning(TRUST_WARNING)
        _warned = True


def load_model(path):
    """Load a model saved by :func:`save_model`, after checking its SHA-256.

    Parameters
    ----------
    path : str or Path
        The ``.joblib`` file or its ``.json`` sidecar.

    Returns
    -------
    (estimator, metadata)

    Raises
    ------
    DataError
        Missing artifact or sidecar, unreadable sidecar, or a hash mismatch (the artifact is
        then never unpickled).
    UsageError
        ``path`` is neither a .joblib nor a .json file.
    """
    import joblib

    path = Path(path)
    artifact, _ = _paths(path)
    if not path.exists():
        raise DataError(f"{path}: model file not found")
    metadata = read_metadata(path)
    recorded = metadata.get("artifact")
    if recorded:
        if not isinstance(recorded, str) or Path(recorded).name != recorded:
            raise DataError(f"{path}: metadata names an invalid model file {recorded!r}")
        artifact = artifact.with_name(recorded)
    if not artifact.is_file():
        raise DataError(f"{artifact}: model file not found")
    expected = metadata.get("sha256")
    if not expected or _sha256(artifact) != expected:
        raise DataError(
            f"refusing to load {artifact}: its SHA-256 does not match the metadata; "
            "joblib files execute code when loaded, only load models you trust")
    _warn_once()
    saved_with = metadata.get("sklearn_version")
    if saved_with and saved_with != _sklearn_version():
        log.warning("%s was saved with scikit-learn %s, this is %s; predictions may differ",
                    artifact.name, saved_with, _sklearn_version())
    return joblib.load(artifact), metadata
