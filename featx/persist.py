"""Save and load model files, each with a JSON sidecar that vouches for it by SHA-256.

Fitted classifiers are ``<name>.joblib`` (:func:`save_model`, :func:`load_model`); fine-tuned
Keras models are ``<name>.keras`` (:func:`save_keras_model`, :func:`load_keras_model`).
Both go through one pair of helpers: :func:`save_artifact` writes the file and then its
sidecar ``<name>.json`` atomically, with the file's SHA-256 added to the caller's record;
:func:`check_artifact` refuses a file whose hash does not match its sidecar.

The classifier sidecar holds what is needed to use the model safely later: class names, the
backbone and cache key the embeddings came from, preprocessing, metrics, best parameters
(all passed by the caller), plus featx and scikit-learn versions and the creation time.

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
from featx.data import file_sha256
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


def _check_name(name: str):
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise UsageError(f"model name must be a plain file name, not {name!r}")


def write_atomic(path: Path, write, *, keep_suffix: bool = False):
    """Write through a temporary file in the same folder, then rename over ``path``.

    ``write(tmp)`` writes the file. The temporary name is ``.<name>.tmp<pid>``, or with
    ``keep_suffix`` ``.<stem>.tmp<pid><suffix>``, for writers that check the suffix
    (Keras' ``model.save`` wants ``.keras``).
    """
    tmp = (path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}") if keep_suffix
           else path.with_name(f".{path.name}.tmp{os.getpid()}"))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def sidecar_for(artifact) -> Path:
    """The JSON sidecar of a model file: same name, ``.json`` suffix."""
    return Path(artifact).with_suffix(".json")


def save_artifact(artifact: Path, write, record: dict, *, keep_suffix: bool = False) -> dict:
    """Write ``artifact`` through ``write(tmp)``, then its sidecar vouching for it.

    Both files are written atomically (:func:`write_atomic`), the sidecar
    (:func:`sidecar_for`) last, so a sidecar never names a half-written file.

    Returns
    -------
    dict
        What the sidecar holds: ``record`` plus ``sha256`` (the artifact's hex SHA-256).
    """
    artifact = Path(artifact)
    write_atomic(artifact, write, keep_suffix=keep_suffix)
    record = {**record, "sha256": file_sha256(artifact)}
    text = json.dumps(record, indent=2, default=json_default) + "\n"
    write_atomic(sidecar_for(artifact), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return record


def sha256_matches(artifact, expected) -> bool:
    """Whether the file's SHA-256 is ``expected`` (the one its sidecar recorded)."""
    return bool(expected) and file_sha256(artifact) == expected


def check_artifact(artifact, expected_sha256, sidecar_name: str) -> None:
    """The trust check before loading a model file: raise DataError unless its hash matches.

    ``expected_sha256`` is what the sidecar ``sidecar_name`` recorded (missing counts as a
    mismatch); the file is never loaded when it does not match.
    """
    if not sha256_matches(artifact, expected_sha256):
        raise DataError(
            f"refusing to load {artifact}: its SHA-256 does not match the sha256 recorded in "
            f"{sidecar_name} ({str(expected_sha256)[:16]}); the file changed after it was "
            "saved. Model files may execute code when loaded: only load models you trust")


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

    ``features``: the :class:`featx.extraction.Features` it was fitted on; ``result``: the
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


def read_sidecar(sidecar) -> dict:
    """A sidecar's JSON; DataError when it is missing or unreadable."""
    sidecar = Path(sidecar)
    if not sidecar.is_file():
        raise DataError(f"{sidecar}: model metadata file not found")
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{sidecar}: unreadable model metadata ({exc})") from None


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


def save_keras_model(model, path, metadata: dict) -> dict:
    """Write a Keras model to ``path`` (a ``.keras`` file) and its sidecar.

    Returns the sidecar's content: ``metadata`` plus ``sha256``.
    """
    return save_artifact(Path(path), lambda tmp: model.save(str(tmp)), metadata,
                         keep_suffix=True)  # model.save checks the suffix


def load_keras_model(path):
    """Load a fine-tuned model saved by :func:`save_keras_model`, after its trust check.

    Returns
    -------
    (keras.Model, metadata)

    Raises
    ------
    DataError
        The file or its sidecar is missing, the sidecar is not a fine-tuned model's, or the
        file's SHA-256 differs from the recorded one (the model is then never loaded).
    """
    import keras

    import featx.augment  # noqa: F401 - registers featx layers for deserialisation
    import featx.backbones.layers  # noqa: F401

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    sidecar = sidecar_for(path)
    if not sidecar.is_file():
        raise DataError(f"{path}: its metadata file {sidecar.name} is missing; a fine-tuned "
                        "model needs it (class names, preprocessing)")
    metadata = read_sidecar(sidecar)
    if metadata.get("featx_model") != "finetune":
        raise DataError(f"{sidecar}: not the metadata of a featx fine-tuned model")
    check_artifact(path, metadata.get("sha256"), sidecar.name)
    return keras.saving.load_model(str(path), compile=False), metadata
