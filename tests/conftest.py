"""Shared fixtures: isolated environment, small generated image folders, a tiny backbone."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from keras_marker import backends_hidden, mark_keras_tests

# A tiny random-weight backbone keeps the suite fast; tests that need real weights say so.
TINY = dict(backbone="mobilenet_v2", weights="random", input_size=32)
TOY = dict(backbone="toy_cnn", weights="random")


def pytest_configure(config):
    """Quick XLA compiles for JAX, whose tests compile many small models and run each once
    (unoptimised code, a third less time; results within the tests' tolerances), and its
    persistent compilation cache, one per run and shared by the run's processes (xdist's
    workers and the tests' subprocesses inherit both): a model compiles once per run."""
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                       "--xla_llvm_disable_expensive_passes=true")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="featx-tests-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config.featx_jax_cache = folder
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if getattr(config, "featx_jax_cache", None):
        shutil.rmtree(config.featx_jax_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def onnx_store(tmp_path_factory):
    """The session's ONNX store; pytest-xdist's workers (each with a temporary folder of its
    own below a shared one) share one, so each export is built once per run."""
    base = tmp_path_factory.getbasetemp()
    store = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "onnx_store"
    store.mkdir(exist_ok=True)
    return store


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch, onnx_store):
    """No downloads, no user config, nothing written where pytest was started: every test
    gets its own Keras home and working directory.

    ONNX exports of the tiny backbone are shared by the whole session (FEATX_ONNX_STORE),
    as they are shared by every dataset of a user; tests of the store use their own.
    """
    offline_env(monkeypatch, tmp_path_factory, onnx_store)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def offline_env(env: pytest.MonkeyPatch, tmp_path_factory, onnx_store):
    """The environment every test runs in: offline, the session's ONNX store, a Keras home
    of its own, and none of the user's featx settings."""
    env.setenv("FEATX_ONNX_STORE", str(onnx_store))
    env.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
    env.setenv("FEATX_OFFLINE", "1")
    env.delenv("FEATX_CACHE_DIR", raising=False)
    env.delenv("FEATX_BACKBONE", raising=False)


def write_image(path: Path, image: np.ndarray):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix or ".png", image)
    assert ok
    path.write_bytes(buf.tobytes())


def class_image(label: int, index: int, size=(40, 48)) -> np.ndarray:
    """A BGR image whose colour depends on the class, with per-image noise."""
    rng = np.random.default_rng(1000 * label + index)
    palette = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40],
                        [200, 40, 200], [40, 200, 200]], dtype=np.float64)
    image = palette[label % len(palette)] + rng.normal(0, 20, size=(*size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_dataset(root: Path, classes=("cat", "dog"), per_class=6, ext=".png", start=0) -> Path:
    for label, name in enumerate(classes):
        for i in range(start, start + per_class):
            write_image(root / name / f"{name}_{i:03d}{ext}", class_image(label, i))
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def invoke(*args):
    """Run the featx CLI in-process with ``args`` (any objects, passed as strings)."""
    from click.testing import CliRunner

    from featx.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def last_json(result):
    """The JSON object a successful command printed as its last line."""
    import json

    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def dogcat_path():
    from featx._backend import backend_name

    value = os.environ.get("FEATX_DOGCAT")
    if not value or not Path(value).is_dir():
        pytest.skip("FEATX_DOGCAT is not set to the dogcat dataset (.ci/run sets it)")
    if backend_name() != "tensorflow":
        pytest.skip("the real-data tests run on the TensorFlow backend: on a CPU, JAX and "
                    "PyTorch embed Lite0 about ten times slower")
    return Path(value)


@pytest.fixture(scope="session")
def dogcat_cache(tmp_path_factory, onnx_store):
    """dogcat extracted once with the real Lite0 weights: ``(data, cache_dir, features)``,
    shared by the end-to-end tests that read its embeddings (and by pytest-xdist's workers:
    the first extracts under a file lock, the others then find every row cached)."""
    import fcntl

    from featx.extraction import extract

    data = dogcat_path()
    cache_dir = onnx_store.parent / "dogcat_cache"
    cache_dir.mkdir(exist_ok=True)
    with open(cache_dir.with_suffix(".lock"), "w") as lock, pytest.MonkeyPatch.context() as env:
        fcntl.flock(lock, fcntl.LOCK_EX)
        offline_env(env, tmp_path_factory, onnx_store)  # set up before any test's
        features = _extract_when_free(extract, data, cache_dir)
    return data, cache_dir, features


def _extract_when_free(extract, data, cache_dir, wait_s=300):
    """``extract`` once no other worker's test is writing the cache (a test's own fit or
    compare on it holds featx's cache lock, not this fixture's file lock)."""
    import time

    from featx.errors import CacheError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return extract(data, cache_dir=cache_dir, progress=False)
        except CacheError as error:
            if "another featx process" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def pytest_collection_modifyitems(config, items):
    """Mark the tests that exercise a Keras backend (:mod:`keras_marker`); on Keras' JAX or
    PyTorch backend (KERAS_BACKEND), skip what needs TensorFlow's, and what runs Keras but
    tests nothing that depends on which backend runs it."""
    from featx._backend import backend_name

    mark_keras_tests(items)
    backend = backend_name()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"needs Keras' TensorFlow backend (KERAS_BACKEND={backend})")
    same = pytest.mark.skip(reason="tests nothing that depends on the Keras backend; the "
                                   "TensorFlow pass ran it")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)
        elif "one_backend" in item.keywords:
            item.add_marker(same)


@pytest.fixture(autouse=True)
def no_backend_unless_marked(request):
    """A test not marked ``keras`` runs with the Keras backends unimportable."""
    if request.node.get_closest_marker("keras") is not None:
        yield
        return
    with backends_hidden():
        yield


# ----- a toy backbone ----------------------------------------------------------------
def _toy_base(cfg, weights, input_size, seed):
    import keras

    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((input_size, input_size, 3))
    for i, filters in enumerate((8, 16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"conv{i}_bn")(x)
        x = keras.layers.ReLU(name=f"conv{i}_relu")(x)
    return keras.Model(inputs, x, name="base")


def register_toy(monkeypatch):
    """Register ``toy_cnn``: a three-layer CNN that learns in a few epochs (random
    MobileNetV2 at 32 px has vanishing activations)."""
    from featx.backbones import BackboneCfg, _registry, register_backbone

    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    register_backbone(BackboneCfg(
        name="toy_cnn", family="test", input_size=32, resize_size=36, interpolation="area",
        normalization="tf", num_features=32, default_layer=None, default_pooling="avg",
        weights_source="random only", offline=True, license="none"), _toy_base)


class ArrayFeatures:
    """The slice of featx's Features that classifiers.compare needs, over in-memory arrays."""

    def __init__(self, X, y, split, class_names, backbone="toy", weights="random",
                 root="/data/toy"):
        self.X, self.labels, self.split = X, np.asarray(y), np.asarray(split)
        self.view = np.zeros(len(self.labels), dtype=np.int16)
        self.class_names = list(class_names)
        self.backbone, self.weights, self.weights_id = backbone, weights, f"{weights}:seed=0"
        self.paths = np.array([f"img{i:05d}.png" for i in range(len(self.labels))])
        self.sha256 = self.paths
        self.root = root

    def indices(self, split, views=False):
        return np.flatnonzero(self.split == split)

    def take(self, idx):
        return self.X[idx], self.labels[idx]

    def arrays(self, split, views=False):
        return self.take(self.indices(split))
