"""Extraction pipeline: reuse, incremental updates, failures, splits.

The cache module on its own (commit protocol, lock, validation, crash and resume) is
tested in test_cache.py.
"""

import os

import numpy as np

from conftest import TINY, class_image, make_dataset, write_image
from featx.cache import FeatureCache
from featx.extraction import extract


def run(data, cache_dir, **kw):
    return extract(data, cache_dir=cache_dir, progress=False, batch_size=4, **{**TINY, **kw})


def test_first_run_extracts_everything(image_folder, cache_dir):
    features = run(image_folder, cache_dir)
    assert features.stats.n_extracted == 12
    assert features.stats.n_images == 12
    assert not features.stats.reused
    assert features.class_names == ["cat", "dog"]
    assert sorted(features.paths) == sorted(
        p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))
    X, y = features.arrays("train")
    Xv, yv = features.arrays("val")
    assert len(X) + len(Xv) == 12 and X.shape[1] == features.dim
    assert np.isfinite(X).all()
    assert set(y) == {0, 1} and set(yv) == {0, 1}  # stratified


def test_cached_rows_equal_direct_model_output(image_folder, cache_dir):
    from featx.backbones import create_backbone
    from featx.data import load_for_model

    features = run(image_folder, cache_dir)
    net = create_backbone(TINY["backbone"], TINY["weights"], input_size=TINY["input_size"], seed=42)
    pre = net.preprocessing
    images = np.stack([load_for_model(image_folder / p, pre["input_size"], pre["resize_size"],
                                      pre["interpolation"]) for p in features.paths])
    import keras

    direct = keras.ops.convert_to_numpy(
        net.feature_model()(images.astype("float32"), training=False))
    with FeatureCache.open(features.cache_path) as cache:
        cached = cache.embeddings()
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)


def test_second_run_reuses_cache_with_zero_forward_passes(image_folder, cache_dir):
    first = run(image_folder, cache_dir)
    before = first.cache_path.stat()
    second = run(image_folder, cache_dir)
    after = second.cache_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert second.stats.n_extracted == 0
    assert second.stats.reused
    assert second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.split, first.split)
    np.testing.assert_array_equal(second.arrays("train")[0], first.arrays("train")[0])


def test_touched_file_is_reused_and_its_stat_recorded(image_folder, cache_dir):
    run(image_folder, cache_dir)
    touched = image_folder / "cat" / "cat_002.png"
    os.utime(touched, ns=(1_000_000_000, 1_000_000_000))
    features = run(image_folder, cache_dir)
    assert features.stats.n_extracted == 0  # same content: no model call
    with FeatureCache.open(features.cache_path) as cache:
        rows = cache.rows()
    row = list(rows["paths"]).index("cat/cat_002.png")
    assert rows["mtime_ns"][row] == 1_000_000_000  # next run needs not re-hash it


def test_added_files_are_the_only_ones_extracted(image_folder, cache_dir):
    first = run(image_folder, cache_dir)
    before = dict(zip(first.paths, first.split))
    make_dataset(image_folder, per_class=5, start=100)
    second = run(image_folder, cache_dir)
    assert second.stats.n_extracted == 10
    assert len(second.paths) == 22 and len(set(second.paths)) == 22
    after = dict(zip(second.paths, second.split))
    assert all(after[p] == s for p, s in before.items())  # old files keep their split


def test_removed_changed_and_moved_files(image_folder, cache_dir):
    run(image_folder, cache_dir)
    (image_folder / "cat" / "cat_000.png").unlink()
    write_image(image_folder / "cat" / "cat_001.png", class_image(0, 999))  # new content
    (image_folder / "dog" / "dog_000.png").rename(image_folder / "dog" / "renamed.png")
    features = run(image_folder, cache_dir)
    assert features.stats.n_extracted == 1  # only the changed file
    assert features.stats.n_copied == 1  # the renamed file reuses its row by content
    assert "cat/cat_000.png" not in set(features.paths)
    assert "dog/renamed.png" in set(features.paths)
    assert len(features.paths) == 11 == len(set(features.paths))


def test_bad_files_are_skipped_with_reasons_and_not_retried(image_folder, cache_dir):
    (image_folder / "cat" / "empty.jpg").write_bytes(b"")
    (image_folder / "dog" / "noise.jpg").write_bytes(os.urandom(2048))
    (image_folder / "dog" / "notes.txt").write_text("not an image")
    features = run(image_folder, cache_dir)
    failed = dict(features.stats.failed)
    assert set(failed) == {"cat/empty.jpg", "dog/noise.jpg"}
    assert all(reason for reason in failed.values())
    assert features.stats.n_images == 12 and features.stats.n_ignored == 1
    assert "cat/empty.jpg" not in set(features.paths)
    again = run(image_folder, cache_dir)
    assert again.stats.n_extracted == 0 and again.stats.n_failed == 2


def test_split_options_are_recorded_and_changes_resplit(image_folder, cache_dir):
    features = run(image_folder, cache_dir, val_fraction=0.5)
    assert len(features.indices("val")) == 6
    assert features.split_params["val_fraction"] == 0.5
    resplit = run(image_folder, cache_dir, val_fraction=0.2)
    assert resplit.stats.n_extracted == 0
    assert len(resplit.indices("val")) == 2
