"""Augmented views in the feature cache: K augmented embeddings of every training image.

``extract(..., augment=K)`` stores them (view numbers 1..K; view 0 is the image itself), so
classifiers trained on cached features can learn from augmentation. The views are computed
through the same pipeline as plain rows (:mod:`._engine`), with the augmentation
(:class:`featx.data.augment.ViewAugmenter`) wrapped around the runtime's mapper.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from featx._backend import backend_name
from featx.errors import UsageError
from featx.options import AugmentOptions

from ._engine import run_pipeline
from ._reader import ImageReader
from ._runtimes import KerasMapper
from ._writers import CacheWriter

log = logging.getLogger(__name__)

RECIPE_ATTR = "augment_recipe"


def augment_recipe(options, seed: int) -> dict:
    """What the cached views were drawn with: the options and the seed, normalised.

    A disabled transformation is ``None`` whether it was given as ``0``, ``False`` or
    ``None``, and numbers are floats, so equivalent spellings compare equal.
    """
    options = AugmentOptions.or_default(options)
    normalised = {name: (float(value) if value else None)
                  for name, value in options.to_dict().items() if name != "flip"}
    normalised["flip"] = bool(options.flip)
    recipe = {"options": normalised, "seed": int(seed)}
    backend = backend_name()
    if backend != "tensorflow":  # each backend draws other random numbers from a seed
        recipe["backend"] = backend
    return recipe


def recorded_recipe(cache) -> dict | None:
    """The recipe recorded in ``cache`` (:data:`RECIPE_ATTR`), or None."""
    value = cache.attr(RECIPE_ATTR)
    if value is None:
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def _drop_views_of_other_recipe(cache, recipe: dict):
    """Drop every augmented view unless the cache records ``recipe`` (or holds none).

    Returns the cache to go on with (a new object when rows were dropped).
    """
    recorded = recorded_recipe(cache)
    if recorded == recipe:
        return cache
    views = cache.rows()["view"] if cache.n_rows else np.zeros(0, dtype=np.int16)
    stale = views > 0
    if stale.any():
        if recorded is None:
            reason = "no augmentation recipe was recorded with them"
        else:
            reason = (f"the augmentation recipe changed from {json.dumps(recorded, sort_keys=True)}"
                      f" to {json.dumps(recipe, sort_keys=True)}")
        log.info("recomputing augmented views: dropping %d cached views because %s",
                 int(stale.sum()), reason)
        cache = cache.keep_rows(~stale)
    return cache


def missing_views(rows: dict, k: int) -> dict[int, list[int]]:
    """Training images lacking some of views 1..k: row index of view 0 -> missing views.

    An augmented view counts as present when a row with the same path, content hash and
    view number exists; so views of a changed file are recomputed (the extractor drops
    the old ones), and views of val/test images are never asked for.
    """
    views = rows["view"]
    present = {(p, h, int(v)) for p, h, v in zip(rows["paths"], rows["sha256"], views) if v > 0}
    todo = {}
    for i in np.flatnonzero((views == 0) & (rows["split"] == "train")):
        path, sha = rows["paths"][i], rows["sha256"][i]
        missing = [v for v in range(1, k + 1) if (path, sha, v) not in present]
        if missing:
            todo[int(i)] = missing
    return todo


def extract_augmented_views(cache, backbone, root, k: int, options=None, seed: int = 0,
                            batch_size: int = 32, progress: bool = True, *, mapper=None):
    """Append K augmented views of every training image that does not have them yet.

    The recipe (options and seed, :func:`augment_recipe`) is recorded in the cache
    attribute :data:`RECIPE_ATTR`. When the cache holds views of another recipe, or of an
    unrecorded one, every augmented view is dropped first and recomputed.

    Parameters
    ----------
    cache : featx.cache.FeatureCache
        Open for writing (the caller holds its lock); its view-0 rows are current. Dropping
        views rewrites the file and closes this object: go on with the returned cache.
    backbone : featx.backbones.Backbone
        The backbone the cache was made with (its model is built only if work remains).
    root : Path
        Data directory the cached paths are relative to.
    k : int
        Views per training image (view numbers 1..k). Rows of views above ``k`` that are
        already cached are kept.
    options : AugmentOptions, dict, bool or None
        The augmentation; ``{}``/``None`` mean the defaults.
    seed : int
        View ``v`` is drawn by a Sequential seeded with ``view_seed(seed, v)``, batch after
        batch in cache row order. Keras draws a batch's transformations from one generator,
        so a view depends on the seed and on which images were computed in the same run,
        not on (path, view) alone; distinct view numbers never share a generator.
    batch_size : int
    progress : bool
        tqdm bar on stderr.
    mapper : callable returning a mapper, optional
        ``mapper(cache)`` builds the runtime that embeds the views into ``cache``
        (:mod:`._runtimes`), called only if views are missing; default: the backbone's
        Keras model.

    Returns
    -------
    cache : featx.cache.FeatureCache
        The open cache to go on with: ``cache`` itself, or its reopened replacement when
        views were dropped (then ``cache`` is closed). If this raises, the replacement
        is closed here; ``cache`` is left to the caller, as always.
    done : int
        Number of (image, view) embeddings computed and appended; 0 when nothing was
        missing (then the model is not even built).
    """
    if k <= 0:
        return cache, 0
    options = AugmentOptions.or_default(options)
    if not options.enabled:
        raise UsageError("augmented views need at least one augmentation option enabled")
    recipe = augment_recipe(options, seed)
    original = cache
    try:
        cache = _drop_views_of_other_recipe(cache, recipe)
        if recorded_recipe(cache) != recipe:
            # recorded before any view is written, so views of a run that dies are kept
            # (and completed) by a rerun with the same recipe, and dropped by another
            cache.set_attrs(**{RECIPE_ATTR: json.dumps(recipe, sort_keys=True)})
        return cache, _append_missing_views(cache, backbone, root, k, options, seed, batch_size,
                                            progress, mapper)
    except BaseException:
        if cache is not original:
            cache.close()  # the caller only knows (and closes) the original object
        raise


def _append_missing_views(cache, backbone, root, k, options, seed, batch_size, progress,
                          build_mapper) -> int:
    """One pipeline pass per view number over the training images that lack it."""
    rows = cache.rows()
    todo = missing_views(rows, k)
    if not todo:
        return 0
    if build_mapper is None:
        def build_mapper(cache):
            return KerasMapper(backbone, batch_size)

    from featx.data.augment import ViewAugmenter  # imports Keras

    mapper = build_mapper(cache)
    augmenter = ViewAugmenter(options, seed)
    done = 0
    for view in range(1, k + 1):
        # increasing row indices: cache row order, as the seeded views expect
        sources = np.array([r for r, views in todo.items() if view in views], dtype=np.int64)
        if not sources.size:
            continue
        columns = {name: values[sources] for name, values in rows.items()}
        columns["view"] = np.full(len(sources), view, dtype=np.int16)
        reader = ImageReader(columns["paths"], backbone.preprocessing, batch_size, root=root)
        writer = CacheWriter(cache, columns)
        timing = run_pipeline(reader, AugmentingMapper(augmenter, view, mapper), writer,
                              progress=progress, desc=f"augment view {view}")
        for path, _, error in writer.failed:
            log.warning("no augmented view %d of %s: %s", view, path, error)
        done += timing.n_images
    return done


class AugmentingMapper:
    """A mapper that augments each batch as view ``view`` before embedding it."""

    def __init__(self, augmenter, view: int, mapper):
        self.augmenter = augmenter
        self.view = view
        self.mapper = mapper
        self.runtime = getattr(mapper, "runtime", "")
        self.precision = getattr(mapper, "precision", "fp32")

    def __call__(self, images):
        return self.mapper(np.asarray(self.augmenter(images, self.view)))
