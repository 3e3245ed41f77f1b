"""Upload sanitizing: decide by decoding, re-encode from pixels, refuse what a person should fix.

An upload is trusted only after Pillow has decoded every pixel of it with a formats allow-list
(JPEG, PNG, WebP, HEIF/HEIC), never because of its extension or Content-Type. What we store is a
JPEG re-encoded from those pixels with no metadata at all: no EXIF (so no GPS position), no XMP,
no ICC profile, no comments. The EXIF orientation is applied first so the pixels stand upright.

Every refusal is a :class:`PhotoRejected` whose message is a sentence a person understands and can
act on ("IMG_1.heic: 48 MB is over the 25 MB limit"). The client's filename is only ever shown to
that person; it never reaches a path or a storage key.

Torch-free on purpose: the web process imports this (Pillow, pillow-heif and numpy only).
"""

from __future__ import annotations

import io
import tempfile
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from app.config import Settings

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")
MIN_SHORT_SIDE = 256  # below this a photo carries too little of the subject to learn from
DRAFT_SIDE = 1024
SPOOL_MEMORY = 256 * 1024  # a sanitized photo larger than this waits on disk
MAX_LONG_SIDE = 2048  # stored photos are downscaled to this; training crops far smaller anyway
JPEG_QUALITY = 92
# Variance of the 4-neighbour Laplacian on a grayscale copy whose shorter side is SHARPNESS_SIDE px.
# Normalizing the size makes a 12 MP phone photo and a small one comparable; the threshold matches
# the worker's own check (worker/engine/photos.py), so what passes here is not dropped there.
SHARPNESS_SIDE = 256
BLUR_THRESHOLD = 40.0
HASH_SIZE = 8  # dHash of 8x8 = 64 bits
DUPLICATE_MAX_BITS = 4  # Hamming distance at or below which two photos count as near-duplicates
MAX_NAME_LENGTH = 255

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

    @property
    def jpeg_bytes(self) -> bytes:
        self.spool.seek(0)
        return self.spool.read()

    @property
    def byte_size(self) -> int:
        return self.spool.seek(0, io.SEEK_END)


@dataclass
class SanitizedBatch:
    """The photos of one request that passed, and every refusal (per file and near-duplicate pairs)."""

    photos: list[SanitizedPhoto] = field(default_factory=list)
    rejections: list[PhotoRejected] = field(default_factory=list)


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


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of a grayscale copy scaled so its shorter side is SHARPNESS_SIDE px."""
    gray = image.convert("L")
    scale = SHARPNESS_SIDE / min(gray.size)
    size = (max(3, round(gray.width * scale)), max(3, round(gray.height * scale)))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    pixels = np.asarray(gray.resize(size, resample), dtype=np.float32)
    laplacian = pixels[:-2, 1:-1] + pixels[2:, 1:-1] + pixels[1:-1, :-2] + pixels[1:-1, 2:] - 4.0 * pixels[1:-1, 1:-1]
    return float(laplacian.var())


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


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert pixels tagged with an ICC profile (e.g. Display P3) to sRGB before the profile is dropped.

    Dropping the profile without converting would shift the colours of wide-gamut phone photos.
    """
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=output_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image  # a broken profile: keep the pixels as they are rather than refuse the photo
    return converted if converted is not None else image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparent areas become white instead of whatever colour hides under alpha 0.

    16-bit grayscale (scanners, some PNG exports) is scaled down to 8 bits: Pillow's own conversion
    would clip every value above 255 to white.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode != "F" else 1.0
        return Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode(name: str, stream: BinaryIO, settings: Settings) -> Image.Image:
    """Open with the allow-list, check the size before decoding, then decode every pixel."""
    _register_heif()
    limit = f"{settings.max_image_pixels / 1_000_000:.0f} megapixels"
    # Pillow's limit is process-wide; it is put back afterwards so other code (and tests with a tighter
    # limit) are not affected. Every web request sets the same value from the same settings.
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a warning is a refusal here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            stream.seek(0)
            image = Image.open(stream, formats=list(ALLOWED_FORMATS))
            width, height = image.size
            if width * height > settings.max_image_pixels:
                # Checked again by hand: not every plugin (HEIF) runs Pillow's own check.
                raise PhotoRejected(name, f"{width}×{height} px is more than the {limit} we accept")
            if getattr(image, "n_frames", 1) > 1:
                raise PhotoRejected(name, "an animation or several pictures in one file; upload a single still photo")
            if image.format == "JPEG":
                # Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while both sides stay >= DRAFT_SIDE: a
                # 12-megapixel phone photo decodes at 3 megapixels, a quarter of the memory and time,
                # and is still far above the training resolution.
                image.draft(image.mode, (DRAFT_SIDE, DRAFT_SIDE))
            image.load()
        except PhotoRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise PhotoRejected(name, f"more pixels than the {limit} we accept") from None
        except UnidentifiedImageError:
            raise PhotoRejected(
                name, f"not an image we can read{_format_hint(stream)}; use JPEG, PNG, WebP or HEIC"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            detail = "incomplete (truncated)" if "truncated" in str(exc) else "damaged and cannot be decoded"
            raise PhotoRejected(name, f"{detail}; try exporting or uploading it again") from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
    return image


def sanitize_upload(filename: str, source: UploadSource, settings: Settings) -> SanitizedPhoto:
    """Decode, check and re-encode one uploaded file, or raise :class:`PhotoRejected` saying why.

    Checks, in order: byte size (settings.max_photo_bytes), decodable as JPEG/PNG/WebP/HEIF, pixel
    count (settings.max_image_pixels, decompression bombs), a single frame, fully decodable (not
    truncated), shorter side at least 256 px after the EXIF orientation, and not too blurry. A file
    object is decoded where it lies (the multipart parser's spooled file), never copied whole into memory.
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
    try:
        # In place: a photo already upright (most are) is not copied.
        ImageOps.exif_transpose(image, in_place=True)
        rgb = _to_rgb(_to_srgb(image))
    except (OSError, ValueError, SyntaxError) as exc:
        raise PhotoRejected(name, "damaged and cannot be decoded; try exporting it again") from exc
    del image  # with a colour conversion, the decoded original is freed before the copies below

    width, height = rgb.size
    if min(width, height) < MIN_SHORT_SIDE:
        raise PhotoRejected(
            name, f"too small ({width}×{height} px); the shorter side must be at least {MIN_SHORT_SIDE} px"
        )
    if sharpness(rgb) < BLUR_THRESHOLD:
        raise PhotoRejected(name, "too blurry; use a sharp photo where the subject is in focus")

    if max(width, height) > MAX_LONG_SIDE:
        rgb.thumbnail((MAX_LONG_SIDE, MAX_LONG_SIDE), Image.Resampling.LANCZOS)
    # A fresh image from the pixels alone, so no info (EXIF, XMP, ICC, comment) can ride along.
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)
    del rgb
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115  # outlives this call, closed when collected
    clean.save(spool, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return SanitizedPhoto(
        spool=spool,  # type: ignore[arg-type]  # SpooledTemporaryFile is a binary file, not a BinaryIO subclass
        width=clean.width,
        height=clean.height,
        perceptual_hash=f"{dhash(clean):016x}",
        original_name=name,
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


def sanitize_uploads(files: Sequence[tuple[str, UploadSource]], settings: Settings) -> SanitizedBatch:
    """Sanitize every file of one request, collecting every refusal instead of stopping at the first.

    Files are decoded and re-encoded one at a time, so a request of 20 large photos holds the pixels
    of one at once (the originals stay in the parser's files, the sanitized copies in their spools).
    """
    batch = SanitizedBatch()
    for filename, source in files:
        try:
            batch.photos.append(sanitize_upload(filename, source, settings))
        except PhotoRejected as refusal:
            batch.rejections.append(refusal)
    batch.rejections.extend(near_duplicates(batch.photos))
    return batch
