"""featx export: one graph from uint8 image to scores, equal to `featx predict`.

Models are fitted on the toy CNN backbone (it gives informative features at 32 px, so labels
are not ties). The export of a model on the real Lite0 weights and dogcat is in
tests/test_e2e.py, beside the other tests that read the shared dogcat cache.
"""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TOY, make_dataset, register_toy
from featx.errors import DataError, UsageError

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK_FEATX = "import sys; sys.modules['featx'] = None"  # `import featx` then raises


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A three-class folder and softmax, logistic, svm and knn models on toy features."""
    from featx import api

    tmp = tmp_path_factory.mktemp("deploy")
    data = make_dataset(tmp / "data", classes=("cat", "dog", "fox"), per_class=8)
    models = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATX_OFFLINE", "1")
        mp.setenv("FEATX_ONNX_STORE", str(tmp / "onnx"))
        register_toy(mp)
        for clf in ("softmax", "logistic", "svm", "knn"):
            models[clf] = Path(api.fit(data, clf, tune=False, out=tmp / "models",
                                       cache_dir=tmp / "cache", progress=False, **TOY)["model"])
        yield data, models, mp


def _cli(*args):
    from featx.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ----- the head ---------------------------------------------------------------------
@pytest.mark.parametrize("clf", ["softmax", "logistic", "svm"])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_folded_head_gives_scikit_learns_scores(clf, n_classes):
    import keras

    from featx.classifiers import class_scores, make_classifier
    from featx.deploy import linear_head
    from featx.deploy._graph import _head_layers

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), 20)
    X = rng.normal(size=(len(y), 6)) * 3 + y[:, None] + 5  # scaling matters
    pipeline = make_classifier(clf).fit(X, y)
    head = linear_head(pipeline, clf)
    features = keras.Input((6,))
    model = keras.Model(features, _head_layers(head, features, keras))
    got = np.asarray(model(X.astype(np.float32)))
    np.testing.assert_allclose(got, class_scores(pipeline, X), atol=2e-5)
    assert head.output == ("decision_values" if clf == "svm" else "probabilities")


@pytest.mark.parametrize("mode", ["lite", "tf", "torch", "caffe", "none"])
def test_stock_normalization_equals_featx_normalization(mode):
    import keras

    from featx.backbones.layers import Normalization
    from featx.deploy._graph import _stock_normalization

    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    x = image = keras.Input((5, 5, 3), dtype="uint8")
    for layer in _stock_normalization(mode):
        x = layer(x)
    stock = np.asarray(keras.Model(image, x)(pixels))
    expected = np.asarray(Normalization(mode)(pixels.astype(np.float32)))
    np.testing.assert_allclose(stock, expected, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("clf", ["knn", "tree"])
def test_knn_and_tree_are_not_one_graph(clf):
    from featx.classifiers import make_classifier
    from featx.deploy import linear_head

    pipeline = make_classifier(clf).fit(np.eye(4), [0, 1, 0, 1])
    with pytest.raises(UsageError, match=f"a {clf} model cannot be exported as one graph"):
        linear_head(pipeline, clf)


# ----- ONNX and Keras files, parity with predict --------------------------------------
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("clf", ["softmax", "logistic", "svm"])
def test_onnx_export_equals_predict(fitted, clf, tmp_path):
    from featx.deploy import check_export, export_model, read_export_metadata
    from featx.classifiers import read_metadata

    data, models, _ = fitted
    exported = export_model(models[clf], "onnx", out=tmp_path / "model.onnx")
    meta = read_export_metadata(exported.path)
    assert meta["classes"] == ["cat", "dog", "fox"]
    assert meta["output"] == ("decision_values" if clf == "svm" else "probabilities")
    assert meta["preprocessing"] == read_metadata(models[clf])["preprocessing"]
    assert meta["backbone"]["name"] == "toy_cnn" and meta["featx_version"]
    assert meta["input"] == {"name": "image", "dtype": "uint8", "shape": [None, 32, 32, 3],
                             "color": "RGB", "layout": "NHWC"}
    parity = check_export(exported.path, models[clf], data)
    assert parity.split == "val" and parity.n_images == 6
    assert parity.agreement == 1.0 and parity.max_score_diff < 1e-4 and parity.passed


def test_keras_export_runs_without_featx(fitted, tmp_path):
    from featx.deploy import ExportedRunner, check_export, export_model
    from featx.extraction import ImageReader

    data, models, _ = fitted
    exported = export_model(models["softmax"], "keras", out=tmp_path / "model.keras")
    assert check_export(exported.path, models["softmax"], data).passed
    files = sorted(str(p) for p in data.rglob("*.png"))[:5]
    images = next(iter(ImageReader(files, exported.metadata["preprocessing"], 8)))["image"]
    np.save(tmp_path / "images.npy", images)
    code = (f"{BLOCK_FEATX}\nimport json, zipfile, keras, numpy as np\n"
            f"path = {str(exported.path)!r}\n"
            "meta = json.loads(zipfile.ZipFile(path).read('featx.json'))\n"
            "model = keras.saving.load_model(path, compile=False)\n"
            f"scores = np.asarray(model(np.load({str(tmp_path / 'images.npy')!r})))\n"
            "print(json.dumps({'classes': meta['classes'], 'scores': scores.tolist()}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["classes"] == ["cat", "dog", "fox"]
    np.testing.assert_allclose(result["scores"], ExportedRunner(exported.path)(images),
                               atol=1e-6)


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- export-example -->\n```python\n(.*?)```\n<!-- /export-example -->",
                      text, re.S)
    assert match, "README lost its export example"
    return match.group(1)


@pytest.mark.tensorflow_only
def test_readme_example_labels_like_predict_without_featx(fitted, tmp_path):
    from featx.api import predict
    from featx.deploy import export_model

    data, models, _ = fitted
    exported = export_model(models["logistic"], "onnx", out=tmp_path / "model.onnx")
    script = tmp_path / "label.py"
    script.write_text(_readme_example())
    assert len(script.read_text().strip().splitlines()) <= 15
    image = sorted((data / "fox").glob("*.png"))[0]
    code = (f"{BLOCK_FEATX}; import runpy; sys.argv = ['label.py', "
            f"{str(exported.path)!r}, {str(image)!r}]; runpy.run_path({str(script)!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    label, score = out.stdout.split()
    row = predict(models["logistic"], [image])[0]
    assert label == row["label"]
    assert abs(float(score) - row["score"]) < 1e-4


@pytest.mark.tensorflow_only
def test_cli_export_checks_and_prints_json(fitted, tmp_path):
    data, models, _ = fitted
    result = _cli("export", models["svm"], "-o", tmp_path / "svm.onnx", "--check", data,
                  "--json")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.output.strip().splitlines()[-1])
    assert outcome["output"] == "decision_values" and outcome["parity"]["passed"]
    assert Path(outcome["path"]).stat().st_size == outcome["size_bytes"]
    text = _cli("export", models["svm"], "-o", tmp_path / "svm2.onnx", "--check", data)
    assert "parity PASSED on 6 val images (fp32)" in text.output


@pytest.mark.tensorflow_only
def test_cli_exits_1_when_the_check_fails(fitted, tmp_path, monkeypatch):
    from featx import deploy

    data, models, _ = fitted
    monkeypatch.setattr(deploy._parity, "FP32_SCORE_TOLERANCE", -1.0)  # no difference can pass
    result = _cli("export", models["svm"], "-o", tmp_path / "svm.onnx", "--check", data)
    assert result.exit_code == 1
    assert "parity FAILED on 6 val images" in result.output


def test_export_names_that_would_overwrite_the_model_are_refused(fitted):
    from featx.deploy import export_model

    model = fitted[1]["svm"]
    for out in (model.with_suffix(".onnx"), model.with_suffix(".json")):
        with pytest.raises(UsageError, match="would overwrite the model|needs a .onnx"):
            export_model(model, "onnx", out=out)
    with pytest.raises(UsageError, match="a keras export needs a .keras file name"):
        export_model(model, "keras", out=model.with_name("x.onnx"))
    assert model.is_file() and model.with_suffix(".json").is_file()


@pytest.mark.tensorflow_only
def test_check_refuses_an_export_of_another_model(fitted, tmp_path):
    from featx.deploy import check_export, export_model

    data, models, _ = fitted
    exported = export_model(models["softmax"], "onnx", out=tmp_path / "softmax.onnx")
    with pytest.raises(DataError, match="was not exported from"):
        check_export(exported.path, models["svm"], data)


@pytest.mark.tensorflow_only
def test_check_skips_unreadable_images_and_says_so(tmp_path, monkeypatch):
    from featx import api
    from featx.deploy import check_export, export_model

    register_toy(monkeypatch)
    data = tmp_path / "data"
    make_dataset(data / "train", per_class=6)
    make_dataset(data / "val", per_class=3, start=10)
    (data / "val" / "dog" / "dog_005.png").write_bytes(b"not an image")  # sorts mid-list
    model = api.fit(data, "svm", tune=False, out=tmp_path / "m", cache_dir=tmp_path / "c",
                    progress=False, **TOY)["model"]
    parity = check_export(export_model(model, "onnx").path, model, data)
    assert parity.n_unreadable == 1 and parity.n_images == 6
    assert parity.passed and parity.agreement == 1.0
    assert "1 unreadable skipped" in parity.line()


def test_cli_refuses_knn_with_one_line(fitted, tmp_path):
    _, models, _ = fitted
    result = _cli("export", models["knn"], "-o", tmp_path / "knn.onnx")
    assert result.exit_code == 2
    assert "knn model cannot be exported as one graph" in result.output
    assert not (tmp_path / "knn.onnx").exists()


def _copy_model(model: Path, to: Path) -> Path:
    to.mkdir()
    shutil.copy(model, to / model.name)
    shutil.copy(model.with_suffix(".json"), to / model.with_suffix(".json").name)
    return to / model.name


def test_a_model_failing_its_sha256_is_refused(fitted, tmp_path):
    _, models, _ = fitted
    copy = _copy_model(models["softmax"], tmp_path / "m")
    copy.write_bytes(copy.read_bytes() + b"\0")
    result = _cli("export", copy)
    assert result.exit_code == 2
    assert "SHA-256 does not match" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_model_whose_cache_key_differs_is_refused(fitted, tmp_path):
    _, models, _ = fitted
    copy = _copy_model(models["softmax"], tmp_path / "m")
    sidecar = copy.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["cache_key"]["impl"] = 999
    sidecar.write_text(json.dumps(meta))
    result = _cli("export", copy)
    assert result.exit_code == 2
    assert "cache key does not match" in result.output


def test_int8_is_onnx_only(fitted):
    from featx.deploy import export_model

    with pytest.raises(UsageError, match="use --format onnx"):
        export_model(fitted[1]["softmax"], "keras", precision="int8")


@pytest.mark.tensorflow_only
def test_int8_export_of_a_model_fitted_on_int8_features_matches_predict(fitted, tmp_path,
                                                                        monkeypatch):
    import onnx

    from featx.deploy._parity import ExportedRunner
    from featx.extraction import QUANTIZATION
    from featx import api
    from featx.deploy import check_export, export_model
    from featx.classifiers import read_metadata

    data, _, _ = fitted
    model = api.fit(data, "softmax", tune=False, out=tmp_path / "m8", precision="int8",
                    cache_dir=tmp_path / "cache", progress=False, **TOY)["model"]
    exported = export_model(model, "onnx", precision="int8", out=tmp_path / "int8.onnx")
    ops = {node.op_type for node in onnx.load(str(exported.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Cast", "Softmax"} <= ops
    key = read_metadata(model)["cache_key"]
    assert exported.metadata["int8_feature_model_sha256"] == key["int8_model_sha256"]
    assert exported.metadata["fitted_on"] == "int8"
    parity = check_export(exported.path, model, data)
    assert parity.bound == {"min_agreement": 1.0, "max_score_diff": 1e-4}
    assert parity.agreement == 1.0 and parity.max_score_diff < 1e-4 and parity.passed
    # the file names the instruction set it was built for; elsewhere featx will not run it
    assert exported.metadata["quantization"]["isa"] == QUANTIZATION["isa"]
    monkeypatch.setitem(QUANTIZATION, "isa", "some-other-cpu")
    with pytest.raises(DataError, match="export it again on this kind of CPU"):
        ExportedRunner(exported.path)


@pytest.mark.tensorflow_only
def test_int8_export_of_an_fp32_model_is_held_to_the_measured_bound(fitted, tmp_path, caplog,
                                                                    monkeypatch):
    from featx.deploy import INT8_MIN_AGREEMENT, check_export, export_model

    data, models, _ = fitted
    monkeypatch.setattr(logging.getLogger("featx"), "propagate", True)  # a CLI test may unset it
    with caplog.at_level(logging.WARNING, logger="featx.deploy"):
        exported = export_model(models["softmax"], "onnx", precision="int8",
                                out=tmp_path / "int8.onnx")
    assert "fitted on fp32 features: its int8 export will not match" in caplog.text
    assert exported.metadata["quantization"]["weights"] == "QInt8"
    parity = check_export(exported.path, models["softmax"], data)
    assert (parity.precision, parity.fitted_on) == ("int8", "fp32")
    assert parity.bound == {"min_agreement": INT8_MIN_AGREEMENT, "max_mean_score_diff": 0.03}
    assert "int8 export of a model fitted on fp32 features" in parity.line()
    assert parity.n_images == 6 and 0.0 <= parity.agreement <= 1.0


def test_int8_needs_the_training_images(fitted, tmp_path):
    from featx.deploy import export_model

    _, models, _ = fitted
    copy = _copy_model(models["softmax"], tmp_path / "m")
    sidecar = copy.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["data_root"] = str(tmp_path / "gone")
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="calibrates on the model's training images"):
        export_model(copy, "onnx", precision="int8")


@pytest.mark.tensorflow_only
def test_finetuned_model_exports_with_parity(fitted, tmp_path):
    from featx.deploy import check_export, export_model
    from featx.finetuning import finetune

    data, _, _ = fitted
    result = finetune(data, **TOY, warmup_epochs=1, epochs=1, unfreeze=2, batch_size=8,
                      augment=False, out=tmp_path / "ft", cache_dir=tmp_path / "cache",
                      progress=False)
    for fmt in ("onnx", "keras"):
        exported = export_model(result.model_path, fmt)
        assert exported.metadata["source"] == "finetune"
        assert exported.metadata["output"] == "probabilities"
        parity = check_export(exported.path, result.model_path, data)
        assert parity.agreement == 1.0 and parity.max_score_diff < 1e-4, parity.line()


def test_a_calibrated_model_is_refused_with_one_line():
    from sklearn.datasets import make_blobs

    from featx.classifiers import fit_classifier
    from featx.deploy import linear_head

    X, y = make_blobs(n_samples=60, centers=3, n_features=8, random_state=0)
    fit = fit_classifier("svm", X, y, tune=False, n_jobs=1, calibrate="sigmoid")
    with pytest.raises(UsageError, match="a calibrated svm model cannot be exported as one "
                                         "graph") as caught:
        linear_head(fit.estimator, "svm")
    assert "\n" not in str(caught.value)
