"""Test photos made from numbers: sharp, distinct, in every format and trick the upload checks meet.

Each photo is a smooth colour gradient with a few large random shapes (so different seeds give
different perceptual hashes) plus fine noise (so the blur check sees a sharp photo). Everything is
seeded: the same arguments always give the same bytes.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_SIZE = (384, 320)
# Where the upright test photos carry a solid red block, so a test can tell which way is up.
MARKER_BOX = (0, 0, 96, 64)
MARKER_COLOUR = (230, 20, 20)


def photo_image(seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE, marker: bool = False) -> Image.Image:
    """A sharp RGB picture, distinct for every seed; with ``marker`` a red block sits in its top-left corner."""
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.empty((height, width, 3), dtype=np.float32)
    for channel in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * xs / width + np.sin(angle) * ys / height
        base[..., channel] = 60 + 130 * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    base += rng.normal(0, 18, size=base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(40, width // 2)), y0 + int(rng.integers(40, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    # Noise again on top of the shapes, so no region is flat.
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if marker:
        ImageDraw.Draw(image).rectangle(MARKER_BOX, fill=MARKER_COLOUR)
    return image


def encode(image: Image.Image, image_format: str = "JPEG", **save_options: Any) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        save_options.setdefault("quality", 95)
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


def make_photo(
    seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE, image_format: str = "JPEG", **save_options: Any
) -> bytes:
    """A valid, sharp photo file (JPEG unless told otherwise)."""
    return encode(photo_image(seed, size), image_format, **save_options)


def make_photos(count: int, start_seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE) -> list[tuple[str, bytes]]:
    """``count`` distinct valid JPEGs as (filename, bytes) pairs, ready to upload."""
    return [(f"photo{index + 1}.jpg", make_photo(start_seed + index, size)) for index in range(count)]


def make_heic(seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE) -> bytes:
    """A HEIC photo, as an iPhone would send it."""
    from pillow_heif import from_pillow

    buffer = io.BytesIO()
    from_pillow(photo_image(seed, size)).save(buffer, quality=90)
    return buffer.getvalue()


# The rotation that undoes EXIF ``orientation``: stored pixels = upright.transpose(this).
_STORED_ROTATION = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def make_oriented_jpeg(orientation: int, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE) -> bytes:
    """A JPEG whose pixels are stored rotated, with the EXIF orientation that makes them upright again.

    Shown upright, the picture is ``size`` with the red marker block in its top-left corner.
    """
    stored = photo_image(seed, size, marker=True).transpose(_STORED_ROTATION[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", exif=exif.tobytes())


def make_jpeg_with_metadata(seed: int = 0) -> bytes:
    """A JPEG carrying GPS coordinates, a camera model, XMP, an ICC profile and a comment."""
    from PIL import ImageCms

    exif = Image.Exif()
    exif[0x0110] = "Secret Camera 9000"  # Model
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (52.0, 31.0, 12.5), 3: "E", 4: (13.0, 24.0, 36.2)})
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF>secret-location</rdf:RDF></x:xmpmeta>'
    return encode(photo_image(seed), "JPEG", exif=exif.tobytes(), icc_profile=icc, comment=b"home sweet home", xmp=xmp)


def make_blurry_photo(seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE) -> bytes:
    return encode(photo_image(seed, size).filter(ImageFilter.GaussianBlur(8)), "JPEG")


def make_truncated_jpeg(seed: int = 0) -> bytes:
    data = make_photo(seed)
    return data[: len(data) // 2]


def make_fake_pdf() -> bytes:
    """A (minimal) PDF, as someone would upload it renamed to .jpg."""
    return b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def make_animation(image_format: str, frames: int = 3, seed: int = 0) -> bytes:
    """An animated GIF, WEBP or PNG (APNG) of ``frames`` distinct frames."""
    images = [photo_image(seed + index) for index in range(frames)]
    return encode(images[0], image_format, save_all=True, append_images=images[1:], duration=100, loop=0)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def make_decompression_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG of one colour whose header says ``width``×``height``: a few dozen KB on disk.

    Built by hand at 1 bit per pixel so making it costs neither time nor memory in the test.
    """
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte "none", then the row's bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def jpeg_markers(data: bytes) -> list[int]:
    """The marker bytes (0xE0 APP0, 0xE1 APP1/EXIF/XMP, 0xE2 ICC, 0xFE COM...) before the scan data."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    markers: list[int] = []
    position = 2
    while position + 4 <= len(data):
        assert data[position] == 0xFF, f"bad marker at {position}"
        marker = data[position + 1]
        markers.append(marker)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        position += 2 + length
    return markers
