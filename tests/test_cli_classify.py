"""fit / predict / compare end to end through the CLI, on generated images and a tiny backbone."""

import csv
import io
import json
import shutil

import pytest

from conftest import invoke, last_json, make_dataset

TINY_ARGS = ["--backbone", "mobilenet_v2", "--weights", "random", "--input-size", "32",
             "--batch-size", "4", "--no-progress"]


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data", classes=("red", "green", "blue"), per_class=10)


def test_fit_then_predict_parity(dataset, tmp_path):
    cache_dir, models = tmp_path / "cache", tmp_path / "models"
    out = last_json(invoke("fit", dataset, "--clf", "softmax", *TINY_ARGS, "--cache-dir",
                           cache_dir, "--out", models, "--cv", "3", "--json"))
    for key in ("model", "clf", "val_accuracy", "val_macro_f1", "fit_seconds", "best_params"):
        assert key in out
    assert out["val_accuracy"] > 0.6  # colour classes are easy even for random features
    metadata = json.loads((models / out["model"].rsplit("/", 1)[-1]).with_suffix(".json")
                          .read_text())
    assert metadata["weights"] == "random" and len(metadata["sha256"]) == 64
    val_predictions = metadata["val_predictions"]

    # predict the val files: cached rows are reused -> exactly fit's predictions
    val_files = [dataset / p for p in val_predictions]
    result = invoke("predict", out["model"], *val_files, "--json")
    rows = last_json(result)
    got = {r["path"]: r["label"] for r in rows}
    assert got == {str(dataset / p): label for p, label in val_predictions.items()}

    # the same files copied elsewhere (not in the cache) are embedded afresh: same labels
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (cache_dir).rename(tmp_path / "cache_gone")
    rows = last_json(invoke("predict", out["model"], *[copy / p for p in val_predictions],
                            "--json"))
    assert [r["label"] for r in rows] == list(val_predictions.values())


def test_predict_csv_and_output_file(dataset, tmp_path):
    out = last_json(invoke("fit", dataset, "--clf", "knn", "--no-tune", *TINY_ARGS,
                           "--cache-dir", tmp_path / "cache", "--out", tmp_path / "m", "--json"))
    (dataset / "red" / "broken.jpg").write_bytes(b"nope")
    result = invoke("predict", out["model"], dataset / "red", "--top-k", "2")
    assert result.exit_code == 0
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0])[:3] == ["path", "label", "score"]
    assert "top2_label" in table[0]
    assert len(table) == 11
    broken = [r for r in table if r["path"].endswith("broken.jpg")]
    assert broken and broken[0]["label"] == "" and broken[0]["error"]
    target = tmp_path / "pred.csv"
    assert invoke("predict", out["model"], dataset / "green", "-o", target).exit_code == 0
    assert target.read_text().startswith("path,label,score")


def test_compare_writes_report_and_reuses_cache(dataset, tmp_path):
    cache_dir, reports = tmp_path / "cache", tmp_path / "reports"
    first = invoke("extract", dataset, *TINY_ARGS, "--cache-dir", cache_dir, "--json")
    assert first.exit_code == 0
    out = last_json(invoke("compare", dataset, *TINY_ARGS, "--cache-dir", cache_dir,
                           "--report-dir", reports, "--cv", "3", "--json"))
    assert {r["clf"] for r in out["results"]} == {"softmax", "logistic", "svm", "knn", "tree"}
    for r in out["results"]:
        assert {"clf", "backbone", "accuracy", "macro_f1", "fit_seconds",
                "predict_seconds"} <= set(r)
        assert r["weights"] == "random" and r["split"] == "val"
    assert (reports / "report.md").exists() and (reports / "report.json").exists()
    assert (reports / "accuracy_vs_fit_time.png").exists()
    assert len(list(reports.glob("confusion_*.png"))) == 5
    report = (reports / "report.md").read_text()
    assert "RANDOM" in report and "val" in report


def test_compare_warm_cache_runs_no_images_through_model(dataset, tmp_path, monkeypatch):
    from featx.extraction import _run

    cache_dir = tmp_path / "cache"
    assert invoke("extract", dataset, *TINY_ARGS, "--cache-dir", cache_dir).exit_code == 0
    built = []
    monkeypatch.setattr(_run, "open_mapper", lambda *a, **k: built.append(a))
    out = last_json(invoke("compare", dataset, "--clf", "softmax,knn", "--no-tune", *TINY_ARGS,
                           "--cache-dir", cache_dir, "--report-dir", tmp_path / "r", "--json"))
    assert built == []  # no runtime was even built
    assert [r["clf"] for r in out["results"]] == ["softmax", "knn"]


def test_classifier_errors_exit_2(dataset, tmp_path):
    bad = invoke("fit", dataset, "--clf", "forest", *TINY_ARGS, "--cache-dir", tmp_path)
    assert bad.exit_code == 2 and "softmax" in bad.stderr and "svm" in bad.stderr
    missing = invoke("predict", tmp_path / "nope.skops", dataset)
    assert missing.exit_code == 2 and "nope.skops" in missing.stderr
    split = tmp_path / "split"
    make_dataset(split / "train", classes=("cat",), per_class=4)
    make_dataset(split / "val", classes=("cat", "dog"), per_class=2)
    result = invoke("fit", split, "--clf", "softmax", *TINY_ARGS, "--cache-dir", tmp_path / "c",
                    "--out", tmp_path / "m")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "only one class ('cat')" in errors[0]


def test_model_with_mismatched_backbone_is_refused(dataset, tmp_path):
    out = last_json(invoke("fit", dataset, "--clf", "tree", "--no-tune", *TINY_ARGS,
                           "--cache-dir", tmp_path / "cache", "--out", tmp_path / "m", "--json"))
    sidecar = tmp_path / "m" / (out["model"].rsplit("/", 1)[-1].replace(".skops", ".json"))
    metadata = json.loads(sidecar.read_text())
    metadata["weights_id"] = "random:seed=7"
    sidecar.write_text(json.dumps(metadata))
    copy = tmp_path / "new.png"
    shutil.copy(next((dataset / "red").glob("*.png")), copy)
    with open(copy, "ab") as handle:  # new content: not in the cache, so it must be embedded
        handle.write(b"\0")
    result = invoke("predict", out["model"], copy)
    assert result.exit_code == 2 and "random:seed=7" in result.stderr


def test_tampered_model_is_refused(dataset, tmp_path):
    out = last_json(invoke("fit", dataset, "--clf", "tree", "--no-tune", *TINY_ARGS,
                           "--cache-dir", tmp_path / "cache", "--out", tmp_path / "m", "--json"))
    with open(out["model"], "ab") as handle:
        handle.write(b"tampered")
    result = invoke("predict", out["model"], dataset / "red")
    assert result.exit_code == 2
    assert "SHA-256" in result.stderr


def test_compare_reports_intervals_tests_calibration_and_repeats(dataset, tmp_path):
    reports = tmp_path / "reports"
    out = last_json(invoke("compare", dataset, "--clf", "softmax,svm,knn", *TINY_ARGS,
                           "--cache-dir", tmp_path / "cache", "--report-dir", reports, "--cv",
                           "3", "--repeats", "2", "--calibrate", "--json"))
    rows = {r["clf"]: r for r in out["results"]}
    for r in rows.values():
        low, high = r["intervals"]["accuracy"]
        assert low <= r["accuracy"] <= high
        assert r["calibration"] == "sigmoid" and 0 <= r["ece"] <= 1  # the svm's too
    assert sum(r["vs_best"] is None for r in rows.values()) == 1
    assert len(out["repeated"]) == 3
    for summary in out["repeated"]:
        assert summary["repeats"] == 2 and summary["protocol"] == "resplit"
    markdown = (reports / "report.md").read_text()
    for heading in ("## Repeated evaluation", "## Calibration", "## Answering only when"):
        assert heading in markdown
    assert (reports / "reliability.png").exists() and (reports / "coverage.png").exists()
    stored = json.loads((reports / "report.json").read_text())
    assert len(stored["repeated"]) == 3


def test_predict_min_score_says_unknown_with_the_best_guess_beside(dataset, tmp_path):
    common = [*TINY_ARGS, "--cache-dir", tmp_path / "cache", "--json"]
    svm = last_json(invoke("fit", dataset, "--clf", "svm", "--no-tune", *common,
                           "--out", tmp_path / "m"))
    refused = invoke("predict", svm["model"], dataset / "red", "--min-score", "0.5")
    assert refused.exit_code == 2
    assert "gives decision values; refit it with `featx fit --calibrate`" in refused.stderr

    calibrated = last_json(invoke("fit", dataset, "--clf", "svm", "--no-tune", "--calibrate",
                                  *common, "--out", tmp_path / "c"))
    assert calibrated["calibration"] == "sigmoid"
    sidecar = json.loads(open(calibrated["model"].replace(".skops", ".json")).read())
    assert sidecar["calibration"] == "sigmoid"
    rows = last_json(invoke("predict", calibrated["model"], dataset / "red", "--min-score",
                            "0.999", "--json"))
    assert all(r["label"] == "unknown" and r["best_guess"] in ("red", "green", "blue")
               for r in rows)
    result = invoke("predict", calibrated["model"], dataset / "red", "--min-score", "0")
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0])[:4] == ["path", "label", "score", "best_guess"]
    assert all(r["label"] == r["best_guess"] for r in table)  # P=0 answers everything


@pytest.mark.e2e
def test_demo_on_a_folder_prints_every_classifier_with_its_interval(dataset, tmp_path):
    from featx._backend import backend_name

    if backend_name() != "tensorflow":  # the code under test is the same on every backend
        pytest.skip("test_cli.py runs the demo on this backend, in a process of its own")
    result = invoke("demo", dataset, "--report-dir", tmp_path / "r", "--cache-dir",
                    tmp_path / "cache")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "val accuracy" in line]
    assert len(lines) == 5 and all("(95% " in line for line in lines)
    assert (tmp_path / "r" / "report.md").exists()
