"""Finding the labelled images of a data directory and the split of each.

Only the standard library and numpy are imported here, so that the CLI starts fast.

Two layouts are recognised (see :func:`discover`)::

    DATA/cat/*.jpg, DATA/dog/*.jpg            "pool": one pool, split here (stratified, seeded)
    DATA/train/cat/..., DATA/val/cat/...      "split": the folders give the split
    (val/ may be called validation/; test/ is optional; names match case-insensitively)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np

from featx.errors import DataError, UsageError

from ._splits import assign_splits

log = logging.getLogger("featx.data")  # one logger for the package

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})


_SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


_LAYOUT_HINT = ("expected DATA/<class>/<images> for two or more classes, or train/ and val/ "
                "(or validation/) folders, optional test/, each holding class folders")


@dataclass
class Manifest:
    """The images of a data directory, their classes and their splits.

    Attributes
    ----------
    root : Path
        The resolved data directory.
    class_names : list of str
        Sorted class names; ``labels`` index into it.
    paths : list of str
        POSIX paths relative to ``root``, sorted.
    labels : ndarray of int64
        Class index of each path.
    splits : ndarray of str
        ``"train"``, ``"val"`` or ``"test"`` for each path.
    layout : str
        ``"pool"`` (class folders) or ``"split"`` (train/ val|validation/ [test/]).
    split_params : dict
        ``{"val_fraction", "test_fraction", "seed", "train_per_class"}`` as requested.
    ignored : list of (str, str)
        (relative path, reason) of files that are not images, or not inside a class folder.
        Hidden files and folders (name starting with ".") are skipped without being listed.
    """

    root: Path
    class_names: list[str]
    paths: list[str]
    labels: np.ndarray
    splits: np.ndarray
    layout: str
    split_params: dict
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self, split: str | None = None) -> np.ndarray:
        """Number of images per class, in ``split`` or overall; int64 of length n_classes."""
        labels = self.labels if split is None else self.labels[self.splits == split]
        return np.bincount(labels, minlength=len(self.class_names)).astype(np.int64)

    def without(self, excluded) -> "Manifest":
        """The manifest less the files whose relative paths are in ``excluded``; every other
        file keeps its split, so runs with and without an exclude list stay comparable."""
        keep = np.array([p not in excluded for p in self.paths], dtype=bool)
        return dataclasses.replace(self, paths=[p for p, k in zip(self.paths, keep) if k],
                                   labels=self.labels[keep], splits=self.splits[keep])


# ----- discovery -------------------------------------------------------------------
def discover(root, *, val_fraction=0.2, test_fraction=0.0, seed=42, train_per_class=None,
             previous_splits: dict[str, str] | None = None) -> Manifest:
    """Find the labelled images under ``root`` and assign each to train, val or test.

    Parameters
    ----------
    root : str or Path
        The data directory: class folders (layout "pool"), or ``train/``, ``val/`` or
        ``validation/``, and optionally ``test/``, each holding class folders (layout
        "split"). Class folders are searched recursively. Hidden entries are skipped.
    val_fraction, test_fraction : float
        Share of each class that goes to val and to test. In the split layout they only
        apply when the val (test) folder is missing: that split is then carved out of
        ``train/``. Each class gets ``round(n * fraction)`` (halves round up), at least
        one val image when ``val_fraction > 0`` and the class has two images or more, and
        always at least one train image.
    seed : int
        Seeds the per-class shuffle: class ``i`` uses ``np.random.default_rng([seed, i])``.
    train_per_class : int, optional
        Few-shot protocol: K train images per class and every other (non-test) image in
        val; ``val_fraction`` is then unused. A class with K images or fewer (after test)
        keeps all but one in train and one in val, with a logged warning. In the split
        layout the K are drawn from ``train/`` and the rest of ``train/`` goes to val.
        The train sets for different K are nested, and test does not depend on K.
    previous_splits : dict, optional
        Relative path -> split recorded earlier (by a cache made with the same split
        parameters). Those files keep their split; new files of each class go, one by one
        in seeded order, to the split furthest below its target count for that class.

    Returns
    -------
    Manifest

    Raises
    ------
    DataError
        ``root`` is missing or not a directory, holds no images, fewer than two classes,
        or no train images.
    UsageError
        The fractions or ``train_per_class`` are out of range.
    """
    params = _split_params(val_fraction, test_fraction, seed, train_per_class)
    root_arg = str(root)
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root_arg}: data directory does not exist")
    if not root.is_dir():
        raise DataError(f"{root_arg}: not a directory (DATA must be a folder of class folders)")

    layout, folders, ignored = _find_layout(root, root_arg)
    found = []  # (relpath, class name, split given by a folder or None)
    for split_dir, fixed_split in folders:
        found += _scan_split_folder(root, split_dir, fixed_split, ignored)
    ignored.sort()
    if not found:
        raise DataError(f"{root_arg}: no images found ({_LAYOUT_HINT}; image extensions: "
                        f"{' '.join(sorted(IMAGE_EXTENSIONS))})")

    class_names = sorted({name for _, name, _ in found})
    if len(class_names) < 2:
        raise DataError(f"{root_arg}: found only one class ({class_names[0]!r}) in layout "
                        f"{layout!r}; {_LAYOUT_HINT}")

    found.sort()
    index = {name: i for i, name in enumerate(class_names)}
    paths = [p for p, _, _ in found]
    labels = np.array([index[name] for _, name, _ in found], dtype=np.int64)
    splits = _splits_for(found, labels, class_names, folders, params, previous_splits)

    _check_train(root_arg, labels, splits, class_names, layout)
    return Manifest(root=root.resolve(), class_names=class_names, paths=paths, labels=labels,
                    splits=splits, layout=layout, split_params=params, ignored=ignored)


def _split_params(val_fraction, test_fraction, seed, train_per_class) -> dict:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UsageError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise UsageError(f"val_fraction + test_fraction must be below 1, got "
                         f"{val_fraction} + {test_fraction}")
    if train_per_class is not None and (int(train_per_class) != train_per_class
                                        or train_per_class < 1):
        raise UsageError(f"train_per_class must be a positive integer, got {train_per_class}")
    return {"val_fraction": float(val_fraction), "test_fraction": float(test_fraction),
            "seed": int(seed),
            "train_per_class": None if train_per_class is None else int(train_per_class)}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _subdirs_and_files(directory: Path) -> tuple[list[str], list[str]]:
    """Non-hidden entry names of ``directory``: (folders, everything else), each sorted."""
    dirs, files = [], []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not _is_hidden(entry.name):
                (dirs if entry.is_dir() else files).append(entry.name)
    return sorted(dirs), sorted(files)


def _find_layout(root: Path, root_arg: str):
    """Return (layout, [(folder relative to root, fixed split or None)], ignored)."""
    dirs, files = _subdirs_and_files(root)
    by_split = {}
    for name in dirs:
        split = _SPLIT_FOLDERS.get(name.lower())
        if split is not None:
            if split in by_split:
                raise DataError(f"{root_arg}: both {by_split[split]}/ and {name}/ found; "
                                f"keep one folder per split")
            by_split[split] = name
    if "train" not in by_split:
        if by_split and len(by_split) == len(dirs):
            found = ", ".join(f"{name}/" for name in by_split.values())
            raise DataError(f"{root_arg}: found {found} but no train/ folder; {_LAYOUT_HINT}")
        return "pool", [("", None)], []  # files beside the class folders: see _scan_split_folder

    ignored = [(name, _loose_file(name)) for name in files]
    for name in dirs:
        if name not in by_split.values():
            log.warning("%s: ignoring folder %s/ (not train/, val/, validation/ or test/)",
                        root_arg, name)
            ignored.append((f"{name}/", "not a split folder (train/, val/, validation/, test/)"))
    folders = [(by_split["train"], None)]
    folders += [(by_split[s], s) for s in ("val", "test") if s in by_split]
    return "split", folders, ignored


def _is_image_name(name: str) -> bool:
    dot = name.rfind(".")  # os.path.splitext's extension, without its cost on 100k names
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.walk gives undecodable bytes as surrogates
        return False
    return True


def _not_an_image(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return f"not an image file ({ext})" if ext else "not an image file (no extension)"


def _loose_file(name: str) -> str:
    """Why a file lying beside the class folders is ignored."""
    return "not in a class folder" if _is_image_name(name) else _not_an_image(name)


def _scan_split_folder(root: Path, split_dir: str, fixed_split, ignored) -> list:
    """Images of every class folder in ``root/split_dir``: [(relpath, class, fixed_split)]."""
    base = root / split_dir
    class_dirs, files = _subdirs_and_files(base)
    for name in files:
        ignored.append((_relpath(base / name, root), _loose_file(name)))
    found = []
    for class_name in class_dirs:
        images = _scan_class_folder(root, base / class_name, ignored)
        if not images:
            log.warning("%s/: no images; class folder skipped", _relpath(base / class_name, root))
        found += [(path, class_name, fixed_split) for path in images]
    return found


def _scan_class_folder(root: Path, folder: Path, ignored) -> list[str]:
    """Relative paths of the images under ``folder`` (recursive, hidden entries pruned)."""
    images = []
    seen = set()  # (device, inode) of visited folders: symlinked folders are followed once

    def on_error(error):
        log.warning("cannot list %s: %s", error.filename, error.strerror)

    for directory, dirnames, filenames in os.walk(folder, followlinks=True, onerror=on_error):
        try:
            stat = os.stat(directory)
        except OSError:  # removed while we walk
            dirnames[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        prefix = _relpath(Path(directory), root) + "/"  # once per folder: fast on 100k files
        prefix = "" if prefix == "./" else prefix
        for name in filenames:
            if _is_hidden(name):
                continue
            rel = prefix + name
            if not _is_utf8(rel):  # a cache stores paths as UTF-8
                log.warning("skipped %s: its name is not UTF-8; rename it to embed it",
                            ascii(rel)[1:-1])
            elif _is_image_name(name):
                images.append(rel)
            else:
                ignored.append((rel, _not_an_image(name)))
    return images


def expand_paths(paths) -> list[Path]:
    """Files as given; folders searched recursively for image files (hidden ones skipped),
    by the rules :func:`discover` uses for class folders."""
    out = []
    for item in map(Path, paths):
        if item.is_dir():
            out.extend(sorted(item / rel for rel in _scan_class_folder(item, item, [])))
        elif item.is_file():
            out.append(item)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not out:
        raise DataError("no image files among the given paths")
    return out


def _relpath(path: Path, root: Path) -> str:
    return PurePath(os.path.relpath(path, root)).as_posix()


def _splits_for(found, labels, class_names, folders, params, previous_splits) -> np.ndarray:
    """Split of each found file: from its folder, or assigned (free files)."""
    splits = np.array([fixed or "" for _, _, fixed in found], dtype="<U5")
    free = splits == ""
    have_folder = {fixed for _, fixed in folders if fixed}
    free_paths = [p for (p, _, _), f in zip(found, free) if f]
    splits[free] = assign_splits(
        free_paths, labels[free],
        val_fraction=0.0 if "val" in have_folder else params["val_fraction"],
        test_fraction=0.0 if "test" in have_folder else params["test_fraction"],
        seed=params["seed"], train_per_class=params["train_per_class"],
        previous_splits=previous_splits, class_names=class_names)
    return splits


def _check_train(root_arg, labels, splits, class_names, layout):
    train = splits == "train"
    if not train.any():
        where = "train/ holds no images" if layout == "split" else "no image was assigned to it"
        raise DataError(f"{root_arg}: the train split is empty ({where})")
    missing = sorted(set(range(len(class_names))) - set(labels[train].tolist()))
    for i in missing:
        log.warning("%s: class %r has no train images; it cannot be learned",
                    root_arg, class_names[i])
