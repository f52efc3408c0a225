"""Tests for featx.data: discovery, splitting, hashing, decoding and resizing.

Every image is generated here with numpy + cv2 (Pillow only for CMYK JPEG, palette PNG and
GIF, which cv2 cannot write).
"""

import hashlib
import io
import logging
import os
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest

from featx import data
from featx.data import (IMAGE_EXTENSIONS, Manifest, assign_splits, discover, file_sha256,
                        hash_files, jpeg_size, load_for_model, read_image, resize_and_crop)
from featx.errors import DataError, ImageDecodeError, UsageError

CV2_MAJOR = int(cv2.__version__.split(".")[0])


# ----- helpers ---------------------------------------------------------------------
def write_image(path, image, ext=None, params=()):
    """Encode ``image`` (BGR/BGRA/gray, as cv2 expects) by its extension and write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(ext or path.suffix, image, list(params))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def tiny(seed=0, shape=(6, 5, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_pool(root, counts, ext=".png", start=0):
    """``counts``: class name -> number of images, written as root/<class>/img_<i>.png."""
    for name, n in counts.items():
        for i in range(start, start + n):
            write_image(root / name / f"img_{i:03d}{ext}", tiny(i))
    return root


def per_class(manifest, split):
    return dict(zip(manifest.class_names, manifest.counts(split).tolist()))


def split_map(manifest):
    return dict(zip(manifest.paths, manifest.splits.tolist()))


def raises_one_line(exc_type, func, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----- layouts -----------------------------------------------------------------------
def test_pool_layout(tmp_path):
    make_pool(tmp_path, {"dog": 5, "cat": 4})
    write_image(tmp_path / "cat" / "deeper" / "nested" / "x.jpg", tiny(9))

    m = discover(tmp_path)

    assert isinstance(m, Manifest)
    assert m.layout == "pool"
    assert m.root == tmp_path.resolve()
    assert m.class_names == ["cat", "dog"]
    assert m.paths == sorted(m.paths)
    assert "cat/deeper/nested/x.jpg" in m.paths
    assert all("\\" not in p and not p.startswith("/") for p in m.paths)
    assert m.labels.dtype == np.int64
    assert [m.class_names[label] for label in m.labels] == [p.split("/")[0] for p in m.paths]
    assert set(m.splits.tolist()) <= {"train", "val", "test"}
    assert m.split_params == {"val_fraction": 0.2, "test_fraction": 0.0, "seed": 42,
                              "train_per_class": None}
    assert len(m) == 10 and m.ignored == []


@pytest.mark.parametrize("val_name", ["val", "validation", "VAL", "Validation"])
@pytest.mark.parametrize("with_test", [False, True])
def test_split_layout(tmp_path, val_name, with_test):
    train = "Train" if with_test else "train"
    make_pool(tmp_path / train, {"cat": 4, "dog": 3})
    make_pool(tmp_path / val_name, {"cat": 2, "dog": 2})
    if with_test:
        make_pool(tmp_path / "TEST", {"cat": 1, "bird": 1})

    m = discover(tmp_path)

    assert m.layout == "split"
    assert m.class_names == (["bird", "cat", "dog"] if with_test else ["cat", "dog"])
    expected = {p: ("train" if p.startswith(train + "/") else
                    "val" if p.startswith(val_name + "/") else "test") for p in m.paths}
    assert split_map(m) == expected
    # labels come from the class folder, whatever the split folder
    assert all(m.class_names[label] == p.split("/")[1] for p, label in zip(m.paths, m.labels))


def test_split_layout_without_val_carves_val_from_train(tmp_path):
    make_pool(tmp_path / "train", {"cat": 10, "dog": 5})
    make_pool(tmp_path / "test", {"cat": 2, "dog": 2})

    m = discover(tmp_path, val_fraction=0.2, test_fraction=0.5)

    assert per_class(m, "val") == {"cat": 2, "dog": 1}
    assert per_class(m, "train") == {"cat": 8, "dog": 4}
    # test comes from the folder only: test_fraction does not carve train/
    assert per_class(m, "test") == {"cat": 2, "dog": 2}
    assert all(p.startswith("test/") for p in np.array(m.paths)[m.splits == "test"])


def test_split_layout_without_test_folder_carves_test_when_asked(tmp_path):
    make_pool(tmp_path / "train", {"cat": 10, "dog": 10})
    make_pool(tmp_path / "val", {"cat": 1, "dog": 1})

    m = discover(tmp_path, test_fraction=0.2)

    assert per_class(m, "test") == {"cat": 2, "dog": 2}
    assert per_class(m, "val") == {"cat": 1, "dog": 1}  # val/ folder only


def test_split_layout_ignores_other_folders_and_loose_files(tmp_path, caplog):
    make_pool(tmp_path / "train", {"cat": 2, "dog": 2})
    make_pool(tmp_path / "val", {"cat": 1, "dog": 1})
    make_pool(tmp_path / "extra", {"cat": 3})
    write_image(tmp_path / "train" / "loose.png", tiny())

    with caplog.at_level(logging.WARNING, logger="featx.data"):
        m = discover(tmp_path)

    assert not any(p.startswith("extra/") for p in m.paths)
    assert ("extra/", "not a split folder (train/, val/, validation/, test/)") in m.ignored
    assert ("train/loose.png", "not in a class folder") in m.ignored
    assert "extra/" in caplog.text


# ----- stratified splitting ----------------------------------------------------------
def test_stratified_80_20(tmp_path):
    make_pool(tmp_path, {"a": 10, "b": 25, "c": 7, "d": 2, "e": 1})

    m = discover(tmp_path, val_fraction=0.2)

    assert per_class(m, "val") == {"a": 2, "b": 5, "c": 1, "d": 1, "e": 0}
    assert per_class(m, "train") == {"a": 8, "b": 20, "c": 6, "d": 1, "e": 1}
    assert per_class(m, "test") == {"a": 0, "b": 0, "c": 0, "d": 0, "e": 0}


def test_stratified_70_15_15(tmp_path):
    make_pool(tmp_path, {"a": 20, "b": 40, "c": 10})

    m = discover(tmp_path, val_fraction=0.15, test_fraction=0.15)

    # round half up: 20 * 0.15 = 3, 40 * 0.15 = 6, 10 * 0.15 = 1.5 -> 2
    assert per_class(m, "test") == {"a": 3, "b": 6, "c": 2}
    assert per_class(m, "val") == {"a": 3, "b": 6, "c": 2}
    assert per_class(m, "train") == {"a": 14, "b": 28, "c": 6}


def test_same_seed_same_split_other_seed_differs(tmp_path):
    make_pool(tmp_path, {"a": 30, "b": 30})

    first = discover(tmp_path, seed=7, test_fraction=0.1)
    again = discover(tmp_path, seed=7, test_fraction=0.1)
    other = discover(tmp_path, seed=8, test_fraction=0.1)

    assert split_map(first) == split_map(again)
    assert split_map(first) != split_map(other)
    assert per_class(first, "val") == per_class(other, "val")


def test_split_does_not_depend_on_path_order():
    paths = [f"a/{i:02d}.png" for i in range(12)]
    labels = np.zeros(12, dtype=np.int64)
    forward = assign_splits(paths, labels, seed=3)
    backward = assign_splits(paths[::-1], labels, seed=3)
    assert forward.tolist() == backward[::-1].tolist()


def test_bad_split_parameters(tmp_path):
    make_pool(tmp_path, {"a": 3, "b": 3})
    for kwargs in ({"val_fraction": 1.0}, {"test_fraction": -0.1},
                   {"val_fraction": 0.5, "test_fraction": 0.5}, {"train_per_class": 0}):
        raises_one_line(UsageError, discover, tmp_path, **kwargs)


# ----- few-shot ---------------------------------------------------------------------
def test_few_shot_k_per_class(tmp_path, caplog):
    make_pool(tmp_path, {"a": 12, "b": 8, "c": 3})

    with caplog.at_level(logging.WARNING, logger="featx.data"):
        m = discover(tmp_path, train_per_class=4, test_fraction=0.25)

    assert per_class(m, "test") == {"a": 3, "b": 2, "c": 1}
    assert per_class(m, "train") == {"a": 4, "b": 4, "c": 1}  # c: 2 left after test
    assert per_class(m, "val") == {"a": 5, "b": 2, "c": 1}
    assert "'c'" in caplog.text
    assert m.split_params["train_per_class"] == 4


def test_few_shot_train_sets_are_nested_and_test_is_fixed(tmp_path):
    make_pool(tmp_path, {"a": 20, "b": 20})
    runs = {k: discover(tmp_path, train_per_class=k, test_fraction=0.2) for k in (1, 5, 10)}
    train = {k: set(np.array(m.paths)[m.splits == "train"]) for k, m in runs.items()}
    test = {k: set(np.array(m.paths)[m.splits == "test"]) for k, m in runs.items()}
    assert train[1] < train[5] < train[10]
    assert test[1] == test[5] == test[10]
    assert len(test[1]) == 8


def test_few_shot_split_layout_rest_of_train_goes_to_val(tmp_path):
    make_pool(tmp_path / "train", {"cat": 6, "dog": 6})
    make_pool(tmp_path / "val", {"cat": 1, "dog": 1})
    m = discover(tmp_path, train_per_class=2)
    assert per_class(m, "train") == {"cat": 2, "dog": 2}
    assert per_class(m, "val") == {"cat": 5, "dog": 5}


# ----- previous splits ---------------------------------------------------------------
def test_previous_splits_are_kept_when_files_are_added(tmp_path):
    make_pool(tmp_path, {"a": 20, "b": 15})
    before = discover(tmp_path, val_fraction=0.2, test_fraction=0.2)
    previous = split_map(before)

    make_pool(tmp_path, {"a": 5, "b": 5}, start=100)  # 10 new files
    after = discover(tmp_path, val_fraction=0.2, test_fraction=0.2, previous_splits=previous)

    now = split_map(after)
    assert len(now) == len(previous) + 10
    assert all(now[p] == s for p, s in previous.items())
    # each class ends up at the counts a fresh split would target
    fresh = discover(tmp_path, val_fraction=0.2, test_fraction=0.2)
    for split in ("train", "val", "test"):
        assert per_class(after, split) == per_class(fresh, split)
    # deterministic
    again = discover(tmp_path, val_fraction=0.2, test_fraction=0.2, previous_splits=previous)
    assert split_map(again) == now


def test_previous_splits_unchanged_data_gives_same_split(tmp_path):
    make_pool(tmp_path, {"a": 9, "b": 9})
    first = discover(tmp_path, seed=1)
    again = discover(tmp_path, seed=99, previous_splits=split_map(first))
    assert split_map(again) == split_map(first)


def test_previous_splits_do_not_override_split_folders(tmp_path):
    make_pool(tmp_path / "train", {"cat": 3, "dog": 3})
    make_pool(tmp_path / "val", {"cat": 1, "dog": 1})
    m = discover(tmp_path, previous_splits={"val/cat/img_000.png": "train",
                                            "train/cat/img_000.png": "test"})
    assert split_map(m)["val/cat/img_000.png"] == "val"
    assert split_map(m)["train/cat/img_000.png"] == "train"  # no test/ carving asked


# ----- what is ignored ---------------------------------------------------------------
def test_hidden_entries_are_skipped_silently(tmp_path, caplog):
    make_pool(tmp_path, {"a": 2, "b": 2})
    write_image(tmp_path / "a" / ".hidden.png", tiny())
    write_image(tmp_path / "a" / ".cache" / "x.png", tiny())
    write_image(tmp_path / ".thumbs" / "y.png", tiny())
    (tmp_path / ".DS_Store").write_bytes(b"x")

    with caplog.at_level(logging.WARNING, logger="featx.data"):
        m = discover(tmp_path)

    assert m.class_names == ["a", "b"]
    assert len(m) == 4
    assert m.ignored == []
    assert caplog.text == ""


def test_non_images_are_listed(tmp_path):
    make_pool(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "b" / "sub").mkdir()
    (tmp_path / "b" / "sub" / "LABELS").write_text("x")
    (tmp_path / "README.md").write_text("x")
    write_image(tmp_path / "loose.png", tiny())
    write_image(tmp_path / "b" / "UPPER.JPG", tiny(), ext=".jpg")

    m = discover(tmp_path)

    assert m.ignored == [("README.md", "not an image file (.md)"),
                         ("a/notes.txt", "not an image file (.txt)"),
                         ("b/sub/LABELS", "not an image file (no extension)"),
                         ("loose.png", "not in a class folder")]
    assert "b/UPPER.JPG" in m.paths  # extensions match case-insensitively


def test_class_without_images_is_dropped(tmp_path, caplog):
    make_pool(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "x.txt").write_text("x")

    with caplog.at_level(logging.WARNING, logger="featx.data"):
        m = discover(tmp_path)

    assert m.class_names == ["a", "b"]
    assert "empty/" in caplog.text and "texts/" in caplog.text


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"} == IMAGE_EXTENSIONS


# ----- errors ------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    path = tmp_path / "nope"
    message = raises_one_line(DataError, discover, path)
    assert str(path) in message and "does not exist" in message


def test_not_a_directory(tmp_path):
    path = write_image(tmp_path / "file.png", tiny())
    message = raises_one_line(DataError, discover, path)
    assert str(path) in message and "not a directory" in message


def test_empty_directory(tmp_path):
    message = raises_one_line(DataError, discover, tmp_path)
    assert str(tmp_path) in message and "no images found" in message


def test_only_non_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    message = raises_one_line(DataError, discover, tmp_path)
    assert str(tmp_path) in message and "no images found" in message


def test_one_class(tmp_path):
    make_pool(tmp_path, {"cat": 3})
    message = raises_one_line(DataError, discover, tmp_path)
    assert str(tmp_path) in message and "'cat'" in message and "class" in message
    assert "train/" in message  # says which layouts are expected


def test_empty_train_split(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    make_pool(tmp_path / "val", {"cat": 2, "dog": 2})
    message = raises_one_line(DataError, discover, tmp_path)
    assert str(tmp_path) in message and "train split is empty" in message


def test_split_folders_without_train(tmp_path):
    make_pool(tmp_path / "val", {"cat": 2, "dog": 2})
    make_pool(tmp_path / "test", {"cat": 2, "dog": 2})
    message = raises_one_line(DataError, discover, tmp_path)
    assert str(tmp_path) in message and "no train/" in message


# ----- hashing -----------------------------------------------------------------------
def test_file_sha256(tmp_path):
    blob = np.random.default_rng(0).bytes(3 * 1024 + 7)
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    assert file_sha256(path, chunk=1024) == hashlib.sha256(blob).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_hash_files_reuses_known_hashes_of_unchanged_files(tmp_path):
    make_pool(tmp_path, {"a": 3})
    rels = ["a/img_000.png", "a/img_001.png", "a/img_002.png", "a/missing.png"]
    hashes, stats = hash_files(tmp_path, rels, workers=2)

    assert hashes[:3] == [file_sha256(tmp_path / r) for r in rels[:3]]
    assert hashes[3] == "" and stats[3] == (-1, -1)
    st = os.stat(tmp_path / rels[0])
    assert stats[0] == (st.st_size, st.st_mtime_ns)

    # a fake hash for an unchanged file is trusted (the file is not read again) ...
    known = {r: (*s, "f" * 64) for r, s in zip(rels[:2], stats[:2])}
    # ... but not for a file whose size or mtime changed
    write_image(tmp_path / rels[1], tiny(50, (9, 9, 3)))
    again, stats2 = hash_files(tmp_path, rels, known=known)
    assert again[0] == "f" * 64
    assert again[1] == file_sha256(tmp_path / rels[1]) and stats2[1] != stats[1]
    assert again[2] == hashes[2]


# ----- reading images ----------------------------------------------------------------
def decode_error(path):
    with pytest.raises(ImageDecodeError) as info:
        read_image(path)
    assert isinstance(info.value, DataError)
    assert info.value.path == str(path)
    return info.value.reason


def gradient_bgr(h=48, w=64):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def test_read_jpeg_is_rgb(tmp_path):
    bgr = np.zeros((16, 24, 3), np.uint8)
    bgr[:, :, 2] = 220  # red in BGR
    image = read_image(write_image(tmp_path / "red.jpg", bgr))
    assert image.shape == (16, 24, 3) and image.dtype == np.uint8
    assert image[..., 0].min() > 200 and image[..., 2].max() < 30


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert decode_error(path) == "empty file (0 bytes)"


def test_missing_file_and_folder(tmp_path):
    assert decode_error(tmp_path / "gone.jpg") == "file not found"
    (tmp_path / "dir.jpg").mkdir()
    assert decode_error(tmp_path / "dir.jpg").startswith("cannot read file (")


def test_random_bytes_named_jpg(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    assert decode_error(path) == "cannot decode image (corrupt or unsupported format)"


@pytest.mark.parametrize("keep", [0.5, 0.95, "no end marker"])
def test_truncated_jpeg(tmp_path, keep):
    whole = cv2.imencode(".jpg", gradient_bgr(96, 128))[1].tobytes()
    cut = whole[:-2] if keep == "no end marker" else whole[: int(len(whole) * keep)]
    path = tmp_path / "cut.jpg"
    path.write_bytes(cut)
    try:
        image = read_image(path)
    except ImageDecodeError as exc:
        assert exc.reason == "truncated image"
    else:  # OpenCV 4 decodes what is there and fills the rest with grey
        assert CV2_MAJOR < 5 and image.shape == (96, 128, 3)
    if CV2_MAJOR >= 5:
        assert decode_error(path) == "truncated image"


def test_truncated_png(tmp_path):
    whole = cv2.imencode(".png", gradient_bgr())[1].tobytes()
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) // 2])
    assert decode_error(path) == "truncated image"


@pytest.mark.parametrize("shape, size", [((1, 1, 3), "1x1"), ((1, 7, 3), "7x1"),
                                         ((5, 1, 3), "1x5")])
def test_degenerate_sizes(tmp_path, shape, size):
    path = write_image(tmp_path / "small.png", tiny(0, shape))
    assert decode_error(path) == f"image too small ({size})"
    assert read_image(write_image(tmp_path / "ok.png", tiny(0, (2, 2, 3)))).shape == (2, 2, 3)


def expected_on_white(bgra):
    color = bgra[..., :3][..., ::-1].astype(np.float64)
    alpha = bgra[..., 3:].astype(np.float64) / 255
    return np.rint(color * alpha + 255 * (1 - alpha)).astype(np.uint8)


@pytest.mark.parametrize("ext, params", [(".png", ()),
                                         (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101))])
def test_alpha_is_composited_on_white(tmp_path, ext, params):
    bgra = np.zeros((4, 6, 4), np.uint8)
    bgra[..., :3] = (30, 60, 200)
    bgra[..., 3] = np.array([0, 51, 128, 200, 254, 255], np.uint8)
    image = read_image(write_image(tmp_path / f"rgba{ext}", bgra, params=params))
    np.testing.assert_array_equal(image, expected_on_white(bgra))
    assert image[0, 0].tolist() == [255, 255, 255]
    assert image[0, 5].tolist() == [200, 60, 30]


def test_16_bit_png_is_scaled(tmp_path):
    values = np.array([0, 128, 129, 257 * 100, 257 * 100 + 128, 65535], np.uint16)
    bgr16 = np.repeat(np.tile(values, (2, 1))[..., None], 3, axis=2)
    bgr16[..., 0] = 65535  # blue channel: checks the channel order too
    image = read_image(write_image(tmp_path / "deep.png", bgr16))
    assert image.dtype == np.uint8
    assert image[0, :, 0].tolist() == [0, 0, 1, 100, 100, 255]
    assert image[0, :, 2].tolist() == [255] * 6


def test_16_bit_png_with_alpha(tmp_path):
    bgra16 = np.zeros((2, 2, 4), np.uint16)
    bgra16[..., 2] = 65535
    bgra16[..., 3] = [[0, 65535], [32768, 65535]]
    image = read_image(write_image(tmp_path / "deep_alpha.png", bgra16))
    assert image[0, 0].tolist() == [255, 255, 255]
    assert image[0, 1].tolist() == [255, 0, 0]
    assert image[1, 0].tolist() == [255, 127, 127]


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_grayscale(tmp_path, ext):
    gray = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (8, 1))
    image = read_image(write_image(tmp_path / f"gray{ext}", gray))
    assert image.shape == (8, 24, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert np.abs(image[..., 0].astype(int) - gray).max() <= (0 if ext == ".png" else 6)


def jpeg_with_orientation(bgr, orientation):
    """A JPEG with a hand-written EXIF APP1 segment holding only the orientation tag."""
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)  # tag, SHORT, count, value
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + b"\0" * 4
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    at = 2
    if jpeg[2:4] == b"\xff\xe0":  # keep JFIF's APP0 first
        at = 4 + struct.unpack(">H", jpeg[4:6])[0]
    return jpeg[:at] + app1 + jpeg[at:]


def test_exif_orientation_is_honoured(tmp_path):
    bgr = np.full((20, 40, 3), 255, np.uint8)
    bgr[:10, :10] = (0, 0, 255)  # red block top-left (BGR)
    upright = tmp_path / "o1.jpg"
    upright.write_bytes(jpeg_with_orientation(bgr, 1))
    rotated = tmp_path / "o6.jpg"
    rotated.write_bytes(jpeg_with_orientation(bgr, 6))

    assert read_image(upright).shape == (20, 40, 3)
    image = read_image(rotated)
    assert image.shape == (40, 20, 3)  # orientation 6: rotate 90 degrees clockwise
    assert image[2:8, -8:-2, 0].min() > 200 and image[2:8, -8:-2, 1].max() < 60  # red top-right
    assert image[2:8, 2:8].min() > 200  # white top-left


def test_cmyk_jpeg(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:] = (200, 100, 50)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(buf.getvalue())
    image = read_image(path)
    assert image.shape == (8, 8, 3)
    assert np.abs(image.astype(int) - rgb).max() <= 4


def palette_image(Image):
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    img.putdata([0, 1, 2, 1, 2, 1, 0, 0])
    return img


def test_palette_png(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    img = palette_image(Image)
    img.save(tmp_path / "p.png")
    img.save(tmp_path / "p_trns.png", transparency=0)

    image = read_image(tmp_path / "p.png")
    assert image[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 0]]
    transparent = read_image(tmp_path / "p_trns.png")
    assert transparent[0].tolist() == [[255, 255, 255], [0, 255, 0], [0, 0, 255], [0, 255, 0]]


def test_gif_with_transparency(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    palette_image(Image).save(tmp_path / "p.gif", transparency=0)
    image = read_image(tmp_path / "p.gif")
    assert image[0].tolist() == [[255, 255, 255], [0, 255, 0], [0, 0, 255], [0, 255, 0]]


def test_format_is_sniffed_not_taken_from_extension(tmp_path):
    bgra = np.zeros((3, 3, 4), np.uint8)  # fully transparent PNG named .jpg
    path = tmp_path / "alpha.jpg"
    path.write_bytes(cv2.imencode(".png", bgra)[1].tobytes())
    assert (read_image(path) == 255).all()


# ----- resizing ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(300, 400, 3), (400, 300, 3), (256, 256, 3), (3, 2, 3),
                                   (224, 224, 3), (2, 600, 3), (1000, 2, 3)])
def test_resize_and_crop_shapes(shape):
    image = tiny(1, shape)
    out = resize_and_crop(image, 224, 256)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


def test_resize_and_crop_takes_the_centre():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255  # white centre third
    out = resize_and_crop(image, 50, 50)
    assert out.shape == (50, 50, 3) and (out == 255).all()
    portrait = np.ascontiguousarray(image.transpose(1, 0, 2))
    assert (resize_and_crop(portrait, 50, 50) == 255).all()


def test_resize_and_crop_interpolation(monkeypatch):
    calls = []
    real = cv2.resize

    def spy(img, dsize, interpolation):
        calls.append(interpolation)
        return real(img, dsize, interpolation=interpolation)

    monkeypatch.setattr(data._images.cv2, "resize", spy)
    resize_and_crop(tiny(0, (300, 500, 3)), 32, 40)
    resize_and_crop(tiny(0, (10, 20, 3)), 32, 40)
    resize_and_crop(tiny(0, (10, 20, 3)), 32, 40, interpolation="bilinear")
    assert calls == [cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LINEAR]
    calls.clear()
    resize_and_crop(tiny(0, (40, 60, 3)), 32, 40)  # shorter side already 40: no resize
    assert calls == []


def test_resize_and_crop_bad_arguments():
    with pytest.raises(ValueError):
        resize_and_crop(tiny(), 224, 200)
    with pytest.raises(ValueError):
        resize_and_crop(tiny(), 8, 8, interpolation="fancy")


def test_load_for_model(tmp_path):
    path = write_image(tmp_path / "x.jpg", gradient_bgr(60, 90))
    out = load_for_model(path, 32, 36)
    np.testing.assert_array_equal(out, resize_and_crop(read_image(path), 32, 36))
    assert out.shape == (32, 32, 3)


# ----- JPEG header and reduced decoding ---------------------------------------------
def jpeg_bytes(bgr, progressive=False):
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])[1].tobytes()


def photo_like(h, w, seed=0):
    """Smooth random colour blobs plus a little noise: compresses and shrinks like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("shape", [(37, 53, 3), (53, 37), (1, 1, 3), (600, 800, 3)])
def test_jpeg_size(progressive, shape):
    jpeg = jpeg_bytes(tiny(2, shape), progressive)
    assert jpeg_size(jpeg) == shape[:2]
    assert jpeg_size(np.frombuffer(jpeg, np.uint8)) == shape[:2]


def test_jpeg_size_skips_exif_and_is_before_rotation():
    jpeg = jpeg_with_orientation(tiny(3, (20, 40, 3)), 6)
    assert jpeg_size(jpeg) == (20, 40)


@pytest.mark.parametrize("blob", [
    b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff\xd9", b"GIF89a" + b"\0" * 20,
    cv2.imencode(".png", tiny())[1].tobytes(), cv2.imencode(".bmp", tiny())[1].tobytes(),
    np.random.default_rng(0).bytes(2000), b"\xff\xd8" + np.random.default_rng(1).bytes(500),
    b"\xff\xd8\xff\xe0\x00\x01" + b"\0" * 20,  # segment length below 2
])
def test_jpeg_size_of_other_bytes_is_none(blob):
    assert jpeg_size(blob) is None


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_size_of_truncated_header_is_none(progressive):
    whole = jpeg_with_orientation(tiny(4, (30, 50, 3)), 3)
    if progressive:
        whole = jpeg_bytes(tiny(4, (30, 50, 3)), True)
    sof_end = whole.index(b"\xff\xc2" if progressive else b"\xff\xc0") + 9
    for cut in range(sof_end):
        assert jpeg_size(whole[:cut]) is None, cut
    assert jpeg_size(whole[:sof_end]) == (30, 50)


@pytest.mark.parametrize("resize_size, shape", [(75, (75, 100)), (76, (150, 200)),
                                                (150, (150, 200)), (256, (300, 400)),
                                                (300, (300, 400)), (301, (600, 800))])
def test_reduced_decode_picks_the_largest_factor(tmp_path, resize_size, shape):
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes(photo_like(600, 800)))
    image = read_image(path, reduced_decode=True, resize_size=resize_size)
    assert image.shape == (*shape, 3)
    assert read_image(path, resize_size=resize_size).shape == (600, 800, 3)  # off by default


@pytest.mark.parametrize("progressive", [False, True])
def test_reduced_decode_is_close_to_full_decode(tmp_path, progressive):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(photo_like(1200, 1600), progressive))
    assert read_image(path, reduced_decode=True, resize_size=256).shape == (300, 400, 3)
    full = load_for_model(path, 224, 256)
    reduced = load_for_model(path, 224, 256, reduced_decode=True)
    assert reduced.shape == full.shape == (224, 224, 3) and reduced.dtype == np.uint8
    diff = np.abs(full.astype(int) - reduced)
    assert diff.mean() < 1.0 and diff.max() <= 10  # measured: mean 0.62, max 4


def test_reduced_decode_not_used_when_the_source_is_too_small(tmp_path, monkeypatch):
    flags = []
    real = cv2.imdecode
    monkeypatch.setattr(data._images.cv2, "imdecode",
                        lambda buf, flag: flags.append(flag) or real(buf, flag))
    small = write_image(tmp_path / "small.jpg", photo_like(511, 700))  # 511 < 2 * 256
    png = write_image(tmp_path / "big.png", photo_like(1200, 1600))
    for path in (small, png):
        np.testing.assert_array_equal(load_for_model(path, 224, 256, reduced_decode=True),
                                      load_for_model(path, 224, 256))
    assert flags == [cv2.IMREAD_COLOR] * 2 + [cv2.IMREAD_UNCHANGED] * 2


def test_reduced_decode_honours_exif_orientation(tmp_path):
    bgr = np.full((200, 400, 3), 255, np.uint8)
    bgr[:100, :100] = (0, 0, 255)  # red block top-left (BGR)
    path = tmp_path / "o6.jpg"
    path.write_bytes(jpeg_with_orientation(bgr, 6))
    image = read_image(path, reduced_decode=True, resize_size=50)
    assert image.shape == (100, 50, 3)  # 1/4 scale, then rotated 90 degrees clockwise
    assert image[2:20, -20:-2, 0].min() > 200 and image[2:20, -20:-2, 1].max() < 60  # red
    assert image[2:20, 2:20].min() > 200  # white top-left


def test_reduced_decode_needs_resize_size(tmp_path):
    path = write_image(tmp_path / "x.jpg", gradient_bgr())
    for resize_size in (None, 0):
        with pytest.raises(ValueError):
            read_image(path, reduced_decode=True, resize_size=resize_size)


# ----- import cost -------------------------------------------------------------------
def test_import_is_light():
    code = ("import sys, featx.data; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "[]"


def test_symlink_loops_are_followed_once(tmp_path):
    make_pool(tmp_path, {"a": 2, "b": 2})
    try:
        (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    except OSError:
        pytest.skip("symlinks not supported here")
    m = discover(tmp_path)
    assert m.counts().tolist() == [2, 2]
