"""Assigning files to train, val and test: stratified by class, seeded, and stable when
files are added (a file keeps the split recorded for it)."""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger("featx.data")  # one logger for the package

SPLITS = ("train", "val", "test")


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
