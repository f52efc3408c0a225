"""Reconciling a folder with its cache (featx.cache.reconcile), on synthetic columns: no model."""

from types import SimpleNamespace

import numpy as np

from conftest import make_dataset
from featx.cache import reconcile
from featx.cache import FeatureCache, cache_path_for
from featx.options import SplitOptions

DIM = 4


def columns(paths, hashes, splits=None, views=None):
    n = len(paths)
    return {
        "labels": np.zeros(n, np.int64),
        "paths": np.asarray(paths, dtype=object),
        "split": np.asarray(splits or ["train"] * n, dtype=object),
        "sha256": np.asarray(hashes, dtype=object),
        "size": np.ones(n, np.int64),
        "mtime_ns": np.ones(n, np.int64),
        "view": np.asarray(views or [0] * n, np.int16),
    }


def state(rows, failed=()):
    return reconcile.CacheState(rows=rows, failed=list(failed), split_params=None)


def test_without_a_cache_every_file_is_extracted():
    plan = reconcile.plan(None, columns(["a", "b"], ["h1", "h2"]))
    assert plan.extract.tolist() == [0, 1] and not plan.copy_from and not plan.known_failed


def test_unchanged_files_keep_their_rows_and_nothing_runs():
    rows = columns(["a", "b"], ["h1", "h2"])
    plan = reconcile.plan(state(rows), columns(["a", "b"], ["h1", "h2"]))
    assert plan.keep.all() and plan.extract.size == 0 and not plan.copy_from


def test_changed_moved_removed_and_failed_files():
    rows = columns(["a", "b", "c"], ["h1", "h2", "h3"])
    current = columns(["a", "moved/b", "d", "bad"], ["h1x", "h2", "h4", "h5"])
    plan = reconcile.plan(state(rows, failed=[("bad", "h5", "truncated image")]), current)
    assert plan.keep.tolist() == [False, False, False]  # a changed, b moved, c removed
    assert plan.copy_from == {1: 1}  # moved/b reuses b's row: same content
    assert plan.extract.tolist() == [0, 2]  # changed a and new d
    assert plan.known_failed == [("bad", "h5", "truncated image")]  # not retried


def test_an_augmented_view_survives_only_while_its_image_trains():
    rows = columns(["a", "a"], ["h1", "h1"], views=[0, 1])
    still_train = reconcile.plan(state(rows), columns(["a"], ["h1"]))
    now_val = reconcile.plan(state(rows), columns(["a"], ["h1"], splits=["val"]))
    assert still_train.keep.tolist() == [True, True]
    assert now_val.keep.tolist() == [True, False]


def _cache_with(path, rows, key):
    cache = FeatureCache.open_for_write(path, key=key, dim=DIM, attrs={"root": "r"})
    cache.append(np.arange(len(rows["paths"]) * DIM, dtype=np.float32).reshape(-1, DIM), **rows)
    return cache


def test_apply_plan_copies_moved_rows_drops_stale_ones_and_refreshes_columns(tmp_path):
    key = {"backbone": "toy"}
    cache = _cache_with(tmp_path / "c.h5", columns(["a", "b"], ["h1", "h2"]), key)
    current = columns(["moved/a", "b"], ["h1", "h2"], splits=["train", "val"])
    plan = reconcile.plan(state(cache.rows()), current)
    cache, n_copied = reconcile.apply_plan(cache, plan, current)
    cache.close()
    assert n_copied == 1
    with FeatureCache.open(tmp_path / "c.h5") as saved:
        rows = saved.rows()
        assert sorted(rows["paths"]) == ["b", "moved/a"]
        assert dict(zip(rows["paths"], rows["split"])) == {"b": "val", "moved/a": "train"}
        by_path = dict(zip(rows["paths"], saved.embeddings()))
    assert by_path["moved/a"].tolist() == [0, 1, 2, 3]  # a's embedding, not recomputed


def test_read_state_refuses_another_key(tmp_path):
    import pytest

    from featx.errors import CacheError

    _cache_with(tmp_path / "c.h5", columns(["a"], ["h1"]), {"backbone": "toy"}).close()
    assert reconcile.recorded_key(tmp_path / "c.h5") == {"backbone": "toy"}
    assert reconcile.read_state(tmp_path / "none.h5", {}) is None
    with pytest.raises(CacheError, match="does not match"):
        reconcile.read_state(tmp_path / "c.h5", {"backbone": "other"})


def test_cached_embeddings_only_from_a_cache_with_the_same_key(tmp_path):
    key = {"backbone": "toy"}
    _cache_with(tmp_path / "c.h5", columns(["a", "b"], ["h1", "h2"]), key).close()
    found = reconcile.cached_embeddings(tmp_path / "c.h5", key, ["h2", "h9"])
    assert list(found) == ["h2"] and found["h2"].tolist() == [4, 5, 6, 7]
    assert reconcile.cached_embeddings(tmp_path / "c.h5", {"backbone": "x"}, ["h2"]) == {}
    assert reconcile.cached_embeddings(tmp_path / "missing.h5", key, ["h2"]) == {}


def test_resolve_split_keeps_the_split_a_cache_recorded(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    net = SimpleNamespace(cfg=SimpleNamespace(name="toy"), weights="random",
                          key=lambda: {"backbone": "toy"})
    fresh, source = reconcile.resolve_split(data, net, cache_dir=tmp_path / "cache",
                                            split=SplitOptions(val_fraction=0.5))
    assert source == "discover" and sorted(set(fresh.splits)) == ["train", "val"]

    flipped = {"train": "val", "val": "train"}
    rows = columns(fresh.paths, [f"h{i}" for i in range(len(fresh.paths))],
                   splits=[flipped[s] for s in fresh.splits])
    path = cache_path_for(tmp_path / "cache", data, "toy", "random", net.key())
    cache = _cache_with(path, rows, net.key())
    cache.set_attrs(split_params=fresh.split_params)
    cache.close()
    manifest, source = reconcile.resolve_split(data, net, cache_dir=tmp_path / "cache",
                                               split=SplitOptions(val_fraction=0.5))
    assert source == "cache"
    assert manifest.splits.tolist() == [flipped[s] for s in fresh.splits]
