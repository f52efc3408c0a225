"""Exclude lists: files to leave out of every command (``--exclude FILE``), one path per line
relative to the data folder, as ``featx audit --write-exclude`` writes them."""

from __future__ import annotations

import logging
from pathlib import Path, PurePath

import numpy as np

from featx._io import write_text_atomic
from featx.errors import DataError

log = logging.getLogger("featx.data")  # one logger for the package


def read_exclude_file(path, root) -> set[str]:
    """The files an exclude list names, as POSIX paths relative to ``root``.

    One path per line, relative to ``root`` (as ``featx audit --write-exclude`` writes
    them) or absolute; ``#`` at the start of a line or after a space starts a comment;
    blank lines are skipped. A listed path that is not under ``root`` is kept as given
    (it then matches nothing, and the caller reports how many matched).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: exclude file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read exclude file ({exc})") from None
    root = Path(root).resolve()
    listed = set()
    for line in text.splitlines():
        entry = _strip_comment(line)
        if not entry:
            continue
        item = Path(entry)
        if item.is_absolute():
            try:
                entry = item.resolve().relative_to(root).as_posix()
            except ValueError:
                pass
        listed.add(PurePath(entry).as_posix())
    return listed


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
