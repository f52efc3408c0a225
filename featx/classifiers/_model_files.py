"""A fitted classifier saved as ``<name>.joblib`` with a JSON sidecar that vouches for it by
SHA-256 and records what rebuilds its features (backbone, cache key, preprocessing), its
metrics and the versions that wrote it.

joblib files are pickles: loading one runs code chosen by whoever wrote it. Only load
models you trust; :func:`load_model` refuses a file whose hash is not the recorded one.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from featx._io import check_artifact, featx_version, read_sidecar, save_artifact, sidecar_for
from featx.errors import DataError, UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


TRUST_WARNING = "joblib model files execute code when loaded; only load models you trust"


_warned = False


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def _check_name(name: str):
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise UsageError(f"model name must be a plain file name, not {name!r}")


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
    record = {
        **metadata,
        "format": FORMAT_VERSION,
        "artifact": artifact.name,
        "featx_version": featx_version(),
        "sklearn_version": _sklearn_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_artifact(artifact, lambda tmp: joblib.dump(estimator, tmp), record)
    return artifact


def feature_source(features, options) -> dict:
    """What rebuilds one backbone's features of a saved classifier (``featx.inference``
    reads it): backbone, weights, options, cache key, cache file, preprocessing, dim."""
    return {
        "backbone": features.backbone,
        "weights": features.weights,
        "weights_id": features.weights_id,
        "backbone_options": {"layer": features.key.get("layer"),
                             "pooling": features.key.get("pooling"),
                             "input_size": features.preprocessing.get("input_size"),
                             "seed": options.seed, "weights_arg": str(options.weights)},
        "cache_key": features.key,
        "cache": str(features.cache_path),
        "preprocessing": features.preprocessing,
        "dim": int(features.dim),
    }


def classifier_metadata(features, clf, result, options, metrics, predictions, *, n_train,
                        use_augmented) -> dict:
    """What a saved classifier records (its sidecar, with :func:`save_model`'s fields):
    enough to rebuild its features (:mod:`featx.inference` reads it) and to audit it.

    ``features``: the :class:`featx.cache.Features` it was fitted on; ``result``: the
    :class:`featx.classifiers.FitResult`; ``options``: the
    :class:`featx.options.ExtractOptions`; ``predictions``: split -> {path: class index}.
    """
    parts = list(getattr(features, "parts", [features]))
    if len(parts) == 1:
        source = feature_source(features, options)
    else:  # a combined backbone: what rebuilds each part's features
        source = {"backbone": features.backbone, "weights": features.weights,
                  "weights_id": features.weights_id, "cache_key": features.key,
                  "preprocessing": features.preprocessing, "dim": int(features.dim),
                  "parts": [feature_source(part, options) for part in parts]}
    return {
        "kind": "featx-classifier",
        "clf": clf,
        "classes": list(features.class_names),
        **source,
        "data_root": str(features.root),
        "split_params": features.split_params,
        "n_train": int(n_train),
        "trained_on_augmented_views": bool(use_augmented),
        "metrics": metrics,
        "best_params": result.best_params,
        "tuned": result.tuned,
        "class_weight": result.class_weight,
        "calibration": result.calibration,  # None, "sigmoid" or "isotonic" (CV-calibrated)
        "fit_seconds": result.fit_seconds,
        "val_predictions": {p: features.class_names[i]
                            for p, i in predictions.get("val", {}).items()},
    }


def _paths(path: Path) -> tuple[Path, Path]:
    """(artifact, sidecar) for a path naming either one."""
    if path.suffix == ".json":
        return path.with_suffix(".joblib"), path
    if path.suffix == ".joblib":
        return path, sidecar_for(path)
    raise UsageError(f"{path}: expected a .joblib model file or its .json sidecar")


def read_metadata(path) -> dict:
    """The sidecar of a saved model (``path``: the .joblib or the .json), without loading it."""
    return read_sidecar(_paths(Path(path))[1])


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
    artifact, sidecar = _paths(path)
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
    check_artifact(artifact, metadata.get("sha256"), sidecar.name)
    _warn_once()
    saved_with = metadata.get("sklearn_version")
    if saved_with and saved_with != _sklearn_version():
        log.warning("%s was saved with scikit-learn %s, this is %s; predictions may differ",
                    artifact.name, saved_with, _sklearn_version())
    return joblib.load(artifact), metadata
