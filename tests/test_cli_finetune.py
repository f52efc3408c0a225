"""featx finetune / augment-preview / predict MODEL.keras / compare --finetune through the CLI."""

import pytest

from conftest import invoke, last_json, make_dataset, register_toy

# the three-layer toy CNN: the commands' plumbing, not the network, is tested here
# (tests/test_finetuning.py trains MobileNetV2 and the toy through the API)
TOY_ARGS = ["--backbone", "toy_cnn", "--weights", "random", "--no-progress"]
QUICK = ["--warmup-epochs", "1", "--epochs", "1", "--batch-size", "8", "--unfreeze", "3"]


@pytest.fixture(autouse=True)
def toy(monkeypatch):
    register_toy(monkeypatch)


def test_finetune_then_predict_keras_model(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=8)
    out = last_json(invoke("finetune", data, *TOY_ARGS, *QUICK, "--out", tmp_path / "m",
                           "--cache-dir", tmp_path / "cache", "--json"))
    for key in ("model", "val_accuracy", "val_macro_f1", "seconds", "epochs_run"):
        assert key in out
    assert out["model"].endswith(".keras") and out["epochs_run"] == 2
    assert list((tmp_path / "m").glob("*-history.png"))
    rows = last_json(invoke("predict", out["model"], data / "cat", "--json"))
    assert len(rows) == 8
    assert all(r["label"] in ("cat", "dog") and 0 <= r["score"] <= 1 for r in rows)


def test_compare_with_finetune_row_states_cost(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=8)
    reports = tmp_path / "reports"
    out = last_json(invoke("compare", data, *TOY_ARGS, "--clf", "softmax", "--no-tune",
                           "--finetune", "--finetune-epochs", "1", "--finetune-warmup-epochs",
                           "1", "--cache-dir", tmp_path / "cache", "--report-dir", reports,
                           "--json"))
    assert [r["clf"] for r in out["results"]] == ["softmax", "finetune"]
    report = (reports / "report.md").read_text()
    assert "cost ratio" in report and "Accuracy difference" in report


def test_augment_preview_writes_png(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=1)
    target = tmp_path / "preview.png"
    result = invoke("augment-preview", next((data / "cat").iterdir()), "--out", target,
                    "--n", "4", "--size", "64")
    assert result.exit_code == 0, result.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
