"""Small I/O concerns, each written once: atomic writes, content hashes, JSON sidecars that
vouch for a file, slugs, numpy values in JSON and featx's own version.

Only the standard library is imported here; every featx module may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from featx.errors import DataError

TEMPORARY_GLOB = ".*.tmp*"  # the names atomic_path writes under, for stray clean-ups


# ----- atomic writes ---------------------------------------------------------------
def temporary_name(path, keep_suffix: bool = False) -> Path:
    """Where :func:`atomic_path` writes ``path`` first: ``.<name>.tmp<pid>`` beside it, or
    with ``keep_suffix`` ``.<stem>.tmp<pid><suffix>`` (for writers that check the suffix,
    as Keras' ``model.save`` checks ``.keras``)."""
    path = Path(path)
    if keep_suffix:
        return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path, *, keep_suffix: bool = False):
    """A temporary path beside ``path`` to write to: renamed over ``path`` when the block
    ends, removed when it raises. Readers see the old file or the whole new one.

    An OSError that names no file, or only the temporary one (a full disk under h5py,
    numpy or zipfile), is raised again naming ``path``."""
    path = Path(path)
    tmp = temporary_name(path, keep_suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        named = exc.filename is not None and str(exc.filename) != str(tmp)
        if exc.errno is None or named:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc
    finally:
        with contextlib.suppress(OSError):  # on a read-only disk too: the error above counts
            tmp.unlink(missing_ok=True)


def write_atomic(path, write, *, keep_suffix: bool = False) -> Path:
    """``write(tmp)`` writes the file; it then replaces ``path`` (:func:`atomic_path`)."""
    with atomic_path(path, keep_suffix=keep_suffix) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----- hashes ------------------------------------------------------------------------
def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """Hex SHA-256 of ``text`` as UTF-8; a file name that is not UTF-8 (which Python holds
    surrogate-escaped) hashes as its bytes."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def json_sha256(value) -> str:
    """Hex SHA-256 of ``value`` as JSON with sorted keys: the same value, the same digest."""
    return text_sha256(json.dumps(value, sort_keys=True))


def slug(text, fallback: str = "x") -> str:
    """``text`` as a file-name part: runs of other characters than letters, digits, ``_.-``
    become one ``-``; ``fallback`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or fallback


# ----- JSON ---------------------------------------------------------------------------
def json_default(value):
    """``json.dumps(default=...)``: numpy scalars and arrays as Python values, the rest as str."""
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return str(value)


def to_json(value, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=json_default)


# ----- sidecars: a JSON file that vouches for a file by its SHA-256 ----------------------
def sidecar_for(artifact) -> Path:
    """The JSON sidecar of a file: same name, ``.json`` suffix."""
    return Path(artifact).with_suffix(".json")


def save_artifact(artifact, write, record: dict, *, keep_suffix: bool = False) -> dict:
    """Write ``artifact`` through ``write(tmp)``, then its sidecar vouching for it.

    Both files are written atomically, the sidecar last, so a sidecar never names a
    half-written file. Returns what the sidecar holds: ``record`` plus ``sha256``.
    """
    artifact = Path(artifact)
    write_atomic(artifact, write, keep_suffix=keep_suffix)
    record = {**record, "sha256": file_sha256(artifact)}
    write_text_atomic(sidecar_for(artifact), to_json(record, indent=2) + "\n")
    return record


def read_sidecar(sidecar) -> dict:
    """A sidecar's JSON; DataError when it is missing or unreadable."""
    sidecar = Path(sidecar)
    if not sidecar.is_file():
        raise DataError(f"{sidecar}: model metadata file not found")
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{sidecar}: unreadable model metadata ({exc})") from None


def sha256_matches(artifact, expected) -> bool:
    """Whether the file's SHA-256 is ``expected`` (the one its sidecar recorded)."""
    return bool(expected) and file_sha256(artifact) == expected


def check_artifact(artifact, expected_sha256, sidecar_name: str) -> None:
    """The integrity check before loading a model file: raise DataError unless its hash
    matches.

    ``expected_sha256`` is what the sidecar ``sidecar_name`` recorded (missing counts as a
    mismatch); the file is never loaded when it does not match. A match is no trust:
    whoever can write the file can write its sidecar.
    """
    if not sha256_matches(artifact, expected_sha256):
        raise DataError(
            f"refusing to load {artifact}: its SHA-256 does not match the sha256 recorded in "
            f"{sidecar_name} ({str(expected_sha256)[:16]}); the file was damaged or replaced "
            "after it was saved")


# ----- provenance ------------------------------------------------------------------------
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
