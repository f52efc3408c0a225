"""The CLI contract scripts rely on: JSON last line, exit codes, one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import invoke, make_dataset
from featx._backend import backend_name
from featx.cli import cli

TINY_ARGS = ["--backbone", "mobilenet_v2", "--weights", "random", "--input-size", "32",
             "--batch-size", "4", "--no-progress"]


def last_json(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_extract_json_contract(image_folder, cache_dir):
    result = invoke("extract", image_folder, *TINY_ARGS, "--cache-dir", cache_dir, "--json")
    assert result.exit_code == 0, result.stderr
    out = last_json(result)
    for key in ("cache", "backbone", "weights", "n_images", "n_failed", "dim", "seconds",
                "images_per_second", "reused"):
        assert key in out
    assert out["n_images"] == 12 and out["n_failed"] == 0 and out["reused"] is False
    assert out["weights"] == "random"
    assert "RANDOM weights" in result.stderr
    again = last_json(invoke("extract", image_folder, *TINY_ARGS, "--cache-dir", cache_dir,
                             "--json"))
    assert again["reused"] is True and again["n_extracted"] == 0

    listing = invoke("cache", "ls", "--cache-dir", cache_dir, "--json")
    assert listing.exit_code == 0
    (row,) = last_json(listing)
    assert row["cache"] == out["cache"] and row["n_images"] == 12
    info = invoke("cache", "info", out["cache"])
    assert info.exit_code == 0 and "mobilenet_v2" in info.stdout


def test_extract_skips_bad_file_and_exits_zero(image_folder, cache_dir):
    (image_folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    result = invoke("extract", image_folder, *TINY_ARGS, "--cache-dir", cache_dir, "--json")
    assert result.exit_code == 0
    out = last_json(result)
    assert out["n_failed"] == 1 and out["failed"][0]["path"] == "cat/broken.jpg"
    assert "cat/broken.jpg" in result.stderr


@pytest.mark.parametrize("case", ["missing", "empty", "one_class"])
def test_data_errors_exit_2_with_one_line(tmp_path, case):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "one_class":
        make_dataset(data, classes=("cat",))
    result = invoke("extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and str(data.name) in lines[0]


def test_unknown_backbone_lists_valid_names(image_folder, tmp_path):
    result = invoke("extract", image_folder, "--backbone", "nope", "--cache-dir", tmp_path)
    assert result.exit_code == 2
    assert "efficientnet_lite0" in result.stderr


def test_imagenet_weights_offline_fail_with_advice(image_folder, tmp_path):
    result = invoke("extract", image_folder, "--backbone", "resnet50", "--cache-dir", tmp_path)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "efficientnet_lite0" in result.stderr


def test_backbones_listing():
    result = invoke("backbones", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in last_json(result)}
    assert rows["efficientnet_lite0"]["offline_weights"] is True
    assert rows["efficientnet_lite0"]["dim"] == 1280
    assert {"mobilenet_v2", "resnet50", "vgg16", "inception_v3", "efficientnet_b0"} <= set(rows)
    text = invoke("backbones")
    assert "efficientnet_lite0" in text.stdout


def test_every_command_has_help():
    def walk(group, prefix=()):
        for name, command in group.commands.items():
            yield prefix + (name,), command
            if hasattr(command, "commands"):
                yield from walk(command, prefix + (name,))

    for path, command in walk(cli):
        result = invoke(*path, "--help")
        assert result.exit_code == 0, path
        assert command.help, f"{' '.join(path)} has no docstring"


# featx's own stderr: its log lines, the demo's one note, and tqdm's progress bars
FEATX_STDERR = re.compile(r"featx: (DEBUG|INFO|WARNING|ERROR): |wrote scikit-learn's digits "
                          r"|[\w .()-]*: *\d+%\|")


@pytest.mark.e2e
def test_demo_prints_every_classifier_and_nothing_but_featx(tmp_path):
    """``featx demo`` on a folder, in a fresh process as a user runs it (TensorFlow logs
    from C++ at import): a line per classifier with its interval, a report, and on stderr
    featx's lines and progress bars only: no TensorFlow or absl log lines, no CUDA
    probing, no library warnings."""
    data = make_dataset(tmp_path / "photos", per_class=10)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["FEATX_ONNX_STORE"] = str(tmp_path / "onnx")  # nothing exported: TensorFlow must load
    done = subprocess.run([sys.executable, "-c", "from featx.cli import main; main()", "demo",
                           str(data), "--report-dir", str(tmp_path / "reports"),
                           "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "val accuracy" in line]
    assert len(lines) == 5 and all("(95% " in line for line in lines)
    assert (tmp_path / "reports" / "report.md").exists()
    if backend_name() == "tensorflow":  # elsewhere Keras runs the model, nothing is exported
        assert list((tmp_path / "onnx").glob("*.onnx")), "the demo exported no backbone"
    lines = [part for line in done.stderr.splitlines() for part in line.split("\r")
             if part.strip()]
    assert [line for line in lines if not FEATX_STDERR.match(line)] == []


@pytest.mark.parametrize("verbose,tf_level,library_level", [(0, "3", "ERROR"),
                                                            (1, "0", "NOTSET")])
def test_verbose_lets_the_libraries_speak(monkeypatch, verbose, tf_level, library_level):
    import logging
    import warnings

    from featx.cli import _app

    monkeypatch.setattr(_app, "TF_LOG_LEVEL_CHOSEN", False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with warnings.catch_warnings():
        _app._quiet_libraries(verbose)
        quiet = any(f[0] == "ignore" and f[2] is Warning for f in warnings.filters)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == tf_level
    assert logging.getLevelName(logging.getLogger("tensorflow").level) == library_level
    assert quiet == (verbose == 0)
    monkeypatch.setattr(_app, "TF_LOG_LEVEL_CHOSEN", True)
    _app._quiet_libraries(verbose)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == tf_level  # a chosen level is left alone
    for name in _app.LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
