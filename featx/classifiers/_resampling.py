"""Repeated evaluation splits over cached rows: ``compare --repeats R`` without a forward pass.

A data set of class folders is re-split R times, stratified, with seeds ``seed .. seed+R-1``
(:func:`featx.data.assign_splits`, the function that made its first split). A data set with
given train/val folders keeps no random split to redraw, so its pooled labelled rows are
evaluated by repeated stratified K-fold instead. In both, the few-shot protocol draws K
training images per class from each repeat's training part only, so an evaluation image
never reaches training.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from featx.data import assign_splits
from featx.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Repeat:
    """One repeat: ``folds`` is a list of (train rows, evaluation rows); every evaluation
    row of the repeat is in exactly one fold's evaluation rows."""

    seed: int
    folds: list


@dataclass
class RepeatPlan:
    protocol: str  # "resplit" or "kfold"
    description: str
    repeats: list


def plan_repeats(paths, labels, pool, *, repeats: int, layout: str, eval_fraction: float,
                 seed: int = 42, train_per_class: int | None = None, cv: int = 5,
                 class_names=None) -> RepeatPlan:
    """The train/evaluation rows of each repeat, drawn from the row indices ``pool``.

    Parameters
    ----------
    paths, labels : arrays over all cache rows
    pool : array of int
        The labelled rows that may be redrawn (train and evaluation split; a test split
        that is not being evaluated stays out).
    repeats : int
    layout : {"pool", "split"}
        "pool" (class folders): stratified re-splits; "split" (given folders): repeated
        stratified K-fold.
    eval_fraction : float
        Share of the pool that is evaluated in a re-split.
    train_per_class : int, optional
        Few-shot: K training rows per class in every repeat.
    cv : int
        Folds of the K-fold protocol (fewer when a class is too small, with one warning).
    """
    if repeats < 1:
        raise DataError(f"--repeats must be at least 1, got {repeats}")
    pool = np.asarray(pool, dtype=np.int64)
    labels = np.asarray(labels)
    names = class_names or [str(c) for c in range(int(labels.max()) + 1)]
    if layout == "split":
        return _kfold_plan(paths, labels, pool, repeats, seed, train_per_class, cv, names)
    return _resplit_plan(paths, labels, pool, repeats, seed, train_per_class,
                         eval_fraction, names)


def _resplit_plan(paths, labels, pool, repeats, seed, train_per_class, eval_fraction, names):
    pool_paths = [str(paths[i]) for i in pool]
    plan = []
    for r in range(repeats):
        with _quiet_after_first(r):  # a too-small class is the same in every repeat
            splits = assign_splits(pool_paths, labels[pool], val_fraction=eval_fraction,
                                   seed=seed + r, train_per_class=train_per_class,
                                   class_names=names)
        plan.append(Repeat(seed + r, [(pool[splits == "train"], pool[splits == "val"])]))
    shot = f"{train_per_class} training images per class, " if train_per_class else ""
    return RepeatPlan("resplit", f"{repeats} stratified re-splits of the {len(pool)} "
                      f"train and evaluation images ({shot}{eval_fraction:.0%} evaluated; "
                      f"seeds {seed}..{seed + repeats - 1})", plan)


@contextlib.contextmanager
def _quiet_after_first(repeat: int):
    """Silence featx.data's per-class warnings after the first repeat: one line, not R."""
    data_log = logging.getLogger("featx.data")
    saved = data_log.disabled
    data_log.disabled = saved or repeat > 0
    try:
        yield
    finally:
        data_log.disabled = saved


def _kfold_plan(paths, labels, pool, repeats, seed, train_per_class, cv, names):
    from sklearn.model_selection import StratifiedKFold

    n_splits = kfold_splits(labels[pool], cv, names)
    plan = []
    for r in range(repeats):
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed + r)
        chunks = []
        for train, held_out in folds.split(np.zeros(len(pool)), labels[pool]):
            train = pool[train]
            if train_per_class:
                train = _k_per_class(paths, labels, train, train_per_class, seed + r)
            chunks.append((train, pool[held_out]))
        plan.append(Repeat(seed + r, chunks))
    shot = f", {train_per_class} training images per class drawn from each fold's training " \
           "part" if train_per_class else ""
    return RepeatPlan("kfold", f"{repeats} x repeated stratified {n_splits}-fold "
                      f"cross-validation over the {len(pool)} pooled labelled images of the "
                      f"given folders (seeds {seed}..{seed + repeats - 1}{shot})", plan)


def kfold_splits(pool_labels, cv: int, names) -> int:
    """The largest fold count <= ``cv`` that every class can fill (one warning line when it
    is fewer); DataError when a class has a single image."""
    classes, counts = np.unique(pool_labels, return_counts=True)
    smallest = int(np.argmin(counts))
    name, count = names[int(classes[smallest])], int(counts[smallest])
    if count < 2:
        raise DataError(f"class {name!r} has {count} labelled image: repeated stratified "
                        "k-fold needs at least 2 per class")
    if count < cv:
        log.warning("class %r has only %d labelled images: repeats use %d-fold instead of "
                    "%d-fold", name, count, count, cv)
    return min(cv, count)


def _k_per_class(paths, labels, rows, k, seed):
    """K rows per class from ``rows`` (all of a class with fewer), seeded."""
    chosen = []
    for label in np.unique(labels[rows]):
        members = rows[labels[rows] == label]
        members = members[np.argsort([str(paths[i]) for i in members], kind="stable")]
        rng = np.random.default_rng([int(seed), int(label)])
        chosen.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(chosen))
