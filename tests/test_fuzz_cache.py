"""Fuzzed cache files (issue 28): random truncations and bit flips, at offsets Hypothesis
draws, of a cache's index, of a shard and of a part file that a stopped run left.

Each damage is either refused in one line naming the damaged file, or its rows are embedded
again by the next ``extract``; every row that is read (by ``Features`` or after the next
extract) equals the undamaged cache's row bit for bit, and the next extract loses no row.
The runtime is exact (:mod:`exact_runtime`), so a re-embedded row is equal bit for bit too.
"""

import collections
import os
import shutil
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import TINY, make_dataset
from exact_runtime import SumMapper
from featx.cache import CacheSession, Features, FeatureCache, parts_dir, shard_dir
from featx.errors import CacheError, DataError
from featx.extraction import extract
from fuzz_settings import SCALE, fuzz_settings

# the runtime is a fake (exact_runtime): no Keras backend changes what these tests check
pytestmark = pytest.mark.one_backend
OUTCOMES = collections.Counter()  # (target, outcome): printed after a long run (-s)


def run(data, cache_dir, mapper=None):
    return extract(data, cache_dir=cache_dir, progress=False, batch_size=2,
                   mapper=mapper or SumMapper(), **TINY)


def _never(*args, **kwargs):
    raise RuntimeError("stopped before its commit")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(data, cache folder, its index, path -> embedding): ten images, eight in two shards
    and two in a part file that a run stopped before its commit left."""
    root = tmp_path_factory.mktemp("fuzz-cache")
    data = make_dataset(root / "data", per_class=3)
    cache_dir = root / "cache"
    run(data, cache_dir)
    make_dataset(data, per_class=1, start=3)
    cache_path = run(data, cache_dir).cache_path
    make_dataset(data, per_class=1, start=4)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="stopped"):
        patch.setattr(CacheSession, "commit", _never)
        run(data, cache_dir)
    assert len(list(parts_dir(cache_path).glob("part-*.npz"))) == 1
    assert len(list(shard_dir(cache_path).glob("*.h5"))) == 2
    whole = run(data, root / "reference")
    reference = dict(zip(whole.paths, whole.take(np.arange(len(whole.paths)))[0]))
    assert len(reference) == 10
    yield data, cache_dir, cache_path, reference
    if SCALE > 1:
        print("\nfuzzed cache files, outcomes:", dict(sorted(OUTCOMES.items())))


def target_file(cache_path, target, which):
    if target == "index":
        return cache_path
    if target == "shard":
        return sorted(shard_dir(cache_path).glob("*.h5"))[which % 2]
    (part,) = parts_dir(cache_path).glob("part-*.npz")
    return part


def damage(path, truncate, offset, bit):
    data = bytearray(path.read_bytes())
    offset = offset * 2654435761 % len(data)  # Hypothesis favours small numbers: spread them
    if truncate:
        del data[offset:]
    else:
        data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def assert_rows_equal(paths, embeddings, reference):
    for path, embedding in zip(paths, embeddings):
        assert embedding.tobytes() == reference[path].tobytes(), f"wrong row for {path}"


def assert_one_line_naming(error, damaged):
    message = str(error)
    assert "\n" not in message and str(damaged) in message, message


def read_now(cache_path, damaged, reference) -> bool:
    """Read every committed row as later stages do; False when refused (in one line)."""
    try:
        features = Features(cache_path)
        assert_rows_equal(features.paths, features.take(np.arange(len(features.paths)))[0],
                          reference)
        return True
    except CacheError as error:
        assert_one_line_naming(error, damaged)
        return False


def extract_again(data, cache_dir, damaged, reference):
    """The next extract: ("refused", 0) in one line, or ("done", images it embedded) with
    every image's row equal to the original."""
    mapper = SumMapper()
    try:
        again = run(data, cache_dir, mapper)
    except (CacheError, DataError) as error:
        assert_one_line_naming(error, damaged)
        return "refused", 0
    assert sorted(again.paths) == sorted(reference)  # no row lost, none twice
    assert_rows_equal(again.paths, again.take(np.arange(len(again.paths)))[0], reference)
    return "done", mapper.n_images


MUTATIONS = dict(truncate=st.booleans(), offset=st.integers(0, 2**31), bit=st.integers(0, 7),
                 which=st.integers(0, 1))


def fuzz(tmp_path, pristine, target, truncate, offset, bit, which):
    """Damage one file of a copy of the pristine cache; (read ok, extract's outcome)."""
    data, cache_dir, cache_path, reference = pristine
    work = tmp_path / f"example-{time.perf_counter_ns()}"  # a new path: no memo applies
    shutil.copytree(cache_dir, work)
    path = work / cache_path.relative_to(cache_dir)
    damaged = target_file(path, target, which)
    damage(damaged, truncate, offset, bit)
    read = read_now(path, damaged, reference)
    outcome = extract_again(data, work, damaged, reference)
    OUTCOMES[target, "read" if read else "refused", *outcome] += 1
    shutil.rmtree(work)
    return read, outcome


@fuzz_settings(14)
@given(**MUTATIONS)
def test_a_damaged_index_is_refused_in_one_line(tmp_path, pristine, truncate, offset, bit,
                                                which):
    outcome = fuzz(tmp_path, pristine, "index", truncate, offset, bit, which)
    # only the user block's unused bytes can change unnoticed (nothing reads them)
    assert outcome in ((False, ("refused", 0)), (True, ("done", 0)))


@fuzz_settings(14)
@given(**MUTATIONS)
def test_a_damaged_shard_is_refused_then_its_rows_embedded_again(tmp_path, pristine,
                                                                  truncate, offset, bit, which):
    outcome = fuzz(tmp_path, pristine, "shard", truncate, offset, bit, which)
    rows = (6, 2)[which % 2]  # the first extract's shard, then the second's
    assert outcome in ((False, ("done", rows)), (True, ("done", 0)))


@fuzz_settings(14)
@given(**MUTATIONS)
def test_a_damaged_part_file_has_its_rows_embedded_again(tmp_path, pristine, truncate,
                                                         offset, bit, which):
    outcome = fuzz(tmp_path, pristine, "part", truncate, offset, bit, which)
    # the index does not list a part's rows, so readers never see them
    assert outcome in ((True, ("done", 0)), (True, ("done", 2)))


def test_a_shard_damaged_under_an_unchanged_mtime_is_not_read(tmp_path, pristine):
    data, cache_dir, cache_path, reference = pristine
    work = tmp_path / "work"
    shutil.copytree(cache_dir, work)
    shard = target_file(work / cache_path.relative_to(cache_dir), "shard", 0)
    before = shard.stat()
    damage(shard, truncate=False, offset=len(shard.read_bytes()) // 2, bit=3)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # bit rot keeps the mtime
    assert not read_now(work / cache_path.relative_to(cache_dir), shard, reference)
    assert extract_again(data, work, shard, reference) == ("done", 6)


def test_a_refused_index_deleted_as_its_line_says_gives_every_row_once(tmp_path, pristine):
    data, cache_dir, cache_path, reference = pristine
    work = tmp_path / "work"
    shutil.copytree(cache_dir, work)
    path = work / cache_path.relative_to(cache_dir)
    damage(path, truncate=True, offset=0x7000, bit=0)
    with pytest.raises(CacheError, match="delete it"):
        Features(path)
    path.unlink()  # the part file a stopped run left is the deleted index's
    assert extract_again(data, work, path, reference) == ("done", 10)


def test_an_index_written_before_seals_is_read_and_sealed_on_its_next_write(tmp_path,
                                                                            monkeypatch):
    from featx.cache import _index, _shards

    path = tmp_path / "old.h5"
    key = {"backbone": "test"}
    rows = dict(labels=[0], paths=["a.png"], split=["train"], sha256=["0" * 64], size=[1],
                mtime_ns=[1], view=[0])
    with monkeypatch.context() as old:  # as featx wrote indexes before seals
        old.setattr(_index, "SEAL_BYTES", 0)
        old.setattr(_index, "seal", lambda path: None)
        old.setattr(_shards, "SEAL_BYTES", 0)
        old.setattr(_shards, "seal", lambda path: None)
        with CacheSession(path, key=key, dim=2, attrs={}) as session:
            session.append(np.ones((1, 2), np.float32), **rows)
    assert path.read_bytes().startswith(_shards.HDF5_SIGNATURE)
    _shards.SEALS_HELD.clear()  # as a new process finds it: its seal is checked
    with FeatureCache.open(path) as cache:
        assert cache.rows()["paths"].tolist() == ["a.png"]
    with CacheSession(path, key=key) as session:
        session.append(np.zeros((1, 2), np.float32), **{**rows, "paths": ["b.png"]})
    assert path.read_bytes().startswith(_shards.SEAL_MAGIC)
    with FeatureCache.open(path) as cache:
        np.testing.assert_array_equal(cache.embeddings(), [[1, 1], [0, 0]])


def test_an_image_whose_name_is_not_utf8_is_skipped_and_the_rest_cached(tmp_path, caplog):
    data = make_dataset(tmp_path / "data", per_class=2)
    first = next((data / "cat").iterdir())
    odd = os.fsencode(first.parent) + b"/caf\xe9.png"  # Latin-1, as old cameras wrote
    os.rename(os.fsencode(first), odd)
    features = run(data, tmp_path / "cache")
    assert len(features.paths) == 3 and r"caf\udce9.png" in caplog.text
    assert len(run(data, tmp_path / "cache").paths) == 3  # and the cache stays usable

