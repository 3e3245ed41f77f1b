"""Upload sanitizing: decide by decoding, re-encode from pixels, refuse what a person should fix.

An upload is trusted only after Pillow has decoded every pixel of it with a formats allow-list
(JPEG, PNG, WebP, HEIF/HEIC), never because of its extension or Content-Type. What we store is a
JPEG re-encoded from those pixels with no metadata at all: no EXIF (so no GPS position), no XMP,
no ICC profile, no comments. The EXIF orientation is read (defensively, never written back) and
applied, so the pixels stand upright.

Every refusal is a :class:`PhotoRejected` whose message is a sentence a person understands and can
act on ("IMG_1.heic: 48 MB is over the 25 MB limit"). The client's filename is only ever shown to
that person; it never reaches a path or a storage key.

Torch-free on purpose: the web process imports this (Pillow, pillow-heif and numpy only).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import tempfile
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, BinaryIO, cast

import numpy as np
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

from app.config import Settings
from worker.engine.sharpness import BLUR_THRESHOLD, sharpness  # the trainer's own measure (numpy only)

if TYPE_CHECKING:
    from app.photos.faces import FaceFound

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")
MIN_SHORT_SIDE = 256  # below this a photo carries too little of the subject to learn from
DRAFT_SIDE = 1024
SPOOL_MEMORY = 256 * 1024  # a sanitized photo larger than this waits on disk
MAX_LONG_SIDE = 2048  # stored photos are downscaled to this; training crops far smaller anyway
JPEG_QUALITY = 92
HASH_SIZE = 8  # dHash of 8x8 = 64 bits
DUPLICATE_MAX_BITS = 4  # Hamming distance at or below which two photos count as near-duplicates
MAX_NAME_LENGTH = 255
# A progressive JPEG is sent as scans, and each scan costs a pass over every 8×8 block of the picture
# however few bytes it carries: one scan repeated 30,000 times is a 1 MB file that decodes for a
# minute. libjpeg's progressive script (what Pillow, ImageMagick and most software write) uses 10
# scans for colour and 6 for grey; 100 leaves ten times that, and 100 near-empty scans of a
# 50-megapixel picture decode in well under a second (bench/web.py, docs/benchmarks.md).
MAX_JPEG_SCANS = 100
STRIP_PIXELS = 1 << 20  # pixels per strip when converting a decoded picture (4 MB at 4 bytes a pixel)

log = logging.getLogger(__name__)

# Magic numbers of files people upload by mistake, only to name them in the refusal. These are
# never decoded: the allow-list above is the one thing that decides what is an image.
_KNOWN_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"PK\x03\x04", "ZIP"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG or XML"),
)

# A truncated upload must fail to load, not come back with grey rows at the bottom.
ImageFile.LOAD_TRUNCATED_IMAGES = False


# An upload as bytes, or as the (spooled) file object the multipart parser wrote it to.
UploadSource = bytes | BinaryIO


class PhotoRejected(Exception):
    """One uploaded file was refused; ``str()`` is "<filename>: <reason>"."""

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(f"{filename}: {reason}")
        self.filename = filename
        self.reason = reason


@dataclass(frozen=True)
class SanitizedPhoto:
    """A photo re-encoded from its pixels: upright, RGB, at most 2048 px long, JPEG with no metadata.

    The JPEG waits in a spooled temporary file (on disk past SPOOL_MEMORY bytes) until the whole
    request has been checked, so a request of 20 photos never holds 20 encoded copies in memory.
    """

    spool: BinaryIO
    width: int
    height: int
    perceptual_hash: str  # 64-bit dHash as 16 hex digits
    original_name: str  # for display only (escaped); never a path or key
    face: FaceFound | None = None  # a person's photo: the face it is trained on (app.photos.faces)

    @property
    def jpeg_bytes(self) -> bytes:
        self.spool.seek(0)
        return self.spool.read()

    @property
    def byte_size(self) -> int:
        return self.spool.seek(0, io.SEEK_END)


@dataclass
class SanitizedBatch:
    """The photos of one request that passed, and every refusal (per file, near-duplicate pairs and, for
    a person, photos of someone else); ``set_problem`` refuses the whole set (no 3 photos of one person)."""

    photos: list[SanitizedPhoto] = field(default_factory=list)
    rejections: list[PhotoRejected] = field(default_factory=list)
    set_problem: str | None = None

    def check_together(self, faces: bool) -> None:
        """The checks across photos, once each photo has been sanitized: near-duplicates and, with
        ``faces`` (a person's studio), that the faces are one person and no shot is there twice."""
        self.rejections.extend(near_duplicates(self.photos))
        if not faces:
            return
        from app.photos.faces import identity_problems

        named = {refusal.filename for refusal in self.rejections}
        found = [(photo.original_name, photo.face) for photo in self.photos
                 if photo.face is not None and photo.original_name not in named]
        identity = identity_problems(found)
        self.rejections.extend(identity.rejections)
        self.set_problem = identity.set_problem


@lru_cache(maxsize=1)
def _register_heif() -> None:
    """Teach Pillow to open HEIF/HEIC (iPhone photos); once per process."""
    from pillow_heif import register_heif_opener

    register_heif_opener()


def display_name(filename: str) -> str:
    """The client's filename made fit to show: its last path part, no control characters, bounded.

    Browsers send only the base name, but other clients may send anything, including "../".
    """
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    if len(name) > MAX_NAME_LENGTH:
        name = name[: MAX_NAME_LENGTH - 1] + "…"
    return name or "unnamed file"


def format_megabytes(size: int) -> str:
    """A byte count as a person reads it: "48 MB", "2.5 MB"."""
    megabytes = size / (1024 * 1024)
    return f"{megabytes:.1f} MB" if megabytes < 10 else f"{megabytes:.0f} MB"


def _format_hint(stream: BinaryIO) -> str:
    stream.seek(0)
    head = stream.read(16).lstrip()
    for signature, label in _KNOWN_SIGNATURES:
        if head.startswith(signature):
            return f" ({label}?)"
    return ""


def dhash(image: Image.Image, hash_size: int = HASH_SIZE) -> int:
    """Difference hash: one bit per horizontally adjacent pixel pair of a tiny grayscale copy."""
    small = image.convert("L").resize((hash_size + 1, hash_size), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hash_distance(first: str, second: str) -> int:
    """Hamming distance between two hex perceptual hashes."""
    return (int(first, 16) ^ int(second, 16)).bit_count()


# --- bounding the work before decoding -------------------------------------------------------------

# A marker inside entropy-coded JPEG data: 0xFF followed by anything but a stuffed zero, a restart
# marker (0xD0–0xD7) or another 0xFF (fill bytes before a marker).
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field


SCAN_READ_BLOCK = 1 << 20  # the JPEG is read in blocks of this size to count its scans


class _Window:
    """A stream read forwards by absolute position, holding about one block of it in memory."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.base = 0  # the stream position of buffer[0]
        self.buffer = b""

    def cover(self, position: int, count: int) -> int | None:
        """The index of ``position`` in ``buffer``, which then holds ``count`` bytes from there on;
        None when the stream ends first. Reads (and copies) only when the buffer runs out."""
        if position < self.base or position > self.base + len(self.buffer):
            self.stream.seek(position)
            self.base, self.buffer = position, b""
        if position + count > self.base + len(self.buffer):
            self.buffer = self.buffer[position - self.base :]
            self.base = position
            while len(self.buffer) < count:
                block = self.stream.read(max(SCAN_READ_BLOCK, count - len(self.buffer)))
                if not block:
                    return None
                self.buffer += block
        return position - self.base


def jpeg_scan_count(stream: BinaryIO, stop_after: int) -> int:
    """How many scans (SOS segments) the first image of a JPEG stream has, counting up to ``stop_after + 1``.

    Walks the marker segments by their lengths and skips each scan's entropy-coded data up to the
    next marker, so bytes inside metadata or inside scans are never taken for a marker. Stops at the
    end-of-image marker, at the first byte that is not a marker (the decoder will refuse the file) or
    once there are more than ``stop_after`` scans. Reads the stream from its start, a block at a time.
    """
    window = _Window(stream)
    scans = 0
    position = 2  # after SOI
    while (index := window.cover(position, 4)) is not None:
        data = window.buffer
        if data[index] != 0xFF:
            break
        marker = data[index + 1]
        if marker == 0xFF:  # a fill byte
            position += 1
            continue
        if marker == 0xD9:  # EOI: what follows is not this image
            break
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        length = (data[index + 2] << 8) | data[index + 3]
        if length < 2:
            break
        position += 2 + length
        if marker != 0xDA:
            continue
        scans += 1
        if scans > stop_after:
            break
        # The entropy-coded data runs up to the next marker: search for it a block at a time.
        while True:
            index = window.cover(position, 2)
            if index is None:
                return scans
            found = _JPEG_MARKER_IN_SCAN.search(window.buffer, index)
            if found is not None:
                position = window.base + found.start()
                break
            position = window.base + len(window.buffer) - 1  # a final 0xFF pairs with the next block
    return scans


def _coefficient_bytes(image: Image.Image) -> int:
    """The DCT coefficient buffer libjpeg keeps for a JPEG of several scans: 2 bytes per coefficient,
    64 per 8×8 block, for every block of every component at full size (``draft`` does not shrink it)."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    width, height = image.size
    total = 0
    for _component, h, v, _table in layers:
        blocks_wide = math.ceil(math.ceil(width * h / h_max) / 8)
        blocks_high = math.ceil(math.ceil(height * v / v_max) / 8)
        total += blocks_wide * blocks_high * 64 * 2
    return total


# Bytes a decoded pixel occupies in Pillow: one for 1-bit, 8-bit grayscale and palette images, two for
# 16-bit grayscale, four for everything else (Pillow stores RGB in four bytes too).
def _pixel_bytes(mode: str) -> int:
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


# How many copies of the decoded pixels a format's decoder holds at its peak, beyond Pillow's own
# image, as measured (peak RSS growth per pixel in a fresh process, tests/app/hostile_photos.py;
# docs/benchmarks.md): WebP 16 bytes a pixel, as libwebp's animation decoder keeps two RGBA canvases
# and Pillow copies the frame out as bytes before its own image; HEIC up to 7.3, libheif's RGB
# buffer (3 bytes a pixel) next to Pillow's image.
_DECODER_COPIES = {"WEBP": 3.0, "HEIF": 0.85}


def decode_memory(image: Image.Image, scans: int) -> int:
    """Bytes of memory decoding ``image`` (opened, not loaded) needs at its peak, from its header alone.

    A JPEG of one scan is decoded at a reduced scale (see ``_decode``) and costs little. A JPEG of
    several scans (progressive) keeps every DCT coefficient of the full-size picture, whatever the
    scale. Other formats are decoded whole, then converted strip by strip (:func:`_working_copy`),
    so the decoded pixels are the cost.
    """
    width, height = image.size
    if image.format == "JPEG":
        scale = _jpeg_draft_scale(image.size)
        output = -(-width // scale) * -(-height // scale) * 4
        return output + (_coefficient_bytes(image) if scans > 1 else 0)
    copies = 1.0 + _DECODER_COPIES.get(image.format or "", 0.0)
    return int(width * height * _pixel_bytes(image.mode) * copies)


def _jpeg_draft_scale(size: tuple[int, int]) -> int:
    """The largest of 1, 2, 4, 8 that keeps both sides at least DRAFT_SIDE (libjpeg's DCT scaling)."""
    scale = 1
    while scale < 8 and min(size) // (scale * 2) >= DRAFT_SIDE:
        scale *= 2
    return scale


class DecodeTooSlow(Exception):
    """Raised from a read of the upload once its decoding has used up its CPU budget."""


class _BudgetedReader:
    """The upload's file as Pillow reads it, refusing further reads once the decoding thread has used
    ``seconds`` of CPU. Pillow feeds its JPEG and PNG decoders 64 KiB at a time, so a decode that
    costs far more than its bytes (whatever trick it uses) is stopped within one such read."""

    def __init__(self, stream: BinaryIO, seconds: float) -> None:
        self._stream = stream
        self._deadline = time.thread_time() + seconds

    def read(self, size: int = -1) -> bytes:
        if time.thread_time() > self._deadline:
            raise DecodeTooSlow()
        return self._stream.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


# --- decoding --------------------------------------------------------------------------------------


def _decode(name: str, stream: BinaryIO, settings: Settings) -> Image.Image:
    """Open with the allow-list, bound the work from the headers, then decode every pixel.

    Refused before any pixel is decoded: more pixels than settings.max_image_pixels, more than one
    frame, a JPEG of more than MAX_JPEG_SCANS scans, and a picture whose decoding would need more
    than settings.max_decode_bytes of memory (:func:`decode_memory`). While decoding, a decode that
    uses more than settings.max_decode_cpu_seconds of CPU is stopped.
    """
    _register_heif()
    limit = f"{settings.max_image_pixels / 1_000_000:.0f} megapixels"
    reader = cast(BinaryIO, _BudgetedReader(stream, settings.max_decode_cpu_seconds))
    try:
        stream.seek(0)
        # Pillow's own size check (Image.MAX_IMAGE_PIXELS) stays as it is: the limit below is checked
        # by hand before anything is decoded, and changing the process-wide value from several
        # decoding threads at once would race.
        image = Image.open(reader, formats=list(ALLOWED_FORMATS))
        width, height = image.size
        if width * height > settings.max_image_pixels:
            # Checked by hand: not every plugin (HEIF) runs Pillow's own check.
            raise PhotoRejected(name, f"{width}×{height} px is more than the {limit} we accept")
        if getattr(image, "n_frames", 1) > 1:
            raise PhotoRejected(name, "an animation or several pictures in one file; upload a single still photo")
        scans = 1
        if image.format == "JPEG":
            scans = _count_scans(stream)
            if scans > MAX_JPEG_SCANS:
                raise PhotoRejected(
                    name,
                    f"a JPEG of more than {MAX_JPEG_SCANS} scans, which takes far too long to decode; "
                    "save it again as a normal JPEG",
                )
        needed = decode_memory(image, scans)
        if needed > settings.max_decode_bytes:
            fitting = width * height * settings.max_decode_bytes // needed
            advice = "a baseline (not progressive) JPEG" if image.format == "JPEG" else "a JPEG"
            raise PhotoRejected(
                name,
                f"{width}×{height} px is more than we can decode as {_format_label(image)} "
                f"(about {fitting / 1_000_000:.0f} megapixels at most); save it smaller or as {advice}",
            )
        if image.format == "JPEG":
            # Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while both sides stay >= DRAFT_SIDE: a
            # 12-megapixel phone photo decodes at 3 megapixels, a quarter of the memory and time,
            # and is still far above the training resolution.
            image.draft(image.mode, (DRAFT_SIDE, DRAFT_SIDE))
        image.load()
    except PhotoRejected:
        raise
    except DecodeTooSlow:
        raise PhotoRejected(name, "takes far too long to decode; save it again as a normal JPEG or PNG") from None
    except Image.DecompressionBombError:
        raise PhotoRejected(name, f"more pixels than the {limit} we accept") from None
    except UnidentifiedImageError:
        raise PhotoRejected(
            name, f"not an image we can read{_format_hint(stream)}; use JPEG, PNG, WebP or HEIC"
        ) from None
    except Exception as exc:  # noqa: BLE001
        # Pillow and its plugins parse hostile bytes here; whatever they raise (OSError, SyntaxError,
        # struct.error, TypeError...) means this file cannot be decoded, never a server error.
        log.info("upload %r refused: %s: %s", name, type(exc).__name__, exc)
        detail = "incomplete (truncated)" if "truncated" in str(exc) else "damaged and cannot be decoded"
        raise PhotoRejected(name, f"{detail}; try exporting or uploading it again") from None
    return image


def _format_label(image: Image.Image) -> str:
    if image.format == "JPEG":
        return "a progressive JPEG"
    return {"WEBP": "WebP", "HEIF": "HEIC"}.get(image.format or "", image.format or "this format")


def _count_scans(stream: BinaryIO) -> int:
    position = stream.tell()
    try:
        return jpeg_scan_count(stream, stop_after=MAX_JPEG_SCANS)
    finally:
        stream.seek(position)


# --- orientation and colour ------------------------------------------------------------------------

# EXIF orientation → the transpose that stands the picture upright (EXIF 2.32, tag 0x0112).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1–8) of a decoded image; 1 when it has none or its EXIF cannot be read.

    Read only, never written back: the stored photo carries no metadata, so nothing is re-serialised
    (Pillow's ``exif_transpose`` writes the EXIF again and fails on odd values in other tags). Any
    error from parsing hostile EXIF means "no orientation", not a refusal: the pixels are fine.
    """
    try:
        value = image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001
        return 1
    if isinstance(value, int) and not isinstance(value, bool) and value in _UPRIGHT:
        return value
    return 1


def _srgb_transform(image: Image.Image) -> ImageCms.ImageCmsTransform | None:
    """A transform from the image's ICC profile (e.g. Display P3) to sRGB, or None when there is none to apply.

    Dropping the profile without converting would shift the colours of wide-gamut phone photos. A
    broken profile keeps the pixels as they are rather than refuse the photo.
    """
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), image.mode, output_mode)
    except Exception:  # noqa: BLE001  # hostile profile bytes: whatever LittleCMS or Pillow raises
        return None


def _rgb_strip(strip: Image.Image, transform: ImageCms.ImageCmsTransform | None) -> Image.Image:
    """One strip of the decoded picture as RGB: colour-managed, transparent areas white, 16 bits scaled.

    16-bit grayscale (scanners, some PNG exports) is scaled to 8 bits: Pillow's own conversion
    would clip every value above 255 to white.
    """
    if transform is not None:
        # On failure the strip keeps its own colours rather than the photo being refused.
        with contextlib.suppress(Exception):
            strip = ImageCms.applyTransform(strip, transform) or strip
    mode = strip.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(strip, dtype=np.float32)
        if mode != "F":
            values /= 257.0
        return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in strip.info):
        rgba = strip.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return strip if mode == "RGB" else strip.convert("RGB")


def _working_copy(image: Image.Image) -> Image.Image:
    """The decoded picture as RGB, reduced by a whole factor while its long side stays >= MAX_LONG_SIDE
    (what is stored) and its short side >= DRAFT_SIDE.

    Converted strip by strip: the decoded picture plus a strip and the (smaller) result are all
    that is ever in memory. Converting the whole picture at once made up to four full-size copies
    (a 49-megapixel RGBA PNG grew the process by 934 MB). Where the JPEG decoder already scaled
    (``draft``) the factor is 1.
    """
    width, height = image.size
    factor = max(1, min(max(width, height) // MAX_LONG_SIDE, min(width, height) // DRAFT_SIDE))
    transform = _srgb_transform(image)
    if factor == 1 and image.mode == "RGB" and transform is None:
        return image
    rows = max(factor, STRIP_PIXELS // max(1, width) // factor * factor)
    result = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        strip.info = image.info  # the palette's transparency, for P images
        rgb = _rgb_strip(strip, transform)
        if factor > 1:
            rgb = rgb.reduce(factor)
        result.paste(rgb, (0, top // factor))
    return result


def sanitize_upload(filename: str, source: UploadSource, settings: Settings, faces: bool = False) -> SanitizedPhoto:
    """Decode, check and re-encode one uploaded file, or raise :class:`PhotoRejected` saying why.

    Checks, in order: byte size (settings.max_photo_bytes), decodable as JPEG/PNG/WebP/HEIF, pixel
    count (settings.max_image_pixels, decompression bombs), a single frame, the work and memory its
    decoding needs (:func:`_decode`), fully decodable (not truncated), shorter side at least 256 px
    after the EXIF orientation, and not too blurry; with ``faces`` (a person's studio) one face, large
    enough (:func:`app.photos.faces.check_face`). A file object is decoded where it lies (the
    multipart parser's spooled file), never copied whole into memory.
    """
    name = display_name(filename)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    size = stream.seek(0, io.SEEK_END)
    if not size:
        raise PhotoRejected(name, "empty (0 bytes)")
    if size > settings.max_photo_bytes:
        raise PhotoRejected(
            name, f"{format_megabytes(size)} is over the {format_megabytes(settings.max_photo_bytes)} limit"
        )
    image = _decode(name, stream, settings)
    orientation = exif_orientation(image)
    try:
        rgb = _working_copy(image)
    except Exception as exc:  # noqa: BLE001  # conversions of hostile pixels: a refusal, not a 500
        log.info("upload %r refused while converting: %s: %s", name, type(exc).__name__, exc)
        raise PhotoRejected(name, "damaged and cannot be decoded; try exporting it again") from None
    del image  # the full-size decoded pixels are freed before the copies below
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])

    width, height = rgb.size
    if min(width, height) < MIN_SHORT_SIDE:
        raise PhotoRejected(
            name, f"too small ({width}×{height} px); the shorter side must be at least {MIN_SHORT_SIDE} px"
        )
    if sharpness(rgb) < BLUR_THRESHOLD:
        raise PhotoRejected(name, "too blurry: no part of it is in sharp focus; use a photo where the subject is sharp")

    if max(width, height) > MAX_LONG_SIDE:
        rgb.thumbnail((MAX_LONG_SIDE, MAX_LONG_SIDE), Image.Resampling.LANCZOS)
    # A fresh image from the pixels alone, so no info (EXIF, XMP, ICC, comment) can ride along.
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)
    del rgb
    face = None
    if faces:
        from app.photos.faces import check_face

        face = check_face(name, clean)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115  # outlives this call, closed when collected
    clean.save(spool, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return SanitizedPhoto(
        spool=spool,  # type: ignore[arg-type]  # SpooledTemporaryFile is a binary file, not a BinaryIO subclass
        width=clean.width,
        height=clean.height,
        perceptual_hash=f"{dhash(clean):016x}",
        original_name=name,
        face=face,
    )


def near_duplicates(photos: Sequence[SanitizedPhoto]) -> list[PhotoRejected]:
    """One refusal per photo that is a near-duplicate of an earlier one, naming both files.

    Twins teach the model one pose twice as hard; a person would rather pick a different shot.
    """
    refusals: list[PhotoRejected] = []
    for later_index, later in enumerate(photos):
        for earlier in photos[:later_index]:
            if hash_distance(earlier.perceptual_hash, later.perceptual_hash) <= DUPLICATE_MAX_BITS:
                refusals.append(
                    PhotoRejected(
                        later.original_name,
                        f"looks almost the same as {earlier.original_name}; keep one and add a different shot",
                    )
                )
                break
    return refusals


def sanitize_uploads(files: Sequence[tuple[str, UploadSource]], settings: Settings,
                     faces: bool = False) -> SanitizedBatch:
    """Sanitize every file of one request, collecting every refusal instead of stopping at the first.

    Files are decoded and re-encoded one at a time, so a request of 20 large photos holds the pixels
    of one at once (the originals stay in the parser's files, the sanitized copies in their spools).
    """
    batch = SanitizedBatch()
    for filename, source in files:
        try:
            batch.photos.append(sanitize_upload(filename, source, settings, faces))
        except PhotoRejected as refusal:
            batch.rejections.append(refusal)
    batch.check_together(faces)
    return batch
