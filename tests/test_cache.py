"""The HDF5 embedding cache on its own: commit protocol, recovery, lock, validation, edits.

Most tests use small random float32 rows (dim 8) and no model; the last three drive the
extraction pipeline (a tiny backbone, and a killed ``featx extract`` subprocess).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TINY, make_dataset
from featx.cache import (CACHE_FORMAT_VERSION, CacheLock, CacheSession, FeatureCache,
                         cache_path_for, key_hash, list_caches, part_id, shard_dir, summary,
                         validate)
from featx.cache._shards import seal
from featx.errors import CacheError
from featx.extraction import extract

DIM = 8
KEY = {"backbone": "test", "input_size": [32, 32], "dim": DIM}
ATTRS = {"root": "/data", "class_names": ["cat", "dog"]}


def vectors(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def columns(n, start=0, split="train", view=0):
    """Per-row metadata of ``n`` rows named ``img_<start>``, ``img_<start+1>``, ..."""
    ids = np.arange(start, start + n)
    return dict(labels=ids % 2, paths=[f"img_{i:03d}.png" for i in ids], split=[split] * n,
                sha256=[f"{i:064x}" for i in ids], size=ids + 1000, mtime_ns=ids * 10,
                view=np.full(n, view))


def make_cache(path, n=0, seed=0, failed=()):
    """A committed cache of ``n`` rows; returns their embeddings."""
    data = vectors(n, seed)
    with CacheSession(path, key=KEY, dim=DIM, attrs=ATTRS) as session:
        session.append(data, **columns(n))
        session.set_failed(list(failed))
    return data


def committed(path):
    """(rows, embeddings) of the cache file as a fresh reader sees it."""
    with FeatureCache.open(path) as cache:
        return cache.rows(), cache.embeddings()


def identity(path):
    stat = Path(path).stat()
    return stat.st_ino, stat.st_mtime_ns


def part_files(session_or_path):
    parts_dir = getattr(session_or_path, "parts_dir", None) or \
        Path(str(session_or_path) + ".parts")
    return sorted(parts_dir.glob("*")) if parts_dir.exists() else []


def abandon(session):
    """Leave a session the way a killed process does: parts written, nothing committed."""
    session.dirty = False
    session.close()


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ds" / "test.h5"


# ----- creating and reading --------------------------------------------------------------
def test_new_cache_is_created_empty_with_key_dim_and_attrs(path):
    make_cache(path)
    with FeatureCache.open(path) as cache:
        assert (cache.n_rows, cache.dim, cache.key) == (0, DIM, KEY)
        assert cache.attr("featx_cache_version") == CACHE_FORMAT_VERSION
        assert cache.attr("root") == "/data"
        assert cache.json_attr("class_names") == ["cat", "dog"]
        assert cache.json_attr("missing", {"default": 1}) == {"default": 1}
        assert cache.attr("missing", "x") == "x"
        assert cache.embeddings().shape == (0, DIM)
        assert cache.failed() == []
    assert [p.name for p in path.parent.iterdir()] == ["test.h5"]  # no tmp, no parts


def test_a_cache_needs_key_and_dim_to_be_created(path):
    with pytest.raises(ValueError, match="key and dim"):
        CacheSession(path, key=None, dim=DIM)
    with pytest.raises(ValueError, match="key and dim"):
        CacheSession(path, key=KEY, dim=None)
    assert not path.exists()
    with pytest.raises(CacheError, match="no such cache file"):
        FeatureCache.open(path)


def test_open_for_write_returns_a_session(path):
    with FeatureCache.open_for_write(path, key=KEY, dim=DIM, attrs=ATTRS) as session:
        assert isinstance(session, CacheSession)
        session.append(vectors(2), **columns(2))
    assert committed(path)[0]["paths"].tolist() == ["img_000.png", "img_001.png"]


def test_embeddings_in_any_index_order(path):
    data = make_cache(path, 10)
    with FeatureCache.open(path) as cache:
        np.testing.assert_array_equal(cache.embeddings([7, 2, 9, 0]), data[[7, 2, 9, 0]])
        np.testing.assert_array_equal(cache.embeddings([3, 1, 3, 3]), data[[3, 1, 3, 3]])
        assert cache.embeddings([]).shape == (0, DIM)
        rows = cache.rows()
    assert rows["paths"].dtype == object and rows["paths"][3] == "img_003.png"
    assert rows["view"].dtype == np.int16 and rows["size"].tolist() == list(range(1000, 1010))


# ----- the commit protocol ------------------------------------------------------------
def test_appended_rows_are_durable_part_files_before_commit(path):
    make_cache(path)
    first, second = vectors(3, seed=1), vectors(2, seed=2)
    session = CacheSession(path, key=KEY)
    session.append(first, **columns(3))
    session.append(second, **columns(2, start=3))
    session.append(vectors(0), **columns(0))  # nothing to write
    parts = part_files(session)
    assert [p.suffix for p in parts] == [".npz", ".npz"]  # renamed: no .tmp left
    assert committed(path)[0]["paths"].size == 0  # the cache file is not touched
    assert session.dirty and session.n_rows == 5  # the session reads its own rows
    np.testing.assert_array_equal(session.embeddings(), np.concatenate([first, second]))
    np.testing.assert_array_equal(session.embeddings([4, 0]), [second[1], first[0]])
    assert session.rows()["paths"][-1] == "img_004.png"

    session.commit()
    assert part_files(session) == [] and not session.dirty
    rows, embeddings = committed(path)
    np.testing.assert_array_equal(embeddings, np.concatenate([first, second]))
    assert rows["paths"].tolist() == [f"img_{i:03d}.png" for i in range(5)]
    runs = {part_id(p)[0] for p in parts}
    with FeatureCache.open(path) as cache:
        assert cache.json_attr("merged_parts") == {runs.pop(): 1}  # parts 0 and 1 of one run
    session.close()


def test_commit_replaces_the_file_atomically(path):
    old = make_cache(path, 2)
    before = identity(path)
    reader = FeatureCache.open(path)  # keeps the old file open
    with CacheSession(path, key=KEY) as session:
        session.append(vectors(1, seed=5), **columns(1, start=2))
        session.commit()
        assert identity(path)[0] != before[0]  # a new file took the old name
        assert not session.dirty
    assert reader.n_rows == 2  # the old file was not modified in place
    np.testing.assert_array_equal(reader.embeddings(), old)
    reader.close()
    assert committed(path)[1].shape == (3, DIM)
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.h5", "test.h5.parts",
                                                             "test.h5.shards"]
    assert part_files(path) == []


def test_a_session_that_changes_nothing_does_not_rewrite_the_file(path):
    make_cache(path, 4, failed=[("bad.png", "0" * 64, "cannot decode")])
    before = identity(path)
    with FeatureCache.open(path) as cache:
        updated = cache.attr("updated")
    with CacheSession(path, key=KEY, dim=DIM, attrs={"root": "elsewhere"}) as session:
        rows = session.rows()
        session.rewrite_column("split", rows["split"])
        session.rewrite_column("mtime_ns", rows["mtime_ns"])
        session.keep_rows(np.ones(4, dtype=bool))
        session.set_failed([("bad.png", "0" * 64, "cannot decode")])
        session.set_attrs(root="/data", class_names=["cat", "dog"])
        session.append(vectors(0), **columns(0))
        assert not session.dirty
        assert session.attr("root") == "/data"  # attrs apply only to a new cache
    assert identity(path) == before
    with FeatureCache.open(path) as cache:
        assert cache.attr("updated") == updated
    with CacheSession(path, key=KEY) as session:
        session.set_attrs(root="/moved")  # a real change is written
        assert session.dirty
    assert identity(path) != before


# ----- recovery ------------------------------------------------------------------------
def test_recover_merges_the_parts_of_a_session_that_never_committed(path):
    old = make_cache(path, 2)
    lost = vectors(3, seed=7)
    session = CacheSession(path, key=KEY)
    session.append(lost[:2], **columns(2, start=2))
    session.append(lost[2:], **columns(1, start=4))
    abandon(session)
    assert committed(path)[0]["paths"].size == 2 and len(part_files(path)) == 2
    stray = path.with_name(path.name + ".parts") / "part-123-0-000009.npz.tmp"
    stray.write_bytes(b"half a batch")

    assert CacheSession.recover(path) == 3
    rows, embeddings = committed(path)
    np.testing.assert_array_equal(embeddings, np.concatenate([old, lost]))
    assert rows["paths"].tolist() == [f"img_{i:03d}.png" for i in range(5)]
    assert part_files(path) == []  # merged parts and the stray .tmp are gone
    assert CacheSession.recover(path) == 0


def test_recover_with_nothing_left_does_not_touch_the_cache(path, tmp_path):
    assert CacheSession.recover(tmp_path / "missing.h5") == 0
    make_cache(path, 2)
    before = identity(path)
    assert CacheSession.recover(path) == 0  # no parts directory
    with CacheSession(path, key=KEY) as session:
        abandon(session)  # creates nothing
    stray = path.with_name(path.name + ".parts") / "part-1-1-000000.npz.tmp"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"")
    assert CacheSession.recover(path) == 0
    assert not stray.exists()
    assert identity(path) == before


def test_a_part_already_merged_is_not_merged_twice(path, tmp_path):
    make_cache(path)
    session = CacheSession(path, key=KEY)
    session.append(vectors(2, seed=1), **columns(2))
    session.append(vectors(1, seed=2), **columns(1, start=2))
    saved = tmp_path / "saved_parts"
    shutil.copytree(session.parts_dir, saved)
    session.close()  # commits and removes its parts
    with FeatureCache.open(path) as cache:
        merged = cache.json_attr("merged_parts")
    assert merged == {part_id(p)[0]: 1 for p in saved.glob("*.npz")}

    later = CacheSession(path, key=KEY)  # another run leaves a part of its own
    later.append(vectors(1, seed=3), **columns(1, start=3))
    abandon(later)
    # a crash between replacing the cache and removing the parts leaves them behind
    for part in saved.iterdir():
        shutil.copy(part, path.with_name(path.name + ".parts") / part.name)
    assert len(part_files(path)) == 3

    assert CacheSession.recover(path) == 1  # only the part of the later run
    rows, _ = committed(path)
    assert rows["paths"].tolist() == [f"img_{i:03d}.png" for i in range(4)]
    assert part_files(path) == []


def test_part_id_names_the_run_and_the_sequence_number():
    assert part_id(Path("x.h5.parts/part-4242-1700000000-000007.npz")) == ("4242-1700000000", 7)


CHILD = """
import os, signal, sys
import numpy as np
from featx.cache import CacheLock, CacheSession
path, action = sys.argv[1], sys.argv[2]
if action == "hold-lock":
    with CacheLock(path):
        print("locked", flush=True)
        sys.stdin.read()
else:
    session = CacheSession(path, key=None)
    for i in range(3):
        session.append(np.full((1, 8), i, np.float32), labels=[0], paths=[f"k{i}"],
                       split=["train"], sha256=[str(i)], size=[1], mtime_ns=[1], view=[0])
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _child(path, action, **kw):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), str(path), action],
                            **kw)


def test_rows_of_a_killed_writer_are_recovered(path):
    make_cache(path, 2)
    child = _child(path, "append-then-die")
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert committed(path)[0]["paths"].size == 2  # the cache survived the crash
    assert CacheSession.recover(path) == 3
    rows, embeddings = committed(path)
    assert rows["paths"].tolist()[2:] == ["k0", "k1", "k2"]
    np.testing.assert_array_equal(embeddings[2:, 0], [0, 1, 2])


# ----- the lock --------------------------------------------------------------------------
def test_lock_refuses_a_second_holder_and_is_released_on_exit(path):
    with CacheLock(path) as lock:
        assert lock.path.read_text() == str(os.getpid())
        with pytest.raises(CacheError, match="another featx process"):
            with CacheLock(path):
                pass
    with pytest.raises(RuntimeError):
        with CacheLock(path):
            raise RuntimeError("released on an exception too")
    with CacheLock(path):
        pass


def test_lock_of_a_killed_process_is_released(path):
    path.parent.mkdir(parents=True)
    child = _child(path, "hold-lock", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"locked\n"
        with pytest.raises(CacheError, match="another featx process"):
            with CacheLock(path):
                pass
    finally:
        child.kill()
        child.wait()
    with CacheLock(path):
        pass


# ----- validation ------------------------------------------------------------------------
def test_a_non_hdf5_file_is_reported_and_not_overwritten(path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"definitely not hdf5")
    with pytest.raises(CacheError, match="not a valid featx cache"):
        FeatureCache.open(path)
    with pytest.raises(CacheError, match="not a valid featx cache"):
        CacheSession(path, key=KEY, dim=DIM)
    assert path.read_bytes() == b"definitely not hdf5"


def test_an_hdf5_file_that_is_not_a_featx_cache_is_refused(path):
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as h5:
        h5["embeddings"] = np.zeros((1, DIM))
    with pytest.raises(CacheError, match="not a featx cache"):
        FeatureCache.open(path)


def test_another_format_version_is_refused(path):
    make_cache(path, 1)
    with h5py.File(path, "a") as h5:
        h5.attrs["featx_cache_version"] = CACHE_FORMAT_VERSION + 1
    seal(path)  # as the newer featx would have
    with pytest.raises(CacheError, match=rf"newer featx \(cache format {CACHE_FORMAT_VERSION + 1};"):
        FeatureCache.open(path)


def test_a_key_mismatch_is_refused(path):
    make_cache(path, 1)
    before = identity(path)
    with pytest.raises(CacheError, match="cache key does not match"):
        CacheSession(path, key={**KEY, "dim": 16}, dim=16)
    assert identity(path) == before
    # the key is compared as JSON: a tuple matches the list it was stored as
    with CacheSession(path, key={**KEY, "input_size": (32, 32)}) as session:
        assert session.key == KEY
    with FeatureCache.open(path) as cache:
        validate(cache.h5, path, KEY)
        with pytest.raises(CacheError, match="does not match"):
            validate(cache.h5, path, {"backbone": "other"})


# ----- changes: compact, rewrite_column, set_failed, set_attrs ------------------------------
def test_keep_rows_keeps_the_chosen_rows_of_the_file_and_of_the_parts(path):
    old = make_cache(path, 4)
    new = vectors(3, seed=9)
    keep = np.array([True, False, True, False, False, True, True])
    with CacheSession(path, key=KEY) as session:
        session.append(new, **columns(3, start=4))
        assert session.keep_rows(keep) is session
        assert session.n_rows == 4 and session.dirty
        expected = np.concatenate([old, new])[keep]
        np.testing.assert_array_equal(session.embeddings(), expected)
    rows, embeddings = committed(path)
    np.testing.assert_array_equal(embeddings, expected)
    assert rows["paths"].tolist() == ["img_000.png", "img_002.png", "img_005.png", "img_006.png"]
    assert rows["sha256"].tolist() == [f"{i:064x}" for i in (0, 2, 5, 6)]


# ----- format version 2: an index over immutable shards -------------------------------------
def shard_files(path):
    folder = shard_dir(path)
    return sorted(folder.iterdir()) if folder.exists() else []


def test_the_index_reads_every_row_through_a_virtual_dataset(path):
    old = make_cache(path, 6)
    new = vectors(3, seed=4)
    with CacheSession(path, key=KEY) as session:
        session.append(new, **columns(3, start=6))
        session.keep_rows(np.array([1, 0, 1, 1, 0, 1, 1, 0, 1], bool))  # mappings of runs
        expected = session.embeddings()
    np.testing.assert_array_equal(expected, np.concatenate([old, new])[[0, 2, 3, 5, 6, 8]])
    with h5py.File(path, "r") as h5:  # what a user who opens the file with h5py sees
        assert h5["embeddings"].is_virtual and h5.attrs["featx_cache_version"] == 2
        np.testing.assert_array_equal(h5["embeddings"][:], expected)
    moved = path.parent.parent / "moved"
    path.parent.rename(moved)  # shards are named relative to the index
    with h5py.File(moved / path.name, "r") as h5:
        np.testing.assert_array_equal(h5["embeddings"][:], expected)


def test_an_update_writes_only_what_changed(path):
    make_cache(path, 5)
    first = {p.name: identity(p) for p in shard_files(path)}
    assert len(first) == 1
    with CacheSession(path, key=KEY) as session:
        session.append(vectors(2, seed=3), **columns(2, start=5))
    after = {p.name: identity(p) for p in shard_files(path)}
    assert {n: after[n] for n in first} == first  # the old shard untouched
    (added,) = set(after) - set(first)
    with h5py.File(shard_dir(path) / added, "r") as h5:
        assert h5["embeddings"].shape == (2, DIM)
        assert h5["paths"].asstr()[:].tolist() == ["img_005.png", "img_006.png"]
    with CacheSession(path, key=KEY) as session:  # removing rows writes no shard at all
        session.keep_rows(np.arange(7) != 3)
    assert {p.name: identity(p) for p in shard_files(path)} == after
    assert committed(path)[0]["paths"].tolist() == [f"img_{i:03d}.png" for i in (0, 1, 2, 4, 5, 6)]


def test_parts_are_committed_a_shard_at_a_time(path, monkeypatch):
    monkeypatch.setattr("featx.cache._session.rows_per_shard", lambda dim: 10)
    data = vectors(35)
    with CacheSession(path, key=KEY, dim=DIM, attrs=ATTRS) as session:
        for start in range(0, 35, 4):
            stop = min(35, start + 4)
            session.append(data[start:stop], **columns(stop - start, start=start))
            assert len(part_files(session)) <= 3  # never more than a shard's worth
            with FeatureCache.open(path) as reader:  # readers see the progress
                assert reader.n_rows == stop - len(session._parts)
    rows, embeddings = committed(path)
    np.testing.assert_array_equal(embeddings, data)
    with FeatureCache.open(path) as cache:
        assert [info.rows for info in cache.shards] == [12, 12, 11]


def write_version_1(path, data, failed=()):
    """A cache as featx wrote it before shards: the embeddings inside the one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as h5:
        h5.create_dataset("embeddings", data=data, maxshape=(None, DIM), chunks=(64, DIM))
        for name, values in columns(len(data)).items():
            h5.create_dataset(name, data=values, dtype=text if name in ("paths", "split",
                                                                         "sha256") else None)
        group = h5.create_group("failed")
        for i, name in enumerate(("paths", "sha256", "reasons")):
            group.create_dataset(name, data=[row[i] for row in failed], dtype=text)
        h5.attrs.update({"featx_cache_version": 1, "key": json.dumps(KEY), "dim": DIM,
                         "n_committed": len(data), "class_names": '["cat", "dog"]'})


def test_a_reader_sees_the_rows_of_the_index_it_opened(path):
    make_cache(path, 3)
    before = FeatureCache.open(path)  # opened before another process changes the cache
    with CacheSession(path, key=KEY) as session:
        session.append(vectors(1), **columns(1, start=3))
    assert committed(path)[0]["paths"].size == 4
    assert before.rows()["paths"].size == 3 == before.embeddings().shape[0]
    assert committed(path)[0]["paths"].size == 4
    before.close()


def test_a_version_1_cache_is_read_and_migrated_on_the_next_write(path):
    old = vectors(5)
    write_version_1(path, old, failed=[("bad.png", "0" * 64, "cannot decode")])
    rows, embeddings = committed(path)
    np.testing.assert_array_equal(embeddings, old)
    np.testing.assert_array_equal(FeatureCache.open(path).embeddings([4, 0]), old[[4, 0]])
    with CacheSession(path, key=KEY) as session:  # nothing changed: stays version 1
        assert session.rows()["paths"].tolist() == rows["paths"].tolist()
    assert FeatureCache.open(path).version == 1
    new = vectors(1, seed=8)
    with CacheSession(path, key=KEY) as session:
        session.append(new, **columns(1, start=5))
    with FeatureCache.open(path) as cache:
        assert cache.version == 2 and len(cache.shards) == 1
        np.testing.assert_array_equal(cache.embeddings(), np.concatenate([old, new]))
        assert cache.failed() == [("bad.png", "0" * 64, "cannot decode")]
        assert cache.json_attr("class_names") == ["cat", "dog"]


def corrupt(shard):
    with h5py.File(shard, "a") as h5:
        h5["embeddings"][0] = 123.0


def test_a_damaged_or_missing_shard_is_never_used(path):
    make_cache(path, 4)
    with CacheSession(path, key=KEY) as session:
        session.append(vectors(3, seed=2), **columns(3, start=4))
    first, second = shard_files(path)  # named in the order written
    corrupt(first)
    with FeatureCache.open(path) as cache:
        assert cache.damaged_shards() == [0]
    assert CacheSession.recover(path) == 0  # no part rows: only the damaged shard's dropped
    assert committed(path)[0]["paths"].tolist() == ["img_004.png", "img_005.png", "img_006.png"]
    second.unlink()
    with FeatureCache.open(path) as cache:
        assert cache.damaged_shards() == [0]
        with pytest.raises(CacheError, match="missing or unreadable"):
            cache.embeddings()
    with h5py.File(path, "r") as h5:
        assert np.isnan(h5["embeddings"][:]).all()  # h5py shows a missing shard as NaN
    CacheSession.recover(path)
    assert committed(path)[0]["paths"].tolist() == []


def test_a_damaged_shard_with_its_stat_restored_is_caught_by_its_seal(path):
    from featx.cache import _shards

    make_cache(path, 3)
    (shard,) = shard_files(path)
    stat = shard.stat()
    corrupt(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _shards.SEALS_HELD.clear()  # as a new process finds it
    with FeatureCache.open(path) as cache:
        assert cache.damaged_shards() == [0]  # its seal, checked once per process
        assert cache.damaged_shards(full=True) == [0]


def test_compact_rewrites_the_rows_in_full_shards_and_frees_the_rest(path):
    data = make_cache(path, 6)
    for start in (6, 8):
        with CacheSession(path, key=KEY) as session:
            session.append(vectors(2, seed=start), **columns(2, start=start))
    with CacheSession(path, key=KEY) as session:
        session.keep_rows(np.arange(10) % 3 != 0)
        expected = session.embeddings()
    pending = shard_dir(path) / "ray-0123.h5"  # an engine's finished shard no index lists yet
    shutil.copy(shard_files(path)[0], pending)
    Path(f"{pending}.done").write_text("{}")
    reader = FeatureCache.open(path)
    reader.embeddings()  # an open reader keeps the files it opened
    with CacheSession(path, key=KEY) as session:
        outcome = session.compact()
    assert outcome["shards_before"] == 3 and outcome["shards_after"] == 1
    assert outcome["rows"] == 6 and outcome["bytes_after"] < outcome["bytes_before"]
    assert len(data) == 6
    np.testing.assert_array_equal(committed(path)[1], expected)
    names = {p.name for p in shard_files(path)}
    assert {"ray-0123.h5", "ray-0123.h5.done"} < names and len(names) == 3
    np.testing.assert_array_equal(reader.embeddings(), expected)
    reader.close()


def test_rewrite_column_changes_only_that_column(path):
    data = make_cache(path, 3)
    with CacheSession(path, key=KEY) as session:
        rows = session.rows()
        rows["split"][:] = "test"  # rows() hands out copies
        assert session.rows()["split"].tolist() == ["train"] * 3
        session.rewrite_column("split", ["train", "val", "test"])
        session.rewrite_column("mtime_ns", [5, 6, 7])
        assert session.rows()["split"].tolist() == ["train", "val", "test"]
    rows, embeddings = committed(path)
    assert rows["split"].tolist() == ["train", "val", "test"]
    assert rows["mtime_ns"].tolist() == [5, 6, 7]
    assert rows["paths"].tolist() == ["img_000.png", "img_001.png", "img_002.png"]
    np.testing.assert_array_equal(embeddings, data)


def test_set_failed_replaces_the_failed_list(path):
    make_cache(path, 1, failed=[("a.png", "aa", "truncated")])
    with CacheSession(path, key=KEY) as session:
        session.set_failed([("b.jpg", "bb", "empty file"), ("c.jpg", "cc", "not an image")])
        assert session.failed() == [("b.jpg", "bb", "empty file"),
                                    ("c.jpg", "cc", "not an image")]
    with FeatureCache.open(path) as cache:
        assert cache.failed() == [("b.jpg", "bb", "empty file"), ("c.jpg", "cc", "not an image")]
    with CacheSession(path, key=KEY) as session:
        session.set_failed([])
    with FeatureCache.open(path) as cache:
        assert cache.failed() == []


def test_set_attrs_stores_scalars_and_json_and_keeps_the_rest(path):
    make_cache(path, 1)
    with FeatureCache.open(path) as cache:
        created = cache.attr("created")
    with CacheSession(path, key=KEY) as session:
        session.set_attrs(backbone="mobilenet_v2", extraction_seconds=1.5, seed=3,
                          split_params={"val_fraction": 0.2}, class_names=["a", "b", "c"])
        assert session.attr("backbone") == "mobilenet_v2"  # staged values are read back
        assert session.json_attr("split_params") == {"val_fraction": 0.2}
        assert session.json_attr("runtimes", []) == []
    with FeatureCache.open(path) as cache:
        assert cache.attr("backbone") == "mobilenet_v2"
        assert cache.attr("extraction_seconds") == 1.5 and cache.attr("seed") == 3
        assert cache.json_attr("split_params") == {"val_fraction": 0.2}
        assert cache.json_attr("class_names") == ["a", "b", "c"]
        assert cache.attr("root") == "/data" and cache.attr("created") == created
        assert cache.key == KEY and cache.n_rows == 1


# ----- listing ---------------------------------------------------------------------------
def test_list_caches_and_summary(tmp_path):
    cache_dir = tmp_path / "cache"
    assert list_caches(cache_dir) == []
    first = cache_dir / "ds" / "a.h5"
    with CacheSession(first, key=KEY, dim=DIM, attrs={**ATTRS, "backbone": "b1"}) as session:
        session.append(vectors(5), **{**columns(5), "split": ["train"] * 3 + ["val", "test"]})
        session.append(vectors(2), **columns(2, start=5, view=1))  # augmented views
        session.set_failed([("bad.png", "x", "cannot decode")])
    make_cache(cache_dir / "ds" / "b.h5", 1)
    (cache_dir / "other" / "c.h5").parent.mkdir()
    (cache_dir / "other" / "c.h5").write_bytes(b"junk")

    listed = list_caches(cache_dir)
    assert [Path(entry["cache"]).name for entry in listed] == ["a.h5", "b.h5", "c.h5"]
    assert "not a valid featx cache" in listed[2]["error"]
    info = listed[0]
    with FeatureCache.open(first) as cache:
        assert summary(cache) == info
    assert info["n_images"] == 5 and info["n_augmented"] == 2 and info["n_failed"] == 1
    assert info["splits"] == {"train": 3, "val": 1, "test": 1}  # original images only
    assert (info["dim"], info["key"], info["backbone"]) == (DIM, KEY, "b1")
    assert info["class_names"] == ["cat", "dog"] and info["root"] == "/data"
    shards = sum(f.stat().st_size for f in Path(f"{first}.shards").iterdir())
    assert info["size_bytes"] == first.stat().st_size + shards and info["created"]
    assert listed[1]["n_images"] == 1 and listed[1]["n_augmented"] == 0


# ----- naming --------------------------------------------------------------------------
def test_key_hash_is_stable(path):
    # a changed digest would orphan every cache users have: change it on purpose only
    assert key_hash({"backbone": "mobilenet_v2", "weights": "random",
                     "input_size": 32}) == "ee442b7e2fec"
    assert key_hash({"b": 1, "a": 2}) == key_hash({"a": 2, "b": 1})
    assert key_hash({"a": 1}) != key_hash({"a": 2})


def test_cache_path_for_is_stable(tmp_path, monkeypatch):
    assert cache_path_for("/c", "/data/My Set!", "mobilenet_v2", "random", {"a": 1}) == \
        Path("/c/My-Set-7b10e678/mobilenet_v2-random-cf764d486d61.h5")
    (tmp_path / "one" / "data").mkdir(parents=True)
    (tmp_path / "two" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "one")
    here = cache_path_for("c", "data", "resnet50", "imagenet", KEY)
    assert here == cache_path_for("c", tmp_path / "one" / "data", "resnet50", "imagenet", KEY)
    there = cache_path_for("c", tmp_path / "two" / "data", "resnet50", "imagenet", KEY)
    assert here.parent != there.parent and here.name == there.name  # same name, other root
    assert here.parent.name.startswith("data-")
    other = cache_path_for("c", "data", "resnet50", "imagenet", {**KEY, "dim": 9})
    assert other.parent == here.parent and other.name != here.name


# ----- through the extraction pipeline ---------------------------------------------------
def run(data, cache_dir, **kw):
    return extract(data, cache_dir=cache_dir, progress=False, batch_size=4, **{**TINY, **kw})


def test_locked_cache_refuses_a_second_writer(image_folder, cache_dir):
    features = run(image_folder, cache_dir)
    with CacheLock(features.cache_path):
        with pytest.raises(CacheError, match="another featx process"):
            run(image_folder, cache_dir)


def test_invalid_cache_file_is_reported_not_overwritten(image_folder, cache_dir):
    features = run(image_folder, cache_dir)
    features.cache_path.write_bytes(b"definitely not hdf5")
    with pytest.raises(CacheError, match="not a valid featx cache"):
        run(image_folder, cache_dir)
    assert features.cache_path.read_bytes() == b"definitely not hdf5"


def _durable_rows(cache_dir):
    """Rows a rerun will find: the cache file's plus those of unmerged part files."""
    files = list(cache_dir.glob("*/*.h5"))
    if not files:
        return 0
    try:
        with h5py.File(files[0], "r", locking=False) as h5:
            n = int(h5.attrs["n_committed"])
            merged = json.loads(h5.attrs.get("merged_parts", "{}"))
    except (OSError, KeyError):  # being replaced right now
        return 0
    for part in cache_dir.glob("*/*.parts/part-*.npz"):
        run, seq = part_id(part)
        if seq > merged.get(run, -1):
            n += 1  # --batch-size 1: one row per part
    return n


def _kill_after(cmd, cache_dir, at_least):
    """Start ``cmd`` and SIGKILL it once ``at_least`` rows are durable; return that count."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if _durable_rows(cache_dir) >= at_least:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # a real crash: no cleanup runs
    finally:
        proc.wait()
    return _durable_rows(cache_dir)


@pytest.mark.one_backend  # the cache's resumption: the backend only computes the rows
def test_resume_after_kill(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=120)
    cache_dir = tmp_path / "cache"
    cmd = [sys.executable, "-m", "featx", "extract", str(data), "--backbone", "mobilenet_v2",
           "--weights", "random", "--input-size", "96", "--batch-size", "1",
           "--cache-dir", str(cache_dir), "--no-progress"]
    first = _kill_after(cmd, cache_dir, 5)
    assert 5 <= first < 240, "the run must be killed part-way"
    second = _kill_after(cmd, cache_dir, first + 5)  # the resumed run is killed too
    assert first < second < 240

    resumed = extract(data, cache_dir=cache_dir, backbone="mobilenet_v2", weights="random",
                      input_size=96, batch_size=8, progress=False)
    assert resumed.stats.n_extracted == 240 - second, resumed.stats
    assert len(resumed.paths) == 240 == len(set(resumed.paths))
    assert set(resumed.paths) == {p.relative_to(data).as_posix() for p in data.rglob("*.png")}
    assert not list(cache_dir.glob("*/*.parts/*"))  # every part merged and removed


def test_cache_compact_and_verify_on_the_command_line(image_folder, cache_dir):
    from conftest import invoke, last_json

    features = run(image_folder, cache_dir)
    for path in sorted(image_folder.rglob("*.png"))[:3]:
        path.unlink()
    features = run(image_folder, cache_dir)  # removing rows writes no shard
    before = sorted_embeddings(features.cache_path)
    outcome = last_json(invoke("cache", "compact", features.cache_path, "--json"))
    assert outcome["rows"] == len(before[0]) and outcome["shards_after"] == 1
    assert outcome["bytes_after"] < outcome["bytes_before"]
    after = sorted_embeddings(features.cache_path)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])
    assert last_json(invoke("cache", "verify", features.cache_path, "--json"))["damaged"] == []
    (shard,) = shard_files(features.cache_path)
    corrupt(shard)
    result = invoke("cache", "verify", features.cache_path)
    assert result.exit_code == 2
    assert result.stderr.strip().endswith(
        f"1 of 1 shards damaged ({shard.name}); `featx cache compact` drops their rows, then "
        "`featx extract` extracts them again")
    with FeatureCache.open(features.cache_path) as cache:  # never read as embeddings
        with pytest.raises(CacheError, match="fails its checksum"):
            cache.embeddings()
    again = run(image_folder, cache_dir)  # the damaged shard's rows are embedded again
    assert again.stats.n_extracted == len(before[0])
    np.testing.assert_allclose(sorted_embeddings(again.cache_path)[1], before[1], atol=1e-5)


def sorted_embeddings(cache_path):
    with FeatureCache.open(cache_path) as cache:
        paths = cache.rows()["paths"]
        order = np.argsort(paths)
        return paths[order].tolist(), cache.embeddings(order)


def test_read_rows_in_blocks_equals_fancy_indexing(tmp_path):
    from featx.cache import read_rows

    data = vectors(300)
    rng = np.random.default_rng(1)
    with h5py.File(tmp_path / "x.h5", "w") as h5:
        h5["e"] = data
        for trial in range(60):
            n = int(rng.integers(0, 40))
            rows = rng.integers(0, 300, n) if trial % 2 else rng.integers(100, 130, n)
            for block in (1, 7, 4096):  # sparse and dense reads, repeats, any order
                np.testing.assert_array_equal(read_rows(h5["e"], rows, block), data[rows])
                out, at = np.zeros((n + 3, DIM), np.float32), rng.permutation(n + 3)[:n]
                read_rows(h5["e"], rows, block, out=out, at=at)
                np.testing.assert_array_equal(out[at], data[rows])


def test_views_made_again_with_other_options_since_they_were_read_are_refused(path):
    from featx.cache import Features

    with CacheSession(path, key=KEY, dim=DIM, attrs={**ATTRS, "augment_recipe": "zoom"}) as s:
        s.append(vectors(2), **columns(2))
        s.append(vectors(2, seed=1), **columns(2, view=1))
    features = Features(path)
    with CacheSession(path, key=KEY) as session:  # another process's extract --augment
        session.set_attrs(augment_recipe="flat")
        session.append(vectors(1, seed=2), **columns(1, start=5))
    np.testing.assert_array_equal(features.take([0, 1])[0], vectors(2))  # originals: kept
    with pytest.raises(CacheError, match="made again with other options"):
        features.take([2, 3])
