"""Runtimes: choice, the ONNX export store, ONNX vs Keras embeddings, int8, fallbacks."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY, make_dataset, register_toy
from featx.backbones import create_backbone
from featx.data import file_sha256
from featx.cli import cli
from featx.errors import UsageError
from featx.extraction import (QUANTIZATION, KerasMapper, OnnxMapper, choose_runtime,
                              ensure_int8, extract)
from featx.extraction import _onnx_store as onnx_export

# ONNX Runtime against Keras: the export runs on the TensorFlow backend
pytestmark = pytest.mark.tensorflow_only


def _tiny():
    return create_backbone("mobilenet_v2", "random", input_size=32, seed=1)


def _toy(monkeypatch, seed=1):
    """The three-layer toy CNN: the store's bookkeeping does not depend on the network, and
    it exports in a second where MobileNetV2 takes ten."""
    register_toy(monkeypatch)
    return create_backbone("toy_cnn", "random", seed=seed)


def _images(n=4, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----- choice ------------------------------------------------------------------------
def test_choose_runtime(monkeypatch):
    assert choose_runtime("auto") == "onnx"
    assert choose_runtime("keras") == "keras"
    assert choose_runtime("auto", device="gpu") == "keras"
    assert choose_runtime("auto", "int8", device="gpu") == "onnx"
    with pytest.raises(UsageError, match="ONNX Runtime only"):
        choose_runtime("keras", "int8")
    monkeypatch.setattr("featx.extraction._runtimes.onnxruntime_available", lambda: False)
    assert choose_runtime("auto") == "keras"
    for runtime, precision in (("onnx", "fp32"), ("auto", "int8")):
        with pytest.raises(UsageError, match="pip install onnxruntime"):
            choose_runtime(runtime, precision)


def test_cli_runtime_onnx_without_onnxruntime_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr("featx.extraction._runtimes.onnxruntime_available", lambda: False)
    data = make_dataset(tmp_path / "data", per_class=2)
    result = CliRunner().invoke(cli, ["extract", str(data), "--runtime", "onnx", "--backbone",
                                      "mobilenet_v2", "--weights", "random", "--input-size",
                                      "32", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "onnxruntime" in lines[0] and lines[0].startswith("Error:")


# ----- the export store --------------------------------------------------------------
def test_export_is_built_once_and_reused(tmp_path, monkeypatch):
    store = tmp_path / "onnx"
    before = onnx_export.exports_built
    first = onnx_export.ensure_fp32(_toy(monkeypatch), store)
    again = onnx_export.ensure_fp32(_toy(monkeypatch), store)  # another Backbone, same key
    assert first.built and not again.built
    assert onnx_export.exports_built == before + 1
    assert again.path == first.path and again.sha256 == first.sha256
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["sha256"] == first.sha256 and sidecar["key"]["backbone"] == "toy_cnn"
    # another backbone configuration (other weights, another input size) is another export
    for other in (_toy(monkeypatch, seed=2), create_backbone("toy_cnn", "random", input_size=48,
                                                              seed=1)):
        exported = onnx_export.ensure_fp32(other, store)
        assert exported.built and exported.path != first.path


def test_corrupt_or_stale_export_is_rebuilt_never_used(tmp_path, caplog, monkeypatch):
    store = tmp_path / "onnx"
    model = onnx_export.ensure_fp32(_toy(monkeypatch), store)
    model.path.write_bytes(model.path.read_bytes()[:1000])  # truncated
    with caplog.at_level("WARNING", logger="featx.extraction"):
        rebuilt = onnx_export.ensure_fp32(_toy(monkeypatch), store)
    assert rebuilt.built and "SHA-256 differs" in caplog.text
    assert rebuilt.sha256 == file_sha256(rebuilt.path)

    sidecar = rebuilt.path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["key"]["impl"] = -1  # recorded for another version of the port
    sidecar.write_text(json.dumps(meta))
    assert onnx_export.ensure_fp32(_toy(monkeypatch), store).built


def test_onnx_fp32_equals_keras_on_the_tiny_backbone(tmp_path):
    net = _tiny()
    images = _images()
    keras_out = KerasMapper(net, 4)(images)
    onnx_out = OnnxMapper(onnx_export.ensure_fp32(net, tmp_path))(images)
    scale = np.abs(keras_out).max()
    assert np.abs(keras_out - onnx_out).max() <= 1e-4 * max(scale, 1.0)


def test_runtime_change_reuses_the_cache(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3)
    kw = dict(cache_dir=tmp_path / "cache", progress=False, **TINY)
    first = extract(data, runtime="keras", **kw)
    assert first.stats.n_extracted == 6 and first.stats.runtime.startswith("keras")
    second = extract(data, runtime="onnx", **kw)
    assert second.cache_path == first.cache_path and second.stats.n_extracted == 0
    make_dataset(data, per_class=1, start=10)
    third = extract(data, runtime="onnx", **kw)
    assert third.stats.n_extracted == 2 and third.stats.runtime.startswith("onnxruntime")
    assert third.runtimes == sorted([first.stats.runtime, third.stats.runtime])


def test_export_failure_falls_back_under_auto_and_fails_when_asked(tmp_path, monkeypatch,
                                                                   caplog):
    def unsupported(net, out):
        raise onnx_export.ExportError(f"{net.cfg.name}: ONNX export failed: op Foo")

    monkeypatch.setattr(onnx_export, "_export_keras", unsupported)
    monkeypatch.setenv("FEATX_ONNX_STORE", str(tmp_path / "store"))  # nothing exported yet
    data = make_dataset(tmp_path / "data", per_class=2)
    kw = dict(cache_dir=tmp_path / "cache", progress=False, **TINY)
    with caplog.at_level("WARNING", logger="featx.extraction"):
        features = extract(data, **kw)
    assert features.stats.runtime.startswith("keras")
    assert "falling back to the Keras runtime" in caplog.text
    args = ["extract", str(data), "--runtime", "onnx", "--backbone", "mobilenet_v2",
            "--weights", "random", "--input-size", "32", "--cache-dir", str(tmp_path / "c2")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "op Foo" in result.stderr


# ----- int8 --------------------------------------------------------------------------
def test_weights_lose_a_bit_only_where_int8_products_would_saturate():
    from featx.extraction import QUANTIZATION, cpu_has_vnni

    assert cpu_has_vnni("flags : fpu avx2 avx512f avx512_vnni", "x86_64")
    assert cpu_has_vnni("flags : fpu avx2 avx_vnni", "x86_64")
    assert not cpu_has_vnni("flags : fpu avx2 fma", "x86_64")
    assert cpu_has_vnni("", "aarch64")
    assert QUANTIZATION.get("reduce_range", False) == (not cpu_has_vnni())


def test_int8_has_its_own_key_and_reuses_its_model(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    kw = dict(cache_dir=tmp_path / "cache", progress=False, **TINY)
    fp32 = extract(data, **kw)
    before = onnx_export.exports_built
    int8 = extract(data, precision="int8", **kw)
    assert int8.cache_path != fp32.cache_path and int8.stats.n_extracted == 12
    assert int8.key["precision"] == "int8" and int8.precision == "int8"
    assert len(int8.key["int8_model_sha256"]) == 64 and int8.key["calibration"]
    assert int8.stats.runtime.endswith("int8")
    assert onnx_export.exports_built == before + 1  # the fp32 export was reused
    # a rerun and an added image reuse the model and every computed row
    make_dataset(data, per_class=1, start=20)
    again = extract(data, precision="int8", **kw)
    assert again.stats.n_extracted == 2 and again.key == int8.key
    assert onnx_export.exports_built == before + 1
    with pytest.raises(UsageError):
        extract(data, precision="int8", runtime="keras", **kw)


def test_int8_rows_are_recomputed_when_their_model_is_gone(tmp_path, caplog):
    data = make_dataset(tmp_path / "data", per_class=4)
    kw = dict(cache_dir=tmp_path / "cache", progress=False, precision="int8", **TINY)
    first = extract(data, **kw)
    # its model only: the store is the session's, and other tests' int8 models stay
    (used,) = [path for path in Path(os.environ["FEATX_ONNX_STORE"]).glob("*-int8-*.onnx")
               if file_sha256(path) == first.key["int8_model_sha256"]]
    used.unlink()
    used.with_suffix(".json").unlink()
    again = extract(data, **kw)
    # quantisation is deterministic: the same calibration sample rebuilds the same model
    assert again.key == first.key and again.stats.n_extracted == 0


# ----- real weights ------------------------------------------------------------------
def _photos():
    import sklearn

    from featx.data import load_for_model, read_image, resize_and_crop

    paths = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    images = np.stack([load_for_model(p, 224, 256) for p in paths])
    scales = np.stack([resize_and_crop(read_image(p), 224, r) for p in paths
                       for r in (224, 256, 320, 400)])
    return images, scales


@pytest.mark.e2e
def test_lite0_onnx_matches_keras_and_int8_stays_close(onnx_store):
    """On the session's store: the Lite0 export the end-to-end tests use (built by whichever
    test needs it first) is the one checked here."""
    net = create_backbone("efficientnet_lite0")
    images, calibration = _photos()
    keras_out = KerasMapper(net, 2)(images)
    fp32 = OnnxMapper(onnx_export.ensure_fp32(net, onnx_store))(images)
    # measured 4.2e-6 (embedding values up to about 4): one cache key for both is safe
    assert np.abs(keras_out - fp32).max() < 2e-5
    model = ensure_int8(net, onnx_store, calibration,
                        onnx_export.calibration_id(["photos at four scales"]))
    int8 = OnnxMapper(model)(images)
    cosine = (int8 * fp32).sum(1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(fp32, axis=1)
    # measured 0.9972 (china) and 0.9965 (flower), calibrated on these photos at 4 scales;
    # 0.9884 and 0.9851 with the 7-bit weights of a CPU without VNNI
    assert cosine.min() > (0.98 if QUANTIZATION.get("reduce_range") else 0.99)
    assert not np.allclose(int8, fp32, atol=1e-3)  # it really is another model


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_int8_end_to_end_fit_predict_compare(tmp_path, monkeypatch):
    """int8 through every command, its agreement with fp32 shown wherever its rows are;
    then, as if on another kind of CPU: the cache's int8 model rebuilt, and the classifier
    fitted on the old one's features refused in one line."""
    import shutil

    from featx.extraction import cpu_isa

    data = make_dataset(tmp_path / "data", per_class=6)
    common = ["--backbone", "mobilenet_v2", "--weights", "random", "--input-size", "32",
              "--cache-dir", tmp_path / "cache", "--precision", "int8",
              "--int8-calibration", "percentile"]
    extracted = CliRunner().invoke(cli, [str(a) for a in ("extract", data, *common)])
    assert "int8:      vs fp32 on " in extracted.output, extracted.output
    fit = _run("fit", data, "--clf", "softmax", "--no-tune", "--out", tmp_path / "m", *common,
               "--json")
    assert fit["precision"] == "int8" and "int8" in fit["runtime"]
    new = tmp_path / "new" / "cat.png"
    new.parent.mkdir()
    shutil.copy(data / "cat" / "cat_000.png", new)
    new.write_bytes(new.read_bytes() + b"\0")  # other content: not in the cache
    rows = _run("predict", fit["model"], new, "--json")
    assert rows[0]["embedded_by"].endswith("int8") and rows[0]["label"] in ("cat", "dog")
    report = _run("compare", data, "--clf", "softmax", "--no-tune",
                  "--report-dir", tmp_path / "r", *common, "--json")
    assert all(r["precision"] == "int8" for r in report["results"])
    key = extract(data, cache_dir=tmp_path / "cache", precision="int8", progress=False,
                  int8_calibration="percentile", **TINY).key
    agreement = key["int8_agreement"]
    assert key["quantization"]["isa"] == cpu_isa() and agreement["n_images"] >= 4
    assert key["quantization"]["calibration"] == "Percentile"
    assert report["results"][0]["int8_agreement"] == agreement
    text = (tmp_path / "r" / "report.md").read_text()
    assert "int8 embeddings" in text and f"int8 (cos {agreement['mean_cosine']:.3f}," in text
    # another kind of CPU
    other = "x86-vnni" if cpu_isa() != "x86-vnni" else "x86-novnni"
    monkeypatch.setitem(QUANTIZATION, "isa", other)
    refused = CliRunner().invoke(cli, ["predict", fit["model"], str(new)])
    assert refused.exit_code == 2, refused.output
    assert "fitted on the features of an int8 model built for" in refused.stderr
    again = CliRunner().invoke(cli, [str(a) for a in ("extract", data, *common, "--json")])
    assert "rebuilding it for this CPU" in again.stderr
    again = json.loads(again.stdout.strip().splitlines()[-1])
    assert again["n_extracted"] == 12
    assert extract(data, cache_dir=tmp_path / "cache", precision="int8", progress=False,
                   int8_calibration="percentile", **TINY).key["quantization"]["isa"] == other
    assert any(other in p.name for p in Path(os.environ["FEATX_ONNX_STORE"]).glob("*-int8-*"))


def test_onnx_runtime_with_a_stored_export_never_imports_tensorflow(tmp_path):
    import subprocess
    import sys

    data = make_dataset(tmp_path / "data", per_class=2)
    extract(data, cache_dir=tmp_path / "c1", progress=False, **TINY)  # exports if needed
    script = ("import sys, featx\n"
              f"f = featx.extract({str(data)!r}, cache_dir={str(tmp_path / 'c2')!r}, "
              "backbone='mobilenet_v2', weights='random', input_size=32, progress=False)\n"
              "print(f.stats.n_extracted, f.stats.runtime.split()[0], "
              "'tensorflow' in sys.modules, 'keras' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=os.environ, check=True).stdout.split()
    assert out == ["4", "onnxruntime", "False", "False"]
