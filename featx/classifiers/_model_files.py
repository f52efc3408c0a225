"""A fitted classifier saved as ``<name>.skops`` with a JSON sidecar that records its
SHA-256 and what rebuilds its features (backbone, cache key, preprocessing), its metrics
and the versions that wrote it.

A ``.skops`` file holds data, not code: loading it builds only skops' trusted scikit-learn,
NumPy and SciPy types plus :data:`TRUSTED_TYPES`, and refuses a file holding any other type.
The sidecar's SHA-256 catches a damaged or replaced file; it is not trust, since whoever can
write the model can write its sidecar. Models saved by featx 0.1 are pickles (``.joblib``):
loading one runs whatever code it holds, so they load only with ``trust_pickle=True``, and
:func:`convert_model` rewrites one as ``.skops`` once.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from featx._io import check_artifact, featx_version, read_sidecar, save_artifact, sidecar_for
from featx.errors import DataError, FeatxError, UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: a joblib pickle (featx 0.1); 2: skops

SUFFIX = ".skops"

PICKLE_SUFFIX = ".joblib"

# The types featx's own classifiers hold beyond skops' default trusted ones: what
# skops.io.get_untrusted_types reports over every registered classifier, fitted with and
# without class weights and calibration (tests/test_model_trust.py derives it again).
# Fixed on purpose: a type added here is a type any model file may make featx build.
TRUSTED_TYPES = (
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.tree._tree.Tree",
)


def _sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def _check_name(name: str):
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise UsageError(f"model name must be a plain file name, not {name!r}")


def save_model(estimator, out_dir, name: str, metadata: dict) -> Path:
    """Write ``out_dir/<name>.skops`` and its ``out_dir/<name>.json`` sidecar.

    Parameters
    ----------
    estimator : fitted estimator
        Holding only skops' trusted types and :data:`TRUSTED_TYPES` (every classifier of
        the registry does), so that :func:`load_model` loads what was saved.
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
        The ``.skops`` file. Its sidecar gets the caller's metadata plus ``format``,
        ``artifact`` (the model file's name), ``featx_version``, ``sklearn_version``,
        ``created`` (UTC, ISO 8601) and ``sha256``.
    """
    _check_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / f"{name}{SUFFIX}"
    _write_skops(estimator, artifact, {**metadata, "created": _now()})
    return artifact


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_skops(estimator, artifact: Path, metadata: dict) -> dict:
    sio = _skops_io()
    data = sio.dumps(estimator)
    extra = _untrusted(sio.get_untrusted_types(data=data))
    if extra:  # a file load_model would refuse: a new classifier needs TRUSTED_TYPES
        raise FeatxError(f"{artifact}: not saved; the model holds types outside featx's "
                         f"allow-list (TRUSTED_TYPES): {', '.join(extra)}")
    record = {**metadata, "format": FORMAT_VERSION, "artifact": artifact.name,
              "featx_version": featx_version(), "sklearn_version": _sklearn_version()}
    return save_artifact(artifact, lambda tmp: tmp.write_bytes(data), record)


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ImportError("not needed to list skops' trusted types")
        return None


def _skops_io():
    """``skops.io``, imported without importing PyTorch where nothing else has.

    skops lists its trusted types by importing every scikit-learn package, and one of them,
    scikit-learn's array-API shim for PyTorch, imports torch when it is installed: 1.5-2 s
    and a framework that `featx predict` on ONNX Runtime does not otherwise load. The shim
    is left unimported (scikit-learn skips packages that fail to import), so a later
    ``import torch`` works as usual.
    """
    if "skops.io" in sys.modules or "torch" in sys.modules:
        import skops.io

        return skops.io
    finder = _NoTorch()
    sys.meta_path.insert(0, finder)
    try:
        import skops.io
    finally:
        sys.meta_path.remove(finder)
    return skops.io


def _untrusted(types) -> list[str]:
    """The type names of ``types`` outside :data:`TRUSTED_TYPES`, printable on one line."""
    return sorted(ascii(t)[1:-1] for t in set(types) - set(TRUSTED_TYPES))


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
        return path.with_suffix(SUFFIX), path
    if path.suffix in (SUFFIX, PICKLE_SUFFIX):
        return path, sidecar_for(path)
    raise UsageError(f"{path}: expected a {SUFFIX} model file (or a {PICKLE_SUFFIX} one from "
                     "featx 0.1) or its .json sidecar")


def read_metadata(path) -> dict:
    """The sidecar of a saved model (``path``: the model file or its .json), without
    loading the model."""
    return read_sidecar(_paths(Path(path))[1])


def _artifact(path: Path) -> tuple[Path, Path, dict]:
    """(model file, sidecar, metadata) of a saved model: the file its sidecar names."""
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
    return artifact, sidecar, metadata


def load_model(path, *, trust_pickle: bool = False):
    """Load a model saved by :func:`save_model`, after checking its SHA-256.

    Parameters
    ----------
    path : str or Path
        The ``.skops`` file or its ``.json`` sidecar (or a featx 0.1 ``.joblib``).
    trust_pickle : bool
        Load a ``.joblib`` pickle, which runs whatever code it holds. Say so only for a
        file whose source you trust; :func:`convert_model` then rewrites it as ``.skops``.

    Returns
    -------
    (estimator, metadata)

    Raises
    ------
    DataError
        Missing model file or sidecar, unreadable sidecar, a hash mismatch, or a ``.skops``
        file holding a type outside the allow-list (the file is then never loaded).
    UsageError
        A ``.joblib`` pickle without ``trust_pickle``, or ``path`` is none of the above.
    """
    artifact, sidecar, metadata = _artifact(Path(path))
    pickled = artifact.suffix != SUFFIX
    if pickled and not trust_pickle:
        raise UsageError(_pickle_refusal(path, artifact, sidecar))
    check_artifact(artifact, metadata.get("sha256"), sidecar.name)
    saved_with = metadata.get("sklearn_version")
    if saved_with and saved_with != _sklearn_version():
        log.warning("%s was saved with scikit-learn %s, this is %s; predictions may differ",
                    artifact.name, saved_with, _sklearn_version())
    estimator = _load_pickle(artifact) if pickled else _load_skops(artifact)
    if not hasattr(estimator, "predict"):
        raise DataError(f"{artifact}: holds a {type(estimator).__name__}, not a fitted "
                        "classifier")
    return estimator, metadata


def _pickle_refusal(path, artifact: Path, sidecar: Path) -> str:
    """Why a pickled model is refused, and how to trust it once: one line."""
    return (f"refusing to load {artifact}: it is a pickle, and loading a pickle runs "
            f"whatever code it holds (its SHA-256 in {sidecar.name} proves nothing: whoever "
            "can write the model can write its sidecar). If you trust its source, convert it "
            f"once: `featx convert-model {path} --trust-pickle` writes "
            f"{artifact.with_suffix(SUFFIX).name}, which loads without running code "
            "(or pass --trust-pickle, in Python trust_pickle=True, to load it as it is)")


def _load_pickle(artifact: Path):
    import joblib

    return joblib.load(artifact)


def _load_skops(artifact: Path):
    import zipfile

    sio = _skops_io()
    try:
        extra = _untrusted(sio.get_untrusted_types(file=artifact))
        if extra:
            raise DataError(f"refusing to load {artifact}: it holds types outside featx's "
                            f"allow-list: {', '.join(extra)}")
        return sio.load(artifact, trusted=list(TRUSTED_TYPES))
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{artifact}: not a readable skops model "
                        f"({type(exc).__name__}: {ascii(str(exc))[1:-1][:200]})") from None


def convert_model(path, *, trust_pickle: bool = False) -> tuple[Path, dict]:
    """Rewrite a featx 0.1 model (a ``.joblib`` pickle) as ``.skops`` beside its sidecar,
    and point the sidecar at the new file; the pickle is left where it is.

    It loads the pickle once, which runs whatever code the file holds: hence
    ``trust_pickle``, without which it refuses as :func:`load_model` does. Returns the
    ``.skops`` file and its sidecar's new content (``converted_from``: the pickle's name).
    """
    artifact, sidecar, _ = _artifact(Path(path))
    if artifact.suffix == SUFFIX:
        raise UsageError(f"{path}: already a {SUFFIX} model ({artifact.name}); nothing to "
                         "convert")
    estimator, metadata = load_model(path, trust_pickle=trust_pickle)
    target = sidecar.with_suffix(SUFFIX)  # beside its sidecar, which keeps its name
    kept = {k: v for k, v in metadata.items() if k != "sha256"}
    record = _write_skops(estimator, target, {**kept, "converted_from": artifact.name,
                                              "converted": _now()})
    return target, record
