"""Finding the labelled images of a data directory, splitting them, and reading them.

Only the standard library, numpy and cv2 are imported here, so that the CLI starts fast.

Two layouts are recognised (see :func:`discover`)::

    DATA/cat/*.jpg, DATA/dog/*.jpg            "pool": one pool, split here (stratified, seeded)
    DATA/train/cat/..., DATA/val/cat/...      "split": the folders give the split
    (val/ may be called validation/; test/ is optional; names match case-insensitively)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import cv2
import numpy as np

from featx.errors import DataError, ImageDecodeError, UsageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
SPLITS = ("train", "val", "test")
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
            if _is_image_name(name):
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


# ----- split assignment ------------------------------------------------------------
def assign_splits(paths, labels, *, val_fraction=0.2, test_fraction=0.0, seed=42,
                  train_per_class=None, previous_splits=None, class_names=None) -> np.ndarray:
    """Assign "train", "val" or "test" to each file, stratified by class and seeded.

    Parameters
    ----------
    paths : sequence of str
        Relative paths; only used to order files (sorted) and to look up
        ``previous_splits``, so the result does not depend on the order given.
    labels : array of int
        Class index of each path; class ``i`` is shuffled by
        ``np.random.default_rng([seed, i])``.
    val_fraction, test_fraction, seed, train_per_class
        As in :func:`discover`. Per class (n files, shuffled): the first ``n_test`` go to
        test, then ``n_val`` to val (few-shot: K to train) and the rest to train (val).
    previous_splits : dict, optional
        Path -> split to keep, unless that split cannot occur with these parameters (e.g.
        "test" with ``test_fraction=0``). New files of a class go, in seeded order, to the
        split with the largest deficit (target count minus current count); ties go to
        train, then val, then test.
    class_names : list of str, optional
        Used in warnings only.

    Returns
    -------
    ndarray of str, aligned with ``paths``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    previous = previous_splits or {}
    allowed = {"train"} | ({"val"} if val_fraction > 0 or train_per_class is not None else set())
    allowed |= {"test"} if test_fraction > 0 else set()
    out = np.empty(len(labels), dtype="<U5")
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        known = [previous.get(paths[i]) for i in members]
        if train_per_class is None and all(split in allowed for split in known):
            # nothing new: no shuffle needed (few-shot goes on, to warn about small classes)
            out[members] = known
            continue
        members = members[np.argsort([paths[i] for i in members], kind="stable")]
        name = class_names[label] if class_names is not None else str(label)
        targets = _targets(len(members), val_fraction, test_fraction, train_per_class, name)
        rng = np.random.default_rng([int(seed), int(label)])
        order = members[rng.permutation(len(members))]
        kept = {int(i): previous[paths[i]] for i in members
                if previous.get(paths[i]) in allowed}
        for i, split in kept.items():
            out[i] = split
        new = [int(i) for i in order if int(i) not in kept]
        if kept:
            _fill_deficits(out, new, targets, kept.values())
        else:
            _fill_in_order(out, new, targets, few_shot=train_per_class is not None)
    return out


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _targets(n, val_fraction, test_fraction, train_per_class, name) -> dict[str, int]:
    """Target count of each split for a class of ``n`` files (always >= 1 train if n >= 1)."""
    n_test = min(_round_half_up(n * test_fraction), max(n - 1, 0))
    rest = n - n_test
    if train_per_class is not None:
        if rest > train_per_class:
            return {"train": train_per_class, "val": rest - train_per_class, "test": n_test}
        log.warning("class %r has %d images for %d train per class: using %d for train and "
                    "%d for val", name, rest, train_per_class, max(rest - 1, 1), min(rest - 1, 1))
        return {"train": max(rest - 1, 1), "val": min(rest - 1, 1), "test": n_test}
    n_val = _round_half_up(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))
    n_test = min(n_test, max(n - 1 - n_val, 0))  # give way to val, keep one train
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def _fill_in_order(out, order, targets, *, few_shot):
    """Fresh assignment: test first, then val then train (few-shot: train then val)."""
    sequence = ("test", "train", "val") if few_shot else ("test", "val", "train")
    start = 0
    for split in sequence:
        out[order[start:start + targets[split]]] = split
        start += targets[split]


def _fill_deficits(out, new, targets, kept_splits):
    """Give each new file to the split furthest below its target count."""
    counts = {s: 0 for s in SPLITS}
    for split in kept_splits:
        counts[split] += 1
    for i in new:
        split = max(SPLITS, key=lambda s: targets[s] - counts[s])  # first of ties wins
        out[i] = split
        counts[split] += 1


# ----- exclude lists ---------------------------------------------------------------
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----- hashing ---------------------------------------------------------------------
def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


HASH_SLICE = 1024


def hash_files(root, relpaths, *, known=None, workers: int = 8):
    """SHA-256, size and mtime of many files, reusing known hashes of unchanged files.

    Parameters
    ----------
    root : str or Path
        Directory the paths are relative to.
    relpaths : sequence of str
        Files to hash.
    known : dict, optional
        Relative path -> ``(size, mtime_ns, sha256)`` recorded earlier. A file whose size
        and ``st_mtime_ns`` are unchanged is not read again.
    workers : int
        Threads reading and hashing (hashlib releases the GIL on large buffers).

    Returns
    -------
    hashes : list of str
        Hex SHA-256 per path, in the order of ``relpaths``; ``""`` for a file that cannot
        be read (missing, permission denied, a folder), which the caller will then fail
        to decode as well.
    stats : list of (int, int)
        ``(size, mtime_ns)`` per path, ``(-1, -1)`` when the file cannot be read; store
        them with the hashes to pass as ``known`` next time.
    """
    root = Path(root)
    base = str(root) + os.sep  # plain strings: a Path per file is slow on 100k files
    known = known or {}
    hashes = [""] * len(relpaths)
    stats = [(-1, -1)] * len(relpaths)
    todo = []
    for i, rel in enumerate(relpaths):
        try:
            st = os.stat(base + rel)
        except OSError as exc:
            log.debug("cannot stat %s: %s", rel, exc)
            continue
        stats[i] = stat = (st.st_size, st.st_mtime_ns)
        previous = known.get(rel)
        if previous is not None and tuple(previous[:2]) == stat and previous[2]:
            hashes[i] = previous[2]
        else:
            todo.append(i)

    def work(i):
        try:
            return i, file_sha256(root / relpaths[i])
        except OSError as exc:
            log.debug("cannot hash %s: %s", relpaths[i], exc)
            return i, None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        # in slices: pool.map submits every task at once, a future per file (100 MB at 50k)
        for start in range(0, len(todo), HASH_SLICE):
            for i, digest in pool.map(work, todo[start:start + HASH_SLICE]):
                if digest is None:
                    stats[i] = (-1, -1)
                else:
                    hashes[i] = digest
    return hashes, stats


# ----- reading images --------------------------------------------------------------
# Formats that may carry alpha or 16-bit samples, by their leading bytes. They are decoded
# with IMREAD_UNCHANGED and normalised here; everything else (JPEG above all) with
# IMREAD_COLOR, which applies the EXIF orientation and converts gray/CMYK/palette to BGR.
_UNCHANGED_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+",
                         b"GIF87a", b"GIF89a", b"BM")
_MIN_SIDE = 2


def read_image(path, *, reduced_decode: bool = False,
               resize_size: int | None = None) -> np.ndarray:
    """Read an image file as RGB.

    JPEG (and any format not listed below) is decoded with ``cv2.IMREAD_COLOR``, which
    honours the EXIF orientation and turns grayscale, palette and CMYK into 8-bit colour.
    PNG, WebP, TIFF, GIF and BMP (recognised by their first bytes, not the extension) are
    decoded unchanged, then 16-bit samples become 8-bit (``round(x / 257)``), grayscale
    becomes three channels and alpha is composited onto white. Their EXIF orientation, if
    any, is not applied.

    Parameters
    ----------
    path : str or Path
    reduced_decode : bool
        Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (``IMREAD_REDUCED_COLOR_*``,
        EXIF orientation still applied): the largest factor whose shorter side, read from
        the header by :func:`jpeg_size`, stays at least ``resize_size``. Other files, and
        JPEGs too small for a factor of 2, are decoded in full. Needs ``resize_size``.
    resize_size : int, optional
        The shorter side the image will be resized to; only used with ``reduced_decode``.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3), RGB

    Raises
    ------
    ImageDecodeError
        With ``reason`` one of: ``"file not found"``, ``"cannot read file (<OS error>)"``,
        ``"empty file (0 bytes)"``, ``"truncated image"``, ``"cannot decode image (corrupt
        or unsupported format)"``, ``"image too small (WxH)"``, ``"unsupported number of
        channels (N)"``, ``"unsupported sample type (<dtype>)"``.
    ValueError
        ``reduced_decode`` without a positive ``resize_size``.
    """
    if reduced_decode and (resize_size is None or resize_size < 1):
        raise ValueError(f"reduced_decode needs a positive resize_size, got {resize_size!r}")
    data = _read_bytes(path)
    unchanged = _is_unchanged_format(data)
    if unchanged:
        flag = cv2.IMREAD_UNCHANGED
    else:
        flag = _reduced_flag(data, resize_size) if reduced_decode else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(data, flag)
    except cv2.error:
        image = None  # e.g. over OpenCV's pixel-count limit
    if image is None or image.size == 0:
        reason = ("truncated image" if _looks_truncated(data)
                  else "cannot decode image (corrupt or unsupported format)")
        raise ImageDecodeError(path, reason)
    height, width = image.shape[:2]
    if min(height, width) < _MIN_SIDE:
        raise ImageDecodeError(path, f"image too small ({width}x{height})")
    if not unchanged:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return _to_rgb8(image, path)


# libjpeg rounds scaled sizes up, so a side of n/f (real) gives at least n/f pixels.
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))


def _reduced_flag(data: np.ndarray, resize_size: int) -> int:
    """The imdecode flag for reduced decoding: the largest factor keeping >= resize_size."""
    size = jpeg_size(data)
    if size is not None:
        for factor, flag in _REDUCED_FLAGS:
            if min(size) >= factor * resize_size:
                return flag
    return cv2.IMREAD_COLOR


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive (Huffman)
_JPEG_OTHER_SOF = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length


def jpeg_size(data) -> tuple[int, int] | None:
    """(height, width) from the SOF0/SOF1/SOF2 header of a JPEG's bytes, without decoding.

    Returns None for anything else: not a JPEG, a cut-off header, a lossless or arithmetic
    coded JPEG, or a height left to a DNL marker (0). The size is before EXIF rotation.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    if n < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    i = 2
    while i + 1 < n:
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker in _JPEG_NO_LENGTH:
            i += 2
        elif marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height = (view[i + 5] << 8) | view[i + 6]
            width = (view[i + 7] << 8) | view[i + 8]
            return (height, width) if height and width else None
        elif marker in _JPEG_OTHER_SOF or marker in (0x00, 0xD8, 0xD9, 0xDA):
            return None  # not scalable, or no SOF before the scan / image end
        elif i + 4 > n:
            return None
        else:
            length = (view[i + 2] << 8) | view[i + 3]
            if length < 2:
                return None
            i += 2 + length
    return None


def _read_bytes(path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    return data


def _is_unchanged_format(data: np.ndarray) -> bool:
    head = data[:16].tobytes()
    return head.startswith(_UNCHANGED_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _looks_truncated(data: np.ndarray) -> bool:
    """True when a file that failed to decode lacks the end its format requires.

    Only used after a failed decode: some valid JPEGs carry data after the end marker
    (e.g. motion photos), so a missing marker alone does not make a file bad.
    """
    head, tail = data[:12].tobytes(), data[-1024:].tobytes()
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in tail
    if head.startswith(b"\x89PNG"):
        return b"IEND" not in tail
    if head.startswith(b"GIF8"):
        return not tail.rstrip(b"\x00").endswith(b";")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 > data.size
    return False


def _to_rgb8(image: np.ndarray, path) -> np.ndarray:
    """An unchanged decode (gray/BGR, optional alpha, 8/16-bit or float) as RGB uint8."""
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ImageDecodeError(path, f"unsupported number of channels ({channels})")
    if channels in (2, 4):
        image = _composite_on_white(_unit_float(image, path))
    elif image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = _unit_float(image, path)
    if image.dtype != np.uint8:
        image = np.rint(image * 255.0).astype(np.uint8)
    code = cv2.COLOR_GRAY2RGB if image.shape[2] == 1 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def _unit_float(image: np.ndarray, path) -> np.ndarray:
    """Samples as float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if image.dtype.kind == "f":
        return np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
    raise ImageDecodeError(path, f"unsupported sample type ({image.dtype})")


def _composite_on_white(image: np.ndarray) -> np.ndarray:
    """``color * a + 1 * (1 - a)`` for float samples in [0, 1], alpha last."""
    color, alpha = image[:, :, :-1], image[:, :, -1:]
    return color * alpha + (1.0 - alpha)


# ----- resizing ----------------------------------------------------------------------
_INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "bilinear": cv2.INTER_LINEAR,
                   "cubic": cv2.INTER_CUBIC, "bicubic": cv2.INTER_CUBIC,
                   "nearest": cv2.INTER_NEAREST, "lanczos": cv2.INTER_LANCZOS4}
# Resized images longer than this many times resize_size are centre-cut first, so a
# 2x5000 strip does not become a 256x640000 intermediate.
_MAX_ASPECT = 4


def resize_and_crop(image: np.ndarray, size: int, resize_size: int,
                    interpolation: str = "area") -> np.ndarray:
    """Resize the shorter side to ``resize_size`` (keeping the aspect), then centre-crop.

    Parameters
    ----------
    image : ndarray of uint8, shape (H, W, 3)
    size : int
        Side of the square output.
    resize_size : int
        Shorter side after resizing; at least ``size``.
    interpolation : str
        ``"area"``: ``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_CUBIC`` when enlarging.
        Also ``"linear"``/``"bilinear"``, ``"cubic"``/``"bicubic"``, ``"nearest"``,
        ``"lanczos"``, used both ways.

    Returns
    -------
    ndarray of uint8, shape (size, size, 3), C-contiguous
    """
    if resize_size < size:
        raise ValueError(f"resize_size ({resize_size}) must be >= size ({size})")
    if interpolation != "area" and interpolation not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from "
                         f"{', '.join(['area', *_INTERPOLATIONS])}")
    height, width = image.shape[:2]
    scale = resize_size / min(height, width)
    image = _cut_long_side(image, scale, resize_size)
    height, width = image.shape[:2]
    if height <= width:
        new_h, new_w = resize_size, max(resize_size, round(width * scale))
    else:
        new_h, new_w = max(resize_size, round(height * scale)), resize_size
    if (new_h, new_w) != (height, width):
        if interpolation == "area":
            flag = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        else:
            flag = _INTERPOLATIONS[interpolation]
        image = cv2.resize(image, (new_w, new_h), interpolation=flag)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def _cut_long_side(image: np.ndarray, scale: float, resize_size: int) -> np.ndarray:
    height, width = image.shape[:2]
    keep = math.ceil(_MAX_ASPECT * resize_size / scale)
    if max(height, width) <= keep:
        return image
    if height > width:
        top = (height - keep) // 2
        return image[top:top + keep]
    left = (width - keep) // 2
    return image[:, left:left + keep]


def load_for_model(path, size: int, resize_size: int, interpolation: str = "area", *,
                   reduced_decode: bool = False) -> np.ndarray:
    """:func:`read_image` then :func:`resize_and_crop`: (size, size, 3) uint8 RGB.

    ``reduced_decode=True`` decodes large JPEGs at 1/2, 1/4 or 1/8 scale, never below
    ``resize_size`` (see :func:`read_image`): much faster, and the output differs from a
    full decode by a few grey levels, so record it with the other preprocessing settings.
    """
    image = read_image(path, reduced_decode=reduced_decode, resize_size=resize_size)
    return resize_and_crop(image, size, resize_size, interpolation)
