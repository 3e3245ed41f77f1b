"""Tests for photo checking, subject-aware cropping and preparation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tests.worker.engine.conftest import make_subject_photo
from worker.engine import photos
from worker.engine.errors import EngineInputError
from worker.engine.photos import (
    check_photo,
    dhash,
    face_crop_box,
    hash_distance,
    image_problems,
    load_photo,
    prepare_photos,
    saliency_crop_box,
)
from worker.engine.sharpness import BLUR_THRESHOLD


def _exif_rotated_jpeg(path: Path) -> Path:
    """A 160x120 JPEG, red left half and blue right half, tagged Orientation=6 (rotate 90° clockwise)."""
    pixels = np.zeros((120, 160, 3), dtype=np.uint8)
    pixels[:, :80] = (220, 20, 20)
    pixels[:, 80:] = (20, 20, 220)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    loaded = load_photo(_exif_rotated_jpeg(tmp_path / "rotated.jpg"))
    assert loaded.mode == "RGB"
    assert loaded.size == (120, 160)  # portrait once turned upright
    top = np.asarray(loaded)[5, 60]
    bottom = np.asarray(loaded)[-5, 60]
    assert top[0] > 150 and top[2] < 80  # the stored left (red) half is now on top
    assert bottom[2] > 150 and bottom[0] < 80


def test_prepare_writes_squares_of_the_resolution(subject_photos: list[Path], tmp_path: Path) -> None:
    prepared = prepare_photos(subject_photos, tmp_path / "out", resolution=64, subject_kind="pet")
    assert prepared.problems == []
    assert len(prepared.images) == 4
    for path in prepared.images:
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_prepare_reports_and_excludes_problem_photos(subject_photos: list[Path], tmp_path: Path) -> None:
    folder = subject_photos[0].parent
    blurred = folder / "blurred.jpg"
    Image.open(make_subject_photo(folder / "sharp.jpg", seed=20)).filter(ImageFilter.GaussianBlur(3)).save(blurred)
    (folder / "sharp.jpg").unlink()
    small = folder / "small.jpg"
    Image.open(subject_photos[1]).resize((40, 30)).save(small)
    duplicate = folder / "duplicate.png"
    Image.open(subject_photos[0]).resize((150, 112)).save(duplicate)
    broken = folder / "broken.jpg"
    broken.write_text("not an image")

    prepared = prepare_photos(
        [*subject_photos, blurred, small, duplicate, broken], tmp_path / "out", resolution=64, subject_kind="pet"
    )
    assert len(prepared.images) == 4
    reasons = {problem.name: problem.reason for problem in prepared.problems}
    assert set(reasons) == {"blurred.jpg", "small.jpg", "duplicate.png", "broken.jpg"}
    assert reasons["blurred.jpg"].startswith("blurry: no part is in sharp focus (sharpness ")
    assert f"< {BLUR_THRESHOLD:.0f}" in reasons["blurred.jpg"]
    assert reasons["small.jpg"].startswith("too small (40x30")
    assert reasons["duplicate.png"].startswith("near-duplicate of photo0.jpg")
    assert reasons["broken.jpg"].startswith("unreadable")
    assert str(prepared.problems[0]).startswith(f"{prepared.problems[0].name}: ")


def test_distinct_fixture_photos_are_not_duplicates(subject_photos: list[Path]) -> None:
    hashes = [dhash(load_photo(path)) for path in subject_photos]
    distances = [hash_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) > photos.DUPLICATE_MAX_BITS


def test_no_photos_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(EngineInputError, match="no photos given"):
        prepare_photos([], tmp_path, resolution=64, subject_kind="pet")


def test_no_usable_photo_names_each_file(tmp_path: Path) -> None:
    broken = tmp_path / "a.jpg"
    broken.write_bytes(b"\x00" * 100)
    tiny = tmp_path / "b.png"
    Image.new("RGB", (10, 10)).save(tiny)
    with pytest.raises(EngineInputError, match=r"no usable photo among 2: a\.jpg: unreadable.*b\.png: too small"):
        prepare_photos([broken, tiny], tmp_path / "out", resolution=64, subject_kind="pet")


@pytest.mark.parametrize(("resolution", "kind"), [(60, "pet"), (64, "robot")])
def test_bad_arguments_are_input_errors(subject_photos: list[Path], tmp_path: Path, resolution: int, kind: str) -> None:
    with pytest.raises(EngineInputError):
        prepare_photos(subject_photos, tmp_path / "out", resolution=resolution, subject_kind=kind)  # type: ignore[arg-type]


def test_check_photo_and_image_problems(subject_photos: list[Path], tmp_path: Path) -> None:
    assert check_photo(subject_photos[0], resolution=64) == []
    assert image_problems(load_photo(subject_photos[0]), resolution=512)[0].startswith("too small (160x120")
    missing = check_photo(tmp_path / "missing.jpg", resolution=64)
    assert [p.name for p in missing] == ["missing.jpg"] and missing[0].reason.startswith("unreadable")


def test_face_crop_centres_the_face_with_head_room() -> None:
    face = (150, 200, 250, 300)
    left, top, right, bottom = face_crop_box((400, 600), face)
    assert right - left == bottom - top == 260
    assert (left + right) / 2 == pytest.approx(200, abs=1)
    assert top == 130  # 0.7 face heights of room above the face
    assert left <= face[0] and top <= face[1] and right >= face[2] and bottom >= face[3]


def test_face_crop_stays_inside_the_image_and_keeps_the_face() -> None:
    cases = [((300, 200), (10, 5, 110, 105)), ((200, 800), (120, 650, 190, 720)), ((120, 120), (0, 0, 120, 120))]
    for size, face in cases:
        left, top, right, bottom = face_crop_box(size, face)
        assert right - left == bottom - top
        assert left >= 0 and top >= 0 and right <= size[0] and bottom <= size[1]
        assert left <= face[0] and top <= face[1] and right >= face[2] and bottom >= face[3]


def test_saliency_crop_keeps_an_off_centre_subject_whole() -> None:
    pixels = np.full((100, 300, 3), 90, dtype=np.uint8)
    pixels[30:70, 230:290] = (230, 160, 40)  # the subject, far right
    left, top, right, bottom = saliency_crop_box(Image.fromarray(pixels))
    assert (top, bottom) == (0, 100)
    assert right - left == 100
    assert left <= 230 and right >= 290


def test_saliency_crop_of_a_tall_image_slides_vertically() -> None:
    pixels = np.full((300, 100, 3), 200, dtype=np.uint8)
    pixels[10:60, 20:80] = (20, 60, 200)
    left, top, right, bottom = saliency_crop_box(Image.fromarray(pixels))
    assert (left, right) == (0, 100) and top <= 10 and bottom >= 60


def test_person_photos_are_cropped_on_the_largest_face(monkeypatch, subject_photos: list[Path], tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    def fake_faces(image: Image.Image) -> list[tuple[int, int, int, int]]:
        seen.append(image.size)
        return [(5, 5, 20, 20), (100, 30, 140, 70)]

    monkeypatch.setattr(photos, "detect_faces", fake_faces)
    prepared = prepare_photos(subject_photos[:2], tmp_path / "out", resolution=64, subject_kind="person")
    assert prepared.faces_found == 2 and len(seen) == 2
    square, used_face = photos.crop_square(load_photo(subject_photos[0]), "person")
    assert used_face and square.size == (104, 104)


def _drawn_face(size: tuple[int, int], centre: tuple[int, int], scale: float) -> Image.Image:
    """A flat cartoon face (skin oval, hair, eyes, brows, nose, mouth) that the Haar cascade detects."""
    image = Image.new("RGB", size, (90, 110, 140))
    draw = ImageDraw.Draw(image)
    cx, cy, s = centre[0], centre[1], scale
    draw.ellipse([cx - 60 * s, cy - 80 * s, cx + 60 * s, cy + 80 * s], fill=(225, 185, 160))
    draw.chord([cx - 60 * s - 5, cy - 80 * s - 15, cx + 60 * s + 5, cy - 20 * s], 180, 360, fill=(60, 40, 30))
    for side in (-1, 1):
        x, y = cx + side * 27 * s, cy - 15 * s
        draw.ellipse([x - 14 * s, y - 6 * s, x + 14 * s, y + 6 * s], fill=(250, 250, 250))
        draw.ellipse([x - 6 * s, y - 6 * s, x + 6 * s, y + 6 * s], fill=(30, 20, 20))
        draw.line([x - 16 * s, y - 16 * s, x + 16 * s, y - 18 * s], fill=(50, 35, 30), width=int(5 * s))
    draw.polygon([(cx, cy - 5 * s), (cx - 10 * s, cy + 25 * s), (cx + 10 * s, cy + 25 * s)], fill=(200, 150, 130))
    draw.ellipse([cx - 25 * s, cy + 42 * s, cx + 25 * s, cy + 55 * s], fill=(150, 60, 60))
    return image.filter(ImageFilter.GaussianBlur(2))


def test_a_detected_face_off_centre_stays_whole_in_the_crop() -> None:
    # The face spans x 572-788 of a 900 px wide photo: a centre crop (150-750) would cut it.
    photo = _drawn_face((900, 600), centre=(680, 300), scale=1.8)
    faces = photos.detect_faces(photo)
    assert len(faces) == 1
    left, top, right, bottom = faces[0]
    assert left < 680 < right and top < 300 < bottom
    assert face_crop_box(photo.size, faces[0]) == (300, 0, 900, 600)
    square, used_face = photos.crop_square(photo, "person")
    assert used_face and square.size == (600, 600)


def test_face_detector_runs_on_a_photo_without_faces(subject_photos: list[Path]) -> None:
    assert photos.detect_faces(load_photo(subject_photos[0])) == []


def test_a_real_face_is_framed_on_its_eyes_at_a_stable_height() -> None:
    from tests import face_photos
    from worker.engine.faces import face_model

    heights = []
    for portrait in face_photos.variations(face_photos.hopper())[:3]:
        wide = Image.new("RGB", (portrait.width * 2, portrait.height + 200), (128, 128, 128))
        wide.paste(portrait, (portrait.width, 200))  # the face far right of a wide photo, room above
        square, used_face = photos.crop_square(wide, "person")
        assert used_face and square.width == square.height
        (left_eye, right_eye) = face_model().detect(square)[0].eyes  # the face is whole in the crop
        heights.append((left_eye[1] + right_eye[1]) / 2 / square.height)
    assert all(abs(height - photos.EYE_HEIGHT) < 0.05 for height in heights), heights


def test_the_landmark_frame_stays_inside_the_image() -> None:
    eyes = ((180.0, 60.0), (220.0, 60.0))
    box = photos.landmark_crop_box((300, 200), eyes, (160, 30, 240, 110))
    assert box == (100, 0, 300, 200)  # 6.5 x 40 px wanted, 200 px possible, slid left and up
    assert photos.landmark_crop_box((1000, 1000), eyes, (160, 30, 240, 110)) == (70, 0, 330, 260)
