"""Weight specifications: parsing, identities for cache keys, offline policy."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from featx.errors import WeightsUnavailableError

from ._config import BackboneCfg

OFFLINE_ENV = "FEATX_OFFLINE"


def is_offline() -> bool:
    """True when ``FEATX_OFFLINE`` asks featx never to download."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def offline_error(cfg: BackboneCfg, reason: str) -> WeightsUnavailableError:
    """The one-line error for ImageNet weights that would need a download."""
    from ._registry import list_backbones, get_backbone_cfg

    offline = ", ".join(n for n in list_backbones() if get_backbone_cfg(n).offline)
    return WeightsUnavailableError(
        f"{cfg.name}: ImageNet weights must be downloaded by Keras and this machine is "
        f"offline ({reason}). Use --weights PATH with a local .weights.h5 file, or an "
        f"offline backbone: {offline}.")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from featx._io import file_sha256

    return file_sha256(path)


def short_sha256(path: str | Path) -> str:
    """First 16 hex digits of the file's sha256 (memoised while the file is unchanged)."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)[:16]


def resolve(cfg: BackboneCfg, weights: str | os.PathLike, seed: int,
            imagenet_file: tuple[str, Path | None] | None) -> tuple[str, str, str]:
    """Turn a user's ``weights`` into (kind, builder argument, weights_id).

    Parameters
    ----------
    cfg : BackboneCfg
    weights : str or path-like
        ``"imagenet"``, ``"random"`` or a path to a local weights file.
    seed : int
        Seed for random weights.
    imagenet_file : (file name, local path or None) or None
        Where the ImageNet weights live; None when the backbone has none.

    Raises
    ------
    WeightsUnavailableError
        For a missing file, or ImageNet weights that are not local while offline.
    """
    if weights == "random":
        return "random", "random", f"random:seed={int(seed)}"
    if weights == "imagenet":
        return "imagenet", "imagenet", _imagenet_id(cfg, imagenet_file)
    path = Path(weights).expanduser()
    if not _is_file(path):
        raise WeightsUnavailableError(
            f"{cfg.name}: weights file {str(weights)!r} not found (use 'imagenet', "
            f"'random' or the path of a local weights file)")
    path = path.resolve()
    return "file", str(path), f"file:{path.name}:sha256={short_sha256(path)}"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name the file system refuses (too long, ...) names no file
        return False


def _imagenet_id(cfg, imagenet_file) -> str:
    if imagenet_file is None:
        raise WeightsUnavailableError(f"{cfg.name}: no ImageNet weights are known")
    file_name, path = imagenet_file
    if cfg.offline:
        if path is None:
            raise WeightsUnavailableError(
                f"{cfg.name}: ImageNet weights file {file_name} is not installed")
        return f"imagenet:{file_name}:sha256={short_sha256(path)}"
    if path is None and is_offline():
        raise offline_error(cfg, f"{OFFLINE_ENV}=1 and {file_name} is not in Keras' cache")
    # Downloaded (and hash-checked) by Keras: the file name identifies the weights.
    return f"imagenet:{file_name}"


def load_keras_weights(model, path) -> None:
    """``model.load_weights(path)``, with failures as WeightsUnavailableError."""
    try:
        model.load_weights(str(path))
    except Exception as exc:  # Keras raises ValueError/OSError/KeyError variously
        msg = " ".join(str(exc).split())[:300]
        raise WeightsUnavailableError(f"cannot load weights file {path}: {msg}") from exc
