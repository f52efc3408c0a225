"""Injected faults on a real filesystem (issue 28): a full disk (a small tmpfs) while a batch,
a shard or an index is written, during ``featx cache compact`` and while a model is saved; a
read-only cache folder; SIGTERM and SIGINT during ``featx extract``; ``kill -9`` at each step
of ``featx cache compact``; readers while the cache is compacted.

Each fault gives one line (exit 2; a stop by a signal exits 128 + its number), the cache
stays readable with what was committed, and the next run completes with rows equal, bit for
bit, to an undisturbed run's (the runtime is exact: :mod:`exact_runtime`). The mounts need
root (CI runs as root); those tests skip, saying why, where mounting is not allowed.
"""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, invoke, last_json, make_dataset
from exact_runtime import SumMapper, use_everywhere
from featx.cache import FeatureCache, Features, compact_cache, parts_dir, shard_dir
from featx.errors import CacheError
from featx.extraction import extract

# the runtime is a fake (exact_runtime): no Keras backend changes what these tests check
pytestmark = pytest.mark.one_backend
DIM = 1280  # TINY's embedding width, which the CLI's runtime must give


def run(data, cache_dir, mapper=None):
    return extract(data, cache_dir=cache_dir, progress=False, batch_size=2,
                   mapper=mapper or SumMapper(DIM), **TINY)


def extract_args(data, cache_dir):
    return ["extract", data, "--backbone", TINY["backbone"], "--weights", TINY["weights"],
            "--input-size", TINY["input_size"], "--batch-size", 2, "--no-progress",
            "--cache-dir", cache_dir]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Forty images and their rows from an undisturbed run: relative path -> row."""
    root = tmp_path_factory.mktemp("faults")
    data = make_dataset(root / "data", per_class=20)
    whole = run(data, root / "cache")
    return data, dict(zip(whole.paths, whole.take(np.arange(len(whole.paths)))[0]))


def small_data(folder, per_class, start=0):
    """Images of the reference set (the same bytes under the same names)."""
    return make_dataset(folder, per_class=per_class, start=start)


def assert_rows(cache_path, reference, n):
    """The cache holds ``n`` rows, each equal to the undisturbed run's."""
    features = Features(cache_path)
    assert len(features.paths) == n == len(set(features.paths))
    for path, row in zip(features.paths, features.take(np.arange(n))[0]):
        assert row.tobytes() == reference[path].tobytes(), path


def one_line(result, code=2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def no_temporary_files(folder):
    assert not [p for p in Path(folder).rglob(".*.tmp*")]


# ----- a small filesystem of our own ----------------------------------------------------
@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int = 2048):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(disk: Path):
    """Take every free byte of ``disk``; :func:`free` gives them back."""
    stat = os.statvfs(disk)
    fd = os.open(disk / f"filler-{time.perf_counter_ns()}", os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, stat.f_bavail * stat.f_frsize)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC


def free(disk: Path):
    for filler in disk.glob("filler-*"):
        filler.unlink()
    (disk / "probe").unlink(missing_ok=True)


def remount(disk: Path, mode: str):
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


# ----- a full disk ------------------------------------------------------------------------
class FillingMapper(SumMapper):
    """The runtime, which fills the disk before its second batch, once the first batch's
    part file is written."""

    def __init__(self, disk, cache_dir):
        super().__init__(DIM)
        self.disk, self.cache_dir, self.filled = disk, cache_dir, False

    def __call__(self, images):
        if self.n_images and not self.filled:
            while not list(self.cache_dir.glob("*/*.parts/part-*.npz")):
                time.sleep(0.005)
            fill(self.disk)
            self.filled = True
        return super().__call__(images)


def _inject(monkeypatch, when, disk, cache_dir):
    import featx.cache._session as session

    write_shard = session.write_shard
    if when == "batch":
        monkeypatch.setattr("featx.extraction._run.open_mapper",
                            lambda *args, **kwargs: FillingMapper(disk, cache_dir))
    elif when == "shard":
        monkeypatch.setattr(session, "write_shard",
                            lambda *args: (fill(disk), write_shard(*args))[1])
    else:  # the index, once the new shard is written
        monkeypatch.setattr(session, "write_shard",
                            lambda *args: (write_shard(*args), fill(disk))[0])


@pytest.mark.parametrize("when", ["batch", "shard", "index"])
def test_a_full_disk_while_extracting(tmp_path, monkeypatch, reference, when):
    _, rows = reference
    data = small_data(tmp_path / "data", 3)
    with small_disk(tmp_path / "disk") as disk:
        cache_dir = disk / "cache"
        use_everywhere(monkeypatch, DIM)
        cache_path = last_json(invoke(*extract_args(data, cache_dir), "--json"))["cache"]
        small_data(data, 2, start=3)
        with monkeypatch.context() as patch:
            _inject(patch, when, disk, cache_dir)
            line = one_line(invoke(*extract_args(data, cache_dir)))
        named = {"batch": f"{cache_path}.", "shard": f"{shard_dir(cache_path)}/",
                 "index": f"{cache_path}: "}[when]
        assert line.startswith(f"Error: {named}") and "No space left" in line, line
        assert_rows(cache_path, rows, 6)  # what was committed before
        free(disk)
        again = last_json(invoke(*extract_args(data, cache_dir), "--json"))
        assert again["n_extracted"] == (2 if when == "batch" else 0)  # parts kept the rest
        assert_rows(cache_path, rows, 10)
        no_temporary_files(cache_dir)


def _compactable(data, cache_dir):
    """A cache of 8 rows in two shards, with rows of 2 removed files left in them."""
    run(data, cache_dir)
    small_data(data, 2, start=3)
    run(data, cache_dir)
    for path in sorted(data.rglob("*_004.png")):
        path.unlink()
    return run(data, cache_dir).cache_path


def test_a_full_disk_during_compact(tmp_path, reference):
    _, rows = reference
    data = small_data(tmp_path / "data", 3)
    with small_disk(tmp_path / "disk") as disk:
        cache_path = _compactable(data, disk / "cache")
        fill(disk)
        line = one_line(invoke("cache", "compact", cache_path))
        assert f"{shard_dir(cache_path)}/" in line and "No space left" in line, line
        assert_rows(cache_path, rows, 8)
        free(disk)
        outcome = last_json(invoke("cache", "compact", cache_path, "--json"))
        assert outcome["shards_before"] == 2 and outcome["shards_after"] == 1
        assert_rows(cache_path, rows, 8)
        no_temporary_files(disk)


def test_a_full_disk_while_saving_a_model(tmp_path, monkeypatch):
    use_everywhere(monkeypatch, DIM)
    data = small_data(tmp_path / "data", 12)
    fit = ["fit", data, "--clf", "knn", "--no-tune", "--cache-dir", tmp_path / "cache",
           "--batch-size", 4, "--backbone", TINY["backbone"], "--weights", TINY["weights"],
           "--input-size", TINY["input_size"], "--no-progress", "--json"]
    undisturbed = last_json(invoke(*fit, "--out", tmp_path / "models"))
    with small_disk(tmp_path / "disk") as disk:
        models = disk / "models"
        models.mkdir()
        fill(disk)
        line = one_line(invoke(*fit, "--out", models))
        assert f"{models}/" in line and "No space left" in line, line
        no_temporary_files(models)
        free(disk)
        again = last_json(invoke(*fit, "--out", models))
        same = ("val_accuracy", "best_params", "clf")
        assert {k: again[k] for k in same} == {k: undisturbed[k] for k in same}
        assert sorted(p.name for p in models.iterdir()) == \
            sorted(p.name for p in (tmp_path / "models").iterdir())


def test_a_read_only_cache_folder_gives_one_line(tmp_path, monkeypatch, reference):
    _, rows = reference
    use_everywhere(monkeypatch, DIM)
    data = small_data(tmp_path / "data", 3)
    with small_disk(tmp_path / "disk") as disk:
        cache_path = run(data, disk / "cache").cache_path
        small_data(data, 2, start=3)
        remount(disk, "ro")
        try:
            line = one_line(invoke(*extract_args(data, disk / "cache")))
            assert f"{cache_path}.lock: Read-only file system" in line, line
            line = one_line(invoke("cache", "compact", cache_path))
            assert "Read-only file system" in line, line
            assert_rows(cache_path, rows, 6)
        finally:
            remount(disk, "rw")
        assert last_json(invoke(*extract_args(data, disk / "cache"), "--json"))[
            "n_extracted"] == 4
        assert_rows(cache_path, rows, 10)


# ----- signals and kill -9, in processes of their own -----------------------------------
# python -c DRIVER ...: the featx program with the exact runtime (slowed by FEATX_TEST_DELAY
# seconds a batch), killed by SIGKILL around FEATX_TEST_KILL ("module:function:before|after")
DRIVER = textwrap.dedent(f"""
    import importlib, os, signal, sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import featx.extraction._run as run
    from exact_runtime import SumMapper
    delay = float(os.environ.get("FEATX_TEST_DELAY", "0"))
    run.open_mapper = lambda *args, **kwargs: SumMapper({DIM}, delay)
    if os.environ.get("FEATX_TEST_KILL"):
        module, name, when = os.environ["FEATX_TEST_KILL"].split(":")
        module = importlib.import_module(module)
        real = getattr(module, name)
        def dying(*args, **kwargs):
            if when == "after":
                real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(module, name, dying)
    from featx.cli import main
    sys.argv = ["featx", *sys.argv[1:]]
    main()
""")


def featx_process(args, **env):
    return subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_extract_at_a_batch_boundary_and_the_rerun_resumes(tmp_path, reference,
                                                                           signum):
    data, rows = reference
    cache_dir = tmp_path / "cache"
    process = featx_process(extract_args(data, cache_dir), FEATX_TEST_DELAY="0.1")
    try:
        deadline = time.monotonic() + 60
        while len(list(cache_dir.glob("*/*.parts/part-*.npz"))) < 2:  # two batches durable
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    (line,) = stderr.strip().splitlines()
    name = signal.Signals(signum).name
    assert line.startswith(f"Error: stopped by {name} at a batch boundary: ") and \
        line.endswith("run the same command again to embed the rest"), line
    (cache_path,) = cache_dir.glob("*/*.h5")
    kept = len(Features(cache_path).paths)
    assert 4 <= kept < 40 and not list(parts_dir(cache_path).glob("*"))  # all committed
    assert_rows(cache_path, rows, kept)
    mapper = SumMapper(DIM)
    assert run(data, cache_dir, mapper).stats.n_extracted == 40 - kept == mapper.n_images
    assert_rows(cache_path, rows, 40)


@pytest.mark.parametrize("kill", [
    "featx.cache._shards:seal:before",  # a new shard written, not yet sealed and named
    "featx.cache._session:write_shard:after",  # the new shard named, the index not written
    "featx.cache._session:_write_index:after",  # the new index in place, old shards not deleted
])
def test_kill_9_during_compact_leaves_every_row(tmp_path, reference, kill):
    _, rows = reference
    data = small_data(tmp_path / "data", 3)
    cache_path = _compactable(data, tmp_path / "cache")
    process = featx_process(["cache", "compact", cache_path], FEATX_TEST_KILL=kill)
    assert process.wait(timeout=60) == -signal.SIGKILL, process.stderr.read()
    assert_rows(cache_path, rows, 8)
    assert compact_cache(cache_path).shards_after == 1
    assert_rows(cache_path, rows, 8)
    with FeatureCache.open(cache_path) as cache:  # nothing else is left in the shards folder
        assert [p.name for p in shard_dir(cache_path).iterdir()] == [cache.shards[0].name]


def test_readers_during_compact_get_their_rows_or_one_line(tmp_path, reference):
    _, rows = reference
    data = small_data(tmp_path / "data", 3)
    cache_path = _compactable(data, tmp_path / "cache")
    early = FeatureCache.open(cache_path)  # opened the index and the first row's shard
    order = np.argsort(early.refs()[0], kind="stable")
    first = early.embeddings(order[:1])
    compact_cache(cache_path)
    with pytest.raises(CacheError, match="replaced while being read"):  # the other shard
        early.embeddings(order)
    assert first.tobytes() == rows[early.rows()["paths"][order[0]]].tobytes()
    early.close()

    done, failures = threading.Event(), []

    def compact_again():
        try:
            for _ in range(5):
                compact_cache(cache_path)
        except Exception as error:  # noqa: BLE001 - reported by the test below
            failures.append(error)
        done.set()

    compactor = threading.Thread(target=compact_again)
    outcomes = {"read": 0, "refused": 0}
    compactor.start()
    while not outcomes["read"] or not done.is_set():
        try:
            assert_rows(cache_path, rows, 8)
            outcomes["read"] += 1
        except CacheError as error:
            assert "\n" not in str(error) and str(cache_path) in str(error)
            outcomes["refused"] += 1
    compactor.join()
    assert not failures and outcomes["read"] >= 1, (failures, outcomes)


def test_a_reader_during_an_extract_gets_its_own_rows(tmp_path, reference):
    _, rows = reference
    data = small_data(tmp_path / "data", 3)
    cache_path = run(data, tmp_path / "cache").cache_path
    features = Features(cache_path)  # its rows read before another run writes the index
    (data / "cat" / "cat_000.png").unlink()
    run(data, tmp_path / "cache")  # every row after cat_000's moves up one place
    kept = np.flatnonzero(features.paths != "cat/cat_000.png")
    for path, row in zip(features.paths[kept], features.take(kept)[0]):
        assert row.tobytes() == rows[path].tobytes(), path
    with pytest.raises(CacheError, match="removed or changed since they were read"):
        features.take(np.arange(len(features.paths)))
