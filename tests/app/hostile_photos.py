"""Hostile uploads made from numbers, and a probe that measures what decoding one costs.

The worst uploads per format at the pixel limit (16-bit grey and RGBA PNGs, progressive JPEGs, WebP,
HEIC) and the progressive-JPEG scan bomb. The PNGs are written by hand a row at a time, so making a
50-megapixel one costs a few MB of memory; the others go through Pillow and are best made in a
process of their own (``make``). tests/app/photos/test_decode_cost.py and bench/web.py use them.

    python -m tests.app.hostile_photos make KIND WIDTH HEIGHT PATH
    python -m tests.app.hostile_photos measure PATH [SETTING=VALUE ...]

``measure`` sanitizes the file once in a fresh process and prints one JSON line: the growth of the
peak resident set (VmHWM, reset just before), what the process keeps afterwards, the CPU time, and
the outcome.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

# px: squares of a checkerboard this wide keep a 50-megapixel picture sharp (in both directions, as
# the blur check asks) once it is scaled down
STRIPE = 64


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, bit_depth: int, colour_type: int, row: bytes, other_row: bytes) -> bytes:
    """A PNG whose rows are ``row`` and ``other_row`` in bands of STRIPE rows (without their filter
    byte), compressed as they are written."""
    compressor = zlib.compressobj(6)
    lines = (b"\x00" + row, b"\x00" + other_row)
    data = b"".join(compressor.compress(lines[(y // STRIPE) % 2]) for y in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def png_16bit_grey(width: int, height: int) -> bytes:
    """16-bit greyscale, a black and white checkerboard: ~100 KB for 49 megapixels, 2 bytes a pixel decoded."""
    row = b"".join((b"\xff\xff" if (x // STRIPE) % 2 else b"\x00\x00") for x in range(width))
    other = b"".join((b"\x00\x00" if (x // STRIPE) % 2 else b"\xff\xff") for x in range(width))
    return _png(width, height, 16, 0, row, other)


def png_rgba(width: int, height: int) -> bytes:
    """An RGBA checkerboard, every other square half transparent (the alpha flattening path)."""
    row = b"".join((b"\xc8\x50\x28\x80" if (x // STRIPE) % 2 else b"\x28\x78\xc8\xff") for x in range(width))
    other = b"".join((b"\x28\x78\xc8\xff" if (x // STRIPE) % 2 else b"\xc8\x50\x28\x80") for x in range(width))
    return _png(width, height, 8, 6, row, other)


def striped_image(width: int, height: int) -> Image.Image:
    """A blue and yellow checkerboard of STRIPE px squares."""
    image = Image.new("RGB", (width, height), (30, 60, 140))
    draw = ImageDraw.Draw(image)
    for y in range(0, height, STRIPE):
        for x in range((y // STRIPE) % 2 * STRIPE, width, 2 * STRIPE):
            draw.rectangle((x, y, x + STRIPE - 1, y + STRIPE - 1), fill=(240, 210, 90))
    return image


def _save(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def progressive_jpeg(width: int, height: int) -> bytes:
    """A progressive JPEG without chroma subsampling (4:4:4): the most DCT coefficients per pixel."""
    return _save(striped_image(width, height), "JPEG", progressive=True, quality=90, subsampling=0)


def progressive_jpeg_420(width: int, height: int) -> bytes:
    """A progressive JPEG as cameras and phones subsample it (4:2:0)."""
    return _save(striped_image(width, height), "JPEG", progressive=True, quality=90, subsampling=2)


def webp(width: int, height: int) -> bytes:
    return _save(striped_image(width, height), "WEBP", quality=80, method=0)


def heic(width: int, height: int) -> bytes:
    from pillow_heif import from_pillow

    buffer = io.BytesIO()
    from_pillow(striped_image(width, height)).save(buffer, quality=30)
    return buffer.getvalue()


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan of a JPEG: its SOS segment and its entropy-coded data."""
    scans: list[tuple[int, int]] = []
    position = 2
    while position + 4 <= len(data) and data[position + 1] != 0xD9:
        marker = data[position + 1]
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        end = position + 2 + length
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            scans.append((position, end))
        position = end
    return scans


def scan_bomb(width: int, height: int, extra_scans: int) -> bytes:
    """A valid progressive JPEG of one colour whose smallest scan is repeated ``extra_scans`` times.

    Every repeat is a few dozen bytes, yet the decoder walks every block of the picture for each: the
    CPU-exhaustion upload of issue 11 (tens of thousands of scans, 43–73 s of decoding).
    """
    data = _save(Image.new("RGB", (width, height), (120, 80, 200)), "JPEG", progressive=True, quality=90)
    scans = jpeg_scans(data)
    start, end = min(scans, key=lambda scan: scan[1] - scan[0])
    return data[: scans[-1][1]] + data[start:end] * extra_scans + b"\xff\xd9"


MAKERS: dict[str, Callable[[int, int], bytes]] = {
    "png16": png_16bit_grey,
    "rgba": png_rgba,
    "jpeg444": progressive_jpeg,
    "jpeg420": progressive_jpeg_420,
    "webp": webp,
    "heic": heic,
}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(path: Path, overrides: dict[str, str]) -> dict[str, object]:
    """Sanitize ``path`` once; the peak RSS growth (MB) and CPU seconds it took, and its outcome."""
    from app.config import Settings
    from app.photos.sanitize import PhotoRejected, sanitize_upload
    from tests.app.photo_factory import make_photo

    settings = Settings(environment="test", **overrides)  # type: ignore[arg-type]  # pydantic converts
    sanitize_upload("warm-up.jpg", make_photo(1), settings)  # every library loaded before measuring
    with path.open("rb") as upload:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_mb("VmRSS")
        cpu = time.process_time()
        try:
            photo = sanitize_upload(path.name, upload, settings)
            outcome = f"accepted, stored {photo.width}×{photo.height}"
        except PhotoRejected as refusal:
            outcome = f"refused: {refusal.reason}"
        cpu = time.process_time() - cpu
        growth = _status_mb("VmHWM") - before
        photo = None  # noqa: F841  # the stored copy is not what is measured afterwards
    kept = _status_mb("VmRSS") - before
    return {"growth_mb": round(growth, 1), "kept_mb": round(kept, 1), "cpu_s": round(cpu, 3), "outcome": outcome}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "make":
        kind, width, height, path = args
        Path(path).write_bytes(MAKERS[kind](int(width), int(height)))
    elif command == "measure":
        path, *pairs = args
        overrides = dict(pair.split("=", 1) for pair in pairs)
        print(json.dumps(measure(Path(path), overrides)))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
