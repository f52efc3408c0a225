"""Read legacy (pre-1.6, non-zip) PyTorch ``state_dict`` files without torch.

The legacy format is five pickles in a row followed by raw storage data:
magic number, protocol version, system info, the pickled ``OrderedDict`` (tensors
refer to storages through persistent ids), and the list of storage keys. Then each
storage, in the order of that list, as a little-endian int64 element count and
the raw little-endian elements.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchPickleError(ValueError):
    """The file is not a legacy torch state dict this reader understands."""


class _StorageType:
    def __init__(self, name):
        self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


class _Storage:
    """Placeholder for a storage; ``data`` is filled in after the pickles."""

    def __init__(self, dtype, numel):
        self.dtype = dtype
        self.numel = numel
        self.data = None


class _TensorRef:
    """A tensor waiting for its storage data."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def to_numpy(self):
        flat = self.storage.data
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view, dtype=flat.dtype.newbyteorder("="))


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
    return _TensorRef(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[:2]!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(storage_type.dtype, numel)
        return self._storages[key]


def _read_storages(f, keys, storages):
    for key in keys:
        storage = storages[key]
        (numel,) = np.frombuffer(f.read(8), dtype="<i8")
        nbytes = int(numel) * storage.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise TorchPickleError(f"storage {key} is truncated")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy torch ``state_dict`` file into numpy arrays.

    Parameters
    ----------
    path : str or Path
        A ``.pth`` file written by ``torch.save`` before PyTorch 1.6 (or with
        ``_use_new_zipfile_serialization=False``).

    Returns
    -------
    dict of str to numpy.ndarray
        Tensor name to array, in file order.

    Raises
    ------
    TorchPickleError
        If the file is not in that format or refers to anything but tensors.
    """
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        try:
            if pickle.load(f) != _MAGIC:
                raise TorchPickleError("not a legacy torch file (bad magic number)")
            if pickle.load(f) != _PROTOCOL:
                raise TorchPickleError("unsupported torch file protocol version")
            sys_info = pickle.load(f)
            if not sys_info.get("little_endian", True):
                raise TorchPickleError("big-endian torch files are not supported")
            state = _RestrictedUnpickler(f, storages).load()
            keys = pickle.load(f)
        except TorchPickleError:
            raise
        except Exception as exc:  # any unpickling failure means "not this format"
            raise TorchPickleError(f"cannot read torch file: {exc}") from exc
        _read_storages(f, keys, storages)
    if not isinstance(state, dict):
        raise TorchPickleError("the file holds no state dict")
    return {name: ref.to_numpy() for name, ref in state.items()}
