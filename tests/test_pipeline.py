"""The pipeline stages alone, and extract() with an injected mapper (no model at all)."""

import numpy as np
import pytest

from conftest import TINY, make_dataset
from featx.extraction import extract
from featx.extraction import ArrayWriter, CacheWriter, ImageReader, run_pipeline

PREP = {"input_size": 16, "resize_size": 18, "interpolation": "area"}


class MeanColourMapper:
    """A fake runtime: the embedding is the mean colour of the image (3 numbers)."""

    runtime = "fake"
    precision = "fp32"
    dim = 3

    def __init__(self):
        self.batches = []

    def __call__(self, images):
        self.batches.append(len(images))
        return images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32)

    @property
    def n_images(self):
        return sum(self.batches)


def _files(root, n=11):
    import cv2

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"img{i:02d}.png"
        cv2.imwrite(str(path), np.full((20, 24, 3), 10 * i, np.uint8))
        paths.append(path)
    return paths


def test_reader_keeps_order_and_batches(tmp_path):
    paths = _files(tmp_path)
    reader = ImageReader(paths, PREP, batch_size=4, workers=3, prefetch=1)
    batches = list(reader)
    assert [len(b["index"]) for b in batches] == [4, 4, 3]
    index = np.concatenate([b["index"] for b in batches])
    assert index.tolist() == list(range(11))
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (11, 16, 16, 3) and images.dtype == np.uint8
    assert images[:, 0, 0, 0].tolist() == [10 * i for i in range(11)]
    assert all(e == "" for b in batches for e in b["error"])


def test_reader_relative_to_root(tmp_path):
    _files(tmp_path / "data", n=3)
    reader = ImageReader(["img00.png", "img02.png"], PREP, batch_size=8, root=tmp_path / "data")
    (batch,) = list(reader)
    assert batch["image"][:, 0, 0, 0].tolist() == [0, 20]


def test_pipeline_drops_error_rows_from_the_mapper_and_reports_them(tmp_path):
    paths = _files(tmp_path)
    paths[3].write_bytes(b"not an image")
    paths[8].write_bytes(b"")
    mapper = MeanColourMapper()
    writer = ArrayWriter(len(paths), 3)
    timing = run_pipeline(ImageReader(paths, PREP, batch_size=4), mapper, writer, progress=False)
    assert mapper.n_images == timing.n_images == 9  # bad files never reach the model
    assert [bool(e) for e in writer.errors] == [i in (3, 8) for i in range(11)]
    good = [i for i in range(11) if i not in (3, 8)]
    np.testing.assert_allclose(writer.embeddings[good, 0], [10 * i for i in good])
    assert not writer.embeddings[[3, 8]].any()


def test_pipeline_closes_the_writer_when_the_mapper_fails(tmp_path):
    paths = _files(tmp_path, n=3)

    class Writer(ArrayWriter):
        closed = False

        def close(self):
            self.closed = True

    def broken(images):
        raise RuntimeError("boom")

    writer = Writer(3, 3)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(ImageReader(paths, PREP, batch_size=2), broken, writer, progress=False)
    assert writer.closed


def test_extract_with_injected_mapper(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=5)
    (data / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    kw = dict(cache_dir=tmp_path / "cache", progress=False, batch_size=3, **TINY)
    mapper = MeanColourMapper()
    features = extract(data, mapper=mapper, **kw)
    assert mapper.n_images == 10 == len(features)
    assert [p for p, _ in features.stats.failed] == ["cat/broken.png"]
    assert features.stats.runtime == "fake fp32"
    X, _ = features.arrays("train")
    assert X.shape[1] == 3  # the injected mapper's embeddings, in cache row order

    again = MeanColourMapper()
    assert extract(data, mapper=again, **kw).stats.reused and again.n_images == 0


def test_reduced_decode_is_part_of_the_key(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    kw = dict(cache_dir=tmp_path / "cache", progress=False, mapper=MeanColourMapper(), **TINY)
    plain = extract(data, **kw)
    reduced = extract(data, reduced_decode=True, **kw)
    assert reduced.cache_path != plain.cache_path
    assert reduced.key["preprocessing"]["reduced_decode"] is True
    assert "reduced_decode" not in plain.key["preprocessing"]  # old caches keep their key


def test_cache_writer_alone_appends_decoded_rows_and_collects_failures(tmp_path):
    from featx.cache import FeatureCache

    n = 4
    rows = {"labels": np.arange(n), "paths": np.array([f"f{i}.png" for i in range(n)], object),
            "split": np.array(["train"] * n, object),
            "sha256": np.array([f"h{i}" for i in range(n)], object),
            "size": np.ones(n, np.int64), "mtime_ns": np.ones(n, np.int64),
            "view": np.zeros(n, np.int16)}
    cache = FeatureCache.open_for_write(tmp_path / "c.h5", key={"k": 1}, dim=2, attrs={})
    writer = CacheWriter(cache, rows)
    for start in (0, 2):
        index = np.arange(start, start + 2)
        writer.put({"index": index, "error": np.array(["", "truncated image"], object),
                    "embedding": np.stack([index, index]).T.astype(np.float32)})
    writer.close()  # every queued batch is in the cache once close returns
    assert writer.failed == [("f1.png", "h1", "truncated image"),
                             ("f3.png", "h3", "truncated image")]
    assert cache.rows()["paths"].tolist() == ["f0.png", "f2.png"]
    assert cache.embeddings().tolist() == [[0, 0], [2, 2]]
    cache.close()


def test_array_writer_alone_keeps_rows_in_reader_order():
    writer = ArrayWriter(3, 2)
    writer.put({"index": np.array([2, 0]), "error": np.array(["", "bad"], object),
                "embedding": np.array([[5, 5], [9, 9]], np.float32)})
    writer.close()
    assert writer.errors == ["bad", "", ""]
    assert writer.embeddings[2].tolist() == [5, 5] and writer.embeddings[0].tolist() == [0, 0]
