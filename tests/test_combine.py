"""Combined backbones (A+B: the parts' cached embeddings side by side, aligned by content
hash) and flip-averaged embeddings."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import _toy_base, make_dataset, register_toy
from featx import api
from featx.cli import cli
from featx.errors import DataError, UsageError
from featx.extraction import extract
from featx.cache import CombinedFeatures, ExtractStats
from featx.options import backbone_parts
from featx.extraction import FlipAveraging

PAIR = "toy_cnn+toy_wide"


@pytest.fixture
def toys(monkeypatch):
    """Two quick backbones with their own preprocessing: toy_cnn (32 px, resize 36, "tf")
    and toy_wide (48 px, resize 56, "lite")."""
    from featx.backbones import BackboneCfg, register_backbone

    register_toy(monkeypatch)
    register_backbone(BackboneCfg(
        name="toy_wide", family="test", input_size=48, resize_size=56, interpolation="area",
        normalization="lite", num_features=32, default_layer=None, default_pooling="avg",
        weights_source="random only", offline=True, license="none"), _toy_base)


@pytest.fixture
def model_calls(monkeypatch):
    """Images each backbone's Keras model was called on, by input size."""
    from featx.extraction import KerasMapper

    calls = {}
    original = KerasMapper.__call__

    def counting(self, images):
        calls[images.shape[1]] = calls.get(images.shape[1], 0) + len(images)
        return original(self, images)

    monkeypatch.setattr(KerasMapper, "__call__", counting)
    return calls


def run(data, cache_dir, backbone=PAIR, **kw):
    return extract(data, backbone=backbone, weights="random", cache_dir=cache_dir,
                   runtime="keras", progress=False, batch_size=4, **kw)


# ----- names --------------------------------------------------------------------------
def test_backbone_parts_split_and_refuse_repeats():
    assert backbone_parts("efficientnet_lite0") == ("efficientnet_lite0",)
    assert backbone_parts("a + b+c") == ("a", "b", "c")
    with pytest.raises(UsageError, match="a appears twice"):
        backbone_parts("a+a")
    with pytest.raises(UsageError, match="empty part"):
        backbone_parts("a+")


# ----- alignment, on in-memory parts ----------------------------------------------------
class MemoryPart:
    """A Features-like cache of one backbone over in-memory rows."""

    def __init__(self, name, paths, sha, labels, split, X, failed=()):
        self.backbone, self.weights, self.weights_id = name, "random", f"random:{name}"
        self.paths, self.sha256 = np.array(paths), np.array(sha)
        self.labels, self.split = np.array(labels), np.array(split)
        self.view = np.zeros(len(paths), np.int16)
        self.X, self.dim = X, X.shape[1]
        self.class_names, self.root = ["a", "b"], "/data"
        self.split_params, self.layout = {}, "pool"
        self.key, self.preprocessing = {"name": name}, {"input_size": 8}
        self.extraction_seconds, self.cache_path = 1.5, f"/cache/{name}.h5"
        self.flip_average, self.precision = False, "fp32"
        self.stats = ExtractStats(failed=list(failed), reused=True)

    def take(self, idx):
        return self.X[idx], self.labels[idx]

    def provenance(self):
        return "memory"


def test_rows_align_by_content_hash_when_the_parts_list_files_in_other_orders():
    paths = [f"f{i}.png" for i in range(6)]
    sha = [f"h{i}" for i in range(6)]
    labels, split = [0, 0, 0, 1, 1, 1], ["train", "val"] * 3
    a = MemoryPart("A", paths, sha, labels, split, np.arange(6.0)[:, None] * [1, 1])
    order = [4, 2, 5, 0, 3, 1]  # B's cache lists the same files in another order
    b = MemoryPart("B", [paths[i] for i in order], [sha[i] for i in order],
                   [labels[i] for i in order], [split[i] for i in order],
                   100 + np.array(order, float)[:, None] * [1, 1, 1])
    combined = CombinedFeatures([a, b])
    X, y = combined.take(np.arange(6))
    assert combined.dim == 5 and X.shape == (6, 5)
    np.testing.assert_array_equal(X[:, :2], a.X)
    np.testing.assert_array_equal(X[:, 2:], 100 + np.arange(6.0)[:, None] * [1, 1, 1])
    np.testing.assert_array_equal(y, labels)
    Xt, _ = combined.arrays("train")
    np.testing.assert_array_equal(Xt[:, 0], [0, 2, 4])
    np.testing.assert_array_equal(Xt[:, 2], [100, 102, 104])
    assert combined.backbone == "A+B"
    assert [p.backbone for p in combined.parts] == ["A", "B"]


def test_a_file_failed_in_one_part_is_left_out_and_reported():
    paths = [f"f{i}.png" for i in range(4)]
    a = MemoryPart("A", paths, ["h0", "h1", "h2", "h3"], [0, 0, 1, 1],
                   ["train", "val", "train", "val"], np.eye(4))
    b = MemoryPart("B", paths[:2] + paths[3:], ["h0", "h1", "h3"], [0, 0, 1],
                   ["train", "val", "val"], np.eye(3),
                   failed=[("f2.png", "cannot decode")])
    combined = CombinedFeatures([a, b])
    assert list(combined.paths) == ["f0.png", "f1.png", "f3.png"]
    assert len(combined) == 3
    assert combined.stats.n_failed == 1
    assert combined.stats.failed == [("f2.png", "B: cannot decode")]
    X, _ = combined.take(np.arange(3))
    np.testing.assert_array_equal(X[:, 4:], np.eye(3))


def test_parts_of_other_datasets_are_refused():
    a = MemoryPart("A", ["x.png"], ["h"], [0], ["train"], np.eye(1))
    b = MemoryPart("B", ["x.png"], ["h"], [0], ["train"], np.eye(1))
    b.class_names = ["a", "c"]
    with pytest.raises(DataError, match="other classes"):
        CombinedFeatures([a, b])


# ----- extraction of combined backbones ------------------------------------------------
def test_cached_parts_are_reused_with_zero_forward_passes(toys, image_folder, cache_dir,
                                                          model_calls):
    alone = run(image_folder, cache_dir, backbone="toy_cnn")
    assert model_calls == {32: 12}
    combined = run(image_folder, cache_dir)
    assert model_calls == {32: 12, 48: 12}  # only the part that was not cached ran
    assert combined.parts[0].stats.n_extracted == 0
    assert combined.parts[0].cache_path == alone.cache_path
    assert combined.dim == alone.dim + combined.parts[1].dim
    assert len(combined) == 12 and combined.backbone == PAIR
    model_calls.clear()
    again = run(image_folder, cache_dir)
    later = run(image_folder, cache_dir, backbone="toy_wide")
    assert model_calls == {} and again.stats.reused and later.stats.reused
    X, _ = again.arrays("train")
    Xa, _ = alone.arrays("train")
    np.testing.assert_array_equal(X[:, :alone.dim], Xa)


def test_a_file_that_fails_in_one_part_only_is_left_out_and_reported(toys, image_folder,
                                                                     cache_dir, monkeypatch):
    from featx.extraction import _reader
    from featx.data import load_for_model
    from featx.errors import ImageDecodeError

    def failing_at_48(path, size, *args, **kw):  # toy_wide's input size only
        if size == 48 and str(path).endswith("cat_001.png"):
            raise ImageDecodeError(path, "planted failure")
        return load_for_model(path, size, *args, **kw)

    monkeypatch.setattr(_reader, "load_for_model", failing_at_48)
    result = CliRunner().invoke(cli, [
        "extract", str(image_folder), "-b", PAIR, "--weights", "random", "--runtime", "keras",
        "--cache-dir", str(cache_dir), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["n_images"] == 11 and out["n_failed"] == 1
    [failed] = out["failed"]
    assert failed["path"] == "cat/cat_001.png"
    assert failed["reason"].startswith("toy_wide: ") and "planted failure" in failed["reason"]
    assert "skipped cat/cat_001.png: toy_wide:" in result.output
    assert out["cache"] is None and len(out["caches"]) == 2
    assert [p["backbone"] for p in out["parts"]] == ["toy_cnn", "toy_wide"]
    combined = run(image_folder, cache_dir)
    assert "cat/cat_001.png" not in set(combined.paths) and len(combined) == 11
    assert combined.parts[0].stats.n_failed == 0  # toy_cnn kept its row


def test_an_image_stored_twice_keeps_a_row_per_path(toys, image_folder, cache_dir):
    (image_folder / "dog" / "copy.png").write_bytes((image_folder / "cat" / "cat_000.png")
                                                   .read_bytes())
    combined = run(image_folder, cache_dir)
    assert len(combined) == 13
    X, _ = combined.take(np.arange(len(combined.paths)))  # repeated cache rows are readable
    same = [list(combined.paths).index(p) for p in ("cat/cat_000.png", "dog/copy.png")]
    np.testing.assert_array_equal(X[same[0]], X[same[1]])


def test_unknown_or_unavailable_part_fails_before_any_extraction(toys, image_folder,
                                                                 cache_dir, monkeypatch):
    with pytest.raises(UsageError, match="part nope"):
        run(image_folder, cache_dir, backbone="toy_cnn+nope")
    monkeypatch.setenv("FEATX_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "--cache-dir",
                                      str(cache_dir), "-b", "efficientnet_lite0+resnet50",
                                      "--no-progress"])
    assert result.exit_code == 2
    assert "part resnet50" in result.output and len(result.output.strip().splitlines()) == 1
    assert not cache_dir.exists() or not list(cache_dir.rglob("*.h5"))  # nothing extracted
    result = CliRunner().invoke(cli, ["extract", str(image_folder), "-b", "toy_cnn+toy_cnn"])
    assert result.exit_code == 2 and "toy_cnn appears twice" in result.output
    with pytest.raises(UsageError, match="--layer names a layer of one backbone"):
        run(image_folder, cache_dir, layer="conv1")
    with pytest.raises(UsageError, match="a weights file belongs to one backbone"):
        extract(image_folder, backbone=PAIR, weights=str(image_folder / "cat" / "cat_000.png"),
                cache_dir=cache_dir)
    for later, error in (("toy_cnn+toy_cnn", "appears twice"), ("nope", "nope"),
                         (PAIR, "--layer")):  # a later backbone's fault, found before any work
        with pytest.raises(UsageError, match=error):
            api.compare(image_folder, ("logistic",), backbones=("toy_cnn", later),
                        weights="random", cache_dir=cache_dir,
                        layer="conv1" if later == PAIR else None)
    with pytest.raises(UsageError, match="--finetune fine-tunes the first backbone"):
        api.compare(image_folder, ("logistic",), backbones=(PAIR,), finetune={},
                    weights="random", cache_dir=cache_dir)
    assert not list(cache_dir.rglob("*.h5"))


# ----- fit -> predict ----------------------------------------------------------------------
def test_combined_model_round_trips_fit_predict_with_each_parts_preprocessing(
        toys, tmp_path, cache_dir, model_calls):
    data = make_dataset(tmp_path / "data", per_class=10)
    outcome = api.fit(data, "logistic", backbone=PAIR, weights="random", cache_dir=cache_dir,
                      runtime="keras", progress=False, batch_size=4, out=tmp_path / "models",
                      tune=False)
    sidecar = json.loads((tmp_path / "models" / f"logistic-{PAIR}-data.json").read_text())
    assert [p["backbone"] for p in sidecar["parts"]] == ["toy_cnn", "toy_wide"]
    assert [p["preprocessing"]["input_size"] for p in sidecar["parts"]] == [32, 48]
    expected = sidecar["val_predictions"]
    files = [data / p for p in expected]
    cached = api.predict(outcome["model"], files, runtime="keras")
    assert {r["embedded_by"] for r in cached} == {"cache"}
    for part in sidecar["parts"]:  # no cache left: each part embeds the files again
        Path(part["cache"]).unlink()
    model_calls.clear()
    embedded = api.predict(outcome["model"], files, runtime="keras")
    assert all(r["embedded_by"].startswith("keras") for r in embedded)
    assert model_calls == {32: len(files), 48: len(files)}  # each part at its own size
    for rows in (cached, embedded):
        assert {r["path"]: r["label"] for r in rows} == {
            str(data / p): label for p, label in expected.items()}
    for a, b in zip(cached, embedded):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_flip_averaged_model_predicts_uncached_files_as_it_was_trained(toys, tmp_path,
                                                                       cache_dir):
    data = make_dataset(tmp_path / "data", per_class=10)
    outcome = api.fit(data, "logistic", backbone="toy_cnn", flip_average=True,
                      weights="random", cache_dir=cache_dir, runtime="keras", progress=False,
                      batch_size=4, out=tmp_path / "models", tune=False)
    assert Path(outcome["model"]).name == "logistic-toy_cnn-flip-data.skops"
    files = sorted(data.rglob("*.png"))
    cached = api.predict(outcome["model"], files, runtime="keras")
    assert {r["embedded_by"] for r in cached} == {"cache"}
    Path(outcome["cache"]).unlink()
    embedded = api.predict(outcome["model"], files, runtime="keras")
    assert all(r["embedded_by"].startswith("keras") for r in embedded)
    for a, b in zip(cached, embedded):  # a plain (not flip-averaged) embedding would differ
        assert a["label"] == b["label"]
        assert [t["score"] for t in a["top"]] == pytest.approx([t["score"] for t in b["top"]],
                                                               abs=1e-4)


def test_combined_models_refuse_export(toys, tmp_path, cache_dir):
    data = make_dataset(tmp_path / "data", per_class=6)
    outcome = api.fit(data, "logistic", backbone=PAIR, weights="random", cache_dir=cache_dir,
                      runtime="keras", progress=False, out=tmp_path / "models", tune=False)
    with pytest.raises(UsageError, match="combined backbones"):
        api.export(outcome["model"], out=tmp_path / "m.onnx")


# ----- flip-averaged embeddings ------------------------------------------------------------
def test_flip_averaging_is_the_mean_of_the_image_and_its_mirror_image():
    seen = []

    def mapper(images):
        seen.append(images.copy())
        return images.reshape(len(images), -1)[:, :4].astype(np.float32)

    images = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    out = FlipAveraging(mapper)(images)
    np.testing.assert_array_equal(seen[1], images[:, :, ::-1])
    expected = (mapper(images) + mapper(images[:, :, ::-1])) / 2
    np.testing.assert_array_equal(out, expected)


def test_flip_average_has_its_own_key_and_caches_the_mean(toys, image_folder, cache_dir):
    from featx.backbones import create_backbone
    from featx.data import load_for_model

    plain = run(image_folder, cache_dir, backbone="toy_cnn")
    flipped = run(image_folder, cache_dir, backbone="toy_cnn", flip_average=True)
    assert flipped.cache_path != plain.cache_path
    assert flipped.key == {**plain.key, "flip_average": True} and flipped.flip_average
    assert flipped.stats.n_extracted == 12  # never mixed with the plain rows
    assert "flip-averaged" in flipped.provenance()
    net = create_backbone("toy_cnn", "random", seed=42)
    pre = net.preprocessing
    images = np.stack([load_for_model(image_folder / p, pre["input_size"], pre["resize_size"],
                                      pre["interpolation"]) for p in flipped.paths])
    model = net.feature_model()
    import keras

    expected = (keras.ops.convert_to_numpy(model(images.astype("float32")))
                + keras.ops.convert_to_numpy(model(images[:, :, ::-1].astype("float32")))) / 2
    X, _ = flipped.take(np.arange(len(flipped.paths)))
    np.testing.assert_allclose(X, expected, rtol=1e-4, atol=1e-5)
    Xp, _ = plain.take(np.arange(len(plain.paths)))
    assert np.abs(X - Xp).max() > 1e-3 * np.abs(Xp).max()  # the mirror images differ


def test_flip_average_works_with_views_and_combined_backbones(toys, image_folder, cache_dir,
                                                               model_calls):
    combined = run(image_folder, cache_dir, flip_average=True, augment=1)
    assert all(p.flip_average for p in combined.parts)
    assert combined.flip_average
    n_train = len(combined.indices("train"))
    assert len(combined.indices("train", views=True)) == 2 * n_train  # one view per image
    # every image and every view went through each model twice (itself and its mirror)
    assert model_calls == {32: 2 * (12 + n_train), 48: 2 * (12 + n_train)}


def test_compare_cli_shows_each_parts_extraction_cost(toys, tmp_path, cache_dir):
    data = make_dataset(tmp_path / "data", per_class=8)
    reports = tmp_path / "reports"
    result = CliRunner().invoke(cli, [
        "compare", str(data), "-b", "toy_cnn", "-b", PAIR, "--clf", "logistic",
        "--weights", "random", "--runtime", "keras", "--cache-dir", str(cache_dir),
        "--report-dir", str(reports), "--no-progress", "--no-tune", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output.strip().splitlines()[-1])["results"]
    assert [r["backbone"] for r in rows] == ["toy_cnn", PAIR]
    single, pair = rows
    assert [p["backbone"] for p in pair["extract_parts"]] == ["toy_cnn", "toy_wide"]
    assert pair["extract_parts"][0]["seconds"] == single["extract_parts"][0]["seconds"] > 0
    report = (reports / "report.md").read_text()
    assert "extraction s" in report
    seconds = [f"{p['seconds']:.1f}" for p in pair["extract_parts"]]
    assert f"| {seconds[0]} + {seconds[1]} |" in report


def test_compare_on_a_combination_with_views_and_repeats(toys, tmp_path, cache_dir):
    data = make_dataset(tmp_path / "data", per_class=8)
    run(data, cache_dir, augment=1)
    both = api.compare(data, ("logistic",), backbones=(PAIR,), augmented="both", tune=False,
                       weights="random", cache_dir=cache_dir, runtime="keras",
                       progress=False, report_dir=tmp_path / "r1")
    plain, with_views = both["results"]
    assert with_views["clf"] == "logistic+aug"
    assert with_views["n_train"] == 2 * plain["n_train"]  # every training image and its view
    repeated = api.compare(data, ("logistic",), backbones=(PAIR,), repeats=2, tune=False,
                           weights="random", cache_dir=cache_dir, runtime="keras",
                           progress=False, report_dir=tmp_path / "r2")["repeated"]
    assert repeated[0]["backbone"] == PAIR and repeated[0]["repeats"] == 2


def test_finetune_refuses_a_combined_backbone(tmp_path):
    from featx.finetuning import finetune

    with pytest.raises(UsageError, match="fine-tuning trains one backbone"):
        finetune(tmp_path, backbone="efficientnet_lite0+efficientnet_lite1")
