"""The Python API's contracts: one options object, names checked once, predict's helpers."""

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_dataset, write_image
from featx import api
from featx.classifiers import check_names, class_scores
from featx.cli import cli
from featx.data import expand_paths
from featx.errors import DataError, UsageError
from featx.extraction import extract
from featx.inference import label_rows
from featx.options import ExtractOptions, SplitOptions


def test_options_are_one_frozen_object_with_split_options_inside():
    options = ExtractOptions.create(backbone="mobilenet_v2", seed=7, val_fraction=0.5)
    assert options.backbone == "mobilenet_v2"
    assert options.split == SplitOptions(val_fraction=0.5, seed=7) and options.seed == 7
    again = ExtractOptions.create(options, batch_size=8)
    assert again.batch_size == 8 and again.split == options.split and options.batch_size is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 4
    assert "batch_size" in ExtractOptions.names() and "train_per_class" in ExtractOptions.names()


@pytest.mark.parametrize("call", [
    lambda data: ExtractOptions.create(batchsize=64),
    lambda data: extract(data, batchsize=64),
    lambda data: api.fit(data, "svm", batchsize=64),
    lambda data: api.compare(data, batchsize=64),
])
def test_a_mistyped_option_raises_at_once_with_the_valid_names(call, tmp_path):
    with pytest.raises(UsageError) as caught:
        call(tmp_path / "no-such-folder")  # fails on the name, before touching any data
    message = str(caught.value)
    assert "'batchsize'" in message and "batch_size" in message and "val_fraction" in message


def test_finetune_refuses_options_it_does_not_use(tmp_path):
    from featx.finetuning import finetune

    with pytest.raises(UsageError, match="layer"):
        finetune(tmp_path, layer="block_5", warmup_epochs=1, epochs=1)


def test_each_cli_command_offers_only_its_own_options(tmp_path):
    result = CliRunner().invoke(cli, ["finetune", str(tmp_path), "--layer", "x"])
    assert result.exit_code == 2 and "No such option" in result.output
    for option in ("--layer", "--workers", "--mixed-precision", "--runtime"):
        assert option not in CliRunner().invoke(cli, ["finetune", "--help"]).output
        assert option in CliRunner().invoke(cli, ["extract", "--help"]).output


def test_classifier_names_are_checked_in_one_place():
    assert check_names("softmax,knn") == ["softmax", "knn"]
    assert check_names(("all",)) == ["softmax", "logistic", "svm", "knn", "tree"]
    with pytest.raises(UsageError, match="forest.*softmax"):
        check_names(["svm", "forest"])


def test_expand_paths_follows_the_data_rules(tmp_path):
    make_dataset(tmp_path / "in", per_class=2)
    write_image(tmp_path / "in" / ".hidden" / "x.png", np.zeros((8, 8, 3), np.uint8))
    write_image(tmp_path / "in" / "cat" / ".x.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    files = expand_paths([tmp_path / "in"])
    assert [f.relative_to(tmp_path / "in").as_posix() for f in files] == [
        "cat/cat_000.png", "cat/cat_001.png", "dog/dog_000.png", "dog/dog_001.png"]
    assert expand_paths([files[0]]) == [files[0]]  # a file is taken as given
    with pytest.raises(DataError, match="no such file"):
        expand_paths([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        expand_paths([tmp_path / "empty"])


def test_label_rows_map_score_columns_to_classes():
    classes = ["cat", "dog", "fox"]
    scores = np.array([[0.1, 0.9], [0.7, 0.3]])  # columns: classes 2 and 0
    rows = label_rows(["a", "b", "c"], ["", "truncated image", ""], scores, [2, 0],
                      [2, 0], classes, top_k=2)
    assert rows[0]["label"] == "fox" and rows[0]["score"] == pytest.approx(0.1)
    assert [t["label"] for t in rows[0]["top"]] == ["cat", "fox"]
    assert rows[1] == {"path": "b", "label": "", "score": None, "error": "truncated image"}
    assert rows[2]["label"] == "cat" and rows[2]["score"] == pytest.approx(0.3)  # column 1


def test_class_scores_give_two_columns_for_a_binary_decision_function():
    from sklearn.svm import LinearSVC

    X = np.array([[0.0], [1.0], [2.0], [3.0]])
    svm = LinearSVC().fit(X, [0, 0, 1, 1])
    scores = class_scores(svm, X)
    assert scores.shape == (4, 2) and np.allclose(scores[:, 0], -scores[:, 1])


def test_the_cli_offers_every_option_of_the_options_object():
    from featx.cli._extract import extract as extract_command

    defaults = ExtractOptions()
    params = {p.name: p.default for p in extract_command.params}
    assert set(ExtractOptions.names()) <= set(params)
    for name in ExtractOptions.names():  # one list of defaults: the options object's
        expected = getattr(defaults.split if name in SplitOptions.names() else defaults, name)
        assert params[name] == expected, name
