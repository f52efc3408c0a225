"""Reading one image file as the model sees it: decode to 8-bit RGB, resize the shorter side,
centre-crop. Only numpy and cv2 are imported.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

from featx.errors import ImageDecodeError, UsageError

from ._headers import declared_size, jpeg_size

# ----- reading images --------------------------------------------------------------
# Of the six formats read, all but JPEG may carry alpha or 16-bit samples: they are decoded
# with IMREAD_UNCHANGED and normalised here; JPEG with IMREAD_COLOR, which applies the EXIF
# orientation and converts gray and CMYK to BGR.
_JPEG_SIGNATURE = b"\xff\xd8"


_MIN_SIDE = 2


# ----- the decompression-bomb limit ----------------------------------------------------
# 2**28 = 16384 x 16384 pixels: above the largest camera photos (about 200 MP), and 1.5 times
# the size at which Pillow refuses an image (2 x its MAX_IMAGE_PIXELS of 89,478,485). A few
# hundred bytes can declare any size, and decoders allocate what the header declares.
MAX_IMAGE_PIXELS = 2 ** 28


def max_image_pixels() -> int:
    """The largest image, in pixels (width x height), that featx decodes.

    ``FEATX_MAX_IMAGE_PIXELS`` when set (to raise it for very large scans or panoramas),
    else :data:`MAX_IMAGE_PIXELS`. Raises :class:`~featx.errors.UsageError` for a value
    that is not a positive whole number. Above 2**30 pixels OpenCV's own limit,
    ``OPENCV_IO_MAX_IMAGE_PIXELS`` (read when cv2 is imported), refuses images as well.
    """
    value = os.environ.get("FEATX_MAX_IMAGE_PIXELS", "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(value) if len(value) < 30 else 0
    except ValueError:
        limit = 0
    if limit < 1:
        raise UsageError(f"FEATX_MAX_IMAGE_PIXELS={value[:40]!r}: expected a positive whole "
                         "number of pixels")
    return limit


def read_image(path, *, reduced_decode: bool = False,
               resize_size: int | None = None) -> np.ndarray:
    """Read an image file as RGB.

    JPEG, PNG, GIF, BMP, WebP and TIFF are read, recognised by their first bytes, not the
    extension; anything else is refused unread. Before any decoding, the size the file's
    header declares is checked against :func:`max_image_pixels` (``FEATX_MAX_IMAGE_PIXELS``,
    default 2**28): a larger image, or a header whose size cannot be read, is refused, so a
    small file cannot make the decoder allocate gigabytes (a decompression bomb).

    JPEG is decoded with ``cv2.IMREAD_COLOR``, which honours the EXIF orientation and turns
    grayscale and CMYK into 8-bit colour. PNG, WebP, TIFF, GIF and BMP are decoded
    unchanged, then 16-bit samples become 8-bit (``round(x / 257)``), grayscale becomes
    three channels and alpha is composited onto white. Their EXIF orientation, if any, is
    not applied.

    Memory: an image just under the limit costs what the decoder holds, 3 bytes a pixel
    for 8-bit colour (converted to RGB in place), 8 for 16-bit RGBA and for GIF (OpenCV
    keeps a 4-channel canvas), at most 32 (a 4-channel 64-bit float TIFF, the deepest
    OpenCV decodes); then 3 bytes a pixel for the RGB result of anything but 8-bit colour,
    about 16 MB of conversion buffers, and the file's bytes. At the default limit: 0.8 GB
    for an 8-bit colour image, at most 9.4 GB.

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
        or unsupported format)"``, ``"image too large: W x H = N pixels, over the limit of
        M (FEATX_MAX_IMAGE_PIXELS)"``, ``"image too small (WxH)"``, ``"unsupported number
        of channels (N)"``, ``"unsupported sample type (<dtype>)"``.
    UsageError
        ``FEATX_MAX_IMAGE_PIXELS`` is not a positive whole number.
    ValueError
        ``reduced_decode`` without a positive ``resize_size``.
    """
    if reduced_decode and (resize_size is None or resize_size < 1):
        raise ValueError(f"reduced_decode needs a positive resize_size, got {resize_size!r}")
    limit = max_image_pixels()
    data = _read_bytes(path)
    _check_declared_size(data, limit, path)
    unchanged = not data.startswith(_JPEG_SIGNATURE)  # the size check let only six through
    if unchanged:
        flag = cv2.IMREAD_UNCHANGED
    else:
        flag = _reduced_flag(data, resize_size) if reduced_decode else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error:
        image = None  # e.g. over OpenCV's own limits
    if image is None or image.size == 0:
        raise ImageDecodeError(path, _undecodable(data))
    height, width = image.shape[:2]
    if min(height, width) < _MIN_SIDE:
        raise ImageDecodeError(path, f"image too small ({width}x{height})")
    if not unchanged:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    return _to_rgb8(image, path)


def _undecodable(data: bytes) -> str:
    return ("truncated image" if _looks_truncated(data)
            else "cannot decode image (corrupt or unsupported format)")


# libjpeg rounds scaled sizes up, so a side of n/f (real) gives at least n/f pixels.
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))


def _reduced_flag(data: bytes, resize_size: int) -> int:
    """The imdecode flag for reduced decoding: the largest factor keeping >= resize_size."""
    size = jpeg_size(data)
    if size is not None:
        for factor, flag in _REDUCED_FLAGS:
            if min(size) >= factor * resize_size:
                return flag
    return cv2.IMREAD_COLOR


def _read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        reason = getattr(exc, "strerror", None) or exc
        raise ImageDecodeError(path, f"cannot read file ({reason})") from None
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    return data


# ----- the size a header declares ----------------------------------------------------
def _check_declared_size(data: bytes, limit: int, path) -> None:
    """Refuse, before any decoder sees them, files whose size cannot be read from their
    header (not one of the six formats, or cut short) and images over ``limit`` pixels."""
    size = declared_size(data)
    if size is None:
        raise ImageDecodeError(path, _undecodable(data))
    width, height = size
    if width * height > limit:
        raise ImageDecodeError(path, f"image too large: {width} x {height} = "
                                     f"{width * height:,} pixels, over the limit of "
                                     f"{limit:,} (FEATX_MAX_IMAGE_PIXELS)")


# ----- decoded samples to RGB ----------------------------------------------------------
def _looks_truncated(data: bytes) -> bool:
    """True when a file that failed to decode lacks the end its format requires.

    Only used after a failed decode: some valid JPEGs carry data after the end marker
    (e.g. motion photos), so a missing marker alone does not make a file bad.
    """
    head, tail = data[:12], data[-1024:]
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in tail
    if head.startswith(b"\x89PNG"):
        return b"IEND" not in tail
    if head.startswith(b"GIF8"):
        return not tail.rstrip(b"\x00").endswith(b";")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 > len(data)
    return False


# Images are converted in strips of about this many pixels, so that the float buffers of a
# conversion stay near 16 MB whatever the image's size.
_STRIP_PIXELS = 1 << 18


def _to_rgb8(image: np.ndarray, path) -> np.ndarray:
    """An unchanged decode (gray/BGR, optional alpha, 8/16-bit or float) as RGB uint8."""
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels not in (1, 2, 3, 4):
        raise ImageDecodeError(path, f"unsupported number of channels ({channels})")
    if image.dtype not in (np.uint8, np.uint16) and image.dtype.kind != "f":
        raise ImageDecodeError(path, f"unsupported sample type ({image.dtype})")
    if channels == 3 and image.dtype == np.uint8:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)
    height, width = image.shape[:2]
    rgb = np.empty((height, width, 3), np.uint8)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        rgb[top:top + rows] = _strip_to_rgb8(image[top:top + rows])
    return rgb


def _strip_to_rgb8(image: np.ndarray) -> np.ndarray:
    if image.shape[2] in (2, 4):
        image = _composite_on_white(_unit_float(image))
    elif image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = _unit_float(image)
    if image.dtype != np.uint8:
        image = np.rint(image * 255.0).astype(np.uint8)
    code = cv2.COLOR_GRAY2RGB if image.shape[2] == 1 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def _unit_float(image: np.ndarray) -> np.ndarray:
    """Samples as float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if image.dtype.kind == "f":
        return np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
    return image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 65535.0)


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
