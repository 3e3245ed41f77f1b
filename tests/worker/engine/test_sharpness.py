"""The blur measure: a sharp subject anywhere in the frame passes; a picture with no sharp part does not."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from tests.app.photo_factory import photo_image
from worker.engine.sharpness import BLUR_THRESHOLD, sharpness


def plain_wall(size: tuple[int, int] = (1200, 900)) -> Image.Image:
    """A smoothly lit painted wall, as a phone's JPEG leaves it: a gradient with no texture."""
    width, height = size
    shade = np.linspace(150, 190, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    return Image.fromarray((shade * np.array([1.0, 0.95, 0.85], np.float32)).astype(np.uint8))


def furry_subject(size: tuple[int, int] = (380, 300), seed: int = 0) -> Image.Image:
    """Low-contrast fine detail, like a dog's fur in soft light: sharp, but faint."""
    rng = np.random.default_rng(seed)
    width, height = size
    strands = np.kron(rng.normal(0, 8, size=(height // 2, width // 2)), np.ones((2, 2)))  # 2 px strands
    fur = 120 + strands[..., None] * np.ones(3)
    return Image.fromarray(np.clip(fur, 0, 255).astype(np.uint8))


def smeared(image: Image.Image, length: int) -> Image.Image:
    """Horizontal motion blur: each pixel the mean of ``length`` pixels along its row."""
    pixels = np.asarray(image, np.float32)
    kernel = np.ones(length, np.float32) / length
    rows = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), 1, pixels)
    return Image.fromarray(np.clip(rows, 0, 255).astype(np.uint8))


def test_a_sharp_subject_small_on_a_plain_wall_passes() -> None:
    # The old whole-picture Laplacian scored this photo 34 (threshold 40) and refused it as blurred.
    wall = plain_wall()
    wall.paste(furry_subject(), (410, 300))  # a tenth of the frame
    assert sharpness(wall) >= BLUR_THRESHOLD


def test_a_sharp_subject_in_front_of_a_soft_background_passes() -> None:
    photo = photo_image(3, (800, 600))
    portrait = photo.filter(ImageFilter.GaussianBlur(12))
    portrait.paste(photo.crop((300, 200, 500, 400)), (300, 200))
    assert sharpness(portrait) >= BLUR_THRESHOLD


def test_a_photo_blurred_all_over_is_refused() -> None:
    assert sharpness(photo_image(4, (800, 600)).filter(ImageFilter.GaussianBlur(6))) < BLUR_THRESHOLD


def test_a_photo_smeared_by_motion_is_refused() -> None:
    # Motion leaves the edges across the movement sharp, so the whole-picture measure passed it.
    photo = photo_image(5, (800, 600))
    assert sharpness(photo) >= BLUR_THRESHOLD
    assert sharpness(smeared(photo, 12)) < BLUR_THRESHOLD  # the old measure: 51, passed
