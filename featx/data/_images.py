"""Reading one image file as the model sees it: decode to 8-bit RGB, resize the shorter side,
centre-crop. Only numpy and cv2 are imported.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from featx.errors import ImageDecodeError

# ----- reading images --------------------------------------------------------------
# Formats that may carry alpha or 16-bit samples, by their leading bytes. They are decoded
# with IMREAD_UNCHANGED and normalised here; everything else (JPEG above all) with
# IMREAD_COLOR, which applies the EXIF orientation and converts gray/CMYK/palette to BGR.
_UNCHANGED_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+",
                         b"GIF87a", b"GIF89a", b"BM")


_MIN_SIDE = 2


def read_image(path, *, reduced_decode: bool = False,
               resize_size: int | None = None) -> np.ndarray:
    """Read an image file as RGB.

    JPEG (and any format not listed below) is decoded with ``cv2.IMREAD_COLOR``, which
    honours the EXIF orientation and turns grayscale, palette and CMYK into 8-bit colour.
    PNG, WebP, TIFF, GIF and BMP (recognised by their first bytes, not the extension) are
    decoded unchanged, then 16-bit samples become 8-bit (``round(x / 257)``), grayscale
    becomes three channels and alpha is composited onto white. Their EXIF orientation, if
    any, is not applied.

    Parameters
    ----------
    path : str or Path
    reduced_decode : bool
        Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (``IMREAD_REDUCED_COLOR_*``,
        EXIF orientation still applied): the largest factor whose shorter side, read from
        the header by :func:`jpeg_size`, stays at least ``resize_size``. Other files, and
        JPEGs too small for a factor of 2, are decoded in full. Needs ``resize_size``.
    resize_size : int, optional
        The shorter side the image will be resized to; only used with ``reduced_decode``.

    Returns
    -------
    ndarray of uint8, shape (H, W, 3), RGB

    Raises
    ------
    ImageDecodeError
        With ``reason`` one of: ``"file not found"``, ``"cannot read file (<OS error>)"``,
        ``"empty file (0 bytes)"``, ``"truncated image"``, ``"cannot decode image (corrupt
        or unsupported format)"``, ``"image too small (WxH)"``, ``"unsupported number of
        channels (N)"``, ``"unsupported sample type (<dtype>)"``.
    ValueError
        ``reduced_decode`` without a positive ``resize_size``.
    """
    if reduced_decode and (resize_size is None or resize_size < 1):
        raise ValueError(f"reduced_decode needs a positive resize_size, got {resize_size!r}")
    data = _read_bytes(path)
    unchanged = _is_unchanged_format(data)
    if unchanged:
        flag = cv2.IMREAD_UNCHANGED
    else:
        flag = _reduced_flag(data, resize_size) if reduced_decode else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(data, flag)
    except cv2.error:
        image = None  # e.g. over OpenCV's pixel-count limit
    if image is None or image.size == 0:
        reason = ("truncated image" if _looks_truncated(data)
                  else "cannot decode image (corrupt or unsupported format)")
        raise ImageDecodeError(path, reason)
    height, width = image.shape[:2]
    if min(height, width) < _MIN_SIDE:
        raise ImageDecodeError(path, f"image too small ({width}x{height})")
    if not unchanged:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return _to_rgb8(image, path)


# libjpeg rounds scaled sizes up, so a side of n/f (real) gives at least n/f pixels.
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))


def _reduced_flag(data: np.ndarray, resize_size: int) -> int:
    """The imdecode flag for reduced decoding: the largest factor keeping >= resize_size."""
    size = jpeg_size(data)
    if size is not None:
        for factor, flag in _REDUCED_FLAGS:
            if min(size) >= factor * resize_size:
                return flag
    return cv2.IMREAD_COLOR


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive (Huffman)


_JPEG_OTHER_SOF = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length


def jpeg_size(data) -> tuple[int, int] | None:
    """(height, width) from the SOF0/SOF1/SOF2 header of a JPEG's bytes, without decoding.

    Returns None for anything else: not a JPEG, a cut-off header, a lossless or arithmetic
    coded JPEG, or a height left to a DNL marker (0). The size is before EXIF rotation.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    if n < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    i = 2
    while i + 1 < n:
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker in _JPEG_NO_LENGTH:
            i += 2
        elif marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            height = (view[i + 5] << 8) | view[i + 6]
            width = (view[i + 7] << 8) | view[i + 8]
            return (height, width) if height and width else None
        elif marker in _JPEG_OTHER_SOF or marker in (0x00, 0xD8, 0xD9, 0xDA):
            return None  # not scalable, or no SOF before the scan / image end
        elif i + 4 > n:
            return None
        else:
            length = (view[i + 2] << 8) | view[i + 3]
            if length < 2:
                return None
            i += 2 + length
    return None


def _read_bytes(path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    return data


def _is_unchanged_format(data: np.ndarray) -> bool:
    head = data[:16].tobytes()
    return head.startswith(_UNCHANGED_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _looks_truncated(data: np.ndarray) -> bool:
    """True when a file that failed to decode lacks the end its format requires.

    Only used after a failed decode: some valid JPEGs carry data after the end marker
    (e.g. motion photos), so a missing marker alone does not make a file bad.
    """
    head, tail = data[:12].tobytes(), data[-1024:].tobytes()
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in tail
    if head.startswith(b"\x89PNG"):
        return b"IEND" not in tail
    if head.startswith(b"GIF8"):
        return not tail.rstrip(b"\x00").endswith(b";")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 > data.size
    return False


def _to_rgb8(image: np.ndarray, path) -> np.ndarray:
    """An unchanged decode (gray/BGR, optional alpha, 8/16-bit or float) as RGB uint8."""
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ImageDecodeError(path, f"unsupported number of channels ({channels})")
    if channels in (2, 4):
        image = _composite_on_white(_unit_float(image, path))
    elif image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = _unit_float(image, path)
    if image.dtype != np.uint8:
        image = np.rint(image * 255.0).astype(np.uint8)
    code = cv2.COLOR_GRAY2RGB if image.shape[2] == 1 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def _unit_float(image: np.ndarray, path) -> np.ndarray:
    """Samples as float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if image.dtype.kind == "f":
        return np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
    raise ImageDecodeError(path, f"unsupported sample type ({image.dtype})")


def _composite_on_white(image: np.ndarray) -> np.ndarray:
    """``color * a + 1 * (1 - a)`` for float samples in [0, 1], alpha last."""
    color, alpha = image[:, :, :-1], image[:, :, -1:]
    return color * alpha + (1.0 - alpha)


# ----- resizing ----------------------------------------------------------------------
_INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "bilinear": cv2.INTER_LINEAR,
                   "cubic": cv2.INTER_CUBIC, "bicubic": cv2.INTER_CUBIC,
                   "nearest": cv2.INTER_NEAREST, "lanczos": cv2.INTER_LANCZOS4}


# Resized images longer than this many times resize_size are centre-cut first, so a
# 2x5000 strip does not become a 256x640000 intermediate.
_MAX_ASPECT = 4


def resize_and_crop(image: np.ndarray, size: int, resize_size: int,
                    interpolation: str = "area") -> np.ndarray:
    """Resize the shorter side to ``resize_size`` (keeping the aspect), then centre-crop.

    Parameters
    ----------
    image : ndarray of uint8, shape (H, W, 3)
    size : int
        Side of the square output.
    resize_size : int
        Shorter side after resizing; at least ``size``.
    interpolation : str
        ``"area"``: ``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_CUBIC`` when enlarging.
        Also ``"linear"``/``"bilinear"``, ``"cubic"``/``"bicubic"``, ``"nearest"``,
        ``"lanczos"``, used both ways.

    Returns
    -------
    ndarray of uint8, shape (size, size, 3), C-contiguous
    """
    if resize_size < size:
        raise ValueError(f"resize_size ({resize_size}) must be >= size ({size})")
    if interpolation != "area" and interpolation not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from "
                         f"{', '.join(['area', *_INTERPOLATIONS])}")
    height, width = image.shape[:2]
    scale = resize_size / min(height, width)
    image = _cut_long_side(image, scale, resize_size)
    height, width = image.shape[:2]
    if height <= width:
        new_h, new_w = resize_size, max(resize_size, round(width * scale))
    else:
        new_h, new_w = max(resize_size, round(height * scale)), resize_size
    if (new_h, new_w) != (height, width):
        if interpolation == "area":
            flag = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        else:
            flag = _INTERPOLATIONS[interpolation]
        image = cv2.resize(image, (new_w, new_h), interpolation=flag)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def _cut_long_side(image: np.ndarray, scale: float, resize_size: int) -> np.ndarray:
    height, width = image.shape[:2]
    keep = math.ceil(_MAX_ASPECT * resize_size / scale)
    if max(height, width) <= keep:
        return image
    if height > width:
        top = (height - keep) // 2
        return image[top:top + keep]
    left = (width - keep) // 2
    return image[:, left:left + keep]


def load_for_model(path, size: int, resize_size: int, interpolation: str = "area", *,
                   reduced_decode: bool = False) -> np.ndarray:
    """:func:`read_image` then :func:`resize_and_crop`: (size, size, 3) uint8 RGB.

    ``reduced_decode=True`` decodes large JPEGs at 1/2, 1/4 or 1/8 scale, never below
    ``resize_size`` (see :func:`read_image`): much faster, and the output differs from a
    full decode by a few grey levels, so record it with the other preprocessing settings.
    """
    image = read_image(path, reduced_decode=reduced_decode, resize_size=resize_size)
    return resize_and_crop(image, size, resize_size, interpolation)
