"""The sanitizer fuzzed over EXIF and PNG chunk bytes: every input ends accepted or as a refusal, never an error.

Hypothesis builds EXIF blocks entry by entry (tags the sanitizer or Pillow read, every TIFF type, odd
counts and offsets) and PNG chunks of every ancillary kind with arbitrary payloads, and puts them
into small valid photos. Derandomized, so the suite tries the same inputs every run; the crashes it
found are kept as plain tests in test_sanitize.py (MALFORMED_EXIF).
"""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.photos.sanitize import PhotoRejected, sanitize_upload
from tests.app import photo_factory as factory

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
BASE = factory.photo_image(40, size=(300, 260))
UPLOAD_SETTINGS = Settings(environment="test")

# Orientation, resolution and its unit, the EXIF / GPS / interop sub-IFD pointers, text tags, and anything.
TAGS = st.one_of(
    st.sampled_from([0x0112, 0x011A, 0x011B, 0x0128, 0x8769, 0x8825, 0xA005, 0x010F, 0x0110, 0x0132, 0x9003]),
    st.integers(0, 0xFFFF),
)
ENTRY = st.tuples(TAGS, st.integers(0, 14), st.sampled_from([0, 1, 2, 3, 4, 255, 0x7FFFFFFF, 0xFFFFFFFF]),
                  st.binary(min_size=4, max_size=4))


@st.composite
def exif_blocks(draw: st.DrawFn) -> bytes:
    """A TIFF-structured EXIF block with arbitrary entries, or arbitrary bytes after a valid header."""
    little = draw(st.booleans())
    order = "<" if little else ">"
    header = (b"II*\x00" if little else b"MM\x00*") + struct.pack(order + "I", 8)
    if draw(st.booleans()):
        return header + draw(st.binary(max_size=200))
    entries = draw(st.lists(ENTRY, max_size=8))
    orientation = draw(st.integers(0, 9))
    if orientation:  # a real orientation next to the odd entries: what makes a sanitizer rotate and rewrite
        entries.insert(draw(st.integers(0, len(entries))), (0x0112, 3, 1, struct.pack(order + "HH", orientation, 0)))
    ifd = struct.pack(order + "H", len(entries)) + b"".join(
        struct.pack(order + "HHI", tag, kind, count) + value for tag, kind, count, value in entries
    )
    return header + ifd + struct.pack(order + "I", draw(st.sampled_from([0, 8, 26, 0xFFFFFFFF]))) + draw(
        st.binary(max_size=64)
    )


def accepted_or_refused(filename: str, data: bytes) -> None:
    with contextlib.suppress(PhotoRejected):
        sanitize_upload(filename, data, UPLOAD_SETTINGS)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
@FUZZ
@given(exif=exif_blocks())
def test_any_exif_is_accepted_or_refused(image_format: str, exif: bytes) -> None:
    payload = exif if image_format == "PNG" else b"Exif\x00\x00" + exif
    accepted_or_refused(f"fuzz.{image_format.lower()}", factory.encode(BASE, image_format, exif=payload))


PNG = factory.encode(BASE, "PNG")
CHUNK_TYPES = st.one_of(
    st.sampled_from([b"eXIf", b"iCCP", b"tEXt", b"zTXt", b"iTXt", b"sRGB", b"gAMA", b"cHRM", b"pHYs", b"tIME",
                     b"sBIT", b"tRNS", b"bKGD", b"acTL", b"fcTL", b"PLTE", b"IHDR", b"IEND"]),
    st.binary(min_size=4, max_size=4),
)


@st.composite
def chunk_payloads(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a keyword-and-compressed-text payload as iCCP/zTXt/iTXt carry."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    keyword = draw(st.binary(max_size=12))
    return keyword + b"\x00\x00" + zlib.compress(draw(st.binary(max_size=200)))


@FUZZ
@given(kind=CHUNK_TYPES, payload=chunk_payloads(), good_crc=st.booleans(), before_data=st.booleans())
def test_any_png_chunk_is_accepted_or_refused(kind: bytes, payload: bytes, good_crc: bool, before_data: bool) -> None:
    crc = zlib.crc32(kind + payload) if good_crc else zlib.crc32(kind + payload) ^ 1
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)
    position = PNG.index(b"IDAT") - 4 if before_data else len(PNG) - 12  # before the pixels, or before IEND
    accepted_or_refused("fuzz.png", PNG[:position] + chunk + PNG[position:])
