"""The data audit: what is wrong with a labelled image set, found from its embeddings alone.

Four checks, each on the L2-normalised embeddings of the original images (no image goes
through a model here):

- :func:`near_duplicates`: pairs whose cosine similarity reaches a threshold, found block by
  block (memory bounded), joined into groups; a group is *across splits* (leakage),
  *conflicting labels* or *same class*.
- :func:`label_issues`: out-of-fold probabilities of a linear model (stratified K-fold,
  seeded), ranked by the probability the given label gets (confident learning's
  self-confidence).
- :func:`outliers`: distance to the k nearest images of the same class, as a robust z-score
  within the class.
- :func:`embedding_map`: a 2-D map (t-SNE, or PCA for large sets) for the report.

:func:`audit_rows` runs them all and returns an :class:`Audit`; :mod:`._findings` names its
files and :mod:`._report` writes it out.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from featx.options import AuditOptions, usable_cores

KINDS = ("across splits", "conflicting labels", "same class")  # most serious first
TSNE_MAX_ROWS = 5000  # "auto" draws t-SNE up to this many images, PCA beyond
BLOCK_BYTES = 32 << 20  # one block of the similarity matrix


@dataclasses.dataclass
class Audit:
    """What the audit found. Indices point into the rows it was given.

    ``duplicates``: groups (dicts: ``members``, ``kind``, ``conflicting_labels``, ``exact``,
    ``similarity``); ``label_errors`` and ``outliers``: ranked findings (dicts with
    ``index``). The lists are whole (the report cuts them to ``options.top``); ``counts``
    holds their lengths and the groups per kind.
    ``skipped``: one line per check (or part of one) that could not run, and why.
    """

    options: AuditOptions
    duplicates: list
    label_errors: list
    outliers: list
    counts: dict
    nearest: dict  # distribution of each image's highest similarity to another image
    skipped: list
    coords: np.ndarray | None
    map_method: str
    seconds: dict


# ----- the whole audit -------------------------------------------------------------
def audit_rows(X, labels, splits, sha256, class_names,
               options: AuditOptions | None = None, verify=None) -> Audit:
    """Run every check on embeddings ``X`` (n, d) with their labels, splits and hashes.

    A float32 ``X`` is scaled to unit rows in place (one copy of the embeddings in memory,
    not two); every check reads the unit rows. A row holding NaN or inf is set to zero (far
    from everything, so it shows as an outlier) and a line in ``skipped`` says so.

    ``verify(i, j, cosine) -> dict | None`` (a :class:`~featx.auditing.CopyVerifier`)
    confirms near-duplicates from the images: each image's ``options.candidates`` nearest
    neighbours from ``options.candidate_cosine`` on are asked, and groups form from the
    confirmed pairs only. Without it (or with ``options.verify`` False) a pair is a
    near-duplicate when its cosine reaches ``options.threshold``.
    """
    options = options or AuditOptions()
    labels = np.asarray(labels, dtype=np.int64)
    seconds, skipped = {}, []
    broken = ~np.isfinite(X).all(axis=1)
    if broken.any():
        X[broken] = 0.0
        skipped.append(f"embeddings: {int(broken.sum())} rows hold NaN or inf; audited as "
                       "zero vectors (extract them again)")
    Z = _timed(seconds, "normalize", normalized, X, out=X if X.dtype == np.float32 else None)
    if verify is not None and options.verify:
        candidates, nearest = _timed(seconds, "duplicates", candidate_pairs, Z,
                                     options.candidate_cosine, options.candidates)
        pairs, copies = _timed(seconds, "verify", verified_pairs, candidates, verify)
        skipped += getattr(verify, "notes", lambda: [])()
    else:
        (pairs, nearest), copies = _timed(seconds, "duplicates", near_duplicates, Z,
                                          options.threshold), None
    component = duplicate_components(pairs, len(Z))
    groups = duplicate_groups(pairs, component, labels, splits, sha256, copies)
    errors, skip = _timed(seconds, "label_errors", label_issues, Z, labels, class_names,
                          folds=options.folds, seed=options.seed,
                          groups=fold_groups(component))
    skipped += skip
    found, skip = _timed(seconds, "outliers", outliers, Z, labels, class_names,
                         neighbours=options.neighbours, z_from=options.outlier_z)
    skipped += skip
    coords, method = _timed(seconds, "map", embedding_map, Z, options.map, options.seed)
    counts = {kind: sum(g["kind"] == kind for g in groups) for kind in KINDS}
    counts.update(duplicate_groups=len(groups), label_errors=len(errors), outliers=len(found),
                  conflicting_labels_any=sum(g["conflicting_labels"] for g in groups))
    return Audit(options=options, duplicates=groups, label_errors=errors, outliers=found,
                 counts=counts, nearest=_distribution(nearest, options.threshold),
                 skipped=skipped, coords=coords, map_method=method, seconds=seconds)


def _timed(seconds: dict, name: str, func, *args, **kwargs):
    started = time.perf_counter()
    result = func(*args, **kwargs)
    seconds[name] = time.perf_counter() - started
    return result


def normalized(X, out=None) -> np.ndarray:
    """Rows scaled to unit length (float32, into ``out`` when given); a zero row stays zero."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, np.maximum(norms, np.finfo(np.float32).tiny), out=out)


# ----- near-duplicates --------------------------------------------------------------
def near_duplicates(Z, threshold: float, block_bytes: int = BLOCK_BYTES):
    """Pairs ``(i, j, similarity)`` with ``i < j`` and cosine similarity >= ``threshold``,
    and each row's highest similarity to any other row.

    ``Z``: unit rows. The upper triangle of ``Z @ Z.T`` is computed a block of rows at a
    time, so memory stays near ``block_bytes`` whatever the number of rows.
    """
    n = len(Z)
    nearest = np.full(n, -1.0, dtype=np.float32)
    found_i, found_j, found_s = [], [], []
    rows = max(1, block_bytes // max(1, 4 * n))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = Z[start:stop] @ Z[start:].T  # (stop - start, n - start)
        local = np.arange(stop - start)
        block[np.arange(block.shape[1])[None, :] <= local[:, None]] = -1.0  # j <= i
        np.maximum(nearest[start:stop], block.max(axis=1), out=nearest[start:stop])
        np.maximum(nearest[start:], block.max(axis=0), out=nearest[start:])
        i, j = np.nonzero(block >= threshold)
        found_i.append(i + start)
        found_j.append(j + start)
        found_s.append(block[i, j])
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return (empty, empty, np.zeros(0, np.float32)), nearest
    return (np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)), nearest


def candidate_pairs(Z, cosine: float, k: int, block_bytes: int = BLOCK_BYTES):
    """Each row's ``k`` nearest other rows with cosine >= ``cosine``, as unique pairs
    ``(i, j, similarity)`` with ``i < j``, and each row's highest similarity to another.

    Block by block, like :func:`near_duplicates`, so memory stays near ``block_bytes``.
    """
    n = len(Z)
    k = min(k, n - 1)
    nearest = np.full(n, -1.0, dtype=np.float32)
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    found_s = [np.zeros(0, np.float32)]
    rows = max(1, block_bytes // max(1, 4 * n))
    for start in range(0, n if k > 0 else 0, rows):
        stop = min(n, start + rows)
        block = Z[start:stop] @ Z.T
        block[np.arange(stop - start), np.arange(start, stop)] = -1.0  # not itself
        nearest[start:stop] = block.max(axis=1)
        best = np.argpartition(-block, k - 1, axis=1)[:, :k]
        similarity = np.take_along_axis(block, best, axis=1)
        r, c = np.nonzero(similarity >= cosine)
        found_i.append(start + r)
        found_j.append(best[r, c])
        found_s.append(similarity[r, c])
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    low, high = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(low * n + high, return_index=True)  # a pair found from both sides
    s = np.concatenate(found_s).astype(np.float32)
    return (low[first], high[first], s[first]), nearest


def verified_pairs(candidates, verify):
    """The candidate pairs ``verify(i, j, cosine)`` confirms, and one dict per confirmed
    pair: ``a``, ``b``, ``cosine``, ``kind``, ``inliers``."""
    from tqdm.auto import tqdm

    kept, copies = [], []
    pairs = list(zip(*(part.tolist() for part in candidates)))
    for i, j, s in tqdm(pairs, unit="pair", desc="audit: checking copies", dynamic_ncols=True,
                        disable=not getattr(verify, "progress", False)):
        verdict = verify(i, j, s)
        if verdict:
            kept.append((i, j, s))
            copies.append({"a": i, "b": j, "cosine": s, **verdict})
    if hasattr(verify, "save"):
        verify.save()
    if not kept:
        empty = np.zeros(0, dtype=np.int64)
        return (empty, empty, np.zeros(0, np.float32)), copies
    i, j, s = zip(*kept)
    return (np.array(i), np.array(j), np.array(s, dtype=np.float32)), copies


def duplicate_components(pairs, n: int) -> np.ndarray:
    """Group number of every row: rows joined by near-duplicate pairs share one (connected
    components); a row with no near-duplicate is alone in its group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j, _ = pairs
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def duplicate_groups(pairs, component, labels, splits, sha256, copies=None) -> list[dict]:
    """Near-duplicate pairs joined into groups (``component``: from
    :func:`duplicate_components`), most serious first.

    A group's ``kind`` is "across splits" when its images sit in more than one split (the
    same picture is trained on and evaluated on), else "conflicting labels" when they carry
    more than one label, else "same class". ``exact``: every member has one content hash.
    ``copies`` (from :func:`verified_pairs`): each group gets the confirmed pairs among its
    members (``pairs``) and their transform kinds (``copy_kinds``).
    """
    i, j, sim = pairs
    if not len(i):
        return []
    splits, sha256 = np.asarray(splits), np.asarray(sha256)
    best = {}
    for a, s in zip(component[i].tolist(), sim.tolist()):
        best[a] = max(best.get(a, -1.0), s)
    members_of = _members(component, set(best))
    pairs_of = {}
    for copy in copies or ():
        pairs_of.setdefault(int(component[copy["a"]]), []).append(copy)
    out = []
    for comp in sorted(best):
        members = members_of[comp]
        if len(set(splits[members].tolist())) > 1:
            kind = "across splits"
        elif len(set(labels[members].tolist())) > 1:
            kind = "conflicting labels"
        else:
            kind = "same class"
        group = {"members": members.tolist(), "kind": kind,
                 "conflicting_labels": len(set(labels[members].tolist())) > 1,
                 "exact": len(set(sha256[members].tolist())) == 1,
                 "similarity": min(best[comp], 1.0)}
        if copies is not None:
            group["pairs"] = pairs_of.get(comp, [])
            group["copy_kinds"] = sorted({c["kind"] for c in group["pairs"]})
        out.append(group)
    out.sort(key=lambda g: (KINDS.index(g["kind"]), -g["similarity"], g["members"][0]))
    return out


def _members(component, wanted) -> dict:
    order = np.argsort(component, kind="stable")
    values, starts = np.unique(component[order], return_index=True)
    ends = list(starts[1:]) + [len(order)]
    return {int(v): np.sort(order[a:b]) for v, a, b in zip(values, starts, ends) if v in wanted}


def _distribution(nearest, threshold) -> dict:
    valid = nearest[nearest > -1.0]
    if not valid.size:
        return {}
    q = np.quantile(valid, [0.5, 0.9, 0.99])
    return {"median": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "max": float(valid.max()),
            "share_at_threshold": float((valid >= threshold).mean())}


# ----- label errors ------------------------------------------------------------------
LABEL_MODEL_C = 0.1  # inverse L2 strength of the out-of-fold logistic regression


def label_issues(X, labels, class_names, *, folds: int = 5, seed: int = 42, groups=None):
    """Images whose given label the other images disagree with, most doubtful first.

    Out-of-fold probabilities come from ``StandardScaler -> LogisticRegression`` fitted on
    the other folds of a stratified, seeded K-fold, so no image is scored by a model that
    saw it; rows of one ``groups`` value (near-duplicates) share a fold, so a copy cannot
    vouch for its twin's label. An image is flagged when another class gets more
    probability than its own; the list is ranked by the probability its own label gets
    (lowest first).

    Classes with fewer than ``folds`` images are left out of this check; fewer than two
    classes left skips it. Either way one line in the returned ``skipped`` says so.
    Returns ``(findings, skipped)``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels, minlength=len(class_names))
    present = [c for c in range(len(class_names)) if counts[c] >= folds]
    small = [class_names[c] for c in range(len(class_names)) if 0 < counts[c] < folds]
    note = (f"{len(small)} class(es) with fewer than {folds} images ({_names(small)}); "
            f"out-of-fold predictions need {folds} per class (--folds)") if small else ""
    if len(present) < 2:
        return [], [f"label errors: skipped: {len(present)} class(es) with at least {folds} "
                    "images (--folds); out-of-fold predictions need two or more"
                    + (f"; fewer: {_names(small)}" if small else "")]
    rows = np.flatnonzero(np.isin(labels, present))
    y = labels[rows]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=LABEL_MODEL_C, max_iter=500))
    cv = _folds(y, None if groups is None else np.asarray(groups)[rows], folds, seed)
    proba = cross_val_predict(model, X if len(rows) == len(X) else X[rows], y, cv=cv,
                              method="predict_proba", n_jobs=min(folds, usable_cores()))
    classes = np.asarray(present)
    given = np.searchsorted(classes, y)
    p_given = proba[np.arange(len(y)), given]
    best = proba.argmax(axis=1)
    flagged = np.flatnonzero(best != given)
    flagged = flagged[np.argsort(p_given[flagged], kind="stable")]
    findings = []
    for f in flagged:
        top = np.argsort(-proba[f])[:3]
        findings.append({"index": int(rows[f]), "label": int(y[f]),
                         "suggested": int(classes[best[f]]), "p_given": float(p_given[f]),
                         "p_suggested": float(proba[f, best[f]]),
                         "probabilities": {int(classes[t]): float(proba[f, t]) for t in top}})
    return findings, [f"label errors: left out {note}"] if note else []


MAX_FOLD_GROUP = 20  # larger near-duplicate groups are chains of look-alikes, not copies


def fold_groups(component) -> np.ndarray:
    """The groups the label check keeps in one fold: near-duplicate groups of at most
    ``MAX_FOLD_GROUP`` images (copies); every other image is a group of its own, so that a
    long chain of similar images cannot pull a whole class into one fold."""
    sizes = np.bincount(component)
    alone = sizes[component] > MAX_FOLD_GROUP
    return np.where(alone, len(component) + np.arange(len(component)), component)


def _folds(y, groups, folds: int, seed: int):
    """Stratified, seeded folds in which every row of one group sits in its first row's
    fold (a ``PredefinedSplit``; StratifiedGroupKFold loops in Python over groups, far
    slower at 50k singletons). Plain stratified folds when grouping would leave a fold's
    training part with one class."""
    from sklearn.model_selection import PredefinedSplit, StratifiedKFold

    fold = np.empty(len(y), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y)):
        fold[test] = k
    if groups is not None:
        _, first = np.unique(groups, return_index=True)
        fold_of_group = dict(zip(groups[first].tolist(), fold[first].tolist()))
        grouped = np.array([fold_of_group[g] for g in groups.tolist()], dtype=np.int64)
        if all(len(set(y[grouped != k].tolist())) > 1 for k in range(folds)):
            fold = grouped
    return PredefinedSplit(fold)


def _names(names, at_most: int = 5) -> str:
    shown = ", ".join(repr(str(n)) for n in names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


# ----- outliers ------------------------------------------------------------------------
MIN_CLASS_FOR_OUTLIERS = 5  # a robust z-score of fewer images says nothing
MIN_SPREAD = 1e-3  # cosine distance: a class of copies (MAD 0) does not make every image odd


def outliers(Z, labels, class_names, *, neighbours: int = 5, z_from: float = 3.5):
    """Images far from every image of their class, most isolated first.

    Score: mean cosine distance to the ``neighbours`` nearest images of the same class;
    an image is an outlier when its robust z-score within the class (median and MAD, the
    MAD at least ``MIN_SPREAD``) reaches ``z_from``. Classes with fewer than
    ``MIN_CLASS_FOR_OUTLIERS`` images are skipped, named in one line of ``skipped``.
    Returns ``(findings, skipped)``.
    """
    from sklearn.neighbors import NearestNeighbors

    findings, small = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < MIN_CLASS_FOR_OUTLIERS:
            small.append(class_names[c])
            continue
        index = NearestNeighbors(n_neighbors=min(neighbours, len(rows) - 1)).fit(Z[rows])
        distance, _ = index.kneighbors()  # each image's neighbours, itself left out
        score = (distance ** 2 / 2).mean(axis=1)  # unit rows: cosine distance = d^2 / 2
        median = np.median(score)
        spread = max(1.4826 * np.median(np.abs(score - median)), MIN_SPREAD)
        z = (score - median) / spread
        for r in np.flatnonzero(z >= z_from):
            findings.append({"index": int(rows[r]), "label": int(c),
                             "distance": float(score[r]), "z": float(z[r])})
    findings.sort(key=lambda f: -f["z"])
    skipped = [f"outliers: skipped {len(small)} class(es) with fewer than "
               f"{MIN_CLASS_FOR_OUTLIERS} images ({_names(small)})"] if small else []
    return findings, skipped


# ----- the map ---------------------------------------------------------------------------
def embedding_map(Z, method: str = "auto", seed: int = 42):
    """2-D coordinates of the rows and the method that drew them ("tsne" or "pca")."""
    from sklearn.decomposition import PCA

    if len(Z) < 3:
        return None, "none"
    if method == "auto":
        method = "tsne" if len(Z) <= TSNE_MAX_ROWS else "pca"
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(Z), "pca"
    from sklearn.manifold import TSNE

    reduced = PCA(n_components=min(50, *Z.shape), random_state=seed).fit_transform(Z)
    tsne = TSNE(n_components=2, init="pca", random_state=seed,
                perplexity=min(30.0, max(2.0, (len(Z) - 1) / 3)), n_jobs=usable_cores())
    return tsne.fit_transform(reduced), "tsne"
