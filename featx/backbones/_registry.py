"""Name -> (config, builder) registry. Registering builds and imports nothing heavy."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from featx.errors import UnknownBackboneError

from ._config import BackboneCfg

# builder(cfg, weights, input_size, seed) -> keras.Model, the conv base.
# `weights` is "imagenet", "random" or the absolute path of a weights file.
Builder = Callable[[BackboneCfg, str, int, int], object]
# head_builder(cfg, weights, seed) -> built keras Dense layer (num_features -> classes) or None.
HeadBuilder = Callable[[BackboneCfg, str, int], object]
# imagenet_file(cfg, input_size) -> (file name, local path or None when not on disk).
ImagenetFile = Callable[[BackboneCfg, int], tuple[str, Path | None]]


@dataclass(frozen=True)
class _Entry:
    cfg: BackboneCfg
    builder: Builder
    head_builder: HeadBuilder | None = None
    imagenet_file: ImagenetFile | None = None


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(cfg: BackboneCfg, builder: Builder, *, head_builder=None,
                      imagenet_file=None) -> None:
    """Register a backbone under ``cfg.name`` (replacing any previous entry).

    Parameters
    ----------
    cfg : BackboneCfg
    builder : callable
        ``builder(cfg, weights, input_size, seed) -> keras.Model`` returning the
        conv base; ``weights`` is ``"imagenet"``, ``"random"`` or a file path.
    head_builder : callable, optional
        ``head_builder(cfg, weights, seed)`` returning a built ``Dense`` layer with
        the ImageNet head, or None when the weights carry no head.
    imagenet_file : callable, optional
        ``imagenet_file(cfg, input_size) -> (file name, local path or None)``: where
        the ImageNet weights live, used for weight ids and offline checks.
    """
    _REGISTRY[cfg.name] = _Entry(cfg, builder, head_builder, imagenet_file)


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted names of registered backbones matching the fnmatch ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        names = ", ".join(list_backbones())
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; valid names: {names}") from None


def get_backbone_cfg(name: str) -> BackboneCfg:
    """Configuration of backbone ``name``; UnknownBackboneError lists valid names."""
    return _entry(name).cfg


def imagenet_weights_path(name: str, input_size: int | None = None) -> Path | None:
    """Local path of the ImageNet weights of ``name``, or None if not on disk."""
    entry = _entry(name)
    if entry.imagenet_file is None:
        return None
    return entry.imagenet_file(entry.cfg, input_size or entry.cfg.input_size)[1]


def describe_backbones() -> list[dict]:
    """One dict per backbone for ``featx backbones`` (no TensorFlow import).

    Keys: name, input_size, dim, default_pooling, weights_source, offline_weights
    (True when ImageNet weights are on this machine already), license.
    """
    rows = []
    for name in list_backbones():
        cfg = _REGISTRY[name].cfg
        rows.append({
            "name": name,
            "input_size": cfg.input_size,
            "dim": cfg.num_features,
            "default_pooling": cfg.default_pooling,
            "weights_source": cfg.weights_source,
            "offline_weights": imagenet_weights_path(name) is not None,
            "license": cfg.license,
        })
    return rows
