"""The contracts between featx's stages, as types one can read and check.

- :class:`Mapper`: the middle stage of the pipeline (``uint8 images -> float32 rows``);
  the runtimes of :mod:`featx.extraction` are mappers, and so is any callable a test or a
  user passes in.
- :class:`Writer`: the last stage of the pipeline (``put(batch)``, ``close()``).
- :class:`FeaturesLike`: the cached rows every later stage reads (classifiers, reports,
  the audit, model files); :class:`featx.cache.Features` is the real one.
- :class:`Result`: what every function of :mod:`featx.api` returns: a dataclass whose
  :meth:`~Result.to_dict` is its JSON, and which also reads like that dict.

A *batch* is a dict of numpy arrays: ``index`` (int64, positions in the reader's paths),
``image`` (uint8 (n, S, S, 3), resized and cropped; black where decoding failed),
``error`` (object: ``""`` or why the file could not be read) and, after the mapper,
``embedding`` (float32 (n, D), zeros on error rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Mapper(Protocol):
    """``uint8 (n, S, S, 3) RGB images -> float32 (n, D)``. The runtimes also say what they
    are (``runtime``: "onnx", "keras"...; ``precision``: "fp32", "int8"...); a plain
    callable is named by its type in reports."""

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class Writer(Protocol):
    """Takes finished batches (``put``); ``close`` returns once every batch is stored."""

    def put(self, batch: dict) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class FeaturesLike(Protocol):
    """Rows of one dataset's embeddings: what classifiers, reports and the audit read.

    ``paths``, ``labels``, ``split``, ``view`` and ``sha256`` are aligned arrays, one entry
    per row (``view`` 0 for an image, k > 0 for its k-th augmented view).
    """

    class_names: list
    paths: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    backbone: str
    weights: str

    def indices(self, split: str, views: bool = False) -> np.ndarray: ...

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]: ...


class Result(Mapping):
    """A dataclass result that also reads like a dict of its fields (``result["model"]``),
    as featx 0.1's dicts did: paths read as strings, and a field named in ``_optional`` is
    not a key while it is None (a key only some results carry), nor is one in
    ``_internal`` (live objects). :meth:`to_dict` is what ``--json`` prints: that dict,
    unless a result says otherwise.
    """

    _optional: tuple = ()
    _internal: tuple = ()

    def __getitem__(self, key):
        if key not in self._keys():
            raise KeyError(key)
        value = getattr(self, key)
        return str(value) if isinstance(value, Path) else value

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name not in self._internal
                and not (f.name in self._optional and getattr(self, f.name) is None)]

    def to_dict(self) -> dict:
        return dict(self)
