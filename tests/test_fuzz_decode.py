"""Fuzzed decoding (issue 28): random bytes, truncated and bit-flipped files of every format
featx reads, unusual modes, every EXIF orientation, and headers that declare huge images.

Every input gives either an RGB uint8 image of the right shape or one ImageDecodeError whose
message is one line starting with the file's path; any other exception fails the test. Images
over the decompression-bomb limit are refused from their header, before any decoder runs.
"""

import io
import struct
import tracemalloc
import zlib
from functools import cache

import cv2
import numpy as np
import pytest
from fuzz_settings import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from featx.data import (MAX_IMAGE_PIXELS, _images, declared_size, load_for_model,
                        max_image_pixels, read_image)
from featx.errors import ImageDecodeError, UsageError

Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")

SIZE, RESIZE = 32, 36


def decoded_or_refused(path, **kwargs):
    """``load_for_model``'s image, or None for the one refusal allowed: an ImageDecodeError
    whose message is one line naming the file."""
    try:
        image = load_for_model(path, SIZE, RESIZE, **kwargs)
    except ImageDecodeError as error:
        assert str(error).startswith(f"{path}: ") and error.reason
        assert "\n" not in str(error) and "\r" not in str(error)
        return None
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    return image


def refusal(path) -> str:
    with pytest.raises(ImageDecodeError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: {info.value.reason}"
    return info.value.reason


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if OpenCV is asked to decode anything."""
    def refuse(*args):
        raise AssertionError("cv2.imdecode ran on a file featx had to refuse unread")

    monkeypatch.setattr(_images.cv2, "imdecode", refuse)


# ----- the seeds: one small image in every format and mode featx reads --------------------
def picture(h=24, w=32) -> np.ndarray:
    """RGB with a different colour in each corner, so that a wrong orientation shows."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, 255 - (x + y) * 255 // (w + h)], -1)
    return rgb.astype(np.uint8)


def alpha_mask(h=24, w=32) -> np.ndarray:
    return (np.arange(w)[None, :].repeat(h, 0) * 255 // (w - 1)).astype(np.uint8)


def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def pil_bytes(image, fmt, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def bgr_bytes(ext, array) -> bytes:
    return cv2.imencode(ext, array)[1].tobytes()


@cache
def seeds() -> dict:
    """name -> (file bytes, the RGB image featx should read, the largest mean difference
    its lossy encoding allows)."""
    rgb, alpha = picture(), alpha_mask()
    pil = Image.fromarray(rgb)
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    gray = np.asarray(pil.convert("L"))
    palette = pil.quantize(16)
    palette_rgb = np.asarray(palette.convert("RGB"))
    index0 = np.asarray(palette) == 0
    frames = [Image.fromarray(np.roll(rgb, 8 * k, axis=1)) for k in range(3)]
    gif_frames = [frame.quantize(64) for frame in frames]
    deep = rgb.astype(np.uint16) * 257
    made = {
        "jpeg": (pil_bytes(pil, "JPEG", quality=95), rgb, 4),
        "jpeg_progressive": (pil_bytes(pil, "JPEG", quality=95, progressive=True), rgb, 4),
        "jpeg_cmyk": (pil_bytes(pil.convert("CMYK"), "JPEG", quality=95), rgb, 4),
        "png": (pil_bytes(pil, "PNG"), rgb, 0),
        "png_16bit": (bgr_bytes(".png", deep[..., ::-1]), rgb, 0),
        "png_rgba": (pil_bytes(rgba, "PNG"), on_white(rgb, alpha), 0),
        "png_palette_trns": (pil_bytes(palette, "PNG", transparency=0),
                             np.where(index0[..., None], 255, palette_rgb), 0),
        "png_gray_alpha": (pil_bytes(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"),
                           np.repeat(on_white(gray[..., None], alpha), 3, axis=2), 0),
        "gif": (pil_bytes(palette, "GIF"), palette_rgb, 0),
        "gif_animated": (pil_bytes(gif_frames[0], "GIF", save_all=True,
                                   append_images=gif_frames[1:], duration=40, loop=0),
                         np.asarray(gif_frames[0].convert("RGB")), 0),
        "bmp": (pil_bytes(pil, "BMP"), rgb, 0),
        "webp": (pil_bytes(pil, "WEBP", quality=95), rgb, 4),
        "webp_lossless": (pil_bytes(pil, "WEBP", lossless=True), rgb, 0),
        "webp_animated": (pil_bytes(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                                    lossless=True, duration=40), rgb, 0),
        "tiff": (pil_bytes(pil, "TIFF"), rgb, 0),
        "tiff_lzw": (pil_bytes(pil, "TIFF", compression="tiff_lzw"), rgb, 0),
        "tiff_16bit": (bgr_bytes(".tif", deep[..., ::-1]), rgb, 0),
        "tiff_cmyk": (pil_bytes(pil.convert("CMYK"), "TIFF"), rgb, 1),
        "tiff_big": (pil_bytes(pil, "TIFF", big_tiff=True), rgb, 0),
    }
    made["jpeg_exif"] = (with_orientation(made["jpeg"][0], 1), rgb, 4)
    return made


def with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF APP1 segment holding its orientation tag, after JFIF's APP0."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + entry + b"\0" * 4
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    at = 4 + struct.unpack(">H", jpeg[4:6])[0] if jpeg[2:4] == b"\xff\xe0" else 2
    return jpeg[:at] + app1 + jpeg[at:]


@pytest.mark.parametrize("name", sorted(seeds()))
def test_every_seed_reads_as_its_picture(tmp_path, name):
    data, expected, tolerance = seeds()[name]
    path = tmp_path / name
    path.write_bytes(data)
    image = read_image(path)
    assert image.shape == expected.shape and image.dtype == np.uint8
    assert np.abs(image.astype(int) - expected).mean() <= max(tolerance, 0.5), name
    assert decoded_or_refused(path) is not None


# ----- random bytes and damaged files ------------------------------------------------------
SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM",
              b"RIFF\x00\x01\x00\x00WEBPVP8 ", b"RIFF\x00\x01\x00\x00WEBPVP8L",
              b"RIFF\x00\x01\x00\x00WEBPVP8X", b"II*\x00", b"MM\x00*", b"II+\x00"]


@fuzz_settings(150)
@given(head=st.sampled_from([b""] + SIGNATURES), body=st.binary(max_size=3000))
def test_random_bytes(tmp_path, head, body):
    path = tmp_path / "random.jpg"
    path.write_bytes(head + body)
    if head + body:
        decoded_or_refused(path)
    else:
        assert refusal(path) == "empty file (0 bytes)"


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` cut short, or with bits flipped: anywhere, or in its first 200 bytes (the
    headers), then perhaps cut too."""
    if draw(st.booleans()):
        return data[:draw(st.integers(1, len(data) - 1))]
    damaged_data = bytearray(data)
    reach = draw(st.sampled_from([len(data), min(len(data), 200)]))
    for at, bit in draw(st.lists(st.tuples(st.integers(0, reach - 1), st.integers(0, 7)),
                                 min_size=1, max_size=8)):
        damaged_data[at] ^= 1 << bit
    if draw(st.booleans()):
        damaged_data = damaged_data[:draw(st.integers(1, len(damaged_data)))]
    return bytes(damaged_data)


@pytest.mark.parametrize("name", sorted(seeds()))
@fuzz_settings(12)
@given(data=st.data())
def test_truncated_and_bit_flipped(tmp_path, name, data):
    path = tmp_path / f"damaged-{name}"
    path.write_bytes(data.draw(damaged(seeds()[name][0])))
    decoded_or_refused(path)
    decoded_or_refused(path, reduced_decode=True)


# ----- EXIF orientation -------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
@fuzz_settings(2)
@given(h=st.integers(8, 40), w=st.integers(8, 40))
def test_every_exif_orientation(tmp_path, orientation, h, w):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(pil_bytes(Image.fromarray(picture(h, w)), "JPEG", quality=95, exif=exif))
    image = read_image(path)
    assert image.shape == ((w, h, 3) if orientation >= 5 else (h, w, 3))
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert np.abs(image.astype(int) - shown).mean() < 2  # Pillow's reading of the same tag
    assert decoded_or_refused(path) is not None


# ----- headers that declare huge images ----------------------------------------------------
def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def sized_png(w, h):
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        png_chunk(b"IEND", b"")


def sized_jpeg(w, h, marker=0xC0, junk=b""):
    data = bytearray(pil_bytes(Image.fromarray(picture(16, 16)), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 1] = marker
    data[at + 5:at + 9] = struct.pack(">HH", h, w)
    return b"\xff\xd8" + junk + bytes(data[2:])


def sized_gif(w, h):
    data = bytearray(pil_bytes(Image.fromarray(picture(16, 16)).quantize(4), "GIF"))
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def sized_bmp(w, h, core=False):
    if core:  # OS/2 BITMAPCOREHEADER
        return b"BM" + struct.pack("<IHHI", 26 + 64, 0, 0, 26) + \
            struct.pack("<IHHHH", 12, w, h, 1, 24) + b"\0" * 64
    data = bytearray(pil_bytes(Image.fromarray(picture(16, 16)), "BMP"))
    data[18:26] = struct.pack("<ii", w, -h)  # top-down rows
    return bytes(data)


def sized_webp(w, h, chunk="VP8X"):
    if chunk == "VP8X":
        body = b"\x10\0\0\0" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
        return b"RIFF" + struct.pack("<I", 4 + 18 + 64) + b"WEBPVP8X" + \
            struct.pack("<I", 10) + body + b"\0" * 64
    data = bytearray(pil_bytes(Image.fromarray(picture(16, 16)), "WEBP",
                               lossless=chunk == "VP8L"))
    assert data[12:16].decode() == chunk.ljust(4)
    if chunk == "VP8L":
        bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
        data[21:25] = struct.pack("<I", bits | (w - 1) | (h - 1) << 14)
    else:
        data[26:30] = struct.pack("<HH", w, h)
    return bytes(data)


def sized_tiff(w, h, order="<", big=False):
    """A minimal TIFF: one directory holding ImageWidth and ImageLength as LONGs."""
    if big:
        head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HHHQ", 43, 8, 0, 16)
        entries = b"".join(struct.pack(order + "HHQQ", tag, 4, 1, value)
                           for tag, value in ((256, w), (257, h)))
        return head + struct.pack(order + "Q", 2) + entries + b"\0" * 8
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8)
    entries = b"".join(struct.pack(order + "HHII", tag, 4, 1, value)
                       for tag, value in ((256, w), (257, h)))
    return head + struct.pack(order + "H", 2) + entries + b"\0" * 4


SIZED = {"png": sized_png, "jpeg_baseline": sized_jpeg,
         "jpeg_lossless": lambda w, h: sized_jpeg(w, h, 0xC3),
         "jpeg_arithmetic": lambda w, h: sized_jpeg(w, h, 0xC9),
         # libjpeg skips bytes before a marker, and so must the header's reader
         "jpeg_after_junk": lambda w, h: sized_jpeg(w, h, junk=b"\xff\x00junk\xff"),
         "gif": sized_gif,
         "bmp": sized_bmp, "bmp_os2": lambda w, h: sized_bmp(w, h, core=True),
         "webp_vp8x": sized_webp, "webp_vp8l": lambda w, h: sized_webp(w, h, "VP8L"),
         "webp_vp8": lambda w, h: sized_webp(w, h, "VP8 "), "tiff": sized_tiff,
         "tiff_big_endian": lambda w, h: sized_tiff(w, h, ">"),
         "bigtiff": lambda w, h: sized_tiff(w, h, big=True)}
# the largest sides each header can hold
MAX_SIDE = {"png": 2 ** 31 - 1, "gif": 65535, "bmp": 2 ** 31 - 1, "bmp_os2": 65535,
            "webp_vp8x": 2 ** 24, "webp_vp8l": 16384, "webp_vp8": 16383, "tiff": 2 ** 32 - 1,
            "tiff_big_endian": 2 ** 32 - 1, "bigtiff": 2 ** 32 - 1}


def max_side(kind):
    return MAX_SIDE.get(kind, 65535)  # JPEG: 16-bit sides


@pytest.mark.parametrize("kind", sorted(SIZED))
@fuzz_settings(6)
@given(data=st.data())
def test_declared_size_is_read_from_the_header(kind, data):
    side = st.integers(1, max_side(kind))
    w, h = data.draw(side), data.draw(side)
    assert declared_size(SIZED[kind](w, h)) == (w, h)


# a VP8 or VP8L frame holds at most 16384 x 16384 pixels: never over the limit
@pytest.mark.parametrize("kind", sorted(k for k in SIZED if max_side(k) ** 2 > MAX_IMAGE_PIXELS))
def test_huge_declared_images_are_refused_before_decoding(tmp_path, kind, no_decoding):
    side = max_side(kind)
    path = tmp_path / f"huge-{kind}"
    path.write_bytes(SIZED[kind](side, side))
    assert refusal(path) == (f"image too large: {side} x {side} = {side * side:,} pixels, "
                             f"over the limit of {MAX_IMAGE_PIXELS:,} (FEATX_MAX_IMAGE_PIXELS)")
    assert decoded_or_refused(path) is None


@pytest.mark.parametrize("kind", sorted(SIZED))
@fuzz_settings(6)
@given(data=st.data())
def test_the_limit_is_the_declared_pixel_count(tmp_path, monkeypatch, kind, data):
    """Under a limit of ``limit`` pixels, a header declaring more is refused unread, one
    declaring at most that reaches the decoder."""
    limit = data.draw(st.integers(4, 4096))
    side = st.integers(1, min(max_side(kind), 8192))
    w, h = data.draw(side), data.draw(side)
    monkeypatch.setenv("FEATX_MAX_IMAGE_PIXELS", str(limit))
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(_images.cv2, "imdecode", lambda *a: calls.append(1) or real(*a))
    path = tmp_path / f"sized-{kind}"
    path.write_bytes(SIZED[kind](w, h))
    decoded_or_refused(path)
    assert bool(calls) == (w * h <= limit)
    if w * h > limit:
        assert refusal(path).startswith(f"image too large: {w} x {h} = {w * h:,} pixels")


@pytest.mark.parametrize("header", [b"P6 30000 30000 255\n", b"\x00\x00\x00\x0cjP  \r\n\x87\n",
                                    b"#?RADIANCE\n-Y 30000 +X 30000\n", b"\x59\xa6\x6a\x95"])
def test_formats_whose_size_is_not_read_are_not_decoded(tmp_path, header, no_decoding):
    """PNM, JPEG 2000, Radiance HDR and Sun raster: OpenCV reads them, featx does not."""
    path = tmp_path / "other.jpg"
    path.write_bytes(header + b"\0" * 256)
    assert refusal(path) == "cannot decode image (corrupt or unsupported format)"


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("FEATX_MAX_IMAGE_PIXELS", raising=False)
    assert max_image_pixels() == MAX_IMAGE_PIXELS == 2 ** 28
    monkeypatch.setenv("FEATX_MAX_IMAGE_PIXELS", " 1000000000 ")
    assert max_image_pixels() == 10 ** 9
    for bad in ("0", "-5", "1e9", "lots", "9" * 40):
        monkeypatch.setenv("FEATX_MAX_IMAGE_PIXELS", bad)
        with pytest.raises(UsageError, match="FEATX_MAX_IMAGE_PIXELS"):
            max_image_pixels()


# ----- memory under the limit --------------------------------------------------------------
def decode_peak(path) -> int:
    """The most memory (bytes) numpy and OpenCV held at once while featx read ``path``."""
    tracemalloc.start()
    try:
        read_image(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_8_bit_colour_is_converted_in_place(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(pil_bytes(Image.fromarray(picture(1024, 2048)), "JPEG"))
    pixels = 1024 * 2048
    assert decode_peak(path) < 3 * pixels + path.stat().st_size + (1 << 20)


def test_deep_images_are_converted_in_strips(tmp_path):
    """A 16-bit RGBA image costs its 8 decoded bytes a pixel, the 3-byte result and one
    strip's buffers, not the 40 bytes a pixel of float copies of the whole image."""
    h, w = 1024, 2048
    rgba16 = np.dstack([picture(h, w), alpha_mask(h, w)]).astype(np.uint16) * 257
    path = tmp_path / "deep.png"
    path.write_bytes(cv2.imencode(".png", rgba16, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1])
    strip_buffers = 64 * _images._STRIP_PIXELS
    assert decode_peak(path) < (8 + 3) * h * w + path.stat().st_size + strip_buffers
