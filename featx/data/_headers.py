"""What an image file's header declares, read without decoding: the sides of a JPEG's
frame (:func:`jpeg_size`, for reduced decoding) and of any format featx reads
(:func:`declared_size`, checked against the decompression-bomb limit). Only the standard
library is imported.
"""

from __future__ import annotations

import re
import struct

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


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the header of a JPEG, PNG, GIF, BMP, WebP or TIFF file's bytes
    declares it, read without decoding (JPEG: the first frame header, as libjpeg finds it;
    GIF and animated WebP: the canvas, which every frame lies within; TIFF: the first
    image). None for any other content, or a header cut short."""
    reader = _size_reader(data)
    return reader(data) if reader else None


def _size_reader(data: bytes):
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size
    for signature, reader in _SIZE_READERS:
        if data.startswith(signature):
            return reader
    return None


def _unpack(fmt: str, data: bytes, offset: int) -> tuple | None:
    try:
        return struct.unpack_from(fmt, data, offset)
    except (struct.error, OverflowError):  # cut short, or an offset past any file
        return None


_NOT_FF = re.compile(rb"[^\xff]")


def _jpeg_header_size(data: bytes) -> tuple[int, int] | None:
    """The first frame header's sides, found as libjpeg finds markers: bytes before a 0xFF
    are skipped, then fill bytes (0xFF); 0xFF then 0x00 is coded data, not a marker."""
    at = 2
    while (at := data.find(b"\xff", at)) >= 0:
        found = _NOT_FF.search(data, at)
        if found is None:
            return None
        marker, at = data[found.start()], found.start() + 1
        if marker == 0x00:
            continue
        if marker in _JPEG_SOF or marker in _JPEG_OTHER_SOF:
            sides = _unpack(">HH", data, at + 3)  # after the length and the sample precision
            return None if sides is None else (sides[1], sides[0])
        if marker in (0xD8, 0xD9, 0xDA):  # no frame header before the image, scan or end
            return None
        if marker not in _JPEG_NO_LENGTH:
            length = _unpack(">H", data, at)
            if length is None or length[0] < 2:
                return None
            at += length[0]
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    return _unpack(">II", data, 16) if data[12:16] == b"IHDR" else None  # the first chunk


def _gif_size(data: bytes) -> tuple[int, int] | None:
    return _unpack("<HH", data, 6)  # the logical screen


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    header = _unpack("<I", data, 14)
    if header is None:
        return None
    if header[0] == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sides
        return _unpack("<HH", data, 18)
    sides = _unpack("<ii", data, 18)  # a negative height stores the rows top-down
    return None if sides is None else (abs(sides[0]), abs(sides[1]))


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # the canvas: 24-bit sides minus one
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1)
    if chunk == b"VP8L":  # lossless: 14-bit sides minus one after the 0x2F signature
        bits = _unpack("<I", data, 21)
        return None if bits is None else ((bits[0] & 0x3FFF) + 1, ((bits[0] >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8 ":  # lossy: 14-bit sides after the frame tag and start code
        sides = _unpack("<HH", data, 26)
        return None if sides is None else (sides[0] & 0x3FFF, sides[1] & 0x3FFF)
    return None


# TIFF field types an image's width and length may take (libtiff reads any integer type):
# BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG, IFD, LONG8, SLONG8, IFD8
_TIFF_INTEGERS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q",
                  18: "Q"}


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth and ImageLength of the first directory (classic or BigTIFF), the larger
    value where a tag is repeated."""
    order = "<" if data[:1] == b"I" else ">"
    if data[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF: 8-byte offsets, counts and values
        first, count_format, entry_size, value_at = _unpack(order + "Q", data, 8), "Q", 20, 12
    else:
        first, count_format, entry_size, value_at = _unpack(order + "I", data, 4), "H", 12, 8
    count = None if first is None else _unpack(order + count_format, data, first[0])
    if count is None:
        return None
    start = first[0] + struct.calcsize(count_format)
    sides = {}
    for entry in range(start, start + min(count[0], 65536) * entry_size, entry_size):
        field = _unpack(order + "HH", data, entry)
        if field is None:
            break
        kind = _TIFF_INTEGERS.get(field[1])
        if field[0] in (256, 257) and kind and struct.calcsize(kind) <= entry_size - value_at:
            value = _unpack(order + kind, data, entry + value_at)
            if value is not None:
                sides[field[0]] = max(sides.get(field[0], 0), value[0])
    return (sides[256], sides[257]) if len(sides) == 2 else None


_SIZE_READERS = ((b"\xff\xd8", _jpeg_header_size), (b"\x89PNG\r\n\x1a\n", _png_size),
                 (b"GIF87a", _gif_size), (b"GIF89a", _gif_size), (b"BM", _bmp_size),
                 (b"II*\x00", _tiff_size), (b"MM\x00*", _tiff_size),
                 (b"II+\x00", _tiff_size), (b"MM\x00+", _tiff_size))
