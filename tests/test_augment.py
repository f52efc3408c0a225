"""Augmentation layers, the preview grid, and augmented views in the feature cache."""

import numpy as np
import pytest

from conftest import TINY, class_image, make_dataset, write_image
from featx.data.augment import (
    AugmentOptions,
    RandomBrightnessFactor,
    augment_preview,
    build_augmentation,
)
from featx.cache import FeatureCache
from featx.cache._shards import seal
from featx.errors import UsageError
from featx.extraction import extract
from featx.extraction._views import augment_recipe, missing_views


def _images(n=6, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


# ----- layers ----------------------------------------------------------------------
def test_augmentation_is_identity_when_not_training():
    x = _images()
    aug = build_augmentation(AugmentOptions(), seed=0)
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)
    y = np.asarray(aug(x, training=True))
    assert y.shape == x.shape
    assert not np.allclose(y, x)
    assert y.min() >= 0.0 and y.max() <= 255.0


def test_same_seed_same_transformations():
    x = _images()
    a = np.asarray(build_augmentation(None, seed=3)(x, training=True))
    b = np.asarray(build_augmentation(None, seed=3)(x, training=True))
    c = np.asarray(build_augmentation(None, seed=4)(x, training=True))
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a, c)


def test_options_choose_the_layers():
    names = lambda opts: [layer.name for layer in build_augmentation(opts).layers]  # noqa: E731
    assert names(AugmentOptions()) == ["flip", "rotation", "zoom", "brightness"]
    assert names(AugmentOptions(zoom=None, rotation=0)) == ["flip", "brightness"]
    assert names({"flip": False, "brightness": None}) == ["rotation", "zoom"]
    assert names(AugmentOptions.none()) == ["identity"]
    x = _images(2)
    np.testing.assert_array_equal(np.asarray(build_augmentation(False)(x, training=True)), x)

    aug = build_augmentation(AugmentOptions(rotation=15, zoom=0.5))
    assert aug.get_layer("rotation").get_config()["factor"] == pytest.approx((-15 / 360, 15 / 360))
    zoom = aug.get_layer("zoom").get_config()
    assert tuple(zoom["height_factor"]) == (-0.5, 0.0) and zoom["width_factor"] is None


def test_options_coercion_and_validation():
    assert AugmentOptions.coerce(True) == AugmentOptions()
    assert AugmentOptions.coerce({}) == AugmentOptions()
    assert not AugmentOptions.coerce(False).enabled
    assert not AugmentOptions.coerce(None).enabled
    assert AugmentOptions.coerce({"zoom": 0.2}).zoom == 0.2
    with pytest.raises(UsageError, match="unknown augment option"):
        AugmentOptions.coerce({"shear": 0.1})
    for bad in (dict(zoom=1.0), dict(rotation=-1), dict(brightness=1.5)):
        with pytest.raises(UsageError):
            AugmentOptions(**bad)


def test_brightness_is_multiplicative():
    x = np.concatenate([np.full((8, 4, 4, 3), 100.0, "float32"), np.zeros((1, 4, 4, 3), "float32")])
    y = np.asarray(RandomBrightnessFactor(0.2, seed=1)(x, training=True))
    bright = y[:8]
    assert np.all(bright >= 80.0 - 1e-3) and np.all(bright <= 120.0 + 1e-3)
    assert np.allclose(bright, bright[:, :1, :1, :1])  # one factor per image
    assert len(np.unique(bright[:, 0, 0, 0])) == 8  # different factors per image
    np.testing.assert_array_equal(y[8], 0.0)  # black stays black (no additive offset)
    assert np.all(np.asarray(RandomBrightnessFactor(0.5)(np.full((4, 2, 2, 3), 250.0),
                                                       training=True)) <= 255.0)


def test_zoom_only_zooms_in_around_the_centre():
    width = 32
    ramp = np.broadcast_to(np.arange(width, dtype="float32")[None, None, :, None],
                           (16, width, width, 3)).copy()
    opts = AugmentOptions(zoom=0.5, rotation=None, brightness=None, flip=False)
    row = np.asarray(build_augmentation(opts, seed=0)(ramp, training=True))[:, width // 2, :, 0]
    span = row.max(axis=1) - row.min(axis=1)
    assert np.all(span >= 0.5 * (width - 1) - 1.0)  # keeps at least half the side (2x at most)
    assert np.all(span <= width - 1 + 1e-3)
    assert np.all(np.diff(row, axis=1) >= -1e-3)  # in, never out: no reflected border
    np.testing.assert_allclose(row.mean(axis=1), (width - 1) / 2, atol=0.6)


def test_augmentation_serialises():
    import keras

    aug = build_augmentation(AugmentOptions(), seed=5)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(aug))
    assert [layer.name for layer in again.layers] == [layer.name for layer in aug.layers]
    assert again.get_layer("brightness").get_config()["factor"] == pytest.approx((0.8, 1.2))


# ----- preview ---------------------------------------------------------------------
def test_augment_preview_writes_a_png(tmp_path):
    import cv2

    source = tmp_path / "cat.png"
    write_image(source, class_image(0, 1, size=(60, 80)))
    out = augment_preview(source, tmp_path / "out" / "preview.png", n=6, seed=1, size=48)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cv2.imread(str(out)).shape[0] > 100
    with pytest.raises(UsageError):
        augment_preview(source, tmp_path / "x.png", n=1)


# ----- augmented views in the cache --------------------------------------------------
def test_missing_views_only_for_current_train_images():
    rows = {
        "paths": np.array(["a", "b", "c", "a", "b", "b"], dtype=object),
        "sha256": np.array(["ha", "hb", "hc", "ha", "old", "hb"], dtype=object),
        "split": np.array(["train", "train", "val", "train", "train", "train"], dtype=object),
        "view": np.array([0, 0, 0, 1, 1, 2], dtype=np.int16),
    }
    # a has view 1; b has view 2 and a stale view 1 (other content); c is validation
    assert missing_views(rows, 2) == {0: [2], 1: [1]}
    assert missing_views(rows, 1) == {1: [1]}
    assert missing_views(rows, 0) == {}


def test_augmented_views_are_train_only_and_idempotent(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    kw = dict(cache_dir=tmp_path / "cache", progress=False, batch_size=4, val_fraction=0.25,
              test_fraction=0.25, **TINY)

    first = extract(data, augment=2, **kw)
    originals = first.view == 0
    train = originals & (first.split == "train")
    n_train = int(train.sum())
    assert set(first.split[originals]) == {"train", "val", "test"}
    assert first.stats.n_augmented == 2 * n_train
    views = first.view > 0
    assert set(first.split[views]) == {"train"}
    assert sorted(first.view[views].tolist()) == [1] * n_train + [2] * n_train
    row_of = {p: i for i, p in enumerate(first.paths) if first.view[i] == 0}
    for i in np.flatnonzero(views):
        source = row_of[first.paths[i]]
        assert first.split[source] == "train"
        assert first.labels[i] == first.labels[source]
        assert first.sha256[i] == first.sha256[source]
    X, _ = first.arrays("train", views=True)
    assert len(X) == 3 * n_train
    assert not np.array_equal(X[:n_train], X[n_train:2 * n_train])

    again = extract(data, augment=2, **kw)
    assert again.stats.n_augmented == 0 and again.stats.reused
    assert len(again.view) == len(first.view)

    more = extract(data, augment=3, **kw)
    assert more.stats.n_augmented == n_train  # only view 3 was missing
    assert np.bincount(more.view).tolist() == [len(first.paths) - 2 * n_train] + [n_train] * 3
    X3, _ = more.arrays("train", views=True)
    np.testing.assert_array_equal(X3[:3 * n_train], X)  # earlier views kept as they were


def test_augmented_views_follow_augment_options(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    features = extract(data, augment=1, augment_options={"zoom": None, "rotation": None},
                       cache_dir=tmp_path / "cache", progress=False, **TINY)
    assert features.stats.n_augmented == int(((features.view == 0)
                                              & (features.split == "train")).sum())
    with pytest.raises(UsageError):
        extract(data, augment=2, augment_options=AugmentOptions.none(),
                cache_dir=tmp_path / "cache", progress=False, **TINY)


def _view_embeddings(features):
    """(path, view) -> embedding of every augmented row."""
    rows = np.flatnonzero(features.view > 0)
    with FeatureCache.open(features.cache_path) as cache:
        X = cache.embeddings(rows)
    return {(features.paths[i], int(features.view[i])): x for i, x in zip(rows, X)}


def test_changed_augment_options_recompute_every_view(tmp_path, caplog):
    import h5py

    data = make_dataset(tmp_path / "data", per_class=4)
    kw = dict(cache_dir=tmp_path / "cache", progress=False, batch_size=4, augment=2, **TINY)
    zoomed = {"zoom": 0.5, "rotation": None, "brightness": None}
    flat = {"zoom": 0, "rotation": None, "brightness": None}

    first = extract(data, augment_options=zoomed, **kw)
    n_views = 2 * int(((first.view == 0) & (first.split == "train")).sum())
    assert n_views and first.stats.n_augmented == n_views
    with FeatureCache.open(first.cache_path) as cache:
        assert cache.json_attr("augment_recipe") == augment_recipe(zoomed, seed=42)
    before = _view_embeddings(first)

    with caplog.at_level("INFO", logger="featx.extraction"):
        second = extract(data, augment_options=flat, **kw)
    assert second.stats.n_augmented == n_views  # every view, not 0
    assert "recipe changed" in caplog.text
    assert np.bincount(second.view).tolist() == np.bincount(first.view).tolist()
    after = _view_embeddings(second)
    assert after.keys() == before.keys()
    for key, x in after.items():
        # random weights give tiny embeddings: compare relatively
        assert not np.allclose(x, before[key], rtol=1e-3, atol=0), key  # not zoomed now
    with FeatureCache.open(second.cache_path) as cache:
        recipe = cache.json_attr("augment_recipe")
    assert recipe == augment_recipe(flat, seed=42)
    assert recipe["options"]["zoom"] is None and recipe["seed"] == 42

    # the same options again, and an equivalent spelling of them, compute nothing
    again = extract(data, augment_options=flat, **kw)
    assert again.stats.n_augmented == 0 and again.stats.reused
    assert extract(data, augment_options={**flat, "zoom": None}, **kw).stats.n_augmented == 0
    for key, x in _view_embeddings(again).items():
        np.testing.assert_array_equal(x, after[key])

    # views of a cache that recorded no recipe cannot be vouched for: recomputed
    with h5py.File(again.cache_path, "r+") as h5:
        del h5.attrs["augment_recipe"]
    seal(again.cache_path)  # an edit by featx, not damage
    assert extract(data, augment_options=flat, **kw).stats.n_augmented == n_views
