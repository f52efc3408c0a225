"""The contracts of featx.base, kept by the real stages; typed results that read like the dicts
they replace; the compare row's one schema."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import ArrayFeatures, make_dataset
from featx.base import FeaturesLike, Mapper, Result, Writer
from featx.cache import CacheSession, CombinedFeatures, Features
from featx.classifiers import NOT_SERIALISED, UNSET, CompareRow
from featx.extraction import (ArrayWriter, CacheWriter, FlipAveraging, KerasMapper, OnnxMapper,
                              map_files)


def test_the_pipelines_stages_keep_their_contracts():
    for writer in (ArrayWriter, CacheWriter):
        assert issubclass(writer, Writer), writer
    for mapper in (KerasMapper, OnnxMapper, FlipAveraging):
        assert issubclass(mapper, Mapper), mapper
    assert not issubclass(dict, Writer) and not issubclass(int, Mapper)


def _cache(tmp_path, n=6, dim=4):
    path = tmp_path / "c.h5"
    attrs = {"root": str(tmp_path), "class_names": ["cat", "dog"], "backbone": "toy",
             "weights": "random", "weights_id": "random:seed=0"}
    with CacheSession(path, key={"backbone": "toy"}, dim=dim, attrs=attrs) as session:
        session.append(np.arange(n * dim, dtype=np.float32).reshape(n, dim),
                       labels=np.arange(n) % 2, paths=[f"{i}.png" for i in range(n)],
                       split=["train", "val"] * (n // 2), sha256=[f"h{i}" for i in range(n)],
                       size=np.ones(n), mtime_ns=np.ones(n), view=np.zeros(n))
    return path


def test_features_of_every_kind_are_features_like(tmp_path):
    features = Features(_cache(tmp_path))
    combined = CombinedFeatures([features, features])
    fake = ArrayFeatures(np.zeros((4, 2)), [0, 1, 0, 1], ["train", "val"] * 2, ["a", "b"])
    for rows in (features, combined, fake):
        assert isinstance(rows, FeaturesLike), type(rows)
    X, y = combined.take(combined.indices("train"))
    assert X.shape == (3, 8) and y.tolist() == [0, 0, 0]
    assert not isinstance(object(), FeaturesLike)


def test_the_pipeline_runs_on_any_callable_as_the_mapper(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    files = sorted(data.rglob("*.png")) + [tmp_path / "missing.png"]
    preprocessing = {"input_size": 8, "resize_size": 8}
    out, errors = map_files(files, preprocessing, lambda images: images.mean(axis=(1, 2)), 3)
    assert out.shape == (5, 3) and out[:4].min() > 0 and not out[4].any()
    assert errors[:4] == [""] * 4 and errors[4] == "file not found"


@dataclasses.dataclass
class _Outcome(Result):
    path: object
    score: float
    extra: object = None
    _optional = ("extra",)


def test_a_result_reads_like_the_dict_it_prints(tmp_path):
    outcome = _Outcome(tmp_path / "m.skops", 0.5)
    assert outcome["path"] == str(tmp_path / "m.skops") and outcome["score"] == 0.5
    assert "extra" not in outcome and set(outcome) == {"path", "score"}
    assert outcome.to_dict() == dict(outcome) == json.loads(json.dumps(outcome.to_dict()))
    outcome.extra = 1
    assert outcome["extra"] == 1 and len(outcome) == 3
    with pytest.raises(KeyError):
        outcome["_optional"]


def test_a_compare_row_has_one_schema():
    row = CompareRow(clf="svm", backbone="b", weights="random", split="val", accuracy=0.9,
                     balanced_accuracy=0.8, macro_f1=0.7, fit_seconds=1.0, estimator=object())
    assert "vs_best" not in row and row.vs_best is UNSET
    row["vs_best"] = None  # tested, and the best
    assert "vs_best" in row and row["vs_best"] is None
    assert set(row.to_dict()) == set(row) - set(NOT_SERIALISED)
    assert row.drop("estimator").get("estimator") is None and "estimator" not in row
    with pytest.raises(KeyError):
        row["no_such_field"] = 1
    with pytest.raises(TypeError):
        CompareRow(clf="svm")  # the required fields are required
