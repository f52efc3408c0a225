"""The Ray engine: shards by content hash, resumable, and the same cache as the local
engine. The first tests need no Ray; the last ones share one real cluster, started with
`ray start --head` and token authentication, as a user's would be."""

import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TINY, invoke, make_dataset
from featx.extraction import _ray_engine as ray_engine
from featx.cache import CacheSession, FeatureCache
from featx._backend import backend_name
from featx.errors import UsageError
from featx.extraction import extract
from featx.cache import DONE_SUFFIX, is_intact

DIM = 4


def files(n, start=0):
    return ([f"c{i % 3}/img_{i:04d}.png" for i in range(start, start + n)],
            [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, start + n)])


def test_shards_are_split_by_content_hash_and_named_by_their_members():
    paths, sha = files(50)
    tasks = ray_engine.plan_shards(paths, sha, "key", rows_per_task=16)
    assert len(tasks) == 4 and sorted(np.concatenate([t.rows for t in tasks])) == list(range(50))
    again = ray_engine.plan_shards(paths, sha, "key", 16)  # deterministic
    assert [(t.name, t.rows.tolist()) for t in again] == [(t.name, t.rows.tolist()) for t in tasks]
    names = {t.name for t in tasks}
    assert {t.name for t in ray_engine.plan_shards(paths, sha, "other key", 16)} & names == set()
    moved = ray_engine.plan_shards(paths[::-1], sha[::-1], "key", 16)  # order does not matter
    assert {t.name for t in moved} == names
    changed = ray_engine.plan_shards(paths[:-1] + ["c0/new.png"], sha[:-1] + [sha[-1][::-1]],
                                     "key", 16)  # one new file: only its shard changes
    assert len({t.name for t in changed} - names) <= 2
    unreadable = ray_engine.plan_shards(["a.jpg", "b.jpg"], ["", ""], "key", 16)
    assert [t.rows.tolist() for t in unreadable] == [[0, 1]]  # placed by path, fail later


class FakeMapper:
    def __call__(self, images):
        return images.reshape(len(images), -1)[:, :DIM].astype(np.float32)


def spec_for(root, shard_dir):
    return ray_engine.WorkerSpec(backbone={}, runtime="keras", precision="fp32", batch_size=4,
                                 store_dir="", int8_model=None, flip_average=False,
                                 root=str(root), shard_dir=str(shard_dir), decode_workers=1)


def test_finished_shards_are_adopted_without_ray_and_damaged_ones_redone(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", per_class=5)
    paths = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    (data / paths[0]).write_bytes(b"not an image")
    columns = {"labels": np.arange(10) % 2, "paths": np.array(paths, object),
               "split": np.array(["train"] * 10, object),
               "sha256": np.array([f"{i:064x}" for i in range(10)], object),
               "size": np.arange(10), "mtime_ns": np.arange(10), "view": np.zeros(10, np.int16)}
    cache_path = tmp_path / "cache.h5"
    folder = tmp_path / "cache.h5.shards"
    folder.mkdir()
    spec = spec_for(data, folder)
    preprocessing = {"input_size": 8, "resize_size": 8, "interpolation": "area"}
    tasks = ray_engine.plan_shards(columns["paths"], columns["sha256"], "k", rows_per_task=4)
    for task in tasks:  # what the actors of a stopped run had finished
        item = {"name": task.name, "paths": columns["paths"][task.rows],
                "sha256": columns["sha256"][task.rows]}
        ray_engine.embed_shard(item, spec, FakeMapper(), preprocessing, DIM)
    shard = folder / tasks[-1].name
    with h5py.File(shard, "a") as h5:
        h5["embeddings"][0] += 1  # damaged: must be embedded again, never used
    redone = []
    monkeypatch.setattr(ray_engine, "_run_tasks", lambda todo, *a: [
        redone.append(t.name) or ray_engine.embed_shard(
            {"name": t.name, "paths": columns["paths"][t.rows],
             "sha256": columns["sha256"][t.rows]}, spec, FakeMapper(), preprocessing, DIM)
        for t in todo])
    with CacheSession(cache_path, key={"k": 1}, dim=DIM) as session:
        outcome = ray_engine.run(session, columns, spec, key_digest="k", rows_per_task=4)
    assert redone == [tasks[-1].name]
    assert outcome["n_reused_shards"] == len(tasks) - 1 and outcome["n_shards"] == len(tasks)
    assert [row[0] for row in outcome["failed"]] == [paths[0]]
    assert not list(folder.glob("*" + DONE_SUFFIX))  # markers go once the index lists them
    with FeatureCache.open(cache_path) as cache:
        rows = cache.rows()
        assert sorted(rows["paths"]) == paths[1:]
        assert all(is_intact(folder, info, full=True) for info in cache.shards)
        order = np.argsort(rows["paths"])
        expected = [FakeMapper()(np.stack([_load(data / p)])) [0] for p in rows["paths"][order]]
        np.testing.assert_array_equal(cache.embeddings(order), np.stack(expected))
        where = {p: i for i, p in enumerate(paths)}
        assert [int(columns["labels"][where[p]]) for p in rows["paths"]] == \
            rows["labels"].tolist()


def _load(path):
    from featx.data import load_for_model

    return load_for_model(path, 8, 8, "area")


def test_the_ray_engine_without_ray_installed_fails_in_one_line(image_folder, cache_dir,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = invoke("extract", image_folder, "--engine", "ray", "--cache-dir", cache_dir,
                    *TINY_ARGS)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --engine ray needs Ray, which is not installed: pip install 'featx[ray]'"]
    assert not cache_dir.exists()  # failed before any work


def test_a_ray_address_without_the_ray_engine_is_refused(image_folder, cache_dir):
    with pytest.raises(UsageError, match="--ray-address needs --engine ray"):
        extract(image_folder, cache_dir=cache_dir, ray_address="127.0.0.1:6379", **TINY)


TINY_ARGS = ("--backbone", TINY["backbone"], "--weights", TINY["weights"], "--input-size",
             TINY["input_size"], "--no-progress")


# ----- on a real cluster -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_of(marker: str) -> list[int]:
    """The processes whose command line names ``marker``, and all their descendants."""
    parents, found = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            parents[int(entry.name)] = int(_stat(entry.name)[1])
        except (OSError, IndexError, ValueError):
            continue
        if marker in cmdline:
            found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def _stat(pid) -> list[str]:
    """/proc/PID/stat's fields after the command name: state, parent, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _alive(pid) -> bool:
    try:
        return _stat(pid)[0] != "Z"  # a zombie has exited; its parent has yet to reap it
    except (OSError, IndexError):
        return False


def _stop(pids):
    for sig, grace in ((signal.SIGTERM, 1), (signal.SIGKILL, 5)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node started with `ray start --head` on free local ports, token
    authentication on, stopped at the end by its own process ids (not `ray stop`, which
    would stop every cluster on the machine). Yields (address, token); this process sends
    the token as a user's shell would, through RAY_AUTH_TOKEN."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'featx[ray]'")
    ray_program = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray_program is None:
        pytest.skip("the `ray` program is not beside this Python")
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="featx-ray-")  # short: Ray's socket paths are limited
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp_path_factory.mktemp("ray_home")),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [ray_program, "start", "--head", f"--port={port}", "--num-cpus=2",
               "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               f"--ray-client-server-port={_free_port()}",
               f"--dashboard-agent-listen-port={_free_port()}"]
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=180)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_AUTH_MODE", "token")
            patch.setenv("RAY_AUTH_TOKEN", token)
            yield f"127.0.0.1:{port}", token
    finally:
        _stop(_processes_of(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_data(tmp_path, onnx_store, monkeypatch):
    monkeypatch.setenv("FEATX_ONNX_STORE", str(onnx_store))
    monkeypatch.setattr(ray_engine, "ROWS_PER_TASK", 16)  # several shards of 41 files
    data = make_dataset(tmp_path / "data", per_class=20)
    (data / "cat" / "broken.png").write_bytes(b"not an image")
    return data


OPTIONS = dict(progress=False, batch_size=8, **TINY)


def sorted_rows(cache_path):
    with FeatureCache.open(cache_path) as cache:
        rows = cache.rows()
        order = np.argsort(rows["paths"])
        return {k: v[order] for k, v in rows.items()}, cache.embeddings(order)


def assert_same_cache(one, other):
    """Same rows in the same order after sorting by path; embeddings within 1e-5."""
    (rows_1, emb_1), (rows_2, emb_2) = sorted_rows(one.cache_path), sorted_rows(other.cache_path)
    for name in rows_1:
        np.testing.assert_array_equal(rows_2[name], rows_1[name], err_msg=name)
    assert np.abs(emb_2 - emb_1).max() < 1e-5
    assert one.stats.failed == other.stats.failed


def test_the_ray_cache_equals_the_local_one(ray_cluster, ray_data, tmp_path, capfd, caplog,
                                           recwarn):
    address, token = ray_cluster
    local = extract(ray_data, cache_dir=tmp_path / "local", **OPTIONS)
    on_ray = extract(ray_data, cache_dir=tmp_path / "ray", engine="ray", ray_address=address,
                     **OPTIONS)
    assert on_ray.stats.engine == "ray" and on_ray.stats.n_extracted == 40
    assert local.stats.n_extracted == 40
    assert [path for path, _ in on_ray.stats.failed] == ["cat/broken.png"]
    assert_same_cache(local, on_ray)
    backend = backend_name()  # the actors' own runtime, as the local run's
    assert on_ray.computed_by == local.computed_by == (
        ["onnxruntime/cpu"] if backend == "tensorflow" else [f"keras/{backend}/cpu"])
    with FeatureCache.open(on_ray.cache_path) as cache:
        assert len(cache.shards) == 4  # by content hash: 41 files, 16 a shard, a power of 2
        expected = cache.embeddings()
    with h5py.File(on_ray.cache_path, "r") as h5:  # the index reads every row with h5py
        np.testing.assert_array_equal(h5["embeddings"][:], expected)
    again = extract(ray_data, cache_dir=tmp_path / "ray", engine="ray", ray_address=address,
                    **OPTIONS)
    assert again.stats.n_extracted == 0 and again.stats.reused  # Ray not even needed
    output = capfd.readouterr()  # the token is in no output, log record or cache file
    assert token not in output.out + output.err + caplog.text
    # no deprecated Ray API, and no actor whose restart Ray warns about (its arguments inline)
    assert not [w for w in recwarn if "deprecated" in str(w.message)]
    assert "constructor arguments in the object store" not in output.err
    assert not any(token.encode() in path.read_bytes()
                   for path in (tmp_path / "ray").rglob("*") if path.is_file())


@pytest.mark.one_backend  # resuming adopts shards; the cache-equals test runs each backend
def test_a_run_whose_driver_died_resumes_its_finished_shards(ray_cluster, ray_data, tmp_path,
                                                             monkeypatch):
    address, _ = ray_cluster

    def die(*args):
        raise RuntimeError("the driver died")

    with monkeypatch.context() as patch:  # every shard done, no index written
        patch.setattr(ray_engine, "_adopt", die)
        with pytest.raises(RuntimeError, match="driver died"):
            extract(ray_data, cache_dir=tmp_path / "ray", engine="ray", ray_address=address,
                    **OPTIONS)
    (shard_dir,) = (tmp_path / "ray").glob("*/*.shards")
    names = sorted(p.name for p in shard_dir.glob("ray-*.h5"))
    assert len(names) == 4 and len(list(shard_dir.glob("*" + DONE_SUFFIX))) == 4
    with h5py.File(shard_dir / names[0], "a") as h5:
        h5["embeddings"][0] += 1  # and one finished shard is damaged
    resumed = extract(ray_data, cache_dir=tmp_path / "ray", engine="ray",
                      ray_address=address, **OPTIONS)  # against the same cluster
    assert resumed.stats.n_shards_reused == 3
    assert 0 < resumed.stats.n_extracted < 40
    local = extract(ray_data, cache_dir=tmp_path / "local", **OPTIONS)
    assert_same_cache(local, resumed)
    assert resumed.computed_by == local.computed_by  # the adopted shards' markers say it


def test_an_address_that_does_not_answer_fails_in_one_line(image_folder, cache_dir):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'featx[ray]'")
    result = invoke("extract", image_folder, "--engine", "ray", "--ray-address",
                    "127.0.0.1:9", "--cache-dir", cache_dir, *TINY_ARGS)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "Error: --ray-address 127.0.0.1:9: no Ray cluster answers there")


@pytest.mark.parametrize("token", ["wrong", None])
def test_a_wrong_or_missing_token_gives_one_line(ray_cluster, image_folder, cache_dir, token,
                                                 monkeypatch, tmp_path):
    address, _ = ray_cluster
    import ray

    if not hasattr(ray.exceptions, "AuthenticationError"):
        pytest.skip(f"Ray {ray.__version__} has no token authentication: any client is let in")
    monkeypatch.setenv("HOME", str(tmp_path))  # no default token file either
    if token:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    else:
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        monkeypatch.delenv("RAY_AUTH_MODE")
    result = invoke("extract", image_folder, "--engine", "ray", "--ray-address", address,
                    "--cache-dir", cache_dir, *TINY_ARGS)
    assert result.exit_code == 2
    refusal = ("refused the authentication token from RAY_AUTH_TOKEN" if token
               else "wants an authentication token and none was found")
    assert result.stderr.strip().splitlines() == [
        f"Error: --ray-address {address}: the Ray cluster {refusal}: "
        f"{ray_engine.AUTH_HELP}"]
    assert not cache_dir.exists()  # refused before any file was hashed


def test_the_actors_get_the_drivers_backend_and_image_limit(monkeypatch):
    from types import SimpleNamespace

    from featx.extraction._ray_engine import connect

    calls = []
    fake = SimpleNamespace(is_initialized=lambda: False,
                           init=lambda **kwargs: calls.append(kwargs),
                           exceptions=SimpleNamespace(RayError=RuntimeError))
    monkeypatch.setenv("FEATX_MAX_IMAGE_PIXELS", "1000")
    assert connect(fake, None, 1)
    assert calls[0]["runtime_env"]["env_vars"]["FEATX_MAX_IMAGE_PIXELS"] == "1000"
    assert "KERAS_BACKEND" in calls[0]["runtime_env"]["env_vars"]
