"""The upload matrix: what a hostile or careless upload meets, decided by decoding, with reasons a person reads."""

from __future__ import annotations

import io
import struct
import time
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from app.config import Settings
from app.photos import sanitize as sanitize_module
from app.photos.sanitize import (
    BLUR_THRESHOLD,
    MAX_JPEG_SCANS,
    MAX_LONG_SIDE,
    SCAN_READ_BLOCK,
    PhotoRejected,
    SanitizedPhoto,
    display_name,
    hash_distance,
    jpeg_scan_count,
    near_duplicates,
    sanitize_upload,
    sanitize_uploads,
    sharpness,
)
from tests.app import hostile_photos
from tests.app import photo_factory as factory


@pytest.fixture
def upload_settings() -> Settings:
    return Settings(environment="test")


def decode(photo: SanitizedPhoto) -> Image.Image:
    image = Image.open(io.BytesIO(photo.jpeg_bytes))
    image.load()
    return image


def refusal(filename: str, data: bytes, settings: Settings) -> PhotoRejected:
    with pytest.raises(PhotoRejected) as caught:
        sanitize_upload(filename, data, settings)
    assert caught.value.filename == filename
    assert str(caught.value).startswith(f"{filename}: ")
    return caught.value


def test_valid_jpeg_is_reencoded_upright_rgb_jpeg(upload_settings: Settings) -> None:
    photo = sanitize_upload("rex.jpg", factory.make_photo(1), upload_settings)
    image = decode(photo)
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    assert (photo.width, photo.height) == image.size == factory.DEFAULT_SIZE
    assert len(photo.perceptual_hash) == 16
    assert photo.original_name == "rex.jpg"


@pytest.mark.parametrize("image_format", ["PNG", "WEBP"])
def test_png_and_webp_are_accepted(upload_settings: Settings, image_format: str) -> None:
    photo = sanitize_upload(
        f"rex.{image_format.lower()}", factory.make_photo(2, image_format=image_format), upload_settings
    )
    assert decode(photo).format == "JPEG"


def test_heic_from_a_phone_is_accepted(upload_settings: Settings) -> None:
    photo = sanitize_upload("IMG_0001.HEIC", factory.make_heic(3), upload_settings)
    assert decode(photo).format == "JPEG"
    assert (photo.width, photo.height) == factory.DEFAULT_SIZE


def test_transparent_png_gets_a_white_background(upload_settings: Settings) -> None:
    image = factory.photo_image(4).convert("RGBA")
    pixels = np.asarray(image).copy()
    pixels[:, : image.width // 2, 3] = 0  # left half fully transparent (its colour is noise underneath)
    data = factory.encode(Image.fromarray(pixels, "RGBA"), "PNG")
    photo = sanitize_upload("cut-out.png", data, upload_settings)
    left = np.asarray(decode(photo))[:, : image.width // 2 - 8]
    assert left.mean() > 250


def test_sixteen_bit_grayscale_is_scaled_not_clipped(upload_settings: Settings) -> None:
    gray = np.asarray(factory.photo_image(16).convert("L"), dtype=np.uint16)
    photo = sanitize_upload("scan.png", factory.encode(Image.fromarray(gray * 257), "PNG"), upload_settings)
    stored = np.asarray(decode(photo).convert("L"), dtype=np.float32)
    assert abs(stored.mean() - gray.mean()) < 3  # not a white sheet


def test_metadata_is_stripped_gps_included(upload_settings: Settings) -> None:
    original = factory.make_jpeg_with_metadata(5)
    assert {0xE1, 0xE2, 0xFE} <= set(factory.jpeg_markers(original))  # the fixture really carries them
    photo = sanitize_upload("home.jpg", original, upload_settings)
    markers = set(factory.jpeg_markers(photo.jpeg_bytes))
    # Only APP0 (the bare JFIF header) may remain: no APP1 (EXIF, XMP), APP2 (ICC), other APPn, or COM.
    assert not markers & ({0xFE} | set(range(0xE1, 0xF0)))
    image = decode(photo)
    assert not image.getexif()
    assert "icc_profile" not in image.info and "comment" not in image.info and "xmp" not in image.info
    for secret in (b"Secret Camera", b"secret-location", b"home sweet home"):
        assert secret not in photo.jpeg_bytes


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(upload_settings: Settings, orientation: int) -> None:
    data = factory.make_oriented_jpeg(orientation, seed=6)
    stored_size = Image.open(io.BytesIO(data)).size
    photo = sanitize_upload(f"rotated-{orientation}.jpg", data, upload_settings)
    upright_size = factory.DEFAULT_SIZE
    assert (photo.width, photo.height) == upright_size
    if orientation in (6, 8):
        assert stored_size == upright_size[::-1]  # the stored pixels really were sideways
    pixels = np.asarray(decode(photo), dtype=np.float32)
    x0, y0, x1, y1 = factory.MARKER_BOX
    marker = pixels[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4].reshape(-1, 3).mean(axis=0)
    assert np.allclose(marker, factory.MARKER_COLOUR, atol=20)  # the red block is back in the top-left corner
    assert not decode(photo).getexif()  # and no orientation tag is left to rotate it twice


def test_large_photo_is_downscaled_to_2048_on_the_long_side(upload_settings: Settings) -> None:
    photo = sanitize_upload("big.png", factory.make_photo(7, size=(2600, 1300), image_format="PNG"), upload_settings)
    assert (photo.width, photo.height) == (MAX_LONG_SIDE, 1024)


def test_decompression_bomb_is_refused_without_decoding(upload_settings: Settings) -> None:
    bomb = factory.make_decompression_bomb(20_000, 20_000)
    assert len(bomb) < 200_000  # tiny on disk, 400 megapixels when decoded
    reason = refusal("cute.png", bomb, upload_settings).reason
    assert "megapixels" in reason


def test_image_just_over_the_pixel_limit_is_refused(upload_settings: Settings, original_limit: int | None) -> None:
    # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; that warning must be a refusal too.
    tight = upload_settings.model_copy(update={"max_image_pixels": 300_000})
    data = factory.make_photo(8, size=(640, 500))  # 320,000 pixels
    assert "megapixels" in refusal("wide.jpg", data, tight).reason
    assert sanitize_upload("ok.jpg", factory.make_photo(8, size=(600, 500)), tight).width == 600
    restored_limit = Image.MAX_IMAGE_PIXELS
    assert restored_limit == original_limit  # the process-wide limit is put back


@pytest.fixture
def original_limit() -> int | None:
    return Image.MAX_IMAGE_PIXELS


def test_truncated_jpeg_is_refused(upload_settings: Settings) -> None:
    assert "truncated" in refusal("half.jpg", factory.make_truncated_jpeg(9), upload_settings).reason


def test_pdf_renamed_to_jpg_is_refused_by_its_content(upload_settings: Settings) -> None:
    error = refusal("photo3.jpg", factory.make_fake_pdf(), upload_settings)
    assert str(error).startswith("photo3.jpg: not an image we can read (PDF?)")


@pytest.mark.parametrize("image_format", ["GIF", "WEBP", "PNG"])
def test_animations_are_refused(upload_settings: Settings, image_format: str) -> None:
    reason = refusal("moving.jpg", factory.make_animation(image_format), upload_settings).reason
    assert "animation" in reason or "GIF" in reason


def test_file_over_the_byte_limit_is_refused_before_decoding(upload_settings: Settings) -> None:
    limit = upload_settings.model_copy(update={"max_photo_bytes": 25 * 1024 * 1024})
    oversized = b"\xff\xd8" + b"\x00" * (48 * 1024 * 1024)
    assert str(refusal("IMG_1.heic", oversized, limit)) == "IMG_1.heic: 48 MB is over the 25 MB limit"


def test_too_small_photo_is_refused(upload_settings: Settings) -> None:
    reason = refusal("thumb.jpg", factory.make_photo(10, size=(300, 200)), upload_settings).reason
    assert "too small (300×200 px)" in reason


def test_blurry_photo_is_refused(upload_settings: Settings) -> None:
    data = factory.make_blurry_photo(11)
    assert sharpness(Image.open(io.BytesIO(data))) < BLUR_THRESHOLD
    assert refusal("shaky.jpg", data, upload_settings).reason.startswith("too blurry")


def test_empty_file_is_refused(upload_settings: Settings) -> None:
    assert "empty" in refusal("nothing.jpg", b"", upload_settings).reason


def test_display_name_keeps_only_the_base_name_without_control_characters() -> None:
    assert display_name("../../etc/passwd") == "passwd"
    assert display_name("C:\\Users\\me\\dog.jpg") == "dog.jpg"
    assert display_name("evil\x00\n.jpg") == "evil.jpg"
    assert display_name("") == "unnamed file"
    assert len(display_name("a" * 1000 + ".jpg")) == 255


def test_near_duplicates_are_refused_naming_both_files(upload_settings: Settings) -> None:
    original = factory.photo_image(12)
    slightly_different = original.resize((380, 316)).resize(original.size)
    files = [
        ("first.jpg", factory.encode(original)),
        ("other.jpg", factory.make_photo(13)),
        ("again.jpg", factory.encode(slightly_different, quality=80)),
    ]
    batch = sanitize_uploads(files, upload_settings)
    assert len(batch.photos) == 3
    assert [(r.filename, r.reason) for r in batch.rejections] == [
        ("again.jpg", "looks almost the same as first.jpg; keep one and add a different shot")
    ]


def test_distinct_photos_are_not_near_duplicates(upload_settings: Settings) -> None:
    photos = [sanitize_upload(name, data, upload_settings) for name, data in factory.make_photos(8)]
    assert near_duplicates(photos) == []
    assert min(hash_distance(a.perceptual_hash, b.perceptual_hash) for a in photos for b in photos if a is not b) > 4


def test_batch_collects_every_refusal(upload_settings: Settings) -> None:
    files = [
        ("good.jpg", factory.make_photo(14)),
        ("bad.jpg", factory.make_fake_pdf()),
        ("blur.jpg", factory.make_blurry_photo(15)),
    ]
    batch = sanitize_uploads(files, upload_settings)
    assert [photo.original_name for photo in batch.photos] == ["good.jpg"]
    assert sorted(r.filename for r in batch.rejections) == ["bad.jpg", "blur.jpg"]


class CountingFile(io.BytesIO):
    """A file object that records how many bytes were read from it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


def test_spooled_uploads_are_sanitized_and_an_oversized_one_is_never_read(upload_settings: Settings) -> None:
    limit = upload_settings.model_copy(update={"max_photo_bytes": 2 * 1024 * 1024})
    good = CountingFile(factory.make_photo(16))
    oversized = CountingFile(b"\xff\xd8" + b"\x00" * (3 * 1024 * 1024))
    batch = sanitize_uploads([("good.jpg", good), ("huge.jpg", oversized)], limit)
    assert [photo.original_name for photo in batch.photos] == ["good.jpg"]
    assert [str(r) for r in batch.rejections] == ["huge.jpg: 3.0 MB is over the 2.0 MB limit"]
    assert good.bytes_read >= len(good.getvalue())  # decoded from the file object itself
    assert oversized.bytes_read == 0


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(upload_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded_sizes: list[tuple[int, int]] = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self: JpegImagePlugin.JpegImageFile, *args: Any, **kwargs: Any) -> Any:
        result = original_draft(self, *args, **kwargs)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    # Blocks of 10 px keep the picture's edges sharp once the blur check scales it down.
    blocky = factory.photo_image(17, (420, 300)).resize((4200, 3000), Image.Resampling.NEAREST)
    photo = sanitize_upload("big.jpg", factory.encode(blocky), upload_settings)
    # Decoded at 1/2 (both sides stay >= 1024), then resized to the stored maximum. (thumbnail()
    # asks for a draft again, which changes nothing once the pixels are loaded.)
    assert set(decoded_sizes) == {(2100, 1500)}
    assert (photo.width, photo.height) == (MAX_LONG_SIDE, 1463)


def test_sanitized_photos_wait_in_a_spool_that_reads_back_whole(upload_settings: Settings) -> None:
    photo = sanitize_upload("a.jpg", factory.make_photo(18, size=(1600, 1200)), upload_settings)
    data = photo.jpeg_bytes
    assert photo.byte_size == len(data) > 0
    assert photo.jpeg_bytes == data  # reading again gives the same bytes
    assert decode(photo).size == (photo.width, photo.height)


# --- hostile uploads (issue 11): the work bounded before decoding, EXIF that cannot crash -----------


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused_quickly(upload_settings: Settings) -> None:
    bomb = hostile_photos.scan_bomb(4096, 4096, extra_scans=30_000)
    assert len(bomb) < 1_000_000  # under a megabyte, yet decoding it walks 16 megapixels 30,000 times
    started = time.monotonic()
    reason = refusal("slow.jpg", bomb, upload_settings).reason
    assert time.monotonic() - started < 5, "the scans were decoded before the refusal"
    assert f"more than {MAX_JPEG_SCANS} scans" in reason


def test_a_normal_progressive_jpeg_is_accepted(upload_settings: Settings) -> None:
    data = factory.make_photo(30, size=(1600, 1200), progressive=True)
    assert len(hostile_photos.jpeg_scans(data)) == 10  # libjpeg's standard progressive script
    photo = sanitize_upload("progressive.jpg", data, upload_settings)
    assert (photo.width, photo.height) == (1600, 1200)


@pytest.mark.parametrize("block", [1, 5, 4096, SCAN_READ_BLOCK])
@pytest.mark.parametrize(
    "options",
    [
        {"progressive": True},
        {},
        {"progressive": True, "restart_marker_blocks": 1},  # RST markers inside the scans
        {"progressive": True, "icc_profile": b"\xff\xda" * 500, "comment": b"\xff\xda\xff\xd9"},  # markers in metadata
    ],
)
def test_scans_are_counted_whatever_the_read_block(
    block: int, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sanitize_module, "SCAN_READ_BLOCK", block)
    for mode in ("RGB", "L"):
        data = factory.encode(factory.photo_image(31, size=(300, 200)).convert(mode), "JPEG", **options)
        expected = len(hostile_photos.jpeg_scans(data))
        assert jpeg_scan_count(io.BytesIO(data), stop_after=1000) == expected
    assert jpeg_scan_count(io.BytesIO(hostile_photos.scan_bomb(64, 64, 500)), stop_after=100) == 101  # stops early


def test_decode_memory_sets_each_formats_pixel_limit(upload_settings: Settings) -> None:
    # 1200×1000 px: 4.8 MB of decoded RGB(A). A baseline JPEG or an RGBA PNG fits a 6 MB budget; a
    # progressive JPEG needs its 4:4:4 DCT coefficients as well (+7.2 MB), a WebP four copies.
    budget = upload_settings.model_copy(update={"max_decode_bytes": 6_000_000})
    image = factory.photo_image(32, size=(1200, 1000))
    assert sanitize_upload("baseline.jpg", factory.encode(image, "JPEG", subsampling=0), budget).width == 1200
    assert sanitize_upload("alpha.png", factory.encode(image.convert("RGBA"), "PNG"), budget).width == 1200
    progressive = factory.encode(image, "JPEG", progressive=True, subsampling=0)
    assert "at most" in refusal("progressive.jpg", progressive, budget).reason
    reason = refusal("big.webp", factory.encode(image, "WEBP"), budget).reason
    assert reason.startswith("1200×1000 px is more than we can decode as WebP") and "megapixels" in reason


def test_a_decode_over_its_cpu_budget_is_stopped(upload_settings: Settings) -> None:
    no_time = upload_settings.model_copy(update={"max_decode_cpu_seconds": 0.0})
    data = hostile_photos.png_16bit_grey(3000, 3000)  # 9 MP to inflate: far more than no time at all
    assert "too long to decode" in refusal("slow.png", data, no_time).reason


# EXIF a camera never writes: each made sanitize_upload raise (HTTP 500) before, now each is accepted.
_RATIONAL, _ASCII, _SHORT, _UNDEFINED = 5, 2, 3, 7


def _tiff(*entries: tuple[int, int, int, bytes]) -> bytes:
    """A little-endian TIFF header with one IFD of (tag, type, count, 4-byte value) entries."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *entry[:3]) + entry[3] for entry in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00"


ORIENTATION_6 = (0x0112, _SHORT, 1, struct.pack("<HH", 6, 0))
# The first two were found by hand, the others by tests/app/photos/test_sanitize_fuzz.py; each made
# Pillow's exif_transpose fail rewriting the EXIF (TypeError, struct.error, AttributeError).
MALFORMED_EXIF = {
    "text in a rational tag": _tiff(ORIENTATION_6, (0x011A, _ASCII, 4, b"abc\x00")),
    "text in a short tag": _tiff(ORIENTATION_6, (0x0128, _ASCII, 4, b"ab\x00\x00")),
    "bytes in a rational tag": _tiff(ORIENTATION_6, (0x011A, _UNDEFINED, 4, b"\x01\x02\x03\x04")),
    "a rational in a text tag": _tiff(ORIENTATION_6, (0x0110, _RATIONAL, 1, struct.pack("<I", 8))),
}


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("case", sorted(MALFORMED_EXIF))
def test_malformed_exif_is_accepted_and_its_orientation_applied(
    upload_settings: Settings, image_format: str, case: str
) -> None:
    exif = MALFORMED_EXIF[case]
    if image_format != "PNG":
        exif = b"Exif\0\0" + exif  # the APP1 / WebP EXIF chunk's header; PNG's eXIf chunk has none
    data = factory.encode(factory.photo_image(33), image_format, exif=exif)
    photo = sanitize_upload(f"odd.{image_format.lower()}", data, upload_settings)
    assert (photo.width, photo.height) == factory.DEFAULT_SIZE[::-1]  # orientation 6 was still applied
    assert not decode(photo).getexif()


def test_unreadable_exif_in_a_png_is_ignored_not_refused(upload_settings: Settings) -> None:
    data = factory.encode(factory.photo_image(34), "PNG", exif=b"\x00\x01\x02 not a TIFF header")
    assert sanitize_upload("odd.png", data, upload_settings).width == factory.DEFAULT_SIZE[0]


@pytest.mark.parametrize(
    "entry",
    [
        (0x0112, 11, 1, struct.pack("<f", 6.0)),  # a float
        (0x0112, _ASCII, 2, b"6\x00\x00\x00"),  # text
        (0x0112, _SHORT, 1, struct.pack("<HH", 9, 0)),  # out of range
        (0x0112, _SHORT, 1, struct.pack("<HH", 0, 0)),
    ],
)
def test_an_orientation_that_is_not_one_of_the_eight_is_ignored(
    upload_settings: Settings, entry: tuple[int, int, int, bytes]
) -> None:
    data = factory.encode(factory.photo_image(35), "JPEG", exif=b"Exif\0\0" + _tiff(entry))
    photo = sanitize_upload("odd.jpg", data, upload_settings)
    assert (photo.width, photo.height) == factory.DEFAULT_SIZE


def test_a_png_with_a_broken_chunk_after_its_pixels_is_refused_not_an_error(upload_settings: Settings) -> None:
    # Found by tests/app/photos/test_sanitize_fuzz.py: an iCCP chunk of one NUL byte after the image
    # data made Pillow raise IndexError while finishing the load (HTTP 500 before).
    png = factory.encode(factory.photo_image(36), "PNG")
    chunk = struct.pack(">I", 1) + b"iCCP\x00" + struct.pack(">I", zlib.crc32(b"iCCP\x00"))
    data = png[:-12] + chunk + png[-12:]
    assert "damaged" in refusal("odd.png", data, upload_settings).reason
