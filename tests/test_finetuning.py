"""Fine-tuning: trainable weights per stage, frozen BN, best-epoch checkpoint, outputs.

Training runs use a registered three-layer toy CNN: random MobileNetV2 (the TINY backbone)
has vanishing activations at 32 px, so nothing can be learned on top of it. TINY still
checks which weights each stage trains.
"""

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import TINY, TOY, class_image, make_dataset, write_image
from conftest import register_toy as _register_toy
from featx.errors import DataError, ImageDecodeError, UsageError


@pytest.fixture
def toy(monkeypatch):
    _register_toy(monkeypatch)


def _toy_net(seed=42):
    from featx.backbones import create_backbone

    return create_backbone("toy_cnn", "random", seed=seed)


# ----- shared runs (module scope: each trains once) ---------------------------------
@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """Pool layout with val and test splits, augmentation on; should learn."""
    from featx.finetuning import finetune

    tmp = tmp_path_factory.mktemp("good")
    data = make_dataset(tmp / "data", per_class=8)
    with pytest.MonkeyPatch.context() as mp:
        _register_toy(mp)
        result = finetune(data, **TOY, val_fraction=0.25, test_fraction=0.25, warmup_epochs=3,
                          epochs=2, unfreeze=4, lr_head=0.05, lr_base=1e-2, batch_size=4,
                          patience=5, out=tmp / "models", cache_dir=tmp / "cache",
                          progress=False)
    return result, data


@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory):
    """Validation labels are the opposite of training labels: val_loss rises every epoch.

    So the best epoch is the first, although both stages run; early stopping (patience 1)
    cuts each stage after one epoch without improvement.
    """
    from featx.finetuning import finetune

    tmp = tmp_path_factory.mktemp("flipped")
    data = tmp / "data"
    for label, name in enumerate(("cat", "dog")):
        for i in range(6):
            write_image(data / "train" / name / f"{i}.png", class_image(label, i))
            write_image(data / "val" / name / f"{i}.png", class_image(1 - label, 50 + i))
    with pytest.MonkeyPatch.context() as mp:
        _register_toy(mp)
        result = finetune(data, **TOY, warmup_epochs=4, epochs=4, unfreeze="all",
                          lr_head=0.05, lr_base=1e-2, batch_size=4, patience=1, augment=False,
                          out=tmp / "models", cache_dir=tmp / "cache", progress=False)
    return result, data


# ----- which weights train in each stage --------------------------------------------
def _head_and_base(net, n_classes=3):
    from featx.finetuning import build_model

    train, inference = build_model(net, n_classes)
    return train, inference, net.base_model()


def _ids(weights):
    return {id(w) for w in weights}


def test_stage1_trains_only_the_head():
    from featx.backbones import create_backbone
    from featx.finetuning import freeze_base

    net = create_backbone(TINY["backbone"], TINY["weights"], input_size=TINY["input_size"])
    train, inference, base = _head_and_base(net)
    freeze_base(base)
    pred = inference.get_layer("pred")
    assert _ids(train.trainable_weights) == _ids([pred.kernel, pred.bias])
    assert len(train.trainable_weights) == 2


@pytest.mark.parametrize("unfreeze", [20, "all"])
def test_stage2_trains_top_layers_except_batchnorm(unfreeze):
    import keras

    from featx.backbones import create_backbone
    from featx.finetuning import freeze_base, unfreeze_top

    net = create_backbone(TINY["backbone"], TINY["weights"], input_size=TINY["input_size"])
    train, inference, base = _head_and_base(net)
    freeze_base(base)
    names = unfreeze_top(base, unfreeze)
    layers = [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]
    top = layers if unfreeze == "all" else layers[-unfreeze:]
    is_bn = lambda layer: isinstance(layer, keras.layers.BatchNormalization)  # noqa: E731
    expected = [w for layer in top if not is_bn(layer) for w in layer.weights]
    pred = inference.get_layer("pred")
    assert _ids(train.trainable_weights) == _ids(expected + [pred.kernel, pred.bias])
    assert names == [layer.name for layer in top if not is_bn(layer)]
    assert all(not layer.trainable for layer in layers if is_bn(layer))
    assert any(is_bn(layer) for layer in top)  # the exclusion was exercised


def test_unfreeze_must_be_positive_or_all():
    from featx.finetuning import unfreeze_top

    for bad in (0, -3, "block7", 2.5, True):
        with pytest.raises(UsageError):
            unfreeze_top(object(), bad)


def test_batchnorm_statistics_do_not_move_in_stage2(toy):
    import keras

    from featx.finetuning._model import _compile
    from featx.finetuning import build_model, freeze_base, unfreeze_top

    net = _toy_net()
    train, inference = build_model(net, 2)
    base = net.base_model()
    freeze_base(base)
    unfreeze_top(base, 4)  # conv3 (+ conv3_bn, frozen) + relus
    _compile(train, 0.1)
    bn = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    stats_before = [np.array(v) for layer in bn for v in (layer.moving_mean,
                                                           layer.moving_variance)]
    before = {layer.name: [np.array(w) for w in layer.weights] for layer in base.layers}
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    train.fit(x, np.array([0, 1] * 4), batch_size=8, epochs=1, verbose=0)

    stats_after = [np.array(v) for layer in bn for v in (layer.moving_mean,
                                                          layer.moving_variance)]
    for a, b in zip(stats_before, stats_after):
        np.testing.assert_array_equal(a, b)
    changed = {name for name, ws in before.items()
               if any(not np.array_equal(w, np.array(v))
                      for w, v in zip(ws, base.get_layer(name).weights))}
    assert changed == {"conv3"}


# ----- the whole recipe ---------------------------------------------------------------
def test_finetune_learns_and_reports(good_run):
    result, _ = good_run
    assert result.val_accuracy == 1.0 and result.test_accuracy == 1.0
    assert result.split_counts == {"train": 8, "val": 4, "test": 4}
    assert result.split_source == "discover"
    assert result.trainable_weights == {"stage1": 2, "stage2": 4}  # head; + conv3 kernel/bias
    assert result.trainable_params == {"stage1": 32 * 2 + 2,
                                       "stage2": 32 * 2 + 2 + 3 * 3 * 16 * 32 + 32}
    assert result.stage1_epochs == 3 and result.epochs_run == 5
    assert result.recipe["augment"] == {"zoom": 0.5, "rotation": 15.0, "brightness": 0.2,
                                        "flip": True}


def test_best_epoch_is_restored_across_stages_and_saved(flipped_run):
    from featx.finetuning import image_dataset, load_finetuned

    result, data = flipped_run
    val_loss = result.history["val_loss"]
    assert result.stage1_epochs == 2 and result.epochs_run == 4  # patience 1 in each stage
    assert result.best_epoch == 1 == int(np.argmin(val_loss)) + 1
    assert val_loss[-1] > val_loss[0]

    model, metadata = load_finetuned(result.model_path)
    model.compile(loss="sparse_categorical_crossentropy")
    paths = sorted(p.relative_to(data).as_posix() for p in (data / "val").rglob("*.png"))
    labels = [0 if "/cat/" in p else 1 for p in paths]
    ds = image_dataset(data, paths, labels, metadata["preprocessing"], 4)
    loss = model.evaluate(ds.map(lambda x, y, w: (x, y)), verbose=0)
    assert loss == pytest.approx(val_loss[0], rel=1e-4)
    assert loss != pytest.approx(val_loss[result.stage1_epochs], rel=1e-3)  # stage 2's best

    with open(result.history_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["stage"]) for r in rows] == [1, 1, 2, 2]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[0]["val_loss"]) == pytest.approx(val_loss[0])
    assert not list(result.model_path.parent.glob(".*.weights.h5"))  # checkpoint cleaned up


def test_outputs_history_plot_and_sidecar(good_run):
    from featx.data import file_sha256

    result, _ = good_run
    with open(result.history_path) as f:
        rows = list(csv.DictReader(f))
    assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "stage"} <= set(rows[0])
    assert [int(r["stage"]) for r in rows] == [1] * 3 + [2] * 2
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    meta = json.loads(result.metadata_path.read_text())
    assert result.metadata_path == result.model_path.with_suffix(".json")
    assert meta["sha256"] == file_sha256(result.model_path)
    assert meta["class_names"] == ["cat", "dog"]
    assert meta["backbone"] == "toy_cnn" and meta["random_weights"] is True
    assert meta["weights_id"] == result.weights_id
    assert meta["preprocessing"]["input_size"] == 32
    assert meta["split_params"]["test_fraction"] == 0.25
    assert meta["metrics"]["val"]["accuracy"] == result.val_accuracy
    assert {"featx", "keras", "tensorflow"} <= set(meta["versions"])


def test_saved_model_predicts_deterministically_without_augmentation(good_run):
    from featx.finetuning import load_finetuned, predict_images

    result, data = good_run
    model, metadata = load_finetuned(result.model_path)
    names = {layer.name for layer in model.layers}
    assert "augmentation" not in names and {"top_dropout", "pred"} <= names
    assert model.input_shape == (None, 32, 32, 3)

    paths = sorted(data.rglob("*.png"))
    first = predict_images(model, metadata, paths, batch_size=5)
    second = predict_images(model, metadata, paths, batch_size=16)
    assert first.shape == (16, 2)
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.sum(axis=1), 1.0, rtol=1e-5)
    labels = np.array([0 if p.parent.name == "cat" else 1 for p in paths])
    assert (first.argmax(axis=1) == labels).mean() == 1.0


def test_load_finetuned_checks_the_sidecar(good_run, tmp_path):
    from featx.finetuning import load_finetuned

    result, _ = good_run
    copy = tmp_path / result.model_path.name
    shutil.copy(result.model_path, copy)
    with pytest.raises(DataError, match="metadata file"):
        load_finetuned(copy)
    shutil.copy(result.metadata_path, copy.with_suffix(".json"))
    load_finetuned(copy)
    with open(copy, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(DataError, match="sha256"):
        load_finetuned(copy)


def test_predict_images_bad_file(good_run, tmp_path):
    from featx.finetuning import load_finetuned, predict_images

    result, data = good_run
    model, metadata = load_finetuned(result.model_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = next(data.rglob("*.png"))
    probs = predict_images(model, metadata, [good, bad], on_error="nan")
    assert np.isfinite(probs[0]).all() and np.isnan(probs[1]).all()
    with pytest.raises(ImageDecodeError):
        predict_images(model, metadata, [good, bad])


def test_predict_rows_of_a_finetuned_model_say_why_a_file_was_skipped(good_run, tmp_path):
    from featx.api import predict

    result, data = good_run
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = next(data.rglob("*.png"))
    rows = predict(result.model_path, [good, bad], top_k=2)
    assert rows[0]["label"] in result.class_names and rows[0]["error"] == ""
    assert rows[1]["label"] == "" and rows[1]["score"] is None
    assert rows[1]["error"] == "cannot decode image (corrupt or unsupported format)"


def test_finetune_row_matches_compare_schema(good_run):
    from featx.classifiers import NOT_SERIALISED
    from featx.finetuning import finetune_row

    result, _ = good_run
    row = finetune_row(result, "toy_cnn", "random")
    assert row["clf"] == "finetune" and row["split"] == "test"
    # the keys of a classifier's compare row (featx.classifiers.result_dict), estimator aside
    assert {"clf", "backbone", "weights", "weights_id", "split", "n_train", "n_eval",
            "accuracy", "balanced_accuracy", "macro_f1", "fit_seconds", "predict_seconds",
            "predict_ms_per_image", "extract_seconds", "tuned", "cv_splits", "cv_score",
            "best_params", "class_weight", "seed", "class_names", "per_class",
            "confusion_matrix"} <= set(row)
    assert [c["class"] for c in row["per_class"]] == ["cat", "dog"]
    assert row["accuracy"] == result.test_accuracy
    assert np.array(row["confusion_matrix"]).sum() == 4
    assert row["best_params"]["unfreeze"] == 4 and row["fit_seconds"] > 0
    assert finetune_row(result, split="val")["accuracy"] == result.val_accuracy
    low, high = row["intervals"]["accuracy"]  # its rows were kept: intervals, ECE, McNemar
    assert low <= row["accuracy"] <= high and 0 <= row["ece"] <= 1
    assert len(row["eval_rows"]["y_pred"]) == row["n_eval"]
    json.dumps({k: v for k, v in row.items() if k not in NOT_SERIALISED})


# ----- data --------------------------------------------------------------------------
def test_split_comes_from_the_cache_when_there_is_one(toy, tmp_path):
    from featx.cache import CacheLock, FeatureCache
    from featx.extraction import extract
    from featx.cache.reconcile import resolve_split

    data = make_dataset(tmp_path / "data", per_class=5)
    net = _toy_net()
    manifest, source = resolve_split(data, net, cache_dir=tmp_path / "cache")
    assert source == "discover"

    features = extract(data, **TOY, cache_dir=tmp_path / "cache", progress=False)
    by_path = dict(zip(features.paths, features.split))
    assert [by_path[p] for p in manifest.paths] == manifest.splits.tolist()

    # A cache whose recorded split differs from a fresh one wins.
    swapped = np.where(features.split == "val", "train", "val").astype(object)
    with CacheLock(features.cache_path), FeatureCache.open_for_write(
            features.cache_path, key=features.key, dim=None, attrs={}) as cache:
        cache.rewrite_column("split", swapped)
    manifest, source = resolve_split(data, net, cache_dir=tmp_path / "cache")
    assert source == "cache"
    assert manifest.splits.tolist() == [dict(zip(features.paths, swapped))[p]
                                        for p in manifest.paths]


def test_val_pipeline_is_plain_deterministic_decoding(tmp_path):
    from featx.data import load_for_model
    from featx.finetuning import image_dataset

    data = make_dataset(tmp_path / "data", per_class=3)
    paths = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    labels = [0 if p.startswith("cat") else 1 for p in paths]
    pre = {"input_size": 32, "resize_size": 36, "interpolation": "area"}
    expected = np.stack([load_for_model(data / p, 32, 36) for p in paths]).astype("float32")

    def collect(ds):
        xs, ys, ws = zip(*[(x.numpy(), y.numpy(), w.numpy()) for x, y, w in ds])
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)

    val = image_dataset(data, paths, labels, pre, 4)
    for _ in range(2):  # cached second pass, same result
        x, y, w = collect(val)
        np.testing.assert_array_equal(x, expected)
        assert y.tolist() == labels and w.tolist() == [1.0] * len(paths)

    x, y, _ = collect(image_dataset(data, paths, labels, pre, 4, training=True, seed=1))
    order = [int(np.flatnonzero((expected == img).all(axis=(1, 2, 3)))[0]) for img in x]
    assert sorted(order) == list(range(len(paths)))  # same images, only reordered
    assert y.tolist() == [labels[i] for i in order]


def test_finetune_needs_a_validation_split(toy, tmp_path):
    from featx.finetuning import finetune

    data = make_dataset(tmp_path / "data", per_class=3)
    with pytest.raises(UsageError, match="validation"):
        finetune(data, **TOY, val_fraction=0.0, out=tmp_path / "m",
                 cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(UsageError, match="unfreeze"):
        finetune(data, **TOY, unfreeze=0, out=tmp_path / "m", progress=False)
