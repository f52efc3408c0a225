"""featx cache export: embeddings and metadata out, row for row, in chunks."""

import csv
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY
from featx.errors import UsageError


@pytest.fixture
def cache_file(image_folder, cache_dir):
    from featx.extraction import extract

    return extract(image_folder, cache_dir=cache_dir, progress=False, augment=1,
                   **TINY).cache_path


def _expected(cache_file, views=False):
    from featx.cache import FeatureCache

    with FeatureCache.open(cache_file) as cache:
        rows = cache.rows()
        keep = np.flatnonzero(rows["view"] >= 0 if views else rows["view"] == 0)
        classes = cache.json_attr("class_names")
        meta = [[rows["paths"][i], classes[rows["labels"][i]], rows["split"][i],
                 rows["sha256"][i]] for i in keep]
        return cache.embeddings(keep), meta, rows["view"][keep]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_npy_rows_align_with_the_cache(cache_file, tmp_path):
    from featx.cache import export_embeddings

    record = export_embeddings(cache_file, "npy", tmp_path / "out")
    X, meta, _ = _expected(cache_file)
    assert record["n_rows"] == len(X) == 12 and record["dim"] == X.shape[1]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "embeddings.npy"), X)
    table = _read_csv(tmp_path / "out" / "metadata.csv")
    assert table[0] == ["path", "label", "split", "sha256"]
    assert table[1:] == meta
    written = json.loads((tmp_path / "out" / "export.json").read_text())
    assert written["key"]["backbone"] == "mobilenet_v2" and written["precision"] == "fp32"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "embeddings.npy", "export.json", "metadata.csv"]  # no temporary file left


def test_csv_and_parquet_hold_the_same_rows(cache_file, tmp_path):
    import pyarrow.parquet as pq

    from featx.cache import export_embeddings

    X, meta, _ = _expected(cache_file)
    export_embeddings(cache_file, "csv", tmp_path / "csv")
    table = _read_csv(tmp_path / "csv" / "embeddings.csv")
    assert table[0][:5] == ["path", "label", "split", "sha256", "e0"]
    assert [row[:4] for row in table[1:]] == meta
    np.testing.assert_array_equal(np.array([row[4:] for row in table[1:]], np.float32), X)

    export_embeddings(cache_file, "parquet", tmp_path / "pq")
    frame = pq.read_table(tmp_path / "pq" / "embeddings.parquet").to_pydict()
    assert [[frame[c][i] for c in ("path", "label", "split", "sha256")]
            for i in range(len(X))] == meta
    np.testing.assert_array_equal(np.array(frame["embedding"], np.float32), X)


def test_export_streams_in_chunks(cache_file, tmp_path, monkeypatch):
    from featx.cache import FeatureCache
    from featx.cache import export_embeddings

    export_embeddings(cache_file, "npy", tmp_path / "whole")
    spans = []
    original = FeatureCache.row_range

    def recording(self, start, stop):
        spans.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(FeatureCache, "row_range", recording)
    monkeypatch.setattr(FeatureCache, "embeddings", None)  # never every row at once
    monkeypatch.setattr(FeatureCache, "rows", None)
    export_embeddings(cache_file, "npy", tmp_path / "chunked", chunk_rows=5)
    with FeatureCache.open(cache_file) as cache:
        n_rows = cache.n_rows
    assert spans == [(s, s + 5) for s in range(0, n_rows, 5)]
    for name in ("embeddings.npy", "metadata.csv"):
        assert ((tmp_path / "whole" / name).read_bytes()
                == (tmp_path / "chunked" / name).read_bytes())


@pytest.mark.parametrize("format", ["npy", "csv", "parquet"])
def test_a_failure_half_way_leaves_no_file(cache_file, tmp_path, monkeypatch, format):
    from featx.cache import FeatureCache
    from featx.cache import export_embeddings

    original = FeatureCache.row_range

    def failing(self, start, stop):
        if start > 0:
            raise OSError("disk full")
        return original(self, start, stop)

    monkeypatch.setattr(FeatureCache, "row_range", failing)
    with pytest.raises(OSError, match="disk full"):
        export_embeddings(cache_file, format, tmp_path / "out", chunk_rows=4)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_empty_cache_exports_empty_files(tmp_path):
    from featx.cache import FeatureCache
    from featx.cache import export_embeddings

    path = tmp_path / "empty.h5"
    with FeatureCache.open_for_write(path, key={"backbone": "x"}, dim=4,
                                     attrs={"class_names": "[]"}) as session:
        session.commit()
    record = export_embeddings(path, "npy", tmp_path / "out")
    assert record["n_rows"] == 0
    assert np.load(tmp_path / "out" / "embeddings.npy").shape == (0, 4)
    assert _read_csv(tmp_path / "out" / "metadata.csv") == [["path", "label", "split",
                                                             "sha256"]]


def test_views_add_the_augmented_rows(cache_file, tmp_path):
    from featx.cache import export_embeddings

    record = export_embeddings(cache_file, "npy", tmp_path / "out", views=True)
    X, meta, views = _expected(cache_file, views=True)
    train_images = sum(1 for row in _expected(cache_file)[1] if row[2] == "train")
    assert record["n_rows"] == len(X) == 12 + train_images
    table = _read_csv(tmp_path / "out" / "metadata.csv")
    assert table[0][-1] == "view"
    assert [int(row[-1]) for row in table[1:]] == views.tolist()


def test_missing_pyarrow_is_one_clear_line(cache_file, tmp_path, monkeypatch):
    from featx.cache import export_embeddings
    from featx.cli import cli

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UsageError, match=r"pip install 'featx\[parquet\]'"):
        export_embeddings(cache_file, "parquet", tmp_path / "out")
    result = CliRunner().invoke(cli, ["cache", "export", str(cache_file), "--format",
                                      "parquet", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: parquet export needs pyarrow: pip install 'featx[parquet]' "
        "(or use --format npy or csv)"]
    assert not (tmp_path / "out" / "embeddings.parquet").exists()


def test_cli_cache_export_json(cache_file, tmp_path):
    from featx.cli import cli

    result = CliRunner().invoke(cli, ["cache", "export", str(cache_file), "-o",
                                      str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["files"] == ["embeddings.npy", "metadata.csv"] and record["n_rows"] == 12
