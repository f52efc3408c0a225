"""End-to-end on real photos with the real offline ImageNet weights (needs $FEATX_DOGCAT)."""

import pytest

from featx.extraction import extract

pytestmark = pytest.mark.e2e


def test_dogcat_extracts_with_real_weights(dogcat_cache):
    data, cache_dir, features = dogcat_cache
    assert features.weights == "imagenet"
    assert features.weights_id.startswith("imagenet:efficientnet-lite0-57934424.pth")
    assert features.stats.n_images == 1399 and features.stats.n_failed == 0
    assert features.dim == 1280
    assert features.class_names == ["cat", "dog"]
    # stratified 80/20 with seed 42
    assert len(features.indices("train")) == 1119 and len(features.indices("val")) == 280
    again = extract(data, cache_dir=cache_dir, progress=False)
    assert again.stats.reused and again.stats.n_extracted == 0


def test_dogcat_best_classifier_reaches_097(dogcat_cache, tmp_path):
    from featx.api import compare

    data, cache_dir, _ = dogcat_cache
    outcome = compare(data, ("all",), cache_dir=cache_dir, report_dir=tmp_path / "report",
                      progress=False)
    results = outcome["results"]
    assert {r["clf"] for r in results} == {"softmax", "logistic", "svm", "knn", "tree"}
    assert all(r["split"] == "val" and r["n_eval"] == 280 for r in results)
    best = max(results, key=lambda r: r["accuracy"])
    assert best["accuracy"] >= 0.97, best
    assert (tmp_path / "report" / "report.md").exists()


@pytest.mark.tensorflow_only
def test_dogcat_export_fp32_and_int8_parity(tmp_path, dogcat_cache):
    from featx import api
    from featx.deploy import INT8_MIN_AGREEMENT, check_export, export_model

    data, cache_dir, _ = dogcat_cache
    model = api.fit(data, "logistic", tune=False, out=tmp_path / "models",
                    cache_dir=cache_dir, progress=False)["model"]
    fp32 = check_export(export_model(model, "onnx").path, model, data)
    assert fp32.n_images == 280 and fp32.agreement == 1.0 and fp32.max_score_diff < 1e-4
    # an int8 export of this fp32 model: held to the bound measured on photos
    int8 = check_export(export_model(model, "onnx", precision="int8").path, model, data)
    assert int8.passed, int8.line()
    assert int8.agreement >= INT8_MIN_AGREEMENT
