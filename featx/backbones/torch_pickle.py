"""Read legacy (pre-1.6, non-zip) PyTorch ``state_dict`` files without torch.

The legacy format is five pickles in a row followed by raw storage data:
magic number, protocol version, system info, the pickled ``OrderedDict`` (tensors
refer to storages through persistent ids), and the list of storage keys. Then each
storage, in the order of that list, as a little-endian int64 element count and
the raw little-endian elements.
"""

from __future__ import annotations

import collections
import os
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


class _Frozen:
    """Refuses pickle's BUILD opcode, so a file cannot rewrite this reader's objects."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"cannot set the state of {type(self).__name__}")


class _StorageType(_Frozen):
    __slots__ = ("dtype",)

    def __init__(self, name):
        self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


class _Storage(_Frozen):
    """Placeholder for a storage; ``data`` is filled in after the pickles."""

    __slots__ = ("dtype", "numel", "data")

    def __init__(self, dtype, numel):
        self.dtype = dtype
        self.numel = numel
        self.data = None


def _is_int(value) -> bool:
    return type(value) is int  # not bool, not anything else a pickle can make


class _TensorRef(_Frozen):
    """A tensor waiting for its storage data."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor does not refer to a storage")
        if not (_is_int(offset) and isinstance(size, (tuple, list))
                and isinstance(stride, (tuple, list))
                and all(_is_int(v) for v in (*size, *stride))):
            raise pickle.UnpicklingError("tensor offset, size and stride must be integers")
        if len(size) != len(stride):
            raise pickle.UnpicklingError(
                f"tensor has {len(size)} sizes but {len(stride)} strides")
        if offset < 0 or any(v < 0 for v in (*size, *stride)):
            raise pickle.UnpicklingError("tensor has a negative offset, size or stride")
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def to_numpy(self, name):
        """The tensor as a native-endian array, after checking it lies inside its storage."""
        flat, numel = self.storage.data, self.storage.numel
        count = 1
        for n in self.size:
            count *= n
        extent = 0 if count == 0 else 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        where = (f"tensor {name!r} (offset {self.offset}, size {list(self.size)}, "
                 f"stride {list(self.stride)})")
        if self.offset + extent > numel:
            raise TorchPickleError(f"{where} lies outside its storage of {numel} elements")
        if count > numel:  # only a stride-0 tensor can; refuse it rather than blow up memory
            raise TorchPickleError(f"{where} has more elements than its storage ({numel})")
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


class _PlainUnpickler(pickle.Unpickler):
    """For the header pickles and the key list: plain data only, no globals at all."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed here")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed here")


class _RestrictedUnpickler(pickle.Unpickler):
    """For the state dict: an ``OrderedDict`` of tensors on storages, nothing else."""

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
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError("unsupported persistent id")
        _kind, storage_type, key, _location, numel = pid[:5]
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("persistent id without a storage type")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise pickle.UnpicklingError("malformed storage persistent id")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(storage_type.dtype, numel)
        elif (storage.dtype, storage.numel) != (storage_type.dtype, numel):
            raise pickle.UnpicklingError(f"storage {key} is declared twice, differently")
        return storage


def _read_storages(f, keys, storages, file_size):
    for key in keys:
        storage = storages[key]
        header = f.read(8)
        if len(header) != 8:
            raise TorchPickleError(f"storage {key} is truncated (no element count)")
        numel = int.from_bytes(header, "little", signed=True)
        if numel != storage.numel:
            raise TorchPickleError(
                f"storage {key} holds {numel} elements, the state dict says {storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        if nbytes > file_size - f.tell():
            raise TorchPickleError(f"storage {key} is truncated")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise TorchPickleError(f"storage {key} is truncated")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_header(f) -> None:
    magic = _PlainUnpickler(f).load()
    if not (_is_int(magic) and magic == _MAGIC):
        raise TorchPickleError("not a legacy torch file (bad magic number)")
    protocol = _PlainUnpickler(f).load()
    if not (_is_int(protocol) and protocol == _PROTOCOL):
        raise TorchPickleError("unsupported torch file protocol version")
    sys_info = _PlainUnpickler(f).load()
    if not isinstance(sys_info, dict):
        raise TorchPickleError("malformed torch file (system info is not a dict)")
    if sys_info.get("little_endian", True) is not True:
        raise TorchPickleError("big-endian torch files are not supported")


def _check_keys(keys, storages) -> None:
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise TorchPickleError("malformed torch file (storage keys are not a list of strings)")
    if len(set(keys)) != len(keys):
        raise TorchPickleError("malformed torch file (repeated storage keys)")
    if set(keys) != set(storages):
        missing = sorted(set(storages) - set(keys))[:3]
        extra = sorted(set(keys) - set(storages))[:3]
        raise TorchPickleError(
            "malformed torch file (storage keys do not match the state dict: "
            f"missing {missing}, unused {extra})")


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy torch ``state_dict`` file into numpy arrays.

    Every pickle goes through a restricted unpickler: the header pickles and the
    storage key list may hold plain data only, the state dict only an
    ``OrderedDict`` of tensors. Tensors are checked to lie inside their storages.

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
        If the file is not in that format, is malformed or truncated, or refers
        to anything but tensors (the message is one line).
    OSError
        If the file cannot be opened or read.
    """
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        try:
            _read_header(f)
            state = _RestrictedUnpickler(f, storages).load()
            keys = _PlainUnpickler(f).load()
            if not isinstance(state, dict):
                raise TorchPickleError("the file holds no state dict")
            if not all(isinstance(k, str) and isinstance(v, _TensorRef)
                       for k, v in state.items()):
                raise TorchPickleError("the state dict holds something other than tensors")
            _check_keys(keys, storages)
            _read_storages(f, keys, storages, file_size)
            return {name: ref.to_numpy(name) for name, ref in state.items()}
        except (TorchPickleError, OSError):
            raise
        except Exception as exc:  # any unpickling failure means "not this format"
            raise TorchPickleError(f"cannot read torch file: {_one_line(exc)}") from exc
