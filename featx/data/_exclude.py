"""Exclude lists: files to leave out of every command (``--exclude FILE``), one path per line
relative to the data folder, as ``featx audit --write-exclude`` writes them."""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path

import numpy as np

from featx._io import write_text_atomic
from featx.errors import DataError

log = logging.getLogger("featx.data")  # one logger for the package


# The longest path Linux accepts (PATH_MAX): a longer line names no file.
_MAX_ENTRY = 4096


def read_exclude_file(path, root) -> set[str]:
    """The files an exclude list names, as POSIX paths relative to ``root``.

    One path per line, relative to ``root`` (as ``featx audit --write-exclude`` writes
    them) or absolute; ``#`` at the start of a line or after a space starts a comment;
    blank lines are skipped; ``a/../b`` is read as ``b``. A file that cannot be an exclude
    list for ``root`` raises DataError, in one line naming the file and the line: not
    UTF-8 text, a NUL byte, a line longer than any path (4096 characters), or a path
    outside ``root`` (the list was written for another folder).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: exclude file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read exclude file ({exc})") from None
    root = Path(root).resolve()
    listed = set()
    for number, line in enumerate(text.split("\n"), start=1):  # only \n: names may hold \x85
        entry = _strip_comment(line)
        if entry:
            listed.add(_listed_path(entry, root, f"{path}: line {number}"))
    return listed


def _listed_path(entry: str, root: Path, where: str) -> str:
    """One entry as a path relative to ``root``; DataError when it names no file there."""
    if "\0" in entry:
        raise DataError(f"{where}: a NUL byte; an exclude list is text, one path per line")
    if len(entry) > _MAX_ENTRY:
        raise DataError(f"{where}: {len(entry):,} characters, longer than any path")
    relative = posixpath.normpath(entry)
    if posixpath.isabs(relative):
        relative = _under(Path(relative), root) or _under(Path(entry).resolve(), root)
    if not relative or relative == "." or relative.startswith("../") or relative == "..":
        raise DataError(f"{where}: {entry[:200]!r} is not a file under {root}; list paths "
                        "relative to the data folder")
    return relative


def _under(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def excluded_paths(exclude_file, manifest) -> frozenset[str]:
    """The images of ``manifest`` that ``exclude_file`` lists; a warning counts the listed
    paths that are not images of the folder, and names each class the list leaves without
    training images."""
    listed = read_exclude_file(exclude_file, manifest.root)
    excluded = frozenset(listed.intersection(manifest.paths))
    if len(excluded) < len(listed):
        missing = sorted(listed - excluded)
        log.warning("%s: %d of its %d paths are not images of %s (first: %s)", exclude_file,
                    len(missing), len(listed), manifest.root, missing[0])
    train = np.asarray(manifest.splits) == "train"
    kept = np.array([path not in excluded for path in manifest.paths], dtype=bool)
    for label in sorted(set(manifest.labels[train].tolist())
                        - set(manifest.labels[train & kept].tolist())):
        log.warning("%s leaves class %r without training images; it cannot be learned",
                    exclude_file, manifest.class_names[label])
    return excluded


def _strip_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    cut = line.find(" #")
    return (line if cut < 0 else line[:cut]).strip()


def write_exclude_file(path, entries) -> Path:
    """Write ``entries`` ((relative path, reason) pairs) as an exclude list, one path per
    line with its reason as a comment; written to a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# featx exclude list: one path per line, relative to the data folder; "
             "pass it as --exclude FILE"]
    lines += [f"{rel}  # {reason}" for rel, reason in entries]
    return write_text_atomic(path, "\n".join(lines) + "\n")
